"""What the non-finite guard costs a MeZO step, measured in one process with guarded and unguarded steps interleaved.

The `guard` suite times each case in its own process (5 steps); MeZO's step then varies by more than the guard
could cost (63 vs 73 ms between two processes of the same step). Here one model and one input serve both steps,
which alternate in blocks of ``--block`` steps for ``--rounds`` rounds, each step timed by CUDA events, so drift
hits both alike. Prints a table and writes JSON:

    python -m benchmarks.guard_interleaved --size 1b --out benchmarks/results/guard_interleaved_h200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.cases.mezo import mezo
from benchmarks.common import build
from benchmarks.task_results import environment


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dist", default="normal", choices=["normal", "rademacher"])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU: the guard's cost is a GPU timing")
    model = build(args.size)
    x = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda")
    steps = {"guarded": mezo(model, x, args.dist, check=True), "unguarded": mezo(model, x, args.dist, check=False)}
    for step in steps.values():  # warm-up: Triton compiles, allocator settles
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        # alternate which goes first, so neither always follows the other
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            for _ in range(args.block):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                steps[name]()  # ends in the step's own host sync (the loss read)
                b.record()
                b.synchronize()
                times[name].append(a.elapsed_time(b))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [dict(case=k, steps=len(v), median_ms=round(med[k], 3), mean_ms=round(statistics.fmean(v), 3),
                 p10_ms=round(sorted(v)[len(v) // 10], 3), p90_ms=round(sorted(v)[len(v) * 9 // 10], 3))
            for k, v in times.items()]
    ratio = med["guarded"] / med["unguarded"]
    # per round: the ratio of the two blocks' medians, for a spread of the ratio itself
    per_round = [statistics.median(times["guarded"][i:i + args.block]) /
                 statistics.median(times["unguarded"][i:i + args.block])
                 for i in range(0, len(times["guarded"]), args.block)]
    rec = dict(size=args.size, batch=args.batch, seq=args.seq, dist=args.dist, rounds=args.rounds, block=args.block,
               params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 3), rows=rows,
               guarded_over_unguarded=round(ratio, 4),
               per_round_ratio_p10_p50_p90=[round(sorted(per_round)[int(q * (len(per_round) - 1))], 4)
                                           for q in (0.1, 0.5, 0.9)],
               env=environment(sys.argv))
    lines = [f"# MeZO step with and without the non-finite guard, interleaved in one process",
             "", f"GPU {rec['env']['gpu']}, commit {rec['env']['commit']}; Llama {args.size} "
             f"({rec['params_b']} B params) bf16, {args.batch}x{args.seq}, z {args.dist}; {args.rounds} rounds of "
             f"{args.block} steps each, alternating.", "",
             "| case | steps | median ms | mean ms | p10 ms | p90 ms |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['steps']} | {r['median_ms']} | {r['mean_ms']} | {r['p10_ms']} | {r['p90_ms']} |"
              for r in rows]
    lines += ["", f"guarded / unguarded (medians): **{ratio:.4f}**; per-round ratio p10/p50/p90: "
              f"{rec['per_round_ratio_p10_p50_p90']}"]
    print("\n".join(lines))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(rec, indent=1))
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
