"""Lightning's progress bars without the noise of step-limited runs: no "Epoch 37/-2", no "v_num: 0.000".

A run limited by ``max_steps`` with ``max_epochs`` unset has ``trainer.max_epochs == -1``: Lightning's
``RichProgressBar`` then prints the last epoch as ``-1 - 1``. The logger's version (``v_num``) is shown as a float
by Rich and means nothing for the first run in a log folder. ``memopt`` uses :class:`MemoptProgressBar` unless the
config names a progress bar.
"""

from __future__ import annotations

from typing import Any, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from typing_extensions import override


def epoch_description(trainer: pl.Trainer, current_epoch: int) -> str:
    """``"Epoch 3/7"`` when ``max_epochs`` bounds the run (0-based, as Lightning counts), else ``"Epoch 3"``."""
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 0:
        return f"Epoch {current_epoch}"
    return f"Epoch {current_epoch}/{max_epochs - 1}"


class _EveryNSteps:
    """Reads the trainer's progress-bar metrics only on logging steps (``log_every_n_steps``) during training.

    Each read converts logged tensors to Python numbers: a host sync per step, which for a zeroth-order step on a
    small model costs as much as its GPU work. In between, the bar shows the last values read.
    """

    def _cached_metrics(self, trainer: pl.Trainer, read: Any) -> dict[str, Any]:
        cache = getattr(self, "_metrics_cache", None)
        every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
        if cache is None or not trainer.training or trainer.global_step % every == 0:
            cache = self._metrics_cache = clean_metrics(read())
        return dict(cache)


def clean_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The progress-bar metrics with ``v_num`` as text, and without it when there is no version to tell apart."""
    version = metrics.pop("v_num", None)
    if isinstance(version, str) or (isinstance(version, int) and not isinstance(version, bool) and version > 0):
        metrics["v_num"] = str(version)
    return metrics


class MemoptProgressBar(_EveryNSteps, TQDMProgressBar):
    """Lightning's TQDM progress bar, showing ``v_num`` only when it tells runs apart (memopt's default bar), and
    reading the logged metrics (a host sync) only every ``log_every_n_steps`` training steps.

    Example::

        trainer = Trainer(max_steps=1000, callbacks=[MemoptProgressBar()])
    """

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Union[int, str, float]]:
        return self._cached_metrics(trainer, lambda: super(MemoptProgressBar, self).get_metrics(trainer, pl_module))


class MemoptRichProgressBar(_EveryNSteps, RichProgressBar):
    """Lightning's Rich progress bar, showing ``Epoch 37`` rather than ``Epoch 37/-2`` when max_steps ends the run,
    and reading the logged metrics (a host sync) only every ``log_every_n_steps`` training steps.

    Example::

        trainer = Trainer(max_steps=1000, callbacks=[MemoptRichProgressBar(leave=True)])
    """

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Union[int, str, float]]:
        return self._cached_metrics(trainer, lambda: super(MemoptRichProgressBar, self).get_metrics(trainer, pl_module))

    # Lightning's private hook for the train bar's text (pinned by tests/test_progress.py)
    def _get_train_description(self, current_epoch: int) -> str:
        text = epoch_description(self.trainer, current_epoch)
        # as Lightning does: pad to the validation bar's text so that the bars do not flicker
        return f"{text:{len(self.validation_description)}}"
