"""Triton kernels behind :mod:`lightning_memopt.core.perturb` (imported lazily; needs Triton and, normally, CUDA).

Each program owns ``BLOCK4`` Philox counters, i.e. ``4·BLOCK4`` consecutive elements of the full parameter, and
generates their z in registers with ``tl.randn4x`` (all four outputs used). Elements are addressed as
``4·counter + lane - start`` so a shard starting at any offset sees the same z as the full tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK4 = 256


@triton.jit
def _pick(n1, n2, n3, n4, lane):
    return tl.where(
        lane == 0, n1[:, None], tl.where(lane == 1, n2[:, None], tl.where(lane == 2, n3[:, None], n4[:, None]))
    )


@triton.jit(do_not_specialize=["seed", "scale"])
def _perturb_kernel(w_ptr, out_ptr, n, start, seed, scale, BLOCK4: tl.constexpr):
    pid = tl.program_id(0)
    c = start // 4 + pid * BLOCK4 + tl.arange(0, BLOCK4)
    lane = tl.arange(0, 4)[None, :]
    loc = c[:, None] * 4 + lane - start
    mask = (loc >= 0) & (loc < n)
    n1, n2, n3, n4 = tl.randn4x(seed, c)
    z = _pick(n1, n2, n3, n4, lane)
    w = tl.load(w_ptr + loc, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + loc, (w + scale * z).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["idx_hi", "J", "lr", "decay", "adam_eps"])
def _update_kernel(
    t_ptr, n, start, idx_hi, seeds_ptr, a_ptr, b_ptr, J, lr, decay, adam_eps, ADAM: tl.constexpr, BLOCK4: tl.constexpr
):
    pid = tl.program_id(0)
    c = start // 4 + pid * BLOCK4 + tl.arange(0, BLOCK4)
    lane = tl.arange(0, 4)[None, :]
    loc = c[:, None] * 4 + lane - start
    mask = (loc >= 0) & (loc < n)
    m = tl.zeros([BLOCK4, 4], dtype=tl.float32)
    v = tl.zeros([BLOCK4, 4], dtype=tl.float32)
    for j in range(J):
        s = tl.load(seeds_ptr + j) + idx_hi
        n1, n2, n3, n4 = tl.randn4x(s, c)
        z = _pick(n1, n2, n3, n4, lane)
        m += tl.load(a_ptr + j) * z
        if ADAM:
            v += tl.load(b_ptr + j) * (z * z)
    t = tl.load(t_ptr + loc, mask=mask, other=0.0).to(tl.float32)
    if ADAM:
        delta = m / (tl.sqrt(v) + adam_eps)
    else:
        delta = m
    tl.store(t_ptr + loc, (t * decay - lr * delta).to(t_ptr.dtype.element_ty), mask=mask)


def _grid(start: int, n: int) -> tuple[int]:
    counters = ((start + n - 1) >> 2) - (start >> 2) + 1
    return (triton.cdiv(counters, BLOCK4),)


def perturbed(w: Tensor, k: int, scale: float, start: int = 0) -> Tensor:
    w = w.detach()
    if not w.is_contiguous():
        w = w.contiguous()
    out = torch.empty_like(w)
    if w.numel():
        _perturb_kernel[_grid(start, w.numel())](w, out, w.numel(), start, k, float(scale), BLOCK4=BLOCK4)
    return out


def update_(
    t: Tensor,
    index: int,
    seeds: Tensor,
    a: Tensor,
    b: Tensor | None,
    lr: float,
    decay: float,
    start: int = 0,
    adam_eps: float | None = None,
) -> None:
    seeds = seeds.to(device=t.device, dtype=torch.int64)
    a = a.to(device=t.device, dtype=torch.float32)
    b = a if b is None else b.to(device=t.device, dtype=torch.float32)
    adam = adam_eps is not None
    _update_kernel[_grid(start, t.numel())](
        t,
        t.numel(),
        start,
        int(index) << 32,
        seeds,
        a,
        b,
        int(seeds.numel()),
        float(lr),
        float(decay),
        float(adam_eps or 0.0),
        ADAM=adam,
        BLOCK4=BLOCK4,
    )
