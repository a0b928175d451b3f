"""GaLore under FSDP2 on 2 CPU processes: local row shards projected with a shared right basis from all-reduced
sketches equal a 1-process run with the same projection type."""

from __future__ import annotations

import pytest

from lightning_memopt.testing import run_distributed
from lightning_memopt.testing.workers import fit_tiny

SPEC = {
    "class_path": "lightning_memopt.galore.callback.GaLore",
    "init_args": {"rank": 8, "update_proj_gap": 2, "proj_type": "right"},
}


def test_two_process_fsdp2_equals_one_process():
    kw = {"steps": 5, "global_batch": 16, "callback": SPEC, "model_kwargs": {"weight_decay": 0.01}}
    ranks = run_distributed("lightning_memopt.testing.workers:fit_tiny", world_size=2, **kw)
    single = fit_tiny(world_size=1, **kw)
    assert ranks[0]["global_step"] == single["global_step"] == 5
    for name, full in single["state"].items():
        for r in ranks:
            assert (r["state"][name] - full).abs().max().item() < 1e-5, name


def test_fsdp2_refuses_a_left_projection():
    spec = {**SPEC, "init_args": {**SPEC["init_args"], "proj_type": "std"}}
    with pytest.raises(RuntimeError, match="proj_type='right'"):
        run_distributed(
            "lightning_memopt.testing.workers:fit_tiny", world_size=2, steps=1, global_batch=4, callback=spec
        )
