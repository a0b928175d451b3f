"""MeZO under FSDP2 (2 CPU processes, gloo) equals a 1-process run with the same seeds."""

from __future__ import annotations

import importlib.util

import lightning.pytorch as pl
import pytest
import torch

from lightning_memopt.mezo.trajectory import replay_trajectory
from lightning_memopt.testing import run_distributed, tiny_model
from lightning_memopt.testing.multiproc import assert_ranks_equal_one_and_all_moved
from lightning_memopt.testing.tiny import full_state
from lightning_memopt.testing.workers import fit_tiny

SPEC = {
    "class_path": "lightning_memopt.mezo.callback.MeZO",
    "init_args": {"eps": 1e-3, "lr": 2e-3, "variant": "momentum", "window": 3, "weight_decay": 0.1},
}
ARGS = {"steps": 6, "global_batch": 16, "callback": SPEC}  # classification: per-example mean, shards average exactly


def test_fsdp2_two_processes_equal_one():
    one = fit_tiny(world_size=1, **ARGS)
    two = run_distributed("lightning_memopt.testing.workers:fit_tiny", world_size=2, **ARGS)
    assert one["global_step"] == two[0]["global_step"] == 6
    init = fit_tiny(world_size=1, steps=0, global_batch=16)["state"]
    assert_ranks_equal_one_and_all_moved(one, two, init)


SHARDINGS = {
    "fsdp2": {},
    "hsdp_replicas": {"strategy_kwargs": {"hsdp": True, "shard_size": 1}},  # whole weights on each rank: not summed
    "zero3": {"strategy": "zero3"},
}


@pytest.mark.parametrize("sharding", list(SHARDINGS))
def test_sharded_trajectory_names_its_base_and_replays_onto_the_unsharded_model(sharding):
    """Recorded on 2 processes, the trajectory's base fingerprint is the whole model's (each rank's pieces summed
    and all-reduced where they are pieces), so a replay onto the unsharded base checks it and rebuilds the
    2-process weights; a wrong base is refused."""
    if sharding == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")
    spec = {**SPEC, "init_args": {**SPEC["init_args"], "record_trajectory": True}}
    two = run_distributed("lightning_memopt.testing.workers:fit_tiny", world_size=2, steps=4, global_batch=16,
                          callback=spec, inspect="lightning_memopt.testing.workers:mezo_trajectory",
                          **SHARDINGS[sharding])
    one = fit_tiny(world_size=1, steps=4, global_batch=16, callback=spec,
                   inspect="lightning_memopt.testing.workers:mezo_trajectory")
    fp = [r["trajectory"]["base_fingerprint"] for r in (*two, one)]
    assert fp[0] == fp[1] and fp[0] == pytest.approx(fp[2], rel=1e-9)
    pl.seed_everything(0, verbose=False)
    base = tiny_model()
    replay_trajectory(base, two[0]["trajectory"])
    for name, w in full_state(base).items():
        torch.testing.assert_close(w, two[0]["state"][name], rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="do not match the trajectory's base"):
        replay_trajectory(base, two[0]["trajectory"])  # now the trained weights, not the base
