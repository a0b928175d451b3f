"""Progress-bar values without a host sync per step (lightning_memopt.callbacks.pbar_values): the logger gets every
step's exact value, the bar a copy; calls the takeover cannot serve unchanged are left to Lightning."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_memopt import MeZO
from lightning_memopt.callbacks.pbar_values import ProgressBarValues
from lightning_memopt.testing import tiny_datamodule, tiny_model, tiny_trainer


class _Metas(pl.Callback):
    """How each training-time log call reached Lightning (its metadata), read before fit drops the results."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.metas = {k.split(".")[-1]: v.meta for k, v in trainer._results.items()}


class _Seen(pl.Callback):
    """What each step logged (the exact values) and what the bar held."""

    def __init__(self) -> None:
        self.logged: list[float] = []
        self.shown: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.logged.append(float(trainer.callback_metrics["mezo/loss"]))
        self.shown.append(trainer.progress_bar_metrics["mezo/loss"])


def test_method_logs_reach_the_logger_exactly_and_the_bar_as_numbers(tmp_path):
    model, seen, metas = tiny_model(), _Seen(), _Metas()
    trainer = tiny_trainer(max_steps=6, log_every_n_steps=2, callbacks=[MeZO(lr=1e-3, eps=1e-2), seen, metas],
                           logger=CSVLogger(tmp_path, name="run"))
    trainer.fit(model, tiny_datamodule(k=16, batch_size=4))
    metas = metas.metas
    # asked with prog_bar=True (the module's train_loss, MeZO's mezo/loss): logged without it, shown by the bar
    for name in ("train_loss", "mezo/loss"):
        assert metas[name].prog_bar is False and metas[name].logger is True, name
        assert isinstance(trainer.progress_bar_metrics[name], float), name
    # the logger's values are each step's own (the callback reads them before the takeover's copy): on CPU the bar's
    # copy is immediate, so both agree step by step
    assert seen.logged == seen.shown and len(seen.logged) == 6
    assert len(set(seen.logged)) > 1
    rows = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    assert "mezo/loss" in rows[0] and len(rows) >= 3
    assert "log" not in model.__dict__  # the module's log is its own again after fit


def test_calls_it_cannot_serve_unchanged_are_left_to_lightning():
    model = tiny_model()
    step = model.training_step

    def training_step(batch, batch_idx):
        out = step(batch, batch_idx)
        model.log("per_epoch", torch.tensor(1.0), prog_bar=True, on_epoch=True)
        model.log("synced", torch.tensor(2.0), prog_bar=True, sync_dist=True)
        model.log("number", 3.0, prog_bar=True)  # Lightning makes the device tensor: left to it
        model.log("positional", torch.tensor(4.0), True, True, True, False, "mean")
        return out

    model.training_step = training_step
    metas = _Metas()
    trainer = tiny_trainer(max_steps=2, callbacks=[MeZO(lr=1e-3, eps=1e-2), metas])
    trainer.fit(model, tiny_datamodule(k=8, batch_size=4))
    metas = metas.metas
    assert all(metas[k].prog_bar for k in ("per_epoch", "synced", "number", "positional"))
    assert metas["train_loss"].prog_bar is False


def test_an_instance_log_of_the_users_is_put_back():
    model = tiny_model()
    calls = []
    own = model.log

    def log(name, value, *a, **kw):
        calls.append(name)
        return own(name, value, *a, **kw)

    model.log = log
    trainer = tiny_trainer(max_steps=2, callbacks=[MeZO(lr=1e-3, eps=1e-2)])
    trainer.fit(model, tiny_datamodule(k=8, batch_size=4))
    assert model.log is log and "train_loss" in calls and "mezo/loss" in calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the asynchronous copy is for CUDA tensors")
def test_cuda_values_are_shown_once_their_copy_lands():
    trainer = tiny_trainer(max_steps=1)
    values = ProgressBarValues()
    values._trainer = trainer
    trainer.state.stage = "train"
    x = torch.tensor(1.5, device="cuda")
    values._submit("v", x)
    torch.cuda.synchronize()
    values._submit("v", torch.tensor(2.5, device="cuda"))  # the first copy has landed: shown, the second starts
    assert trainer._logger_connector._progress_bar_metrics["v"] == 1.5
    values.flush()
    assert trainer._logger_connector._progress_bar_metrics["v"] == 2.5
