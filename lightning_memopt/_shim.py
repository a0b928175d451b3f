"""Every private Lightning API this library touches, in one place (pinned by tests/test_shim.py).

A Lightning upgrade that moves one of these breaks one test here instead of four methods.
"""

from __future__ import annotations

from typing import Any


def set_skip_backward(trainer: Any, value: bool) -> None:
    """Skip ``loss.backward()`` in automatic optimization (what Lightning's own SWA callback does)."""
    trainer.fit_loop._skip_backward = value


def get_skip_backward(trainer: Any) -> bool:
    return bool(trainer.fit_loop._skip_backward)


def grad_scaler(trainer: Any) -> Any:
    """The precision plugin's GradScaler, or None (``16-mixed`` on CUDA has one)."""
    return getattr(trainer.precision_plugin, "scaler", None)


def attached_trainer(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or None (``module.trainer`` raises when there is none)."""
    return module._trainer


def uses_distributed_sampler(trainer: Any) -> bool:
    """Whether Lightning puts a DistributedSampler into the training loader (``Trainer(use_distributed_sampler=)``)."""
    return bool(trainer._accelerator_connector.use_distributed_sampler)


def epoch_batches_taken(trainer: Any) -> int:
    """Training batches the current epoch has processed (what a loader resumed in the middle of it skips)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


def resolve_data_parallel_size(strategy: Any) -> None:
    """ModelParallelStrategy's ``data_parallel_size="auto"`` as every process of every node (pure data parallel)."""
    if strategy._data_parallel_size == "auto":
        strategy._data_parallel_size = strategy.num_processes * strategy.num_nodes


def closure_loss(closure: Any) -> Any:
    """The graph-attached loss from the last call of Lightning's automatic-optimization closure (or None).

    ``optimizer.step`` receives the precision plugin's ``partial(_wrap_closure, model, optimizer, closure)``; calling
    it returns only a detached copy, the loss with its graph stays in ``Closure._result.closure_loss``.
    """
    import functools

    obj = closure
    while isinstance(obj, functools.partial):
        obj = obj.keywords.get("closure", obj.args[-1] if obj.args else None)
    result = getattr(obj, "_result", None)
    return getattr(result, "closure_loss", None)


def set_progress_bar_value(trainer: Any, name: str, value: float) -> None:
    """Show ``value`` under ``name`` in the progress bar without logging it: Lightning keeps the bar's values in
    this dict (``trainer.progress_bar_metrics`` returns it after adding the prog_bar results)."""
    trainer._logger_connector._progress_bar_metrics[name] = value
