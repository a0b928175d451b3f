"""Memory accounting shared by :class:`~lightning_memopt.callbacks.memory_report.MemoryReport` and ``benchmarks/``.

Tensor sizes are counted from the tensors themselves (the local shard of a DTensor under FSDP2, each storage once).
Peaks come from the CUDA caching allocator (``max_memory_allocated``) or, on CPU, from the process resident set
size (RSS), whose high-water mark Linux lets us reset.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from lightning_memopt.core.fsdp import local

GIB = float(2**30)


def _storage_key(t: Tensor) -> tuple[str, int]:
    try:
        return (str(t.device), t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # e.g. meta or wrapper tensors without a storage
        return (str(t.device), id(t))


def tensor_bytes(tensors: Iterable[Tensor], seen: Optional[set] = None, device: Optional[torch.device] = None) -> int:
    """Bytes held by ``tensors``: local shards of DTensors, each storage counted once (tied weights, views); with
    ``device``, only the tensors on it."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = local(t)
        if t.device.type == "meta" or (device is not None and t.device != device):
            continue
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        try:
            total += t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            total += t.numel() * t.element_size()
    return total


def param_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters (local shards under FSDP2)."""
    return tensor_bytes(p for p in module.parameters())


def grad_bytes(module: torch.nn.Module) -> int:
    """Bytes of the ``.grad`` tensors that currently exist."""
    return tensor_bytes(p.grad for p in module.parameters() if p.grad is not None)


def walk_tensors(obj: Any) -> Iterable[Tensor]:
    """The tensors in ``obj``, looking inside dicts, lists and tuples (not into other objects)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from walk_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from walk_tensors(v)


def optimizer_state_bytes(optimizers: Iterable[torch.optim.Optimizer], device: Optional[torch.device] = None) -> int:
    """Bytes of tensors in the optimizers' ``state`` (a :class:`HolderOptimizer`'s method state included).

    A holder's wrapped optimizer is counted too, and so is the state its method keeps outside it (the owner's
    ``state_tensors()``: DFOLoRA's search state and adapters); tensors shared with other state are counted once.
    With ``device``, only the state on it (DFOLoRA parks idle layers' CMA-ES state on the host).
    """
    seen: set = set()
    total = 0
    for opt in optimizers:
        for o in (opt, getattr(opt, "wrapped", None)):
            if o is not None:
                total += tensor_bytes(walk_tensors(dict(o.state)), seen, device)
        owner_tensors = getattr(getattr(opt, "owner", None), "state_tensors", None)
        if owner_tensors is not None:
            total += tensor_bytes(owner_tensors(), seen, device)
    return total


# ---- process-level peaks -------------------------------------------------------------------------------------------
_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _status_kib(field: str) -> Optional[int]:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """The process's resident set size now."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The process's RSS high-water mark (since start, or since :func:`reset_peak_rss` where that works)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); False where that is impossible."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_bytes(device: torch.device) -> int:
    """Peak allocated bytes on a CUDA device, or the process's peak RSS otherwise."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


@dataclass
class MemoryBreakdown:
    """Peak memory and its parts, in bytes. ``source`` says how ``peak`` was measured."""

    peak: int
    params: int
    grads: int
    optimizer_state: int
    activations_other: int
    source: str

    @classmethod
    def from_parts(cls, peak: int, params: int, grads: int, optimizer_state: int, source: str) -> "MemoryBreakdown":
        """Activations/other is what the peak leaves after the counted parts (never below zero)."""
        rest = max(0, peak - params - grads - optimizer_state)
        return cls(peak, params, grads, optimizer_state, rest, source)

    def gib(self) -> dict[str, float]:
        return {k: v / GIB for k, v in asdict(self).items() if k != "source"}

    def as_metrics(self, prefix: str = "mem/") -> dict[str, float]:
        """``{"mem/peak_gib": ..., "mem/params_gib": ..., ...}``"""
        return {f"{prefix}{k}_gib": v for k, v in self.gib().items()}

