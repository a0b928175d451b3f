"""Triton kernels for AdaLomo's per-parameter update (imported lazily; needs Triton and, normally, CUDA).

The torch version in :meth:`lightning_memopt.lomo.core.FusedStep._adalomo` launches about 30 kernels per parameter,
each from Python. On small models they, not GPU work, look to set AdaLomo's step: SmolLM2 (272 tensors) through a
Trainer took 355 ms a step against AdamW's 177 ms on an H200. Here a matrix takes four launches and a vector one,
and no fp32 copy of the gradient is made:

1. squared sums of each row (partial, per column block) and each column (partial, per row segment);
2. the row and column moments ``beta·m + (1 - beta)·(mean g² + eps)`` into scratch;
3. per-program partial sums of ``||u||²`` and ``||θ||²``, where ``u = g / sqrt(v)``;
4. the step (update RMS clipped, relative to RMS(θ)) and the moments' commit.

Every sum is split the same way on every run (no atomics), so results are deterministic. Nothing but scratch is
written before the last launch, so a kernel that fails to compile leaves weights and moments as they were. The
arithmetic is the torch version's; sums run in another order, so results agree to float rounding, not bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_memopt.core._triton import ok_flag

BR, BC = 32, 128  # matrix tiles
BV = 1024  # moment vectors
FLT_MAX = tl.constexpr(3.4028234663852886e38)  # x <= FLT_MAX: finite (false for NaN and inf)
NPROG = 256  # programs of the norm pass at most (its partial sums: a fixed split for a given shape)
# Integer arguments other than the row length C are not specialized on (their divisibility does not vectorize any
# load): one compile per dtype and flags, not one per matrix shape.
VEC_MAX = 1 << 16  # vectors up to this size in one program; longer ones take the torch path


@triton.jit
def _g(g_ptr, offs, mask, gscale, clampv, coef_ptr, CLAMP: tl.constexpr, COEF: tl.constexpr):
    """The gradient as the update sees it: fp32, unscaled (fp16), value-clipped, times the global-norm clip."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * gscale
    if CLAMP:  # NaN stays NaN, as torch.clamp (a plain min/max on the GPU returns the bound)
        g = tl.clamp(g, -clampv, clampv, propagate_nan=tl.PropagateNan.ALL)
    if COEF:
        g = g * tl.load(coef_ptr)
    return g


