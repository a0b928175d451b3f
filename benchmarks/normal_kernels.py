"""Where a perturbation pass's time goes: one in-place pass over 1.1B bf16 elements (a 1.1B model's weights) by how
z is made, and by block shape. The variants are copies of ``core/_perturb_triton.py``'s normal kernel with parts
swapped: no z at all (memory alone), ±1 signs, the precise Box–Muller (DIST 0), fast math (DIST 1), each half of fast
math alone, and Philox4x32 with 7 rounds instead of 10. ``JOIN`` lays the four lanes out with ``tl.join`` instead of
selects. Needs Triton and a GPU; prints a table, writes JSON:

    python -m benchmarks.normal_kernels --out benchmarks/results/normal_kernels_h200
"""

import argparse
import json

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from benchmarks.common import timed
from lightning_memopt.core._perturb_triton import _cos_sin_2pi


@triton.jit
def _log(u, LOG: tl.constexpr):
    if LOG == 0:
        return libdevice.log(u)
    return libdevice.fast_logf(u)


@triton.jit
def _z4(seed, c, OUT: tl.constexpr, LOG: tl.constexpr, TRIG: tl.constexpr, ROUNDS: tl.constexpr):
    i1, i2, i3, i4 = tl.randint4x(seed, c, ROUNDS)
    if OUT == 0:
        u1 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(i1))
        u3 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(i3))
        r1 = tl.sqrt(-2.0 * _log(u1, LOG))
        r3 = tl.sqrt(-2.0 * _log(u3, LOG))
        if TRIG == 0:
            c2, s2 = _cos_sin_2pi(tl.uint_to_uniform_float(i2))
            c4, s4 = _cos_sin_2pi(tl.uint_to_uniform_float(i4))
        else:
            t2 = 6.283185307179586 * tl.uint_to_uniform_float(i2)
            t4 = 6.283185307179586 * tl.uint_to_uniform_float(i4)
            c2, s2 = libdevice.fast_cosf(t2), libdevice.fast_sinf(t2)
            c4, s4 = libdevice.fast_cosf(t4), libdevice.fast_sinf(t4)
        return r1 * c2, r1 * s2, r3 * c4, r3 * s4
    elif OUT == 2:
        return (1.0 - 2.0 * (i1 >> 31).to(tl.float32), 1.0 - 2.0 * (i2 >> 31).to(tl.float32),
                1.0 - 2.0 * (i3 >> 31).to(tl.float32), 1.0 - 2.0 * (i4 >> 31).to(tl.float32))
    else:  # no z at all: the memory pass alone (scale 0 on a constant)
        return 0.0 * c.to(tl.float32), 0.0 * c.to(tl.float32), 0.0 * c.to(tl.float32), 0.0 * c.to(tl.float32)


@triton.jit(do_not_specialize=["seed", "scale"])
def _kern(w_ptr, n, seed, scale, BLOCK4: tl.constexpr, OUT: tl.constexpr, LOG: tl.constexpr, TRIG: tl.constexpr,
          ROUNDS: tl.constexpr, JOIN: tl.constexpr):
    pid = tl.program_id(0)
    c = pid * BLOCK4 + tl.arange(0, BLOCK4)
    n1, n2, n3, n4 = _z4(seed, c, OUT, LOG, TRIG, ROUNDS)
    if JOIN:
        z = tl.reshape(tl.join(tl.join(n1, n3), tl.join(n2, n4)), [BLOCK4, 4])  # lanes 0..3 = n1 n2 n3 n4
        loc = c[:, None] * 4 + tl.arange(0, 4)[None, :]
    else:
        lane = tl.arange(0, 4)[None, :]
        z = tl.where(lane == 0, n1[:, None],
                     tl.where(lane == 1, n2[:, None], tl.where(lane == 2, n3[:, None], n4[:, None])))
        loc = c[:, None] * 4 + lane
    mask = loc < n
    w = tl.load(w_ptr + loc, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptr + loc, (w + scale * z).to(w_ptr.dtype.element_ty), mask=mask)


def bench(f, reps=10):
    """Median ms of ``reps`` calls after 3 warm-up calls (CUDA events)."""
    return 1e3 * timed(f, warm=3, reps=reps)[0]


VARIANTS = [  # (OUT, LOG, TRIG, ROUNDS, label)
    (3, 0, 0, 10, "memory only"), (2, 0, 0, 10, "rademacher"), (0, 0, 0, 10, "precise (DIST 0)"),
    (0, 2, 1, 10, "fast (DIST 1)"), (0, 2, 0, 10, "fast log + poly trig"), (0, 0, 1, 10, "libdevice log + fast trig"),
    (0, 0, 0, 7, "precise, philox 7 rounds"), (2, 0, 0, 7, "rademacher, 7 rounds"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_100_000_000, help="elements (bf16)")
    ap.add_argument("--out", help="JSON path prefix")
    args = ap.parse_args()
    n = args.n
    w = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    rows = [{"variant": "torch mul_", "ms": round(bench(lambda: w.mul_(1.0)), 3)}]
    print(f"{'torch mul_ (a copy pass)':32s} {rows[0]['ms']:7.3f} ms", flush=True)
    for out, log, trig, rounds, label in VARIANTS:
        for b4, nw in [(256, 4), (256, 8), (512, 4), (512, 8), (1024, 8)]:
            for join in (0, 1):
                grid = (triton.cdiv(n, 4 * b4),)
                kw = {"BLOCK4": b4, "OUT": out, "LOG": log, "TRIG": trig, "ROUNDS": rounds, "JOIN": join,
                      "num_warps": nw}
                ms = bench(lambda grid=grid, kw=kw: _kern[grid](w, n, 1234, 1e-3, **kw))
                rows.append({"variant": label, "block4": b4, "warps": nw, "join": join, "ms": round(ms, 3)})
                print(f"{label:32s} BLOCK4={b4:5d} warps={nw} join={join} {ms:7.3f} ms", flush=True)
    if args.out:
        env = {"gpu": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__, "n": n}
        with open(args.out + ".json", "w") as f:
            json.dump({"rows": rows, "env": env}, f, indent=1)


if __name__ == "__main__":
    main()
