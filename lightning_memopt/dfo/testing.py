"""A worker for :func:`lightning_memopt.testing.run_distributed`: a tiny DFOLoRA fit returning z's and fitness."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_memopt.dfo.callback import DFOLoRA
from lightning_memopt.testing.tiny import tiny_datamodule, tiny_model, tiny_trainer


class _FitnessRecorder(pl.Callback):
    def __init__(self, dfo: DFOLoRA) -> None:
        self.dfo, self.fitness = dfo, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.dfo.last_fitness is not None:
            self.fitness.append(self.dfo.last_fitness.detach().cpu().double())


def fit_dfo(
    world_size: int = 1, steps: int = 4, global_batch: int = 16, dfo: dict[str, Any] | None = None, seed: int = 0
) -> dict[str, Any]:
    """Fit the tiny model with DFOLoRA on ``world_size`` CPU processes (FSDP2 when > 1) at one global batch."""
    from lightning_memopt.strategies import FSDP2Strategy

    pl.seed_everything(seed, verbose=False)
    model = tiny_model()
    dm = tiny_datamodule(batch_size=global_batch // world_size)
    cb = DFOLoRA(**(dfo or {}))
    rec = _FitnessRecorder(cb)
    kw: dict[str, Any] = {"max_steps": steps, "callbacks": [cb, rec]}
    if world_size > 1:
        kw.update(devices=world_size, strategy=FSDP2Strategy(save_distributed_checkpoint=False),
                  use_distributed_sampler=False)
    trainer = tiny_trainer(**kw)
    trainer.fit(model, dm)
    assert cb.lora is not None
    return {
        "z": [z.cpu().double() for z in cb.lora.z], "fitness": rec.fitness, "global_step": trainer.global_step,
        "stats": cb.lora.stats(), "grads": sum(p.grad is not None for p in model.parameters()),
    }
