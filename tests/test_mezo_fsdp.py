"""MeZO under FSDP2 (2 CPU processes, gloo) equals a 1-process run with the same seeds."""

from __future__ import annotations

from lightning_memopt.testing import run_distributed
from lightning_memopt.testing.multiproc import assert_ranks_equal_one_and_all_moved
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