@triton.jit(do_not_specialize=["R", "RS", "gscale", "clampv"])
def _sq_kernel(g_ptr, R, C, RS, rowpart_ptr, colpart_ptr, gscale, clampv, coef_ptr,
               CLAMP: tl.constexpr, COEF: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    s, cb = tl.program_id(0), tl.program_id(1)
    cols = cb * BC + tl.arange(0, BC)
    cmask = cols < C
    acc = tl.zeros([BC], dtype=tl.float32)
    r_end = tl.minimum(s * RS + RS, R)
    for r0 in range(s * RS, r_end, BR):
        rows = r0 + tl.arange(0, BR)
        rmask = rows < r_end
        m = rmask[:, None] & cmask[None, :]
        g = _g(g_ptr, rows[:, None].to(tl.int64) * C + cols[None, :], m, gscale, clampv, coef_ptr, CLAMP, COEF)
        g2 = g * g
        acc += tl.sum(g2, axis=0)
        tl.store(rowpart_ptr + cb.to(tl.int64) * R + rows, tl.sum(g2, axis=1), mask=rmask)
    tl.store(colpart_ptr + s.to(tl.int64) * C + cols, acc, mask=cmask)


@triton.jit
def _moment(part_ptr, n_parts, L, blk, old_ptr, new_ptr, beta, v, ve, BV: tl.constexpr):
    """Block ``blk`` of a moment of length L: ``beta·old + v·Σ(its n_parts partial squared sums) + ve`` into
    ``new_ptr``; returns the block's sum."""
    i = blk * BV + tl.arange(0, BV)
    m = i < L
    sq = tl.zeros([BV], dtype=tl.float32)
    for j in range(0, n_parts):
        sq += tl.load(part_ptr + j * L + i, mask=m, other=0.0)
    new = tl.load(old_ptr + i, mask=m, other=0.0) * beta + v * sq + ve
    tl.store(new_ptr + i, new, mask=m)
    return tl.sum(tl.where(m, new, 0.0))


@triton.jit(do_not_specialize=["R", "C", "n_cb", "n_seg", "n_rv", "beta", "vr", "vc", "ve"])
def _moments_kernel(rowpart_ptr, colpart_ptr, R, C, n_cb, n_seg, row_ptr, col_ptr, nr_ptr, nc_ptr, avgpart_ptr,
                    n_rv, beta, vr, vc, ve, BV: tl.constexpr):
    """Rows ``beta·m + (1 - beta)/C·Σ_c g² + (1 - beta)·eps`` (and their block sums, for the mean), columns alike."""
    pid = tl.program_id(0)
    if pid < n_rv:
        tl.store(avgpart_ptr + pid, _moment(rowpart_ptr, n_cb, R, pid, row_ptr, nr_ptr, beta, vr, ve, BV))
    else:
        _moment(colpart_ptr, n_seg, C, pid - n_rv, col_ptr, nc_ptr, beta, vc, ve, BV)


@triton.jit
def _row_avg(avgpart_ptr, n_rv, R, BAVG: tl.constexpr):
    a = tl.arange(0, BAVG)
    return tl.sum(tl.load(avgpart_ptr + a, mask=a < n_rv, other=0.0)) / R


@triton.jit
def _u_tile(g_ptr, R, C, rt, ct, nr_ptr, nc_ptr, avg, gscale, clampv, coef_ptr,
            CLAMP: tl.constexpr, COEF: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """(u, element offsets, mask) of tile (rt, ct): ``u = g·rsqrt(row/avg)·rsqrt(col)``, as the torch version."""
    rows = rt * BR + tl.arange(0, BR)
    cols = ct * BC + tl.arange(0, BC)
    rmask, cmask = rows < R, cols < C
    m = rmask[:, None] & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    g = _g(g_ptr, offs, m, gscale, clampv, coef_ptr, CLAMP, COEF)
    fr = tl.rsqrt(tl.load(nr_ptr + rows, mask=rmask, other=1.0) / avg)
    fc = tl.rsqrt(tl.load(nc_ptr + cols, mask=cmask, other=1.0))
    return g * fr[:, None] * fc[None, :], offs, m


@triton.jit(do_not_specialize=["R", "n_ct", "n_tiles", "nprog", "n_rv", "gscale", "clampv"])
def _norms_kernel(g_ptr, d_ptr, R, C, n_ct, n_tiles, nprog, nr_ptr, nc_ptr, avgpart_ptr, n_rv, part_ptr, gscale,
                  clampv, coef_ptr, CLAMP: tl.constexpr, COEF: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                  BAVG: tl.constexpr):
    pid = tl.program_id(0)
    avg = _row_avg(avgpart_ptr, n_rv, R, BAVG)
    su = tl.zeros([BR, BC], dtype=tl.float32)
    sd = tl.zeros([BR, BC], dtype=tl.float32)
    for t in range(pid, n_tiles, nprog):
        u, offs, m = _u_tile(g_ptr, R, C, t // n_ct, t % n_ct, nr_ptr, nc_ptr, avg, gscale, clampv, coef_ptr,
                             CLAMP, COEF, BR, BC)
        d = tl.load(d_ptr + offs, mask=m, other=0.0).to(tl.float32)
        su += u * u
        sd += d * d
    tl.store(part_ptr + 2 * pid, tl.sum(tl.sum(su, axis=1), axis=0))
    tl.store(part_ptr + 2 * pid + 1, tl.sum(tl.sum(sd, axis=1), axis=0))


@triton.jit
def _step(su, sd, lr, wd, eps_scale, inv_sqrt_n, clip_threshold, HAS_WD: tl.constexpr):
    """(−step size, weight factor): ``lr_t = lr·max(RMS(θ), eps_scale)``,
    ``step = lr_t / max(1, RMS(u) / threshold)``."""
    lr_t = tl.maximum(tl.sqrt(sd) * inv_sqrt_n, eps_scale) * lr
    step = lr_t / tl.maximum(tl.sqrt(su) * inv_sqrt_n / clip_threshold, 1.0)
    b = 1.0
    if HAS_WD:
        b = 1.0 - lr_t * wd
    return -step, b


@triton.jit(do_not_specialize=["R", "n_rv", "nprog", "lr", "wd", "eps_scale", "inv_sqrt_n", "clip_threshold",
                              "gscale", "clampv"])
def _apply_kernel(g_ptr, d_ptr, R, C, nr_ptr, nc_ptr, avgpart_ptr, n_rv, part_ptr, nprog, row_ptr, col_ptr, ok_ptr,
                  lr, wd, eps_scale, inv_sqrt_n, clip_threshold, gscale, clampv, coef_ptr, fin_ptr,
                  CLAMP: tl.constexpr, COEF: tl.constexpr, HAS_OK: tl.constexpr, HAS_WD: tl.constexpr,
                  FIN: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BAVG: tl.constexpr, BP: tl.constexpr):
    rt, ct = tl.program_id(0), tl.program_id(1)
    avg = _row_avg(avgpart_ptr, n_rv, R, BAVG)
    p = tl.arange(0, BP)
    su = tl.sum(tl.load(part_ptr + 2 * p, mask=p < nprog, other=0.0))
    sd = tl.sum(tl.load(part_ptr + 2 * p + 1, mask=p < nprog, other=0.0))
    a, b = _step(su, sd, lr, wd, eps_scale, inv_sqrt_n, clip_threshold, HAS_WD)
    u, offs, m = _u_tile(g_ptr, R, C, rt, ct, nr_ptr, nc_ptr, avg, gscale, clampv, coef_ptr, CLAMP, COEF, BR, BC)
    d = tl.load(d_ptr + offs, mask=m, other=0.0).to(tl.float32)
    new = b * d + a * u
    ok = 1
    if HAS_OK:  # a skipped step (non-finite loss) leaves weights and moments as they were
        ok = tl.load(ok_ptr)
    if FIN:  # so does a gradient that is not finite (||u||² is not then): this tensor only, and its flag says so
        fin = su <= FLT_MAX
        ok = tl.where(fin, ok, 0)
        if (rt == 0) & (ct == 0):
            tl.store(fin_ptr, tl.where(fin, tl.load(fin_ptr), 0))
    if HAS_OK or FIN:
        new = tl.where(ok != 0, new, d)
    tl.store(d_ptr + offs, new.to(d_ptr.dtype.element_ty), mask=m)
    if ok != 0:  # the moments, once: by the first tile column (rows) and the first tile row (columns)
        if ct == 0:
            rows = rt * BR + tl.arange(0, BR)
            tl.store(row_ptr + rows, tl.load(nr_ptr + rows, mask=rows < R), mask=rows < R)
        if rt == 0:
            cols = ct * BC + tl.arange(0, BC)
            tl.store(col_ptr + cols, tl.load(nc_ptr + cols, mask=cols < C), mask=cols < C)


@triton.jit(do_not_specialize=["N", "beta", "vg", "ve", "lr", "wd", "eps_scale", "inv_sqrt_n", "clip_threshold",
                              "gscale", "clampv"])
def _vector_kernel(g_ptr, d_ptr, sq_ptr, ns_ptr, N, beta, vg, ve, ok_ptr, lr, wd, eps_scale, inv_sqrt_n,
                   clip_threshold, gscale, clampv, coef_ptr, fin_ptr, CLAMP: tl.constexpr, COEF: tl.constexpr,
                   HAS_OK: tl.constexpr, HAS_WD: tl.constexpr, FIN: tl.constexpr, BLOCK: tl.constexpr):
    """A whole vector in one program: its moment ``beta·m + (1 - beta)·(g² + eps)``, then the step."""
    su = tl.zeros([BLOCK], dtype=tl.float32)
    sd = tl.zeros([BLOCK], dtype=tl.float32)
    for o in range(0, N, BLOCK):
        i = o + tl.arange(0, BLOCK)
        m = i < N
        g = _g(g_ptr, i, m, gscale, clampv, coef_ptr, CLAMP, COEF)
        new = tl.load(sq_ptr + i, mask=m, other=1.0) * beta + vg * (g * g) + ve
        tl.store(ns_ptr + i, new, mask=m)
        u = g * tl.rsqrt(new)
        d = tl.load(d_ptr + i, mask=m, other=0.0).to(tl.float32)
        su += tl.where(m, u * u, 0.0)
        sd += d * d
    usq = tl.sum(su)  # ||u||²
    a, b = _step(usq, tl.sum(sd), lr, wd, eps_scale, inv_sqrt_n, clip_threshold, HAS_WD)
    ok = 1
    if HAS_OK:
        ok = tl.load(ok_ptr)
    if FIN:
        fin = usq <= FLT_MAX
        ok = tl.where(fin, ok, 0)
        tl.store(fin_ptr, tl.where(fin, tl.load(fin_ptr), 0))
    for o in range(0, N, BLOCK):
        i = o + tl.arange(0, BLOCK)
        m = i < N
        g = _g(g_ptr, i, m, gscale, clampv, coef_ptr, CLAMP, COEF)
        new = tl.load(ns_ptr + i, mask=m, other=1.0)
        d = tl.load(d_ptr + i, mask=m, other=0.0).to(tl.float32)
        w = b * d + a * (g * tl.rsqrt(new))
        if HAS_OK or FIN:
            w = tl.where(ok != 0, w, d)
        tl.store(d_ptr + i, w.to(d_ptr.dtype.element_ty), mask=m)
        if ok != 0:
            tl.store(sq_ptr + i, new, mask=m)


def _common(g: Tensor, ok: Tensor | None, gscale: float, clamp: float | None, coef: Tensor | None,
            finite: Tensor | None):
    okt = ok_flag(ok, g)
    coeft = g if coef is None else coef.to(device=g.device, dtype=torch.float32)
    flags = dict(CLAMP=clamp is not None, COEF=coef is not None, HAS_OK=ok is not None, FIN=finite is not None)
    return okt, coeft, float(gscale), float(clamp or 0.0), g if finite is None else finite, flags


def adalomo_matrix_(d: Tensor, g: Tensor, row: Tensor, col: Tensor, *, beta: float, eps0: float, lr: float,
                    wd: float, eps_scale: float, clip_threshold: float, ok: Tensor | None = None,
                    gscale: float = 1.0, clamp: float | None = None, coef: Tensor | None = None,
                    finite: Tensor | None = None) -> None:
    """AdaLomo's step for a contiguous 2-D weight ``d`` with gradient ``g``, in place, moments included (fp32
    ``row`` of ``d.shape[0]``, ``col`` of ``d.shape[1]``). ``gscale``, ``clamp`` and ``coef`` act on ``g`` as it is
    read (fp16 unscaling, value clipping, the global-norm clip coefficient); ``ok`` false skips the step. With
    ``finite`` (an int32 flag), a gradient that is not finite skips this tensor and sets the flag to 0."""
    R, C = d.shape
    n_cb = triton.cdiv(C, BC)
    n_seg = min(triton.cdiv(R, BR), max(1, 512 // n_cb))  # about 512 programs for the squared sums
    rs = triton.cdiv(triton.cdiv(R, n_seg), BR) * BR
    n_seg = triton.cdiv(R, rs)
    n_rv, n_rt, n_ct = triton.cdiv(R, BV), triton.cdiv(R, BR), n_cb
    n_tiles = n_rt * n_ct
    nprog = min(n_tiles, NPROG)
    scratch = torch.empty(n_cb * R + n_seg * C + R + C + n_rv + 2 * nprog, dtype=torch.float32, device=d.device)
    rowpart, colpart, nr, nc, avgpart, part = scratch.split([n_cb * R, n_seg * C, R, C, n_rv, 2 * nprog])
    okt, coeft, gs, cv, fin, flags = _common(g, ok, gscale, clamp, coef, finite)
    g_flags = dict(CLAMP=flags["CLAMP"], COEF=flags["COEF"])
    bavg = max(16, triton.next_power_of_2(n_rv))  # the block of a small sum: no tl.arange shorter than 16
    _sq_kernel[(n_seg, n_cb)](g, R, C, rs, rowpart, colpart, gs, cv, coeft, **g_flags, BR=BR, BC=BC)
    _moments_kernel[(n_rv + triton.cdiv(C, BV),)](
        rowpart, colpart, R, C, n_cb, n_seg, row, col, nr, nc, avgpart, n_rv, float(beta), (1.0 - beta) / C,
        (1.0 - beta) / R, (1.0 - beta) * eps0, BV=BV)
    _norms_kernel[(nprog,)](
        g, d, R, C, n_ct, n_tiles, nprog, nr, nc, avgpart, n_rv, part, gs, cv, coeft, **g_flags, BR=BR, BC=BC,
        BAVG=bavg)
    _apply_kernel[(n_rt, n_ct)](
        g, d, R, C, nr, nc, avgpart, n_rv, part, nprog, row, col, okt, float(lr), float(wd), float(eps_scale),
        1.0 / (R * C) ** 0.5, float(clip_threshold), gs, cv, coeft, fin, **flags, HAS_WD=bool(wd), BR=BR, BC=BC,
        BAVG=bavg, BP=max(16, triton.next_power_of_2(nprog)))


def adalomo_vector_(d: Tensor, g: Tensor, sq: Tensor, *, beta: float, eps0: float, lr: float, wd: float,
                    eps_scale: float, clip_threshold: float, ok: Tensor | None = None, gscale: float = 1.0,
                    clamp: float | None = None, coef: Tensor | None = None, finite: Tensor | None = None) -> None:
    """:func:`adalomo_matrix_` for a contiguous vector of at most ``VEC_MAX`` elements (fp32 moment ``sq``)."""
    n = d.numel()
    ns = torch.empty(n, dtype=torch.float32, device=d.device)
    okt, coeft, gs, cv, fin, flags = _common(g, ok, gscale, clamp, coef, finite)
    _vector_kernel[(1,)](
        g, d, sq, ns, n, float(beta), 1.0 - beta, eps0 * (1.0 - beta), okt, float(lr), float(wd), float(eps_scale),
        1.0 / n ** 0.5, float(clip_threshold), gs, cv, coeft, fin, **flags, HAS_WD=bool(wd), BLOCK=1024)
