"""GaLore under FSDP2 on 2 CPU processes: local row shards projected with a shared right basis from all-reduced
sketches equal a 1-process run with the same projection type; checkpoints gather the sharded moments and resume
exactly."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

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


def fit_with_checkpoint(world_size: int, ckpt_dir: str, steps: int, ckpt_path: str | None = None):
    """Fit on FSDP2 with a checkpoint at step 3 (or resume from ``ckpt_path``); weights and gathered GaLore state."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_memopt.strategies import FSDP2Strategy
    from lightning_memopt.testing import tiny_datamodule, tiny_model, tiny_trainer
    from lightning_memopt.testing.tiny import full_state
    from lightning_memopt.testing.workers import build_callback

    pl.seed_everything(0, verbose=False)
    model = tiny_model(lr_schedule="constant", warmup_steps=2)
    cbs = build_callback(SPEC)
    if ckpt_path is None:
        cbs.append(ModelCheckpoint(ckpt_dir, every_n_train_steps=3, save_top_k=-1))
    trainer = tiny_trainer(
        max_steps=steps,
        callbacks=cbs,
        enable_checkpointing=ckpt_path is None,
        devices=world_size,
        strategy=FSDP2Strategy(save_distributed_checkpoint=False),
        use_distributed_sampler=False,
    )
    # one batch per epoch: a restarted (non-stateful) loader still gives the same batches after resume
    trainer.fit(model, tiny_datamodule(k=4, batch_size=8 // world_size), ckpt_path=ckpt_path)
    names = {id(p): n for n, p in model.named_parameters()}
    opt = {}
    for p, st in trainer.strategy.optimizers[0].state.items():
        for k, v in st.items():
            opt[f"{names[id(p)]}.{k}"] = v.full_tensor() if hasattr(v, "full_tensor") else v
    return {"state": full_state(model), "opt": opt}


def test_fsdp2_resume_is_exact(tmp_path):
    target = "tests.test_galore_fsdp:fit_with_checkpoint"
    full = run_distributed(target, world_size=2, ckpt_dir=str(tmp_path), steps=6)
    half = next(tmp_path.glob("*step=3.ckpt"))
    resumed = run_distributed(target, world_size=2, ckpt_dir=str(tmp_path), steps=6, ckpt_path=str(half))
    a, b = full[0], resumed[0]
    q = "model.model.layers.0.self_attn.q_proj.weight"
    assert a["opt"][f"{q}.exp_avg"].shape == (64, 8)  # every rank's rows, gathered
    assert a["opt"][f"{q}.n"] == b["opt"][f"{q}.n"] == 6
    for k, v in a["opt"].items():
        if torch.is_tensor(v):
            torch.testing.assert_close(b["opt"][k], v, atol=1e-6, rtol=0, msg=k)
    for k, v in a["state"].items():
        torch.testing.assert_close(b["state"][k], v, atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"proj_type": "std"}, "proj_type='right'"),
        ({"proj_type": "right", "refresh": "svd"}, "refresh='randomized'"),
        ({"proj_type": "right", "optimizer": "adafactor", "moments": "keep"}, "optimizer='adamw'"),
        ({"proj_type": "right", "layerwise": True}, "layerwise=False"),
    ],
)
def test_fsdp2_refusals_name_the_fix(kwargs, match):
    """Checked in-process on a stand-in trainer whose strategy is a (not set up) ModelParallelStrategy."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_memopt.galore.callback import GaLore
    from lightning_memopt.testing import tiny_model

    strategy = ModelParallelStrategy()
    model = tiny_model()
    strategy.optimizers = [torch.optim.AdamW(model.parameters())]
    trainer = SimpleNamespace(
        strategy=strategy,
        precision="32-true",
        precision_plugin=SimpleNamespace(),
        accumulate_grad_batches=1,
        gradient_clip_val=None,
    )
    with pytest.raises(MisconfigurationException, match=match):
        GaLore(**kwargs)._validate(trainer, model)
