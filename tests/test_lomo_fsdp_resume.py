"""AdaLomo under FSDP2: resuming a 2-process run from a checkpoint is exact (weights and sharded moments)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_memopt.testing import run_distributed, tiny_model
from lightning_memopt.testing.tiny import full_state

ADALOMO = {"class_path": "lightning_memopt.lomo.callback.AdaLomo", "init_args": {"lr": 0.01}}


def fit_with_checkpoints(world_size: int, ckpt_dir: str, steps: int, callback: dict, ckpt_path: str | None = None):
    """fit_tiny with a checkpoint every 4 steps (or resuming from ``ckpt_path``); returns weights and method state."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_memopt.strategies import FSDP2Strategy
    from lightning_memopt.testing.workers import build_callback

    pl.seed_everything(0, verbose=False)
    model = tiny_model(lr_schedule="constant", warmup_steps=12)
    cbs = build_callback(callback)
    if ckpt_path is None:
        cbs.append(ModelCheckpoint(ckpt_dir, every_n_train_steps=8, save_top_k=-1))
    from lightning_memopt.testing import tiny_datamodule, tiny_trainer

    trainer = tiny_trainer(
        max_steps=steps,
        callbacks=cbs,
        enable_checkpointing=ckpt_path is None,
        devices=world_size,
        strategy=FSDP2Strategy(save_distributed_checkpoint=False),
        use_distributed_sampler=False,
    )
    trainer.fit(model, tiny_datamodule(batch_size=16 // world_size), ckpt_path=ckpt_path)
    holder = trainer.strategy.optimizers[0]
    names = {id(p): n for n, p in model.named_parameters()}
    state = {}
    for p, st in holder.state.items():
        for k, v in st.items() if callback else ():
            state[f"{names[id(p)]}.{k}"] = v.full_tensor() if hasattr(v, "full_tensor") else v
    return {"state": full_state(model), "opt": state, "lr": holder.param_groups[0]["lr"]}


def test_fsdp2_adalomo_resume_is_exact(tmp_path):
    target = "tests.test_lomo_fsdp_resume:fit_with_checkpoints"
    full = run_distributed(target, world_size=2, ckpt_dir=str(tmp_path), steps=16, callback=ADALOMO)
    half = next(tmp_path.glob("*step=8.ckpt"))
    resumed = run_distributed(
        target, world_size=2, ckpt_dir=str(tmp_path), steps=16, callback=ADALOMO, ckpt_path=str(half)
    )
    a, b = full[0], resumed[0]
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert a["opt"].keys() == b["opt"].keys() and len(a["opt"]) > 0
    assert a["opt"]["model.model.embed_tokens.weight.row"].shape == (256,)  # every rank's rows, not rank 0's
    for k in a["opt"]:
        if k.endswith(".step"):
            assert a["opt"][k] == b["opt"][k] == 16
        else:  # the row moments are sharded DTensors: gathered here at full size
            assert torch.equal(a["opt"][k], b["opt"][k]), k
