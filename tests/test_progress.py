"""Progress bars for step-limited runs: "Epoch 3", not "Epoch 3/-2"; no "v_num: 0.000"; the CLI's default bar."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from lightning_memopt import MemoptProgressBar, MemoptRichProgressBar
from lightning_memopt.callbacks.progress import clean_metrics, epoch_description
from lightning_memopt.cli import run_cli
from lightning_memopt.testing import tiny_datamodule, tiny_model, tiny_trainer

BASE = ["--config", "configs/full_ft_adamw.yaml", "--trainer.accelerator=cpu", "--trainer.devices=1"]


def _fit(bar, tmp_path, **kwargs):
    trainer = tiny_trainer(enable_progress_bar=True, callbacks=[bar], logger=CSVLogger(tmp_path, name="run"), **kwargs)
    trainer.fit(tiny_model(), tiny_datamodule(k=4, batch_size=4))
    return trainer


def test_rich_bar_shows_no_bogus_epoch_total_or_v_num(tmp_path, capsys, no_unexpected_warnings):
    bar = MemoptRichProgressBar(leave=True)
    trainer = _fit(bar, tmp_path, max_steps=5)  # 2 batches an epoch: ends in epoch 2, max_epochs is -1
    assert trainer.max_epochs == -1
    assert bar._get_train_description(2).strip() == "Epoch 2"
    out = capsys.readouterr().out
    assert "Epoch 2" in out and "/-2" not in out and "Epoch 2/" not in out
    assert "train_loss" in out and "v_num" not in out
    # Lightning's own bar prints what this one fixes (if this fails, Lightning fixed it and the subclass can go)
    assert RichProgressBar._get_train_description(bar, 2).strip() == "Epoch 2/-2"


def test_rich_bar_keeps_the_total_when_max_epochs_is_set(tmp_path, capsys):
    bar = MemoptRichProgressBar()
    _fit(bar, tmp_path, max_epochs=2, max_steps=-1)
    assert bar._get_train_description(1).strip() == "Epoch 1/1"


def test_tqdm_bar_shows_v_num_only_when_it_tells_runs_apart(tmp_path, capsys):
    bar = MemoptProgressBar(leave=True)  # the finished bar stays in the output
    trainer = _fit(bar, tmp_path, max_steps=2)
    assert trainer.logger.version == 0
    assert "v_num" not in bar.get_metrics(trainer, trainer.lightning_module)
    out = capsys.readouterr().out
    assert "Epoch 0" in out and "v_num" not in out
    bar = MemoptProgressBar(leave=True)
    trainer = _fit(bar, tmp_path, max_steps=2)  # a second run in the same folder: version_1
    assert bar.get_metrics(trainer, trainer.lightning_module)["v_num"] == "1"
    assert "v_num=1" in capsys.readouterr().out


def test_clean_metrics_and_epoch_description():
    assert clean_metrics({"v_num": 0, "loss": 1.0}) == {"loss": 1.0}
    assert clean_metrics({"v_num": 12}) == {"v_num": "12"} and clean_metrics({"v_num": "abcd"}) == {"v_num": "abcd"}
    assert clean_metrics({"v_num": None}) == {}

    class T:
        max_epochs = -1

    assert epoch_description(T(), 37) == "Epoch 37"
    T.max_epochs = None
    assert epoch_description(T(), 37) == "Epoch 37"
    T.max_epochs = 40
    assert epoch_description(T(), 37) == "Epoch 37/39"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], MemoptProgressBar),  # the config names no bar: ours
        (["--trainer.callbacks+=RichProgressBar"], RichProgressBar),  # Lightning's, as named: kept, not doubled
        (["--trainer.callbacks+=TQDMProgressBar"], TQDMProgressBar),
        (["--trainer.callbacks+=MemoptRichProgressBar"], MemoptRichProgressBar),
        (["--trainer.enable_progress_bar=false"], type(None)),
    ],
)
def test_cli_default_progress_bar(extra, expected, in_repo):
    cli = run_cli([*BASE, *extra], run=False)
    bar = cli.trainer.progress_bar_callback
    assert type(bar) is expected
    assert sum(isinstance(c, (TQDMProgressBar, RichProgressBar)) for c in cli.trainer.callbacks) == (bar is not None)


def test_quickstart_uses_the_rich_bar(in_repo):
    cli = run_cli(["--config", "configs/quickstart.yaml", "--trainer.accelerator=cpu"], run=False)
    assert type(cli.trainer.progress_bar_callback) is MemoptRichProgressBar


def test_progress_bars_read_logged_metrics_only_on_logging_steps(monkeypatch):
    import lightning.pytorch as pl

    from lightning_memopt.callbacks.progress import MemoptProgressBar
    from lightning_memopt.testing import tiny_datamodule, tiny_model, tiny_trainer

    reads = []
    original = pl.Trainer.progress_bar_metrics

    def counted(self):
        if self.training:
            reads.append(self.global_step)
        return original.fget(self)

    monkeypatch.setattr(pl.Trainer, "progress_bar_metrics", property(counted))
    from lightning.pytorch.callbacks import TQDMProgressBar

    counts = []
    for bar in (TQDMProgressBar(), MemoptProgressBar()):
        reads.clear()
        trainer = tiny_trainer(max_steps=12, log_every_n_steps=4, enable_progress_bar=True, callbacks=[bar])
        trainer.fit(tiny_model(), tiny_datamodule(k=32))
        counts.append(len(reads))
    assert all(step % 4 == 0 for step in reads[1:])  # after the first read: logging steps only
    assert counts[0] >= 12 and counts[1] <= counts[0] // 2, counts
