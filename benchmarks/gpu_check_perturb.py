"""Check the Triton perturbation kernels against the torch emulation, and time them (GPU; or CPU with
``TRITON_INTERPRET=1`` for a slow logic check).

Usage: ``python -m benchmarks.gpu_check_perturb [--quick] [--dists 0,1,2] [--profile SIZE]``. Prints one ``CHECK {json}`` line per
comparison (kernel DIST 0 = precise normals, 1 = fast-math normals, 2 = Rademacher; the update's loop kernel and its
one-direction kernel), ``PROF {json}`` lines with a MeZO step's parts timed (GPU time by CUDA events, and the host's
enqueue time: when they are close the step is launch-bound), and exits non-zero if any comparison is off.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from lightning_memopt.core import _perturb_triton as T
from lightning_memopt.core import perturb as P

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = {0: "normal", 1: "normal", 2: "rademacher"}  # kernel DIST -> emulated distribution


def _bad(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, slack: torch.Tensor | float) -> int:
    # 1 ulp of the result dtype (log/cos rounding may flip a rounding boundary) + float32 rounding of z
    ulp = torch.finfo(dtype).eps * ref.float().abs().clamp_min(1.0)
    return int(((out.float() - ref.float()).abs() > ulp * 1.01 + slack).sum())


def check(quick: bool = False, dists: tuple[int, ...] = (0, 1, 2), dtypes: tuple[torch.dtype, ...] = ()) -> bool:
    """Every comparison for the kernel distributions ``dists`` (and ``dtypes``, default: by ``quick``); True if all
    agree (tests/test_gpu.py runs this)."""
    ok = True
    torch.manual_seed(0)
    cases = [((4099,), 0), ((257, 33), 0), ((1000, 64), 12345), ((5,), 3), ((3, 4096), 2**28 + 1)]
    if not dtypes:
        dtypes = (torch.float32, torch.bfloat16) if quick else (torch.float32, torch.bfloat16, torch.float16)
    for dist in dists:
        try:
            ok &= _check_many(dist, dtypes)
            ok &= _check_dist(dist, dtypes, cases[:3] if quick else cases)
        except Exception as err:  # noqa: BLE001 - report and go on (fast math is optional; the interpreter lacks it)
            print("CHECK " + json.dumps({"dist": dist, "error": repr(err)[:300]}), flush=True)
            ok &= dist == 1
    return ok


def _check_many(dist: int, dtypes) -> bool:
    """The many-tensor kernels against the one-tensor kernels: bit-identical (same formula, same z); once with odd
    sizes and offsets, once with sizes, offsets and addresses that take the kernels' vectorised (ALIGNED) path."""
    ok = True
    sets = (
        (((4099,), (257, 33), (5,), (64, 64)), [0, 12345, 2**28 + 1, 7]),
        (((4096,), (64, 48), (16,), (128, 64)), [0, 1024, 2**28, 16]),
    )
    for dtype in dtypes:
        for shapes, starts in sets:
            ws = [torch.randn(s, device=DEV).to(dtype) for s in shapes]
            idx = [3, 0, 17, 2**20]
            seed_t = torch.full((), 2**32 - 5, dtype=torch.int64, device=DEV)
            outs = T.perturbed_many(ws, idx, seed_t, 0.125, dist)
            bad = sum(
                int((o != T.perturbed(w, P.key(2**32 - 5, i), 0.125, 0, dist)).sum()) for o, w, i in zip(outs, ws, idx)
            )
            a = torch.tensor([0.5], device=DEV)
            t1 = [w.clone().reshape(-1) for w in ws]
            t2 = [w.clone().reshape(-1) for w in ws]
            T.update1_many(t1, idx, starts, seed_t, a, 0.01, 0.999, dist)
            for t, i, st in zip(t2, idx, starts):
                T.update_(t, i, seed_t.reshape(1), a, None, 0.01, 0.999, st, None, dist, [2**32 - 5])
            bad += sum(int((x != y).sum()) for x, y in zip(t1, t2))
            ok &= bad == 0
            aligned = T._tables(t1, starts, idx).aligned
            rec = {"op": "many", "dist": dist, "dtype": str(dtype), "aligned": aligned, "bad": bad}
            print("CHECK " + json.dumps(rec), flush=True)
    return ok


