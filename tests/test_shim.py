"""Pins the behaviour of every private Lightning API used through lightning_memopt._shim.

If a Lightning upgrade moves one of these, this file fails first (and alone).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_memopt import _shim
from lightning_memopt.testing import tiny_datamodule, tiny_model, tiny_trainer
from lightning_memopt.testing.tiny import full_state


class Recorder(pl.Callback):
    def __init__(self, skip: bool | None = None) -> None:
        self.skip = skip
        self.backward_calls = 0
        self.training_steps = 0
        self.grads_seen: list[bool] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.skip is not None:
            _shim.set_skip_backward(trainer, self.skip)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.training_steps += 1

    def on_after_backward(self, trainer, pl_module) -> None:
        self.backward_calls += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads_seen.append(any(p.grad is not None for p in pl_module.parameters()))


def test_skip_backward_really_skips_backward():
    model, rec = tiny_model(), Recorder(skip=True)
    before = full_state(model)
    trainer = tiny_trainer(max_steps=3, callbacks=[rec])
    trainer.fit(model, tiny_datamodule(k=16))
    assert _shim.get_skip_backward(trainer) is True
    assert rec.training_steps == 3 and trainer.global_step == 3  # the step still counts
    assert rec.backward_calls == 0 and rec.grads_seen == [False, False, False]
    after = full_state(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_skip_backward_false_runs_backward():
    model, rec = tiny_model(), Recorder(skip=False)
    trainer = tiny_trainer(max_steps=2, callbacks=[rec])
    trainer.fit(model, tiny_datamodule(k=16))
    assert _shim.get_skip_backward(trainer) is False
    assert rec.backward_calls == 2 and rec.grads_seen == [True, True]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_grad_scaler_is_none_without_fp16(precision):
    assert _shim.grad_scaler(pl.Trainer(accelerator="cpu", precision=precision, logger=False)) is None


def test_grad_scaler_is_the_plugins_scaler():
    scaler = torch.amp.GradScaler("cpu")
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = pl.Trainer(accelerator="cpu", plugins=[plugin], logger=False)
    assert _shim.grad_scaler(trainer) is scaler


def test_attached_trainer_is_none_before_fit_and_the_trainer_during_it():
    model, seen = tiny_model(), []

    class Probe(pl.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            seen.append(_shim.attached_trainer(pl_module) is trainer)

    assert _shim.attached_trainer(model) is None
    tiny_trainer(max_steps=1, callbacks=[Probe()]).fit(model, tiny_datamodule(k=16))
    assert seen == [True]


def test_resolve_data_parallel_size_counts_every_process():
    from lightning.pytorch.strategies import ModelParallelStrategy

    s = ModelParallelStrategy()
    assert s._data_parallel_size == "auto"
    s.num_nodes, s.parallel_devices = 2, [torch.device("cpu")] * 3
    _shim.resolve_data_parallel_size(s)
    assert s._data_parallel_size == 6


def test_closure_loss_is_the_graph_attached_loss():
    seen = []

    class Probe(pl.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            opt = trainer.optimizers[0]
            step = opt.step

            def wrapped(closure=None, **kw):
                out = step(closure, **kw)
                seen.append(_shim.closure_loss(closure))
                return out

            opt.step = wrapped

    trainer = tiny_trainer(max_steps=1, callbacks=[Probe()])
    trainer.fit(tiny_model(), tiny_datamodule(k=16))
    (loss,) = seen
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert float(loss.detach()) == pytest.approx(float(trainer.callback_metrics["train_loss"]), rel=1e-5)


@pytest.mark.parametrize("flag", [True, False])
def test_uses_distributed_sampler_reads_the_trainer_flag(flag):
    assert _shim.uses_distributed_sampler(tiny_trainer(use_distributed_sampler=flag)) is flag


def test_epoch_batches_taken_counts_the_current_epoch_s_batches():
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch_idx, _shim.epoch_batches_taken(trainer)))

    trainer = tiny_trainer(max_steps=10, callbacks=[Watch()])
    trainer.fit(tiny_model(), tiny_datamodule(k=32, batch_size=8))  # 8 batches an epoch
    assert seen == [(i % 8, i % 8 + 1) for i in range(10)]


def test_a_progress_bar_value_set_through_the_shim_shows_in_the_bar():
    class Show(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            _shim.set_progress_bar_value(trainer, "shown", 2.5)

    trainer = tiny_trainer(max_steps=2, callbacks=[Show()])
    trainer.fit(tiny_model(), tiny_datamodule(k=16, batch_size=8))
    assert trainer.progress_bar_metrics["shown"] == 2.5
    assert "shown" not in trainer.callback_metrics and "shown" not in trainer.logged_metrics
