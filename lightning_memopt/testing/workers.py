"""Worker functions for :func:`run_distributed` (also callable in-process with ``world_size=1``)."""

from __future__ import annotations

import importlib
from typing import Any, Optional

import lightning.pytorch as pl
import torch

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
