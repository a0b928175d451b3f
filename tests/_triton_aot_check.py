"""Compile the in-backward update kernels for an H100/H200 (sm_90) without a GPU: Triton's front end, its LLVM
back end and the ptxas it ships, for every flag combination the library launches. Catches what the interpreter
does not (types, constexpr branches, lowering), and checks that value clipping keeps NaN (``max.NaN``).

Run by tests/test_lomo_core.py where Triton is installed and no GPU is (a GPU runs the kernels in tests/test_gpu.py).
Prints AOT_OK when every variant compiled.
"""

from __future__ import annotations

import itertools
import traceback

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lightning_memopt.core import _axpby_triton as AX
from lightning_memopt.lomo import _adalomo_triton as AD

TARGET = GPUTarget("cuda", 90, 32)
FLAGS = [False, True]


def compile_(fn, signature: dict[str, str], constexprs: dict[str, object]):
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    return triton.compile(src, target=TARGET)


def check() -> list[str]:
    bad = []
    for dt, a_t, has_ok, clamp, fin in itertools.product(["bf16", "fp32"], FLAGS, FLAGS, FLAGS, FLAGS):
        sig = {"d_ptr": f"*{dt}", "u_ptr": "*fp32", "n": "i32", "a_host": "fp32", "b_host": "fp32",
               "a_ptr": "*fp32", "b_ptr": "*fp32", "ok_ptr": "*u8", "bound": "fp32", "fin_ptr": "*i32"}
        name = f"axpby {dt} A_T={a_t} HAS_OK={has_ok} CLAMP={clamp} FIN={fin}"
        try:
            k = compile_(AX._axpby_kernel, sig, {"A_T": a_t, "B_T": False, "HAS_OK": has_ok, "CLAMP": clamp,
                                                 "FIN": fin, "BLOCK": AX.BLOCK})
            if clamp and "max.NaN" not in k.asm["ptx"]:
                bad.append(f"{name}: the clamp does not keep NaN")
        except Exception:  # noqa: BLE001 - each variant reported
            bad.append(f"{name}: {traceback.format_exc(limit=2)}")
    for dt, has_ok, fin, clamp in itertools.product(["bf16", "fp32"], FLAGS, FLAGS, FLAGS):
        consts = {"CLAMP": clamp, "COEF": False, "HAS_OK": has_ok, "HAS_WD": True, "FIN": fin}
        sig = {"g_ptr": f"*{dt}", "d_ptr": f"*{dt}", "R": "i32", "C": "i32", "nr_ptr": "*fp32", "nc_ptr": "*fp32",
               "avgpart_ptr": "*fp32", "n_rv": "i32", "part_ptr": "*fp32", "nprog": "i32", "row_ptr": "*fp32",
               "col_ptr": "*fp32", "ok_ptr": "*u8", "lr": "fp32", "wd": "fp32", "eps_scale": "fp32",
               "inv_sqrt_n": "fp32", "clip_threshold": "fp32", "gscale": "fp32", "clampv": "fp32",
               "coef_ptr": "*fp32", "fin_ptr": "*i32"}
        name = f"adalomo matrix {dt} {consts}"
        try:
            k = compile_(AD._apply_kernel, sig, {**consts, "BR": AD.BR, "BC": AD.BC, "BAVG": 16, "BP": AD.NPROG})
            if clamp and "max.NaN" not in k.asm["ptx"]:
                bad.append(f"{name}: the clamp does not keep NaN")
        except Exception:  # noqa: BLE001
            bad.append(f"{name}: {traceback.format_exc(limit=2)}")
        sig = {"g_ptr": f"*{dt}", "d_ptr": f"*{dt}", "sq_ptr": "*fp32", "ns_ptr": "*fp32", "N": "i32",
               "beta": "fp32", "vg": "fp32", "ve": "fp32", "ok_ptr": "*u8", "lr": "fp32", "wd": "fp32",
               "eps_scale": "fp32", "inv_sqrt_n": "fp32", "clip_threshold": "fp32", "gscale": "fp32",
               "clampv": "fp32", "coef_ptr": "*fp32", "fin_ptr": "*i32"}
        name = f"adalomo vector {dt} {consts}"
        try:
            compile_(AD._vector_kernel, sig, {**consts, "BLOCK": 1024})
        except Exception:  # noqa: BLE001
            bad.append(f"{name}: {traceback.format_exc(limit=2)}")
    return bad


if __name__ == "__main__":
    problems = check()
    print("\n".join(problems) or "AOT_OK")