def _check_dist(dist: int, dtypes, cases) -> bool:
    ok = True
    for dtype in dtypes:
        for shape, start in cases:
            w = torch.randn(shape, device=DEV).to(dtype)
            k = P.key(2**32 - 3, 17)
            z = P.normal(k, start, w.numel(), DEV, NAMES[dist])
            ref = (w.reshape(-1).float() + 0.25 * z).to(dtype)
            out = T.perturbed(w, k, 0.25, start, dist).reshape(-1)
            slack = (2e-6 if dist == 1 else 0.25e-6) * (z.abs() + 1)
            bad = _bad(out, ref, dtype, slack)
            ok &= bad == 0
            rec = {"op": "perturbed", "dist": dist, "dtype": str(dtype), "shape": shape, "start": start, "bad": bad}
            print("CHECK " + json.dumps(rec), flush=True)
            for adam, nseed in ((None, 3), (1e-6, 3), (None, 1)):
                seeds = torch.tensor([1, 2**32 - 1, 99][:nseed], device=DEV)
                a = torch.tensor([0.5, -0.25, 0.125][:nseed], device=DEV)
                b = torch.tensor([0.3, 0.2, 0.1][:nseed], device=DEV)
                t1, t2 = w.clone().reshape(-1), w.clone().reshape(-1)
                ints = seeds.tolist() if nseed == 1 else None  # one direction: the J=1 kernel
                T.update_(t1, 5, seeds, a, b, 0.01, 0.999, start, adam, dist, ints)
                zs = [P.normal(P.key(int(s), 5), start, t2.numel(), DEV, NAMES[dist]) for s in seeds.tolist()]
                P.update_(t2, 5, seeds, a, b, 0.01, 0.999, start, adam, zs=zs)
                bad = _bad(t1, t2, dtype, 1e-5 if dist == 1 else 1e-6)
                ok &= bad == 0
                rec = {
                    "op": "update",
                    "dist": dist,
                    "adam": adam,
                    "J": nseed,
                    "dtype": str(dtype),
                    "shape": shape,
                    "start": start,
                    "bad": bad,
                }
                print("CHECK " + json.dumps(rec), flush=True)
    return ok


def _time(fn, reps: int = 5) -> tuple[float, float]:
    """(median GPU seconds by CUDA events, median host seconds to enqueue) after 2 warm-up calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        b.record()
        b.synchronize()
        gpu.append(a.elapsed_time(b) / 1e3)
    return statistics.median(gpu), statistics.median(host)


def profile(size: str) -> None:
    from benchmarks.common import build
    from lightning_memopt.mezo.core import ZeroOrder, ZOConfig

    model = build(size).eval()
    x = torch.randint(0, model.config.vocab_size, (8, 512), device=DEV)

    def loss():
        return model(input_ids=x, labels=x).loss

    def emit(part, fn, **kw):
        g, h = _time(fn)
        print(
            "PROF "
            + json.dumps({"size": size, "part": part, "gpu_ms": round(g * 1e3, 2), "host_ms": round(h * 1e3, 2), **kw}),
            flush=True,
        )

    params = [p for p in model.parameters() if p.requires_grad]
    gbytes = 2 * sum(p.numel() * p.element_size() for p in params) / 1e9  # one read + one write of every weight

    def copy_pass():
        for p in params:
            torch.add(p, 0.0)  # read W, write a temporary: the bandwidth floor of a perturbation pass

    def perturb_pass(dist):
        for i, p in enumerate(params):
            P.perturbed(p, P.key(7, i), 1e-3, dist=dist)

    with torch.no_grad():
        emit("forward", loss)
        emit("copy_pass", copy_pass, gbytes=round(gbytes, 2))
        for distname in ("normal", "rademacher"):
            emit("perturb_pass", lambda d=distname: perturb_pass(d), dist=distname, gbytes=round(gbytes, 2))
        for fast in ("0", "1"):
            os.environ["MEMOPT_FAST_MATH"] = fast
            for distname in ("normal", "rademacher"):
                if distname == "rademacher" and fast == "1":
                    continue
                tag = {"dist": distname, "fast_math": fast}
                try:
                    _profile_variant(model, loss, emit, distname, tag)
                except Exception as err:  # noqa: BLE001 - report and go on
                    print("PROF " + json.dumps({"size": size, "error": repr(err)[:300], **tag}), flush=True)
        os.environ["MEMOPT_FAST_MATH"] = "0"
        zo = ZeroOrder(model, ZOConfig())
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            g, _ = zo.step(loss, 99, 1e-9)
            g.item()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
        print(table, flush=True)


def _profile_variant(model, loss, emit, distname: str, tag: dict) -> None:
    from lightning_memopt.mezo.core import ZeroOrder, ZOConfig, apply_update

    zo = ZeroOrder(model, ZOConfig(distribution=distname))
    with zo.perturber.active(7, 1e-3):
        emit("forward_perturbed", loss, **tag)
    g = torch.ones(1, device=DEV)
    seeds = torch.tensor([7], device=DEV)
    for ints in (None, [7]):

        def upd(ints=ints):
            apply_update(model, zo.params, seeds, g * 1e-3, None, [0.0], [0.0], None, None, distname, ints)

        emit("update_loop" if ints is None else "update_J1", upd, **tag)
    state = {"t": 0}

    def step():
        gg, _ = zo.step(loss, state["t"], 1e-9)
        state["t"] += 1
        gg.item()

    emit("mezo_step", step, **tag)
    zo.close()


if __name__ == "__main__":
    dists = tuple(int(d) for d in sys.argv[sys.argv.index("--dists") + 1].split(",")) if "--dists" in sys.argv else (
        0, 1, 2)
    good = True if "--nocheck" in sys.argv else check(quick="--quick" in sys.argv, dists=dists)
    print("ALL_OK" if good else "MISMATCH", flush=True)
    if "--profile" in sys.argv and DEV == "cuda":
        profile(sys.argv[sys.argv.index("--profile") + 1])
    sys.exit(0 if good else 1)
