"""Can MeZO's weight passes hide behind its forward? A probe for issue 18's 1.1B step (≤ 1.10× its floor).

A Gaussian pass over 1.1B bf16 weights is compute-bound (2.1 ms against 1.08 ms of memory traffic,
``normal_kernels_h200.md``), and the step makes three. The forward's GEMMs run on the tensor cores, the z
arithmetic on the CUDA cores. If decoder layer k+1's pass runs on a side stream while layer k's forward runs, the
forward's own layers wait only for their own weights. This probe times, on a random-init Llama in bf16 under
``no_grad``:

* ``forward``: one forward alone;
* ``pass``: one in-place Gaussian pass over every weight (``update1_many``, as MeZO's restore/update), alone;
* ``serial``: the pass, then the forward, on one stream (what the step does today);
* ``pipelined``: the pass layer by layer on a side stream, the forward on the main stream, each layer's forward
  waiting (forward pre-hook, ``wait_event``) for its own layer's pass only.

It prints ``hidden = (serial − pipelined) / pass``: the share of the pass the forward hides. It also checks that
both orders leave the same weights and logits. On CPU (``DEV=cpu``, the tiny model) there are no streams: the
pipelined order runs inline, which checks the plumbing only.

    python -m benchmarks.overlap_probe --size 1b --batch 8 --seq 512 --out benchmarks/results/overlap_probe_h200
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import DEV, build, timed
from benchmarks.task_results import environment
from lightning_memopt.core.perturb import seed_tensor, update1_many


def groups(model: torch.nn.Module) -> list[tuple[torch.nn.Module | None, list[tuple[int, torch.Tensor]]]]:
    """(decoder layer, its parameters with their by-name indices), the rest (embedding, norm, head) first as
    ``(None, ...)``: the forward needs those before its first layer."""
    layers = list(model.model.layers)
    index = {id(p): i for i, (_, p) in enumerate(sorted(model.named_parameters(), key=lambda kv: kv[0]))}
    owned = {id(p) for layer in layers for p in layer.parameters()}
    rest = [(index[id(p)], p) for p in model.parameters() if id(p) not in owned]
    return [(None, rest)] + [(layer, [(index[id(p)], p) for p in layer.parameters()]) for layer in layers]


def apply_pass(params: list[tuple[int, torch.Tensor]], seed_t: torch.Tensor, a: torch.Tensor, eps: float) -> None:
    """``p ← p − eps·z`` over the group, one launch on the GPU (MeZO's in-place kernel)."""
    if params:
        update1_many([p for _, p in params], [i for i, _ in params], [0] * len(params), 0, a, eps, 1.0,
                     seed_t=seed_t)


def serial(model, gs, ids, seed_t, a, eps):
    for _, params in gs:
        apply_pass(params, seed_t, a, eps)
    return model(ids).logits


def pipelined(model, gs, ids, seed_t, a, eps):
    if DEV != "cuda":  # no streams: the same order inline (checks the plumbing)
        return serial(model, gs, ids, seed_t, a, eps)
    main, side = torch.cuda.current_stream(), _SIDE
    side.wait_stream(main)
    events = []
    with torch.cuda.stream(side):
        for _, params in gs:
            apply_pass(params, seed_t, a, eps)
            ev = torch.cuda.Event()
            ev.record(side)
            events.append(ev)
    handles = [layer.register_forward_pre_hook(lambda *_, ev=ev: main.wait_event(ev))
               for (layer, _), ev in zip(gs[1:], events[1:])]
    try:
        main.wait_event(events[0])  # the embedding, final norm and head
        out = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    main.wait_stream(side)
    return out


_SIDE: Any = None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    global _SIDE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1b" if DEV == "cuda" else "tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", help="JSON path prefix")
    args = ap.parse_args(argv)
    if DEV == "cuda":
        _SIDE = torch.cuda.Stream()
    torch.manual_seed(0)
    model = build(args.size).eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=DEV)
    gs = groups(model)
    seed_t = seed_tensor(1234, DEV)
    a = torch.ones(1, dtype=torch.float32, device=DEV)
    eps, rows = 1e-3, {}
    with torch.no_grad():
        # both orders from the same weights: the same weights after, and the same logits
        ref = [p.detach().clone() for p in model.parameters()]
        out_s = serial(model, gs, ids, seed_t, a, eps)
        w_s = [p.detach().clone() for p in model.parameters()]
        for p, r in zip(model.parameters(), ref):
            p.copy_(r)
        out_p = pipelined(model, gs, ids, seed_t, a, eps)
        same_w = all(torch.equal(p, w) for p, w in zip(model.parameters(), w_s))
        logit_diff = float((out_p.float() - out_s.float()).abs().max())
        del ref, w_s, out_s, out_p
        signs = itertools.cycle([eps, -eps])  # each timed pass undoes the one before: the weights stay put
        cases: dict[str, Callable[[], Any]] = {
            "forward": lambda: model(ids).logits,
            "pass": lambda: [apply_pass(p, seed_t, a, next(signs)) for _, p in gs],
            "serial": lambda: serial(model, gs, ids, seed_t, a, next(signs)),
            "pipelined": lambda: pipelined(model, gs, ids, seed_t, a, next(signs)),
        }
        for name, f in cases.items():
            rows[name] = 1e3 * timed(f, warm=2, reps=args.reps)[0]  # ms
    hidden = (rows["serial"] - rows["pipelined"]) / rows["pass"]
    res = {"size": args.size, "batch": args.batch, "seq": args.seq, "ms": {k: round(v, 3) for k, v in rows.items()},
           "hidden": round(hidden, 3), "same_weights": same_w, "max_logit_diff": logit_diff,
           "env": {**environment(sys.argv), "torch": torch.__version__}}
    print(f"{args.size} {args.batch}x{args.seq}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in rows.items())
          + f"; hidden {hidden:.2f} of a pass; same weights {same_w}, max logit diff {logit_diff:.3g}", flush=True)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
