"""Pins the private torch API used through lightning_memopt._torch_shim and the holder's optimizer bookkeeping.

If a torch upgrade moves one of these, this file fails first (and alone).
"""

from __future__ import annotations

import warnings

import torch

from lightning_memopt import _torch_shim
from lightning_memopt.core.holder import HolderOptimizer


def _holder() -> tuple[torch.optim.Optimizer, HolderOptimizer]:
    p = torch.nn.Parameter(torch.zeros(3))
    base = torch.optim.AdamW([p], lr=0.1)
    return base, HolderOptimizer(base)


def test_holder_has_every_attribute_optimizer_init_sets():
    real = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    _, holder = _holder()
    missing = set(vars(real)) - set(vars(holder))
    assert not missing, missing  # torch's own __init__ made them: no hand-set privates to drift


def test_holder_step_hooks_and_state_dict_hooks_run():
    base, holder = _holder()
    seen = []
    holder.register_step_pre_hook(lambda opt, args, kwargs: seen.append("pre"))
    holder.register_step_post_hook(lambda opt, args, kwargs: seen.append("post"))
    holder.register_state_dict_pre_hook(lambda opt: seen.append("sd"))
    holder.step()
    holder.state_dict()
    assert seen == ["pre", "post", "sd"]
    assert holder.param_groups is base.param_groups


def test_mark_stepped_silences_the_scheduler_order_warning():
    base, holder = _holder()
    sched = torch.optim.lr_scheduler.LambdaLR(base, lambda s: 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Detected call of `lr_scheduler.step()` before `optimizer.step()`"
        holder.step()
        sched.step()
    assert base.param_groups[0]["lr"] == 0.05


def test_local_shape_and_offset_of_a_dim0_shard():
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        shape, offset = _torch_shim.local_shape_and_offset((6, 4), mesh, [Shard(0)])
        assert tuple(shape) == (6, 4) and tuple(offset) == (0, 0)
    finally:
        dist.destroy_process_group()
