"""Progress-bar values without a host sync per training step.

Lightning turns every tensor logged with ``prog_bar=True`` into a Python number at the end of each training batch
(``_ResultCollection.metrics`` calls ``.item()``), whether or not a progress bar shows it: a host sync per step. The
GPU then idles while the host runs Lightning's loop until the next step is queued. For a graphed MeZO step at 1.1B on
the H200 that was 2.8 ms of 54.5 under the profiler (``benchmarks/zo_step_profile.py``); without the profiler,
removing it took the step from 52.4 to 51.8 ms.

:class:`ProgressBarValues` takes such calls over while a method trains. Each is logged as asked but with
``prog_bar=False``: the logger and ``callback_metrics`` get every step's exact value, which Lightning converts only
on logging steps. The progress bar gets a copy made asynchronously (into pinned memory, with an event), shown once
the copy has landed: a value a step or two old, never a stall. Left to Lightning: calls with ``on_epoch=True`` or
``sync_dist=True`` (or arguments past ``on_epoch`` given by position), values that are not one-element tensors, and
values on other accelerators.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_memopt import _shim


class ProgressBarValues:
    """Installed on a LightningModule for one fit: its training-time ``log(..., prog_bar=True)`` calls of one-element
    CPU or CUDA tensors go to the logger without ``prog_bar``, and to the progress bar through an asynchronous copy.
    """

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._module: tuple[pl.LightningModule, Any] | None = None  # the module and its own instance `log`, if any
        self._copies: dict[str, tuple[Tensor, Any]] = {}  # name -> (pinned host scalar, event or None once read)

    def install(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.uninstall()
        self._trainer = trainer
        own = pl_module.__dict__.get("log")
        original = pl_module.log

        def log(name: str, value: Any, prog_bar: bool = False, logger: bool | None = None,
                on_step: bool | None = None, on_epoch: bool | None = None, *args: Any, **kwargs: Any) -> None:
            if prog_bar and not args and self._takes(value, on_epoch, kwargs):  # more positionals: Lightning's
                original(name, value, False, logger, on_step, on_epoch, *args, **kwargs)
                self._submit(name, value)
            else:
                original(name, value, prog_bar, logger, on_step, on_epoch, *args, **kwargs)

        pl_module.log = log  # type: ignore[method-assign]
        self._module = (pl_module, own)

    def uninstall(self) -> None:
        if self._module is not None:
            module, own = self._module
            if own is None:
                module.__dict__.pop("log", None)
            else:
                module.log = own  # type: ignore[method-assign]
            self._module = None

    def flush(self) -> None:
        """Show the last values (waits for their copies: at the end of training, once)."""
        for name, (buf, event) in list(self._copies.items()):
            if event is not None:
                event.synchronize()
                self._show(name, buf)

    def _takes(self, value: Any, on_epoch: bool | None, kwargs: dict[str, Any]) -> bool:
        return (
            self._trainer is not None
            and self._trainer.training
            and not on_epoch
            and not kwargs.get("sync_dist", False)
            and isinstance(value, Tensor)
            and value.numel() == 1
            and value.device.type in ("cuda", "cpu")
            and not (value.is_cuda and torch.cuda.is_current_stream_capturing())
        )

    def _submit(self, name: str, value: Tensor) -> None:
        self._poll()
        held = self._copies.get(name)
        if value.device.type == "cpu":
            self._publish(name, float(value.detach()))
            return
        if held is not None and held[1] is not None:  # the last copy is still on its way: the bar keeps waiting
            return
        buf = held[0] if held is not None else torch.empty((), dtype=torch.float32, pin_memory=True)
        buf.copy_(value.detach().reshape(()).float(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._copies[name] = (buf, event)

    def _poll(self) -> None:
        for name, (buf, event) in list(self._copies.items()):
            if event is not None and event.query():
                self._show(name, buf)

    def _show(self, name: str, buf: Tensor) -> None:
        self._copies[name] = (buf, None)
        self._publish(name, float(buf))

    def _publish(self, name: str, value: float) -> None:
        if self._trainer is not None:  # pinned by tests/test_progress.py
            _shim.set_progress_bar_value(self._trainer, name, value)
