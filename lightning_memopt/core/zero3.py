"""DeepSpeed ZeRO-3 helpers: partitioned parameters, their global offsets, release, gradient averaging.

Under ZeRO-3 (:class:`~lightning_memopt.strategies.ZeRO3Strategy`) each parameter ``p`` keeps only its flat partition
``p.ds_tensor`` (``p.data`` is empty) except while a module using it runs, when DeepSpeed all-gathers it. Rank ``r``
of the partition group holds elements ``[r·k, (r+1)·k)`` of the flattened parameter (``k`` =
``p.ds_tensor.ds_numel``; the last partition is padded), so like FSDP2's row shards one global offset describes a
partition, and the methods keyed by global element index (MeZO's directions) do not depend on the world size.

These helpers need no DeepSpeed import: a parameter is ZeRO-3 partitioned when it carries ``ds_tensor``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_zero3(p: Any) -> bool:
    return isinstance(p, Tensor) and hasattr(p, "ds_tensor") and hasattr(p, "ds_shape")


def full_shape(p: Tensor) -> tuple[int, ...]:
    """The parameter's shape (ZeRO-3's ``ds_shape``; outside a forward ``p.shape`` is ``(0,)`` there)."""
    return tuple(p.ds_shape) if is_zero3(p) else tuple(p.shape)


def _group(p: Tensor) -> Any:
    return getattr(p, "ds_process_group", None)


def partition(p: Tensor) -> tuple[Tensor, int]:
    """(this rank's partition without its padding, as a flat view that can be written in place; the flat offset of
    its first element in the whole parameter)."""
    part = p.ds_tensor
    k = int(getattr(part, "ds_numel", part.numel()))
    rank = dist.get_rank(group=_group(p)) if dist.is_available() and dist.is_initialized() else 0
    start = rank * k
    n = max(0, min(k, int(p.ds_numel) - start))
    return part.view(-1).narrow(0, 0, n), start


RELEASE_ATTR = "_memopt_zero3_release"  # set on the module by ZeRO3Strategy: DeepSpeed's release of every parameter


def release_all(module: torch.nn.Module) -> None:
    """Partition again every parameter DeepSpeed left gathered, so that writes to partitions are seen by the next
    forward (the counterpart of FSDP2's ``reshard``). A backward leaves the first module's weights gathered (its
    input needs no gradient, so DeepSpeed's release hook never fires): they would be reused, stale, otherwise."""
    release = module.__dict__.get(RELEASE_ATTR)
    if release is not None:
        release()
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    gathered = [p for p in module.parameters() if is_zero3(p) and p.ds_status == ZeroParamStatus.AVAILABLE]
    for p in gathered:
        p.ds_active_sub_modules.clear()
    if gathered:
        gathered[0].partition(gathered)


def average_grad_(p: Tensor) -> Tensor:
    """All-reduce ``p.grad`` (the whole gradient, as autograd left it on this rank) to its mean over the
    data-parallel ranks, in place."""
    g = p.grad
    if dist.is_available() and dist.is_initialized():
        n = dist.get_world_size(_group(p))
        if n > 1:
            dist.all_reduce(g, group=_group(p))
            g.div_(n)
    return g


def gathered_copy(p: Tensor) -> Tensor:
    """A copy of the whole parameter (all-gathered: a collective on every rank of its partition group)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
        return p.data.detach().clone()


def has_zero3(module: torch.nn.Module) -> bool:
    return any(is_zero3(p) for p in module.parameters())
