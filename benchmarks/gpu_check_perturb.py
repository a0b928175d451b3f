"""Check the Triton perturbation kernels against the torch emulation, and time them (GPU; or CPU with
``TRITON_INTERPRET=1`` for a slow logic check).

Usage: ``python -m benchmarks.gpu_check_perturb [--time SIZE]``. Prints one ``CHECK {json}`` line per comparison and
``TIME {json}`` lines; exits non-zero if any comparison is outside tolerance.
"""

from __future__ import annotations

import json
import sys

import torch

from lightning_memopt.core import _perturb_triton as T
from lightning_memopt.core import perturb as P

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _torch_update(t, idx, seeds, a, b, lr, decay, start, adam_eps):
    zs = [P.normal(P.key(int(s), idx), start, t.numel(), t.device) for s in seeds.tolist()]
    P.update_(t, idx, seeds, a, b, lr, decay, start, adam_eps, zs=zs)


def check() -> bool:
    ok = True
    torch.manual_seed(0)
    cases = [((4099,), 0), ((257, 33), 0), ((1000, 64), 12345), ((5,), 3), ((3, 4096), 2**28 + 1)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape, start in cases:
            w = torch.randn(shape, device=DEV).to(dtype)
            k = P.key(2**32 - 3, 17)
            z = P.normal(k, start, w.numel(), DEV)
            ref = (w.reshape(-1).float() + 0.25 * z).to(dtype)
            out = T.perturbed(w, k, 0.25, start).reshape(-1)
            # tolerance: 1 ulp of the result dtype (log/cos rounding may flip a rounding boundary) + float32 z rounding
            ulp = torch.finfo(dtype).eps * ref.float().abs().clamp_min(1.0)
            bad = int(((out.float() - ref.float()).abs() > ulp * 1.01 + 0.25e-6 * (z.abs() + 1)).sum())
            zdiff = (
                float(((out.float() - w.reshape(-1).float()) / 0.25 - z).abs().max())
                if dtype == torch.float32
                else None
            )
            rec = {
                "op": "perturbed",
                "dtype": str(dtype),
                "shape": shape,
                "start": start,
                "bad": bad,
                "z_maxdiff": zdiff,
            }
            ok &= bad == 0
            print("CHECK " + json.dumps(rec), flush=True)
            for adam in (None, 1e-6):
                seeds = torch.tensor([1, 2**32 - 1, 99], device=DEV)
                a = torch.tensor([0.5, -0.25, 0.125], device=DEV)
                b = torch.tensor([0.3, 0.2, 0.1], device=DEV)
                t1, t2 = w.clone().reshape(-1), w.clone().reshape(-1)
                T.update_(t1, 5, seeds, a, b, 0.01, 0.999, start, adam)
                _torch_update(t2, 5, seeds, a, b, 0.01, 0.999, start, adam)
                ulp = torch.finfo(dtype).eps * t2.float().abs().clamp_min(1.0)
                bad = int(((t1.float() - t2.float()).abs() > ulp * 1.01 + 1e-6).sum())
                ok &= bad == 0
                rec = {"op": "update", "adam": adam, "dtype": str(dtype), "shape": shape, "start": start, "bad": bad}
                print("CHECK " + json.dumps(rec), flush=True)
    return ok


def timing(size: str) -> None:
    from benchmarks.common import build, timed

    model = build(size)
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    seeds = torch.tensor([7], device=DEV)
    a = torch.tensor([1e-3], device=DEV)

    def perturb_pass():
        with torch.no_grad():
            for i, p in enumerate(params):
                T.perturbed(p, P.key(7, i), 1e-3)

    def update_pass():
        with torch.no_grad():
            for i, p in enumerate(params):
                T.update_(p.data, i, seeds, a, None, 1e-9, 1.0, 0, None)

    for name, fn in (("perturb_pass", perturb_pass), ("update_pass", update_pass)):
        t, _ = timed(fn)
        gbps = 2 * 2 * n / t / 1e9
        print(
            "TIME " + json.dumps({"op": name, "size": size, "numel": n, "s": round(t, 5), "GBps": round(gbps, 1)}),
            flush=True,
        )


if __name__ == "__main__":
    good = check()
    if "--time" in sys.argv and DEV == "cuda":
        timing(sys.argv[sys.argv.index("--time") + 1])
    print("ALL_OK" if good else "MISMATCH", flush=True)
    sys.exit(0 if good else 1)
