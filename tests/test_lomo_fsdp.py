"""LOMO/AdaLomo under FSDP2: a 2-process CPU run equals a 1-process run (same global batch)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_memopt.testing import run_distributed, tiny_model
from lightning_memopt.testing.tiny import full_state
from lightning_memopt.testing.workers import fit_tiny


def rel(a: dict, b: dict) -> float:
    num = sum((a[k].double() - b[k].double()).pow(2).sum() for k in a).sqrt()
    return float(num / sum(b[k].double().pow(2).sum() for k in b).sqrt())


CASES = {
    # Two-pass clipping: the measure pass all-reduces the sharded squared norms; a small bound so it clips.
    "lomo_clip": {
        "class_path": "lightning_memopt.lomo.callback.LOMO",
        "init_args": {"lr": 0.5, "clip_grad_norm": 0.05},
    },
    # AdaLomo's column statistics and RMS values are all-reduced over the row shards.
    "adalomo": {"class_path": "lightning_memopt.lomo.callback.AdaLomo", "init_args": {"lr": 0.01, "weight_decay": 0.1}},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fsdp2_two_processes_equal_one(case):
    cb = CASES[case]
    two = run_distributed(
        "lightning_memopt.testing.workers:fit_tiny", world_size=2, steps=3, global_batch=16, callback=cb
    )
    one = fit_tiny(1, steps=3, global_batch=16, callback=cb)
    pl.seed_everything(0, verbose=False)
    init = full_state(tiny_model())
    assert two[0]["global_step"] == one["global_step"] == 3
    assert rel(one["state"], init) > 1e-3
    assert rel(two[0]["state"], one["state"]) <= 1e-5
    for k in two[0]["state"]:
        assert torch.equal(two[0]["state"][k], two[1]["state"][k])
