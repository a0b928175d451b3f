"""MeZO's step through Lightning, eager beside ``cuda_graph=True``, against its own forward (eager and captured).

One process, one model shape at a time, nothing else on the GPU: the bare forward (the loss of
``model(input_ids=x, labels=x)``, eval, no autograd) eager and replayed from a CUDA graph, then the MeZO step as a
user runs it (``benchmarks.cases.lightning``: an ordinary LightningModule under a Trainer, bf16-true) eager and
with ``cuda_graph=True``, then the floor: 2 captured forwards plus 3 passes over the weights (perturb +, perturb -,
update: each reads and writes every weight) at the copy bandwidth measured here. The steps are timed as a fit
runs them (``throughput``: no sync per step, a step is the time between two step starts); ``MEZO_DIST=rademacher``
times ±1 directions. ``--population N`` adds the population estimator (N rank-4 directions, batched through
``per_sample_loss``; ``MEZO_POP_CHUNK`` members per forward, default 8) eager and graphed, with its cost over the
plain graphed step, directions per second, and its peak over one forward of the base batch and of the chunk's rows.
``--overlap`` adds the plain step with ``overlap=True`` (each group's copies one ahead on a side stream), eager and
graphed, beside the same step without it.
Peaks: allocated and reserved (a graph's activations sit in its pool, which only the
reserved figure shows). Prints a table, writes JSON:

    python -m benchmarks.zo_fastpath --sizes smol:16:128,1b:8:512 --out benchmarks/results/zo_fastpath_h200
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.cases import lightning as lcases
from benchmarks.common import build, timed
from benchmarks.task_results import environment
from lightning_memopt.core.graphs import GraphReplay


def weight_pass_s(nbytes: int, reps: int = 10) -> float:
    """Seconds to read and write ``nbytes`` once (a device copy of that size), median of ``reps``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t, _ = timed(lambda: dst.copy_(src), warm=2, reps=reps)
    del src, dst
    return t


