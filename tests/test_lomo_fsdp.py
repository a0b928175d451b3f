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


NAN_AT_1 = {"class_path": "lightning_memopt.testing.workers.NaNGradAt",
            "init_args": {"module": "model.model.layers.1.mlp.down_proj", "step": 1}}


@pytest.mark.parametrize("case", ["lomo", "adalomo"])
def test_fsdp2_a_nan_gradient_on_one_shard_is_left_out_alike_on_every_rank(case):
    """Step 1's gradient is NaN in down_proj's first rows (the first rank's shard only) and in every tensor before
    it. Each rank leaves out what its shard holds of them (LOMO the NaN elements, AdaLomo the tensors, decided from
    all-reduced norms), every rank counts the same tensors, and the result equals one process."""
    cb = {"class_path": "lightning_memopt.lomo.callback.LOMO", "init_args": {"lr": 0.5}} if case == "lomo" \
        else CASES["adalomo"]
    kw = {"steps": 3, "global_batch": 16, "callback": cb, "callbacks": [NAN_AT_1],
          "inspect": "lightning_memopt.testing.workers:skip_counts"}
    two = run_distributed("lightning_memopt.testing.workers:fit_tiny", world_size=2, **kw)
    one = fit_tiny(1, **kw)
    assert one["skips"][:2] == (0, 1) and 10 < one["skips"][2] < len(one["state"])
    assert two[0]["skips"] == two[1]["skips"] == one["skips"]
    assert all(torch.isfinite(v).all() for v in one["state"].values())
    assert rel(two[0]["state"], one["state"]) <= 1e-5


def test_fp16_a_non_finite_loss_on_one_rank_is_skipped_alike_on_every_rank():
    """Each rank checked its own loss: the rank with the NaN kept its scale, the other took the NaN norm for an
    overflow and halved it, and from then on the ranks scaled their gradients differently."""
    cb = {"class_path": "lightning_memopt.lomo.callback.LOMO", "init_args": {"lr": 0.05, "init_loss_scale": 256.0}}
    out = run_distributed(
        "lightning_memopt.testing.workers:fit_tiny", world_size=2, steps=3, global_batch=16, callback=cb,
        callbacks=[{"class_path": "lightning_memopt.testing.workers.NaNLossOnRank", "init_args": {"step": 1}}],
        inspect="lightning_memopt.testing.workers:scaler_state", model_kwargs={"torch_dtype": "float16"},
        trainer_kwargs={"precision": "16-true"})
    assert out[0]["scaler"] == out[1]["scaler"] and out[0]["scaler"]["scale"] == 256.0
    assert out[0]["skipped"] == out[1]["skipped"] == 1
