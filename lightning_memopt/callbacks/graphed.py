"""The module's own ``training_step`` (or a step around it) replayed from CUDA graphs, with its logging kept.

A captured step runs the module's Python once; ``self.log`` inside it would then log the capture's tensors forever.
:func:`recording_logs` records the calls during capture, and :func:`replay_logs` re-issues them after each replay
with that replay's values (the graph rewrites the same tensors). :class:`GraphedTrainingStep` does both around
``training_step`` alone, for methods whose own work is outside the graph (DFOLoRA); MeZO's graph holds its whole
estimate and uses the two functions directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils._pytree import tree_map

from lightning_memopt.core.graphs import GraphReplay, graph_batch

LogCall = tuple[str, Any, tuple, dict]


@contextmanager
def recording_logs(pl_module: pl.LightningModule) -> Iterator[list[LogCall]]:
    """``pl_module.log`` calls inside the block are recorded (name, value, args, kwargs), not logged."""
    logs: list[LogCall] = []

    def record(name: str, value: Any, *a: Any, **kw: Any) -> None:
        logs.append((name, value, a, kw))

    own = pl_module.__dict__.get("log")
    pl_module.log = record  # type: ignore[method-assign]
    try:
        yield logs
    finally:
        if own is None:
            del pl_module.__dict__["log"]
        else:
            pl_module.log = own  # type: ignore[method-assign]


def replay_logs(pl_module: pl.LightningModule, logs: list[LogCall]) -> None:
    """Log the recorded calls; tensor values are cloned (the next replay rewrites them)."""
    for name, value, a, kw in logs:
        pl_module.log(name, value.clone() if isinstance(value, torch.Tensor) else value, *a, **kw)


def last_per_name(logs: list[LogCall]) -> list[LogCall]:
    """The last call of each name, in first-call order: a step that runs ``training_step`` once per perturbed
    forward logs once, so epoch sums and means count each step once."""
    last: dict[str, LogCall] = {}
    for call in logs:
        last[call[0]] = call
    return list(last.values())


def clone_tensors(out: Any) -> Any:
    return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, out)


class GraphedTrainingStep:
    """``training_step(batch, *rest)`` from a CUDA graph per batch signature (:class:`GraphReplay`: eager with one
    warning where capture cannot work). The other arguments (``batch_idx``) are not part of a graph's signature:
    only the Python side of the step reads them, and that runs at capture.

    Args:
        name: used in warnings.
        max_graphs: batch signatures captured at most.
    """

    def __init__(self, name: str, max_graphs: int = 4) -> None:
        self.graph = GraphReplay(self._run, name, max_graphs, warmup=1)
        self._call: tuple[Callable[..., Any], pl.LightningModule, tuple, dict] | None = None

    def __call__(self, step: Callable[..., Any], pl_module: pl.LightningModule, batch: Any, rest: tuple,
                 kwargs: dict) -> Any:
        self._call = (step, pl_module, rest, kwargs)
        out, logs = self.graph(graph_batch(pl_module, batch))
        if out is None and self.graph.disabled is None:  # its replays would return None for every batch of the shape
            self.graph.disable("training_step returned None (skip this batch) at capture")
        replay_logs(pl_module, logs)
        return clone_tensors(out)

    def _run(self, batch: Any) -> tuple[Any, list[LogCall]]:
        assert self._call is not None
        step, pl_module, rest, kwargs = self._call
        with recording_logs(pl_module) as logs:
            out = step(batch, *rest, **kwargs)
        return out, logs
