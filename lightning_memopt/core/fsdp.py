"""FSDP2 helpers shared by every method: local shards, global offsets, reshard, scalar all-reduce.

FSDP2 (``fully_shard``) shards each parameter on dim 0 as a DTensor. Outside forward, non-root groups hold only their
local shard; the root group stays unsharded after a forward until ``reshard()`` is called, so any in-place write to
shards must call :func:`reshard_all` first or the next forward reuses stale unsharded tensors.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor


def is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4
        return False
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view that can be written in place), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def global_offset(t: Tensor) -> tuple[int, tuple[int, ...]]:
    """(flat element offset of the local shard's first element in the full tensor, full shape).

    FSDP2 shards on dim 0, so the local shard is a contiguous run of full rows and one offset describes it.
    """
    if not is_dtensor(t):
        return 0, tuple(t.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape = tuple(t.shape)
    _, offsets = compute_local_shape_and_global_offset(shape, t.device_mesh, t.placements)
    row = 1
    for s in shape[1:]:
        row *= s
    if any(o != 0 for o in offsets[1:]):
        raise NotImplementedError("Only dim-0 sharding (FSDP2's default) is supported.")
    return int(offsets[0]) * row, shape


def fsdp_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def reshard_all(module: torch.nn.Module) -> None:
    """Reshard every FSDP2 group so that shard writes are seen by the next forward (the root stays unsharded)."""
    for m in fsdp_modules(module):
        m.reshard()


def is_fsdp2(module: torch.nn.Module) -> bool:
    return bool(fsdp_modules(module))


def all_reduce_mean(x: Tensor, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """Average a tensor over data-parallel ranks (no-op without an initialised process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        x /= dist.get_world_size(group)
    return x


def all_reduce_sum(x: Tensor, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def local_params(params: Iterable[Tensor]) -> list[Tensor]:
    return [local(p) for p in params]
