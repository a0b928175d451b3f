"""Worker functions for :func:`run_distributed` (also callable in-process with ``world_size=1``)."""

from __future__ import annotations

import importlib
from typing import Any, Optional

import lightning.pytorch as pl

from lightning_memopt.testing.tiny import full_state, tiny_datamodule, tiny_model, tiny_trainer


class LossRecorder(pl.Callback):
    """Records the training loss the module logged at each optimizer step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        v = trainer.callback_metrics.get("train_loss")
        if v is not None:
            self.losses.append(float(v))


def build_callback(spec: Optional[dict[str, Any]]) -> list[pl.Callback]:
    if not spec:
        return []
    mod, name = spec["class_path"].rsplit(".", 1)
    return [getattr(importlib.import_module(mod), name)(**spec.get("init_args", {}))]


def fit_tiny(
    world_size: int = 1,
    steps: int = 10,
    global_batch: int = 16,
    callback: Optional[dict[str, Any]] = None,
    model_kwargs: Optional[dict[str, Any]] = None,
    dm_kwargs: Optional[dict[str, Any]] = None,
    trainer_kwargs: Optional[dict[str, Any]] = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit the tiny model for ``steps`` on ``world_size`` CPU processes (FSDP2 when > 1); same global batch."""
    from lightning_memopt.strategies import FSDP2Strategy

    pl.seed_everything(seed, verbose=False)
    model = tiny_model(**(model_kwargs or {}))
    dm = tiny_datamodule(batch_size=global_batch // world_size, **(dm_kwargs or {}))
    rec = LossRecorder()
    kw: dict[str, Any] = dict(max_steps=steps, callbacks=[rec, *build_callback(callback)])
    if world_size > 1:
        kw.update(devices=world_size, strategy=FSDP2Strategy(save_distributed_checkpoint=False),
                  use_distributed_sampler=False)
    kw.update(trainer_kwargs or {})
    trainer = tiny_trainer(**kw)
    trainer.fit(model, dm)
    return {"state": full_state(model), "losses": rec.losses, "global_step": trainer.global_step}


def fit_tiny_checkpointed(
    world_size: int,
    ckpt_dir: str,
    steps: int,
    callback: dict[str, Any],
    every: int,
    ckpt_path: Optional[str] = None,
    warmup_steps: int = 0,
    k: int = 64,
    global_batch: int = 16,
) -> dict[str, Any]:
    """FSDP2 fit of the tiny model with a checkpoint every ``every`` steps, or resumed from ``ckpt_path``.

    Returns full weights, the holder's method state gathered to full tensors (``"<param>.<key>"``) and the lr, so a
    test can compare an uninterrupted run with a resumed one.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_memopt.strategies import FSDP2Strategy

    pl.seed_everything(0, verbose=False)
    model = tiny_model(lr_schedule="constant", warmup_steps=warmup_steps)
    cbs = build_callback(callback)
    if ckpt_path is None:
        cbs.append(ModelCheckpoint(ckpt_dir, every_n_train_steps=every, save_top_k=-1))
    trainer = tiny_trainer(
        max_steps=steps, callbacks=cbs, enable_checkpointing=ckpt_path is None, devices=world_size,
        strategy=FSDP2Strategy(save_distributed_checkpoint=False), use_distributed_sampler=False,
    )
    trainer.fit(model, tiny_datamodule(k=k, batch_size=global_batch // world_size), ckpt_path=ckpt_path)
    holder = trainer.strategy.optimizers[0]
    names = {id(p): n for n, p in model.named_parameters()}
    opt = {}
    for p, st in holder.state.items():
        for key, v in st.items():
            opt[f"{names[id(p)]}.{key}"] = v.full_tensor() if hasattr(v, "full_tensor") else v
    return {"state": full_state(model), "opt": opt, "lr": holder.param_groups[0]["lr"]}