def one(size: str, batch: int, seq: int, reps: int, population: int = 0, overlap: bool = False) -> dict[str, Any]:
    model = build(size).eval()
    x = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def loss(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    rec: dict[str, Any] = dict(size=size, batch=batch, seq=seq, params_b=round(nbytes / 2 / 1e9, 3))
    with torch.no_grad():
        t, peak = timed(lambda: loss(x), warm=3, reps=reps)
        rec.update(forward_ms=round(1e3 * t, 3), forward_peak_gib=round(peak, 3),
                   forward_peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3))
        graph = GraphReplay(loss, "forward")
        t, _ = timed(lambda: graph(x), warm=3, reps=reps)
        rec.update(forward_graph_ms=round(1e3 * t, 3), forward_graph_captured=graph.captures == 1)
        if population:
            members = int(os.environ.get("MEZO_POP_CHUNK", "8")) or 2 * population
            members = min(members, 2 * population)
            xm = x.repeat(members, 1)
            del graph
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            t, peak = timed(lambda: loss(xm), warm=1, reps=3)
            rec.update(members_per_forward=members, forward_chunk_ms=round(1e3 * t, 3),
                       forward_chunk_peak_gib=round(peak, 3))
            del xm
            graph = None
    del graph, model, x
    gc.collect()
    torch.cuda.empty_cache()
    rec["weight_pass_ms"] = round(1e3 * weight_pass_s(nbytes), 3)
    cases = [("mezo_lightning", "step_eager"), ("mezo_lightning_graph", "step_graph")]
    if overlap:
        cases += [("mezo_lightning", "step_eager_overlap"), ("mezo_lightning_graph", "step_graph_overlap")]
    if population:
        os.environ["MEZO_POP"] = str(population)
        cases += [("mezo_pop_lightning", "pop_eager"), ("mezo_pop_lightning_graph", "pop_graph")]
    for case, key in cases:
        torch.cuda.reset_peak_memory_stats()
        os.environ["MEZO_OVERLAP"] = "1" if key.endswith("_overlap") else "0"
        r = lcases.run(case, size, batch, seq, warm=3, reps=reps, timing="throughput")
        rec[f"{key}_ms"] = None if r.get("step_s") is None else round(1e3 * r["step_s"], 3)
        rec[f"{key}_peak_gib"] = r.get("peak_gib")
        rec[f"{key}_peak_reserved_gib"] = r.get("peak_reserved_gib")
        gc.collect()
        torch.cuda.empty_cache()
    floor = 2 * rec["forward_graph_ms"] + 3 * rec["weight_pass_ms"]
    rec["floor_ms"] = round(floor, 3)
    e, g = rec["step_eager_ms"], rec["step_graph_ms"]
    if e and g:
        rec.update(graph_over_forward_graph=round(g / rec["forward_graph_ms"], 3),
                   eager_over_graph=round(e / g, 3), graph_over_floor=round(g / floor, 3),
                   eager_over_floor=round(e / floor, 3),
                   eager_peak_over_forward=round(rec["step_eager_peak_gib"] / rec["forward_peak_gib"], 3),
                   graph_reserved_over_forward_reserved=round(
                       rec["step_graph_peak_reserved_gib"] / rec["forward_peak_reserved_gib"], 3))
    o, g = rec.get("step_graph_overlap_ms"), rec["step_graph_ms"]
    if overlap and o and g:
        rec.update(graph_overlap_over_graph=round(o / g, 3), graph_overlap_over_floor=round(o / floor, 3),
                   graph_overlap_peak_reserved_over_graph=round(
                       rec["step_graph_overlap_peak_reserved_gib"] / rec["step_graph_peak_reserved_gib"], 3))
    p, g = rec.get("pop_graph_ms"), rec["step_graph_ms"]
    if population and p and g:
        rec.update(population=population, pop_graph_over_step_graph=round(p / g, 3),
                   directions_per_s_pop=round(population / (p / 1e3), 1), directions_per_s_plain=round(1e3 / g, 1),
                   pop_eager_peak_over_forward=round(rec["pop_eager_peak_gib"] / rec["forward_peak_gib"], 3),
                   pop_eager_peak_over_forward_chunk=round(rec["pop_eager_peak_gib"] / rec["forward_chunk_peak_gib"], 3))
    return rec


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="smol:16:128,1b:8:512", help="SIZE:BATCH:SEQ,...")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--population", type=int, default=0, help="also time the population estimator, N directions")
    ap.add_argument("--overlap", action="store_true", help="also time the plain step with overlap=True")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    rows = []
    for spec in args.sizes.split(","):
        size, b, s = spec.split(":")
        rows.append(one(size, int(b), int(s), args.reps, args.population, args.overlap))
        print("ROW " + json.dumps(rows[-1]), flush=True)
    env = environment(sys.argv)
    env["distribution"] = os.environ.get("MEZO_DIST", "normal")
    cols = ["size", "batch", "seq", "forward_ms", "forward_graph_ms", "step_eager_ms", "step_graph_ms",
            "graph_over_forward_graph", "eager_over_graph", "floor_ms", "graph_over_floor", "eager_over_floor",
            "forward_peak_gib", "eager_peak_over_forward", "forward_peak_reserved_gib",
            "step_graph_peak_reserved_gib", "graph_reserved_over_forward_reserved"]
    if args.overlap:
        cols += ["step_eager_overlap_ms", "step_graph_overlap_ms", "graph_overlap_over_graph", "graph_overlap_over_floor",
                 "graph_overlap_peak_reserved_over_graph"]
    if args.population:
        env["population_chunk"] = int(os.environ.get("MEZO_POP_CHUNK", "8")) or None
        cols += ["pop_eager_ms", "pop_graph_ms", "pop_graph_over_step_graph", "directions_per_s_pop",
                 "directions_per_s_plain", "members_per_forward", "pop_eager_peak_gib", "pop_eager_peak_over_forward",
                 "pop_eager_peak_over_forward_chunk"]
    lines = [f"# MeZO step through Lightning: eager and cuda_graph=True", "",
             f"GPU {env['gpu']}, commit {env['commit']}; random-init Llama, bf16, z {env['distribution']}; medians of "
             f"{args.reps} steps (forwards: synchronised per call; MeZO steps: as a fit runs, no sync per step).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c)) for c in cols) + " |" for r in rows]
    print("\n".join(lines))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(dict(rows=rows, env=env), indent=1))
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
