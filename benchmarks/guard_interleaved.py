"""What the non-finite checks cost a method's step, measured in one process with checked and unchecked steps
interleaved.

The `guard` suite times each case in its own process (5 steps); MeZO's step then varies by more than the guard
could cost (63 vs 73 ms between two processes of the same step). Here one model and one input serve both steps,
which alternate in blocks of ``--block`` steps for ``--rounds`` rounds, each step timed by CUDA events, so drift
hits both alike. ``--method`` picks what is checked, as the callbacks check it:

* ``mezo``: the projected gradient and the loss;
* ``lomo`` / ``adalomo``: the loss, and each tensor's gradient inside the kernel that updates it (TensorFlags);
* ``galore``: the loss and the gradients' total norm (``get_total_norm``) before the step;
* ``galore_layerwise``: the loss, and each parameter's (projected) gradient in its hook.

Prints a table and writes JSON:

    python -m benchmarks.guard_interleaved --size 1b --per_step --out benchmarks/results/guard_interleaved_h200
    python -m benchmarks.guard_interleaved --method adalomo --size 1b --out benchmarks/results/guard_adalomo_h200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.cases.galore import setup as galore_case
from benchmarks.cases.mezo import mezo
from benchmarks.common import build
from benchmarks.task_results import environment
from lightning_memopt.core.fused_backward import FusedBackward
from lightning_memopt.core.nonfinite import SkipGuard
from lightning_memopt.lomo.core import FusedStep, LomoSettings

Step = Callable[[], Any]


def lomo_steps(model: torch.nn.Module, x: torch.Tensor, rule: str) -> dict[str, Step]:
    """One FusedStep (its hooks serve both), its checks switched per step."""
    model.train()
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-5, "weight_decay": 0.0}]
    fs = FusedStep(groups, {}, LomoSettings(rule=rule))

    def run(check: bool) -> Step:
        def step() -> None:
            fs.check_nonfinite = check
            fs.step(model(input_ids=x, labels=x).loss)
        return step

    return {"checked": run(True), "unchecked": run(False)}


def galore_steps(model: torch.nn.Module, x: torch.Tensor, layerwise: bool) -> dict[str, Step]:
    """GaLore as its callback steps it (benchmarks/cases/galore.py's settings), with and without the checks."""
    guard = SkipGuard("GaLore", notify=lambda msg: None)
    holder, galore, _ = galore_case(model, 200, guard=guard)
    group = holder.param_groups[0]
    if layerwise:
        FusedBackward(group["params"], update=lambda p: galore.step_param(p, group))

    def run(check: bool) -> Step:
        def step() -> None:  # the guard resolved where the callback resolves it: with this step's work queued
            loss = model(input_ids=x, labels=x).loss
            if layerwise:
                guard.resolve()
                galore.begin(guard.check(loss, step=0) if check else None, per_tensor=check,
                             loss=loss if check else None)
                loss.backward()
                galore.end()
                return
            loss.backward()
            guard.resolve()
            grads = [p.grad for p in group["params"] if p.grad is not None]
            galore.step(guard.check(loss, torch.nn.utils.get_total_norm(grads), step=0) if check else None)
            holder.zero_grad(set_to_none=True)
        return step

    return {"checked": run(True), "unchecked": run(False)}


METHODS: dict[str, Callable[[torch.nn.Module, torch.Tensor, argparse.Namespace], dict[str, Step]]] = {
    "mezo": lambda m, x, a: {"checked": mezo(m, x, a.dist, check=True), "unchecked": mezo(m, x, a.dist, check=False)},
    "lomo": lambda m, x, a: lomo_steps(m, x, "sgd"),
    "adalomo": lambda m, x, a: lomo_steps(m, x, "adalomo"),
    "galore": lambda m, x, a: galore_steps(m, x, layerwise=False),
    "galore_layerwise": lambda m, x, a: galore_steps(m, x, layerwise=True),
}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="mezo", choices=list(METHODS))
    ap.add_argument("--size", default="1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dist", default="normal", choices=["normal", "rademacher"])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--per_step", action="store_true",
                    help="time each step alone, synchronized (MeZO's steps sync anyway); by default a block's steps "
                         "are queued back to back, as a training loop runs them, and timed together, so a check "
                         "that holds the host back (waiting for the last backward) shows")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU: the guard's cost is a GPU timing")
    model = build(args.size)
    x = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda")
    steps = METHODS[args.method](model, x, args)
    for step in steps.values():  # warm-up: Triton compiles, allocator settles
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        # alternate which goes first, so neither always follows the other
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            if not args.per_step:  # one time per block: ms per step over its steps, queued back to back
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(args.block):
                    steps[name]()
                b.record()
                b.synchronize()
                times[name].append(a.elapsed_time(b) / args.block)
                continue
            for _ in range(args.block):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                steps[name]()  # MeZO's ends in its own host sync (the loss read)
                b.record()
                b.synchronize()
                times[name].append(a.elapsed_time(b))
    med = {k: statistics.median(v) for k, v in times.items()}
    per = args.block if args.per_step else 1  # timings per block
    rows = [dict(case=k, steps=len(v) * args.block // per, median_ms=round(med[k], 3),
                 mean_ms=round(statistics.fmean(v), 3),
                 p10_ms=round(sorted(v)[len(v) // 10], 3), p90_ms=round(sorted(v)[len(v) * 9 // 10], 3))
            for k, v in times.items()]
    ratio = med["checked"] / med["unchecked"]
    # per round: the ratio of the two blocks' medians, for a spread of the ratio itself
    per_round = [statistics.median(times["checked"][i:i + per]) / statistics.median(times["unchecked"][i:i + per])
                 for i in range(0, len(times["checked"]), per)]
    rec = dict(method=args.method, size=args.size, batch=args.batch, seq=args.seq, dist=args.dist, rounds=args.rounds,
               block=args.block, timing="per step" if args.per_step else "per block, steps queued back to back",
               params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 3), rows=rows,
               checked_over_unchecked=round(ratio, 4),
               per_round_ratio_p10_p50_p90=[round(sorted(per_round)[int(q * (len(per_round) - 1))], 4)
                                           for q in (0.1, 0.5, 0.9)],
               env=environment(sys.argv))
    lines = [f"# {args.method} step with and without the non-finite checks, interleaved in one process",
             "", f"GPU {rec['env']['gpu']}, commit {rec['env']['commit']}; Llama {args.size} "
             f"({rec['params_b']} B params) bf16, {args.batch}x{args.seq}"
             f"{f', z {args.dist}' if args.method == 'mezo' else ''}; {args.rounds} rounds of "
             f"{args.block} steps each, alternating; timed {rec['timing']}.", "",
             "| case | steps | median ms | mean ms | p10 ms | p90 ms |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['steps']} | {r['median_ms']} | {r['mean_ms']} | {r['p10_ms']} | {r['p90_ms']} |"
              for r in rows]
    lines += ["", f"checked / unchecked (medians): **{ratio:.4f}**; per-round ratio p10/p50/p90: "
              f"{rec['per_round_ratio_p10_p50_p90']}"]
    print("\n".join(lines))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(rec, indent=1))
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
