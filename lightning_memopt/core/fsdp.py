"""FSDP2 helpers shared by every method: local shards, global offsets, reshard, all-reduces, sharded state.

FSDP2 (``fully_shard``) shards each parameter on dim 0 as a DTensor. Outside forward, non-root groups hold only their
local shard; the root group stays unsharded after a forward until ``reshard()`` is called, so any in-place write to
shards must call :func:`reshard_all` first or the next forward reuses stale unsharded tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_memopt._torch_shim import local_shape_and_offset
from lightning_memopt.core.zero3 import full_shape, gathered_copy, has_zero3, is_zero3, partition, release_all


def is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4
        return False
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view that can be written in place), the flat partition of a DeepSpeed ZeRO-3
    parameter (:mod:`lightning_memopt.core.zero3`), or the tensor itself."""
    if is_dtensor(t):
        return t.to_local()
    if is_zero3(t):
        return partition(t)[0]
    return t


def full_ndim(t: Tensor) -> int:
    """The number of dimensions of the whole parameter (a ZeRO-3 parameter's ``.ndim`` is 1 outside forward)."""
    return len(full_shape(t))


def full(t: Tensor) -> Tensor:
    """The whole tensor (all-gathered for a DTensor or a ZeRO-3 parameter: a collective on every rank), or the
    tensor itself."""
    if is_zero3(t):
        return gathered_copy(t)
    return t.full_tensor() if is_dtensor(t) else t


def global_offset(t: Tensor) -> tuple[int, tuple[int, ...]]:
    """(flat element offset of the local shard's first element in the full tensor, full shape).

    FSDP2 shards on dim 0, so the local shard is a contiguous run of full rows and one offset describes it.
    """
    if is_zero3(t):
        return partition(t)[1], full_shape(t)
    if not is_dtensor(t):
        return 0, tuple(t.shape)
    shape = tuple(t.shape)
    _, offsets = local_shape_and_offset(shape, t.device_mesh, t.placements)
    row = 1
    for s in shape[1:]:
        row *= s
    if any(o != 0 for o in offsets[1:]):
        raise NotImplementedError("Only dim-0 sharding (FSDP2's default) is supported.")
    return int(offsets[0]) * row, shape


def shard_group(p: Tensor) -> Optional[dist.ProcessGroup]:
    """The process group ``p`` is sharded over (its mesh dimension with a ``Shard`` placement); None when it is
    not a DTensor or not sharded over more than one rank. Statistics that need every row all-reduce over it."""
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Shard

    dims = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    if not dims:
        return None
    if len(dims) > 1:
        raise NotImplementedError("Parameters sharded over more than one mesh dimension are not supported.")
    mesh = p.device_mesh
    if mesh.size(dims[0]) == 1:
        return None
    return mesh.get_group(dims[0]) if mesh.ndim > 1 else mesh.get_group()


def piece_group(p: Tensor) -> tuple[bool, Optional[dist.ProcessGroup]]:
    """(whether :func:`local` of ``p`` is one rank's piece of it, the group whose ranks' pieces make it whole): an
    FSDP2 shard over its shard group (a shard dimension of one rank holds the whole), a ZeRO-3 partition over its
    partition group (None: the default group), else the whole tensor."""
    if is_dtensor(p):
        group = shard_group(p)
        return group is not None, group
    if is_zero3(p):
        return True, getattr(p, "ds_process_group", None)
    return False, None


def sharded_zeros(p: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Zero state of the GLOBAL ``shape`` whose rows follow ``p``'s: a DTensor sharded like ``p`` under FSDP2 (so
    distributed checkpoints gather and re-shard it like the weights), a plain tensor otherwise. ``shape[0]`` must be
    ``p``'s number of rows."""
    w = local(p)
    if not is_dtensor(p):
        return torch.zeros(shape, dtype=dtype, device=w.device)
    from torch.distributed.tensor import DTensor

    t = torch.zeros((w.shape[0], *shape[1:]), dtype=dtype, device=w.device)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)


def fsdp_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def reshard_all(module: torch.nn.Module) -> None:
    """Reshard every FSDP2 group so that shard writes are seen by the next forward (the root stays unsharded); under
    DeepSpeed ZeRO-3, partition again the parameters it left gathered."""
    for m in fsdp_modules(module):
        m.reshard()
    if has_zero3(module):
        release_all(module)


def is_fsdp2(module: torch.nn.Module) -> bool:
    return bool(fsdp_modules(module))


def _world(group: Optional[dist.ProcessGroup]) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_reduce_(x: Tensor, group: Optional[dist.ProcessGroup] = None, op: str = "sum") -> Tensor:
    """In place over ``group`` (``"sum"``, ``"mean"``, ``"min"`` or ``"max"``); a no-op without a process group."""
    n = _world(group)
    if n > 1:
        red = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(x, op=red[op], group=group)
        if op == "mean":
            x /= n
    return x


def all_reduce_mean(x: Tensor, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """The mean over data-parallel ranks, in a new tensor (``x`` is left as it is)."""
    return all_reduce_(x.clone(), group, "mean") if _world(group) > 1 else x


def all_reduce_sum(x: Tensor, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """The sum over data-parallel ranks, in a new tensor (``x`` is left as it is)."""
    return all_reduce_(x.clone(), group, "sum") if _world(group) > 1 else x
