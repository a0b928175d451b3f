"""Where a graphed MeZO step's time goes, as a fit runs it: ``MeZO(cuda_graph=True)`` through Lightning on a
random-init Llama (the ``mezo_lightning_graph`` case of ``benchmarks/cases/lightning.py``), profiled for a few steps
after warm-up. Prints the wall-clock per step (between step starts, as ``zo_fastpath`` times it), the GPU's busy
time per step (the union of kernel and copy intervals, annotations left out) and its idle gaps, the kernels by total
time, and every host sync the step makes (``torch.cuda.set_sync_debug_mode``, with the Python frames that made
it). Needs a CUDA GPU:

    python -m benchmarks.zo_step_profile --size 1b --batch 8 --seq 512 --out benchmarks/results/zo_step_profile_h200
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from collections import Counter
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks.cases import lightning as lcases
from benchmarks.task_results import environment


class _Profile(pl.Callback):
    """Profiles steps ``[warm, warm + steps)`` and records host syncs there."""

    def __init__(self, warm: int, steps: int) -> None:
        self.warm, self.steps = warm, steps
        self.prof: Any = None
        self.starts: list[Any] = []
        self.syncs: Counter = Counter()
        self._show: Any = None

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing CUDA operation" in str(message):
            frames = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"
                      for f in traceback.extract_stack()[:-2] if "warnings.py" not in f.filename][-6:]
            self.syncs[" <- ".join(reversed(frames))] += 1
        else:
            self._show(message, category, filename, lineno, file, line)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.warm:
            torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
            self._show, warnings.showwarning = warnings.showwarning, self._record
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        if self.warm <= step <= self.warm + self.steps:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.starts.append(ev)
        if step == self.warm + self.steps and self.prof is not None:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = self._show
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)


def _union_ms(intervals: list[tuple[float, float]]) -> tuple[float, list[float]]:
    """Total length (ms) of the union of ``(start, end)`` intervals in µs, and the gaps between them (µs)."""
    total, gaps, cur = 0.0, [], None
    for a, b in sorted(intervals):
        if cur is None:
            cur = [a, b]
        elif a > cur[1]:
            total += cur[1] - cur[0]
            gaps.append(a - cur[1])
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    if cur is not None:
        total += cur[1] - cur[0]
    return total / 1e3, gaps


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--case", default="mezo_lightning_graph",
                    choices=sorted(c for c in lcases.CASES if c.startswith("mezo")))
    ap.add_argument("--out", default=None, help="JSON path prefix")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    prof = _Profile(args.warm, args.steps)
    # the case as zo_fastpath runs it (its module, precision, Trainer), one step past the profiled ones
    lcases.run(args.case, args.size, args.batch, args.seq, warm=args.warm, reps=args.steps + 1, timing="throughput",
               callbacks=(prof,))
    if prof.prof is None or len(prof.starts) < args.steps + 1:
        raise SystemExit("the fit ended before the profiled steps did (out of memory?): see the RESULT line above")
    walls = [a.elapsed_time(b) for a, b in zip(prof.starts, prof.starts[1:])]
    # GPU work only: a user annotation (Lightning's "Optimizer.step#...") spans the whole step and would hide gaps
    events = [e for e in prof.prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
              and not getattr(e, "is_user_annotation", False) and not e.name.startswith("Optimizer.")]
    busy, gaps = _union_ms([(e.time_range.start, e.time_range.end) for e in events])
    kernels: Counter = Counter()
    calls: Counter = Counter()
    for e in events:
        kernels[e.name[:90]] += e.time_range.elapsed_us() / 1e3
        calls[e.name[:90]] += 1
    n = args.steps
    rec = {
        "case": args.case, "size": args.size, "batch": args.batch, "seq": args.seq, "steps": n,
        "wall_ms_per_step": [round(w, 3) for w in walls],
        "gpu_busy_ms_per_step": round(busy / n, 3),
        "gpu_events_per_step": round(len(events) / n, 1),
        "gaps_over_5us_per_step": round(sum(1 for g in gaps if g > 5) / n, 1),
        "gap_ms_per_step": round(sum(gaps) / 1e3 / n, 3),
        "largest_gaps_us": [round(g, 1) for g in sorted(gaps, reverse=True)[:12]],
        "kernels_ms_per_step": [[k, round(v / n, 3), calls[k] // n] for k, v in kernels.most_common(30)],
        "host_syncs_in_profiled_steps": dict(prof.syncs.most_common(20)),
        "env": environment(sys.argv),
    }
    print(f"wall ms/step {rec['wall_ms_per_step']}; GPU busy {rec['gpu_busy_ms_per_step']} ms/step; "
          f"gaps {rec['gap_ms_per_step']} ms/step ({rec['gaps_over_5us_per_step']} over 5 us); largest gaps (us) "
          f"{rec['largest_gaps_us']}")
    for k, v, c in rec["kernels_ms_per_step"]:
        print(f"{v:9.3f} ms  {c:5d}x  {k}")
    print(f"host syncs in {n} profiled steps: {sum(prof.syncs.values())}")
    for k, v in prof.syncs.most_common(20):
        print(f"{v:5d}  {k}")
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
