"""Lazy import of this package's Triton kernel modules: CPU wheels have no Triton, and the torch paths compute the
same numbers, so a module that does not import is None (tried once)."""

from __future__ import annotations

import importlib
from types import ModuleType

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
