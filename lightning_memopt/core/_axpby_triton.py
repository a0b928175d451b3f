"""Triton kernel behind :mod:`lightning_memopt.core.axpby` (imported lazily; needs Triton and CUDA)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_memopt.core._triton import ok_flag

BLOCK = 2048
FLT_MAX = tl.constexpr(3.4028234663852886e38)  # |x| <= FLT_MAX: finite (false for NaN and inf)


@triton.jit(do_not_specialize=["a_host", "b_host", "bound"])
def _axpby_kernel(
    d_ptr, u_ptr, n, a_host, b_host, a_ptr, b_ptr, ok_ptr, bound, fin_ptr,
    A_T: tl.constexpr, B_T: tl.constexpr, HAS_OK: tl.constexpr, CLAMP: tl.constexpr, FIN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CLAMP:  # NaN stays NaN, as torch.clamp (a plain min/max on the GPU returns the bound)
        u = tl.clamp(u, -bound, bound, propagate_nan=tl.PropagateNan.ALL)
    a = a_host
    if A_T:
        a = a * tl.load(a_ptr).to(tl.float32)
    b = b_host
    if B_T:
        b = tl.load(b_ptr).to(tl.float32)
    new = b * d + a * u
    if HAS_OK:  # a skipped step (non-finite loss) writes the weight back unchanged, whatever u holds
        new = tl.where(tl.load(ok_ptr) != 0, new, d)
    if FIN:  # a non-finite element of u is not applied, and the tensor's flag says so
        fin = tl.abs(u) <= FLT_MAX
        new = tl.where(fin, new, d)
        if tl.sum(tl.where(mask & ~fin, 1, 0)) > 0:
            tl.store(fin_ptr, 0)
    tl.store(d_ptr + offs, new.to(d_ptr.dtype.element_ty), mask=mask)


def axpby_(d: Tensor, u: Tensor, a, b, ok: Tensor | None, clamp: float | None, finite: Tensor | None = None) -> None:
    n = d.numel()
    if n == 0:
        return
    a_t, b_t = isinstance(a, Tensor), isinstance(b, Tensor)
    f32 = torch.float32
    a_ptr = a.to(device=d.device, dtype=f32) if a_t else d
    b_ptr = b.to(device=d.device, dtype=f32) if b_t else d
    ok_ptr = ok_flag(ok, d)
    _axpby_kernel[(triton.cdiv(n, BLOCK),)](
        d, u, n, 1.0 if a_t else float(a), 1.0 if b_t else float(b), a_ptr, b_ptr, ok_ptr,
        float(clamp or 0.0), d if finite is None else finite, A_T=a_t, B_T=b_t, HAS_OK=ok is not None,
        CLAMP=clamp is not None, FIN=finite is not None, BLOCK=BLOCK,
    )


@triton.jit(do_not_specialize=["a", "b"])
def _axpby_many_kernel(ref_ptr, rel_ptr, u_ptr, n, a, b, ok_ptr, HAS_OK: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d_ptr = ref_ptr + tl.load(rel_ptr + t)
    d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + t.to(tl.int64) * n + offs, mask=mask, other=0.0).to(tl.float32)
    new = b * d + a * u
    if HAS_OK:
        new = tl.where(tl.load(ok_ptr) != 0, new, d)
    tl.store(d_ptr + offs, new.to(ref_ptr.dtype.element_ty), mask=mask)


_REL: dict[tuple[int, ...], Tensor] = {}


def axpby_many_(ds: list[Tensor], u: Tensor, a: float, b: float, ok: Tensor | None) -> None:
    n = ds[0].numel()
    if n == 0:
        return
    ptrs = tuple(d.data_ptr() for d in ds)
    rel = _REL.get(ptrs)
    if rel is None:  # the same parameters every step: made once (a host-to-device copy)
        if len(_REL) > 256:
            _REL.clear()
        esize = ds[0].element_size()
        rel = _REL[ptrs] = torch.tensor([(p - ptrs[0]) // esize for p in ptrs], dtype=torch.int64,
                                        device=ds[0].device)
    ok_ptr = ok_flag(ok, ds[0])
    _axpby_many_kernel[(triton.cdiv(n, BLOCK), len(ds))](
        ds[0], rel, u, n, float(a), float(b), ok_ptr, HAS_OK=ok is not None, BLOCK=BLOCK
    )
