"""AdaLomo under FSDP2: resuming a 2-process run from a checkpoint is exact (weights and sharded moments)."""

from __future__ import annotations

import torch

from lightning_memopt.testing import run_distributed

ADALOMO = {"class_path": "lightning_memopt.lomo.callback.AdaLomo", "init_args": {"lr": 0.01}}


def test_fsdp2_adalomo_resume_is_exact(tmp_path):
    target = "lightning_memopt.testing.workers:fit_tiny_checkpointed"
    kw = dict(world_size=2, ckpt_dir=str(tmp_path), steps=16, callback=ADALOMO, every=8, warmup_steps=12)
    full = run_distributed(target, **kw)
    half = next(tmp_path.glob("*step=8.ckpt"))
    resumed = run_distributed(target, ckpt_path=str(half), **kw)
    a, b = full[0], resumed[0]
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert a["opt"].keys() == b["opt"].keys() and len(a["opt"]) > 0
    assert a["opt"]["model.model.embed_tokens.weight.row"].shape == (256,)  # every rank's rows, not rank 0's
    for k in a["opt"]:
        if k.endswith(".step"):
            assert a["opt"][k] == b["opt"][k] == 16
        else:  # the row moments are sharded DTensors: gathered here at full size
            assert torch.equal(a["opt"][k], b["opt"][k]), k
