"""Lazy import of this package's Triton kernel modules: CPU wheels have no Triton, and the torch paths compute the
same numbers, so a module that does not import is None (tried once)."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

_MODULES: dict[str, ModuleType | None] = {}


def kernels(name: str) -> ModuleType | None:
    """``lightning_memopt.core.<name>`` (or the module ``name`` where it has a dot) if it imports (Triton present),
    else None."""
    if name not in _MODULES:
        try:
            _MODULES[name] = importlib.import_module(name if "." in name else f"lightning_memopt.core.{name}")
        except Exception:  # noqa: BLE001 - no usable Triton: the torch fallback gives the same results
            _MODULES[name] = None
    return _MODULES[name]


def ok_flag(ok: Tensor | None, like: Tensor) -> Tensor:
    """The skip flag as the kernels read it: bytes on ``like``'s device, a free view where it is a bool there already
    (no cast kernel per launch); ``like`` stands in when there is none (the kernels' HAS_OK=False ignores it)."""
    if ok is None:
        return like
    if ok.dtype == torch.bool and ok.device == like.device:
        return ok.view(torch.uint8)
    return ok.to(device=like.device, dtype=torch.uint8)
