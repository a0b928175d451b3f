"""Shared pieces of the GPU benchmarks: model builder, timing, and the RESULT line protocol.

Each case runs in its own process (fresh CUDA allocator) and prints one line ``RESULT {json}``, the same protocol as
``../shared/tools/anchors_gpu.py``, so our figures and the peers' sit in one table. ``DEV=cpu`` runs the smoke mode.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable

import torch

DEV = os.environ.get("DEV", "cuda" if torch.cuda.is_available() else "cpu")


def build(size: str, dtype: torch.dtype = torch.bfloat16, **overrides: Any) -> torch.nn.Module:
    """A random-init Llama of the anchors' shapes, on DEV, in ``dtype`` (weights' values do not matter here).

    Built on the meta device and materialised on DEV (``lightning_memopt.models.init``): the weights exist once, in
    their final dtype, at any size. ``MEMOPT_META_INIT=0`` constructs directly on DEV instead (the same model).
    """
    from lightning_memopt.models.configs import llama_config
    from lightning_memopt.models.init import build_causal_lm

    cfg = llama_config(size, **overrides)  # the anchors' vocab (32000; 512 for tiny/small; SmolLM2's for smol)
    meta = os.environ.get("MEMOPT_META_INIT", "1") != "0"
    return build_causal_lm(cfg, device=DEV, dtype=dtype, meta=meta, seed=0)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[], Any], warm: int = 2, reps: int = 5, last: list | None = None) -> tuple[float, float]:
    """Median seconds per call after ``warm`` calls (CUDA events on GPU), and peak GiB over the timed calls.
    ``last``: gets each call's return value (one slot: the last call's, read after the timing)."""
    if last is None:
        last = [None]
    for _ in range(warm):
        last[0] = step()
    sync()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        if DEV == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            last[0] = step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            last[0] = step()
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0
    return statistics.median(times), peak


def report(res: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(res), flush=True)


def run_case(method: str, size: str, batch: int, seq: int, make_step: Callable[[torch.nn.Module, torch.Tensor], Callable[[], Any]],
             warm: int = 2, reps: int = 5, model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the model, make the step closure, time it, print and return the RESULT record (OOM is a result)."""
    res: dict[str, Any] = dict(method=method, size=size, batch=batch, seq=seq, impl="lightning_memopt")
    try:
        model = build(size, **(model_kwargs or {}))
        res["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
        if DEV == "cuda":  # the build's own peak against the weights: 1.0 means no second copy at load
            from lightning_memopt.models.init import tensor_bytes

            res["load_peak_x"] = round(torch.cuda.max_memory_allocated() / tensor_bytes(model), 3)
        x = torch.randint(0, model.config.vocab_size, (batch, seq), device=DEV)
        step = make_step(model, x)
        out: list = [None]
        t, mem = timed(step, warm, reps, out)
        res.update(step_s=round(t, 4), peak_gib=round(mem, 2), tok_per_s=round(batch * seq / t, 1))
        if isinstance(out[0], torch.Tensor) and out[0].numel() == 1:  # the loss of the last step: a real, finite one
            res["loss"] = round(float(out[0]), 4)
    except torch.OutOfMemoryError:
        res.update(step_s=None, peak_gib="OOM")
    report(res)
    return res


def parse_case_args(module: str, cases: Any, argv: list[str], batch: int = 8, seq: int = 512) -> tuple[str, str, int, int]:
    """``CASE SIZE [BATCH] [SEQ]`` from a case module's command line, with a usage error naming the cases."""
    if len(argv) < 2 or argv[0] not in cases:
        raise SystemExit(f"usage: python -m benchmarks.cases.{module} {{{','.join(cases)}}} SIZE [BATCH] [SEQ]")
    return argv[0], argv[1], int(argv[2]) if len(argv) > 2 else batch, int(argv[3]) if len(argv) > 3 else seq
