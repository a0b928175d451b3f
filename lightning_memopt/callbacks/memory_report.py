"""MemoryReport: peak training memory split into parameters, gradients, optimizer state and activations/other."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_memopt.core.fsdp import fsdp_modules, is_dtensor, local, reshard_all
from lightning_memopt.core.memory import (
    GIB,
    MemoryBreakdown,
    current_rss_bytes,
    grad_bytes,
    optimizer_state_bytes,
    param_bytes,
    peak_bytes,
    reset_peak,
)


def _gathered(module: torch.nn.Module) -> bool:
    """Whether an FSDP2 module holds its gathered full tensors (parameters outside every FSDP2 module are plain)."""
    for m in fsdp_modules(module):
        nested = {id(p) for sub in fsdp_modules(m) if sub is not m for p in sub.parameters()}
        if any(not is_dtensor(p) for p in m.parameters() if id(p) not in nested):
            return True
    return False


def _fmt(nbytes: float) -> str:
    if nbytes >= GIB:
        return f"{nbytes / GIB:.2f} GiB"
    return f"{nbytes / 2**20:.1f} MiB"


class MemoryReport(Callback):
    """Reports peak memory during fit, split into parameters, gradients, optimizer state and activations/other.

    Parameters, gradients and optimizer state are counted from the tensors (local shards under FSDP2; optimizer
    state is every tensor in ``trainer.optimizers[i].state``, which includes a method's own state, and the state a
    method keeps outside it: DFOLoRA's search state and adapters). Gradients are the largest total ever alive at
    once, tracked by a light post-accumulate-grad hook, so methods that apply and free each gradient inside backward
    show only what they really hold. Activations/other is the peak minus those parts.

    The peak comes from the CUDA allocator (``max_memory_allocated``, reset at fit start) or, on CPU, from the
    process RSS: the RSS high-water mark minus the RSS at fit start, plus the parameters (which were already
    resident). RSS includes allocator slack, so CPU figures are coarser; the table names the source used.

    Numbers are logged as ``mem/peak_gib``, ``mem/params_gib``, ``mem/grads_gib``, ``mem/optimizer_state_gib`` and
    ``mem/activations_other_gib`` (every ``log_every_n_steps`` optimizer steps and at the end), and a table is
    printed on rank zero when fit ends. Figures are per process.

    Args:
        log_every_n_steps: log the running figures every this many optimizer steps (0: only at the end).
        print_table: print a rich table at the end of training.
        track_grads_in_backward: hook every trainable parameter to see gradients that live only inside backward.

    Example::

        report = MemoryReport()
        trainer = Trainer(max_steps=100, callbacks=[LOMO(lr=1e-3), report])
        trainer.fit(model, datamodule)
        print(report.breakdown.gib())
    """

    def __init__(self, log_every_n_steps: int = 50, print_table: bool = True, track_grads_in_backward: bool = True):
        if log_every_n_steps < 0:
            raise ValueError(f"log_every_n_steps must be >= 0, got {log_every_n_steps}.")
        self.log_every_n_steps = log_every_n_steps
        self.print_table = print_table
        self.track_grads_in_backward = track_grads_in_backward
        self.breakdown: Optional[MemoryBreakdown] = None
        self._device = torch.device("cpu")
        self._baseline_rss = 0
        self._params = 0
        self._max_grads = 0
        self._max_opt = 0
        self._handles: list[Any] = []
        self._live: dict[int, int] = {}  # id(param) -> bytes of its live grad, during one backward
        self._live_bytes = 0
        self._last: Optional[torch.Tensor] = None
        self._last_logged_step = -1

    # ---- measurement ----------------------------------------------------------------------------------------------
    def _sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: bool = False) -> None:
        # Parameters change only when a callback adds some (e.g. LoRA) before training starts. FSDP2's root holds its
        # gathered full tensors after a forward without backward (DFOLoRA, a validation): not this rank's parameters.
        if params and not _gathered(pl_module):
            self._params = max(self._params, param_bytes(pl_module))
        self._max_grads = max(self._max_grads, grad_bytes(pl_module))
        # on a GPU the peak is the device's: state parked on the host is not part of it
        on = self._device if self._device.type == "cuda" else None
        self._max_opt = max(self._max_opt, optimizer_state_bytes(trainer.optimizers, on))

    def _reset_live(self, pl_module: pl.LightningModule) -> None:
        """Start following gradients from those alive now (earlier micro-batches' under accumulation)."""
        self._live = {}
        for p in pl_module.parameters():
            if p.grad is not None:
                lg = local(p.grad)
                self._live[id(p)] = lg.numel() * lg.element_size()
        self._live_bytes = sum(self._live.values())
        self._last = None

    def _grad_hook(self, p: torch.Tensor) -> None:
        prev = self._last
        if prev is not None and prev.grad is None and id(prev) in self._live:  # freed by a fused update
            self._live_bytes -= self._live.pop(id(prev))
        g = p.grad
        if g is None:  # another hook already applied and freed it: it lived for a moment all the same
            lp = local(p)
            transient = lp.numel() * lp.element_size()
        else:
            transient = 0
            if id(p) not in self._live:
                lg = local(g)
                self._live[id(p)] = lg.numel() * lg.element_size()
                self._live_bytes += self._live[id(p)]
        self._max_grads = max(self._max_grads, self._live_bytes + transient)
        self._last = p

    def _current(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> MemoryBreakdown:
        self._sample(trainer, pl_module, params=True)
        if self._device.type == "cuda":
            peak, source = peak_bytes(self._device), "CUDA allocator (max_memory_allocated)"
        else:
            grown = max(0, peak_bytes(self._device) - self._baseline_rss)
            peak = grown + self._params
            source = (
                f"CPU RSS: high-water mark - RSS at fit start ({_fmt(self._baseline_rss)}) + parameters"
            )
        return MemoryBreakdown.from_parts(peak, self._params, self._max_grads, self._max_opt, source)

    def _log(self, trainer: pl.Trainer, breakdown: MemoryBreakdown) -> None:
        metrics = breakdown.as_metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        for k, v in metrics.items():
            trainer.callback_metrics[k] = torch.tensor(v)

    # ---- hooks ----------------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._device = pl_module.device
        self._params = self._max_grads = self._max_opt = 0
        self._last_logged_step = -1
        self.breakdown = None
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        reset_peak(self._device)
        self._baseline_rss = current_rss_bytes()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After other callbacks' on_fit_start (which may add or swap parameters) and after sharding.
        self._remove_hooks()
        if self.track_grads_in_backward:
            self._handles = [
                p.register_post_accumulate_grad_hook(self._grad_hook) for p in pl_module.parameters() if p.requires_grad
            ]
        reshard_all(pl_module)  # a sanity-check validation leaves FSDP2's root gathered; the next forward gathers again
        self._sample(trainer, pl_module, params=True)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Also covers methods that run backward themselves (no on_before_backward): stale entries are dropped here.
        if self._handles:
            self._reset_live(pl_module)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._handles:
            self._reset_live(pl_module)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._max_grads = max(self._max_grads, grad_bytes(pl_module))
        if self._handles:
            self._reset_live(pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._max_grads = max(self._max_grads, grad_bytes(pl_module))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sample(trainer, pl_module)
        step = trainer.global_step
        n = self.log_every_n_steps
        if n > 0 and step % n == 0 and step != self._last_logged_step:
            self._last_logged_step = step
            self._log(trainer, self._current(trainer, pl_module))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.breakdown = self._current(trainer, pl_module)
        self._log(trainer, self.breakdown)
        self._remove_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        # Printed here, after a progress bar listed before us has closed its live display.
        if stage == "fit" and self.breakdown is not None and self.print_table and trainer.is_global_zero:
            self.print_breakdown(self.breakdown, world_size=trainer.world_size)

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._live, self._last = {}, None

    # ---- output ---------------------------------------------------------------------------------------------------
    @staticmethod
    def print_breakdown(breakdown: MemoryBreakdown, world_size: int = 1) -> None:
        """Print ``breakdown`` as a rich table (falls back to plain text without rich)."""
        rows = [
            ("Parameters", breakdown.params),
            ("Gradients (most alive at once)", breakdown.grads),
            ("Optimizer state", breakdown.optimizer_state),
            ("Activations / other", breakdown.activations_other),
            ("Peak", breakdown.peak),
        ]
        title = "Peak memory during fit" + (f" (per process, rank 0 of {world_size})" if world_size > 1 else "")
        caption = f"Source: {breakdown.source}"
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:  # rich is a dependency, but keep the report if it is missing
            lines = [title] + [f"  {name:<32} {_fmt(v):>12}" for name, v in rows] + [caption]
            rank_zero_info("\n".join(lines))
            return
        table = Table(title=title, caption=caption)
        table.add_column("Part")
        table.add_column("Memory", justify="right")
        table.add_column("% of peak", justify="right")
        for i, (name, v) in enumerate(rows):
            pct = f"{100 * v / breakdown.peak:.0f}%" if breakdown.peak > 0 else "-"
            table.add_row(name, _fmt(v), pct, end_section=i == len(rows) - 2)
        Console().print(table)
