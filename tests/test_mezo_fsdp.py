"""MeZO under FSDP2 (2 CPU processes, gloo) equals a 1-process run with the same seeds."""

from __future__ import annotations

import torch

from lightning_memopt.testing import run_distributed
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
    moved = 0
    for k, v in one["state"].items():
        for rank in range(2):
            torch.testing.assert_close(two[rank]["state"][k], v, rtol=1e-4, atol=1e-5)
        moved += int(not torch.equal(v, init[k]))
    assert moved == len(init)  # every parameter was updated (the root group's too: embeddings, norm, head)
