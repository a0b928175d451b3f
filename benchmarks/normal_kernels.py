"""Where a perturbation pass's time goes: one in-place pass over 1.1B bf16 elements (a 1.1B model's weights) by how
z is made, and by block shape, in one process. The normal kernels are bound by instruction issue, so the variants
swap how z is made and keep the rest: no z at all (memory alone), ±1 signs, the library's normal z today (DIST 0 and
fast math DIST 1 of ``core/_perturb_triton.py``), and the precise normal z it replaced (kept here as the reference:
Triton's Philox with separate high and low multiplies, libdevice's log, cos/sin from two polynomials), with Triton's
Philox or the library's. Needs Triton and a GPU; prints a table, writes JSON:

    python -m benchmarks.normal_kernels --out benchmarks/results/normal_kernels_h200
"""

import argparse
import json
import sys

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from benchmarks.common import timed
from benchmarks.task_results import environment
from lightning_memopt.core._perturb_triton import _philox4, _z4


@triton.jit
def _cos_sin_2pi_before(u):
    """The kernel's cos(2πu), sin(2πu) before 2026-12-05: one quadrant reduction and two polynomials."""
    t = 4.0 * u
    q = tl.floor(t + 0.5)
    r = t - q
    x = r * r
    s = r * (1.5707963705062866 + x * (-0.6459640860557556 + x * (0.07969258725643158 + x * (
        -0.004681318998336792 + x * 0.00015832345525268465))))
    c = 1.0 + x * (-1.2337005138397217 + x * (0.25366950035095215 + x * (-0.020863469690084457 + x * (
        0.000919170503038913 + x * -2.4866163585102186e-05))))
    k = q.to(tl.int32) & 3
    odd = (k & 1) != 0
    cc = tl.where(odd, s, c)
    ss = tl.where(odd, c, s)
    return tl.where(((k + 1) & 2) != 0, -cc, cc), tl.where((k & 2) != 0, -ss, ss)


@triton.jit
def _z4_variant(seed, c, Z: tl.constexpr, PHILOX: tl.constexpr):
    if PHILOX == 0:
        i1, i2, i3, i4 = tl.randint4x(seed, c)
    else:
        i1, i2, i3, i4 = _philox4(seed, c)
    if Z == 0:  # the precise normal z before: libdevice log, two polynomials
        u1 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(i1))
        u3 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(i3))
        r1 = tl.sqrt(-2.0 * libdevice.log(u1))
        r3 = tl.sqrt(-2.0 * libdevice.log(u3))
        c2, s2 = _cos_sin_2pi_before(tl.uint_to_uniform_float(i2))
        c4, s4 = _cos_sin_2pi_before(tl.uint_to_uniform_float(i4))
        return r1 * c2, r1 * s2, r3 * c4, r3 * s4
    elif Z == 2:
        return (1.0 - 2.0 * (i1 >> 31).to(tl.float32), 1.0 - 2.0 * (i2 >> 31).to(tl.float32),
                1.0 - 2.0 * (i3 >> 31).to(tl.float32), 1.0 - 2.0 * (i4 >> 31).to(tl.float32))
    else:  # no z at all: the memory pass alone (scale 0 on a constant)
        return 0.0 * c.to(tl.float32), 0.0 * c.to(tl.float32), 0.0 * c.to(tl.float32), 0.0 * c.to(tl.float32)


@triton.jit(do_not_specialize=["seed", "scale"])
def _kern(w_ptr, n, seed, scale, BLOCK4: tl.constexpr, Z: tl.constexpr, PHILOX: tl.constexpr, LIB: tl.constexpr):
    pid = tl.program_id(0)
    c = pid * BLOCK4 + tl.arange(0, BLOCK4)
    if LIB >= 0:  # the library's z: DIST = LIB
        n1, n2, n3, n4 = _z4(seed, c, LIB)
    else:
        n1, n2, n3, n4 = _z4_variant(seed, c, Z, PHILOX)
    lane = tl.arange(0, 4)[None, :]
    z = tl.where(lane == 0, n1[:, None], tl.where(lane == 1, n2[:, None], tl.where(lane == 2, n3[:, None], n4[:, None])))
    loc = c[:, None] * 4 + lane
    mask = loc < n
    w = tl.load(w_ptr + loc, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptr + loc, (w + scale * z).to(w_ptr.dtype.element_ty), mask=mask)


def bench(f, reps=10):
    """Median ms of ``reps`` calls after 3 warm-up calls (CUDA events)."""
    return 1e3 * timed(f, warm=3, reps=reps)[0]


VARIANTS = [  # (Z, PHILOX, LIB, label): LIB >= 0 runs the library's _z4 with DIST = LIB
    (3, 0, -1, "memory only"),
    (2, 0, -1, "rademacher, Triton's Philox"),
    (2, 1, 2, "rademacher (library: DIST 2)"),
    (0, 0, -1, "normal, precise, before"),
    (0, 1, -1, "normal, precise, before with the library's Philox"),
    (0, 1, 0, "normal, precise (library: DIST 0)"),
    (0, 1, 1, "normal, fast math (library: DIST 1)"),
]
SHAPES = [(512, 4), (1024, 4), (1024, 8)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_100_000_000, help="elements (bf16)")
    ap.add_argument("--out", help="JSON path prefix")
    args = ap.parse_args()
    n = args.n
    w = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    rows = [{"variant": "torch mul_", "ms": round(bench(lambda: w.mul_(1.0)), 3)}]
    print(f"{'torch mul_ (a copy pass)':52s} {rows[0]['ms']:7.3f} ms", flush=True)
    for z, philox, lib, label in VARIANTS:
        for b4, nw in SHAPES:
            grid = (triton.cdiv(n, 4 * b4),)
            kw = {"BLOCK4": b4, "Z": z, "PHILOX": philox, "LIB": lib, "num_warps": nw}
            ms = bench(lambda grid=grid, kw=kw: _kern[grid](w, n, 1234, 1e-3, **kw))
            rows.append({"variant": label, "block4": b4, "warps": nw, "ms": round(ms, 3)})
            print(f"{label:52s} BLOCK4={b4:5d} warps={nw} {ms:7.3f} ms", flush=True)
    if args.out:
        env = dict(environment(sys.argv), triton=triton.__version__, torch=torch.__version__, n=n)
        with open(args.out + ".json", "w") as f:
            json.dump({"rows": rows, "env": env}, f, indent=1)


if __name__ == "__main__":
    main()
