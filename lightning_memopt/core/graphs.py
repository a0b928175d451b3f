"""CUDA-graph replay of a step function, one graph per input signature, and device scalars a replay reads.

On small models a forward-only step is set by Python and kernel launches, not by the GPU. :class:`GraphReplay`
captures ``fn(*inputs)`` once per input signature (tensor shapes, dtypes and devices, plus any non-tensor values)
and replays it: the inputs are copied into the graph's static buffers, the graph runs, and the outputs are the
graph's static tensors (valid until the next replay: clone what you keep). Whatever else changes from call to call
must live in device tensors the graph reads, such as a step's seed in :class:`DeviceValues`.

Where a graph cannot work it warns once, saying why, and runs ``fn`` eagerly from then on: no CUDA, a capture that
fails (a host sync inside ``fn``, a hook that reads a tensor), or more input signatures than ``max_graphs`` (pad
batches to a fixed length or to a few buckets). It never silently does something else.

``fn`` must be a pure function of its inputs and of device state: its Python side effects run only at capture
(and in the eager warm-up before it), its kernels at every replay.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_memopt.core.validate import at_least


def _hint(err: BaseException) -> str:
    """The usual cause of a capture error, where the message alone does not name it."""
    if "CPU and CUDA tensors during CUDA graph capture" in str(err):
        return (". The step copies a host tensor to the GPU: e.g. indexing with a Python list (logits[:, ids_list]) "
                "or torch.tensor(...) made in each forward. Make such a tensor once on the device (a buffer)")
    return ""


def signature(tree: Any) -> tuple:
    """What a captured graph is specific to: each tensor's shape, dtype and device, and every other leaf's value."""
    leaves, spec = tree_flatten(tree)
    sig: list[Any] = [str(spec)]
    for x in leaves:
        if isinstance(x, Tensor):
            sig.append(("T", tuple(x.shape), x.dtype, str(x.device)))
        else:
            try:
                hash(x)
                sig.append(("V", type(x).__name__, x))
            except TypeError:
                sig.append(("V", type(x).__name__, repr(x)))
    return tuple(sig)


def graph_batch(module: Any, batch: Any) -> Any:
    """``batch`` as a captured step should see it: ``module.graph_batch(batch)`` where the module defines it (say, to
    drop non-tensor fields its training step does not read, which would make every batch a new signature), else
    ``batch`` itself."""
    hook = getattr(module, "graph_batch", None)
    return hook(batch) if callable(hook) else batch


class DeviceValues:
    """A static device tensor that a graph reads, rewritten before each replay from pinned host memory.

    :meth:`set` writes the values into one of a few pinned buffers and copies them with ``non_blocking``: no host
    sync, and a buffer is reused only after its copy has run (an event per buffer).
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | str, slots: int = 4) -> None:
        self.tensor = torch.zeros(n, dtype=dtype, device=device)
        self._host = [torch.zeros(n, dtype=dtype, pin_memory=True) for _ in range(slots)]
        self._events: list[torch.cuda.Event | None] = [None] * slots
        self._i = 0

    def set(self, values: Sequence[int | float]) -> Tensor:
        i = self._i = (self._i + 1) % len(self._host)
        if self._events[i] is not None:
            self._events[i].synchronize()  # type: ignore[union-attr]  # long done: it was queued slots steps ago
        host = self._host[i]
        for j, v in enumerate(values):
            host[j] = v
        self.tensor.copy_(host, non_blocking=True)
        ev = self._events[i] = torch.cuda.Event()
        ev.record()
        return self.tensor


class GraphReplay:
    """``fn(*inputs)`` from a CUDA graph captured per input signature; eager, with one warning, where it cannot be.

    Args:
        fn: the function to capture (see the module docstring for what it may do).
        name: used in warnings, e.g. ``"MeZO(cuda_graph=True)"``.
        max_graphs: distinct input signatures captured at most; beyond, eager with a warning (each graph keeps its
            activations' memory in a pool shared by all graphs of this object).
        warmup: eager calls on a side stream before capture (cuBLAS and the allocator settle there, as torch's
            ``make_graphed_callables`` does).
        warmup_once: warm up before the first capture only. For a ``fn`` with no lazy state of its own per signature
            (DFO's population forward: its maps are made before any capture), where the process's lazy state has
            settled at the first capture; it saves one eager call per later signature (DFO captures one per layer
            and batch shape: 90 at SmolLM2's 30 layers and 3 lengths).
    """

    def __init__(
        self, fn: Callable[..., Any], name: str, max_graphs: int = 8, warmup: int = 2, warmup_once: bool = False
    ) -> None:
        self.fn = fn
        self.name = name
        self.max_graphs = at_least(max_graphs, 1, "max_graphs")
        self.warmup = int(warmup)
        self.warmup_once = bool(warmup_once)
        self.disabled: str | None = None  # why graphs are off (then every call is eager)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor], Any]] = {}
        self._pool: Any = None
        self._warned: set[str] = set()
        self.replays = 0
        self.captures = 0

    def _warn(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"{self.name}: {reason}; running the eager step.", stacklevel=3)

    def disable(self, reason: str) -> None:
        """Run eagerly from now on (warned once, with ``reason``)."""
        self.disabled = reason
        self._warn(reason)

    def __call__(self, *inputs: Any) -> Any:
        if self.disabled is not None:
            return self.fn(*inputs)
        leaves, _ = tree_flatten(inputs)
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        if not torch.cuda.is_available() or not tensors or any(t.device.type != "cuda" for t in tensors):
            self.disable("CUDA graphs need CUDA tensors (this run's inputs are on the CPU)")
            return self.fn(*inputs)
        sig = signature(inputs)
        entry = self._graphs.get(sig)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                self._warn(
                    f"more than max_graphs={self.max_graphs} input signatures (batch shapes or non-tensor values); "
                    f"new ones run eagerly. Pad batches to a fixed length or a few buckets (PromptClassificationDataModule"
                    f"(padding='max_length' or 'bucket'))"
                )
                return self.fn(*inputs)
            try:
                entry = self._capture(inputs)
            except Exception as err:  # noqa: BLE001 - any capture failure: say why, then run eagerly
                self.disable(f"the step could not be captured in a CUDA graph ({type(err).__name__}: {err}){_hint(err)}")
                return self.fn(*inputs)
            self._graphs[sig] = entry
        graph, static, out = entry
        for dst, src in zip(static, tensors):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        self.replays += 1
        return out

    def _capture(self, inputs: tuple) -> tuple[torch.cuda.CUDAGraph, list[Tensor], Any]:
        leaves, spec = tree_flatten(inputs)
        static_leaves = [x.clone() if isinstance(x, Tensor) else x for x in leaves]
        static_inputs = tree_unflatten(static_leaves, spec)
        static = [x for x in static_leaves if isinstance(x, Tensor)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(0 if self.warmup_once and self.captures else self.warmup):
                self.fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may allocate while this thread captures
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self.fn(*static_inputs)
        self._pool = graph.pool()
        self.captures += 1
        return graph, static, out
