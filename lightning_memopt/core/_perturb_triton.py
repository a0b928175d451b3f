"""Triton kernels behind :mod:`lightning_memopt.core.perturb` (imported lazily; needs Triton and, normally, CUDA).

Each program owns ``BLOCK4`` Philox counters, i.e. ``4·BLOCK4`` consecutive elements of the full parameter, and
generates their z in registers from one Philox4x32 draw (all four words used). Elements are addressed as
``4·counter + lane - start`` so a shard starting at any offset sees the same z as the full tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Needed by every normal kernel: where it does not import, neither does this module, and the torch path runs.
from triton.language.extra.cuda import libdevice

from lightning_memopt.core._triton import ok_flag

BLOCK4 = 512  # 5% faster than 256 for the normal kernels over 1.1B elements on the H200 (equal for the rest)
# DIST: 0 = Box–Muller with -2·ln(u) within 4 and cos/sin(2πu) within 2 float32 ulps of the exact values (polynomials
# after exact range reductions; the angle 2πu is never rounded to float32), 1 = fast approximate log/cos/sin (equal
# to float rounding), 2 = Rademacher signs from the top bit of each Philox word. The normal kernels are bound by
# instruction issue, not memory (benchmarks/results/normal_kernels_h200.md): each instruction saved here counts.


@triton.jit
def _philox4(seed, c):
    """``tl.randint4x(seed, c)``: Philox4x32-10 on ``(c, c >> 32, 0, 0)`` with key ``(seed, seed >> 32)``, the same
    numbers, with each 32x32-bit product written as one 64-bit multiply so that the compiler emits one wide multiply
    for both halves instead of two (Triton's own does umulhi and mul separately: 14 more of the normal kernel's
    ~190 instructions per counter, sm_90 SASS)."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = c.to(tl.uint32)
    zero = c0 * 0
    if c.dtype.primitive_bitwidth > 32:
        c1 = (c >> 32).to(tl.uint32)
    else:
        c1 = zero
    c2 = zero
    c3 = zero
    for _ in tl.static_range(10):
        pb = c2.to(tl.uint64) * 0xCD9E8D57
        pa = c0.to(tl.uint64) * 0xD2511F53
        c0 = (pb >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (pa >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = pb.to(tl.uint32)
        c3 = pa.to(tl.uint32)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _neg2log(u):
    """-2·ln(u) for u in [1e-7, 1), within 4 float32 ulps (3.1 at worst in a float32 emulation over 20M draws).

    u = 2^e·m with m in [2/3, 4/3) by libdevice's exponent split, without its special cases (u is never 0, subnormal
    or infinite here); ln(m) = 2·atanh(s) with s = (m - 1)/(m + 1), |s| <= 1/5, from a minimax polynomial in s²
    (2.4e-9 relative). 15 instructions, where libdevice's logf and the product take 22 (sm_90 SASS)."""
    i = u.to(tl.int32, bitcast=True)
    t = (i - 0x3F2AAAAB) & -8388608  # e·2^23 (0xFF800000)
    m = (i - t).to(tl.float32, bitcast=True)
    s = libdevice.fast_dividef(m - 1.0, m + 1.0)
    w = s * s
    p = -4.0 + w * (-1.333341 + w * (-0.7990535 + w * -0.6086985))
    return t.to(tl.float32) * -1.6525916589735634e-07 + s * p  # -2·ln(2)·2^-23


@triton.jit
def _polar(r, u):
    """(r·cos 2πu, r·sin 2πu) for u in [0, 1], cos and sin within 2 float32 ulps of the float64 angle's.

    The angle is π/2·(q + x) with q = round(4u) and x = 4u - q, both exact: adding 1.5·2^23 rounds 4u to an integer
    that sits in the sum's last bits. sin(π/2·x) comes from a minimax polynomial on |x| <= 1/2 (3.2e-9 relative) and
    cos from sqrt(1 - sin²), well conditioned there (cos >= 0.7). The quadrant's sign flips are xors of sign bits:
    odd q negates x (sin is odd, cos even) before the swap, q >= 2 negates r."""
    y = u * 4.0 + 12582912.0
    x = u * 4.0 - (y - 12582912.0)
    q = y.to(tl.int32, bitcast=True)  # q's low bits = round(4u)'s
    w = x * x
    x = (x.to(tl.int32, bitcast=True) ^ (q << 31)).to(tl.float32, bitcast=True)
    s = x * (1.5707964 + w * (-0.6459635 + w * (0.07968003 + w * -0.004601658)))
    c = tl.sqrt(1.0 - s * s)
    r = (r.to(tl.int32, bitcast=True) ^ ((q << 30) & -2147483648)).to(tl.float32, bitcast=True)
    odd = (q & 1) != 0
    return r * tl.where(odd, s, c), r * tl.where(odd, c, s)


@triton.jit
def _z4(seed, c, DIST: tl.constexpr):
    i1, i2, i3, i4 = _philox4(seed, c)
    if DIST == 0:
        u1 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(i1))
        u3 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(i3))
        n1, n2 = _polar(tl.sqrt(_neg2log(u1)), tl.uint_to_uniform_float(i2))
        n3, n4 = _polar(tl.sqrt(_neg2log(u3)), tl.uint_to_uniform_float(i4))
    elif DIST == 1:
        u1 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(i1))
        u3 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(i3))
        t2 = 6.283185307179586 * tl.uint_to_uniform_float(i2)
        t4 = 6.283185307179586 * tl.uint_to_uniform_float(i4)
        r1 = tl.sqrt(-2.0 * libdevice.fast_logf(u1))
        r3 = tl.sqrt(-2.0 * libdevice.fast_logf(u3))
        n1, n2 = r1 * libdevice.fast_cosf(t2), r1 * libdevice.fast_sinf(t2)
        n3, n4 = r3 * libdevice.fast_cosf(t4), r3 * libdevice.fast_sinf(t4)
    else:
        n1 = 1.0 - 2.0 * (i1 >> 31).to(tl.float32)
        n2 = 1.0 - 2.0 * (i2 >> 31).to(tl.float32)
        n3 = 1.0 - 2.0 * (i3 >> 31).to(tl.float32)
        n4 = 1.0 - 2.0 * (i4 >> 31).to(tl.float32)
    return n1, n2, n3, n4


@triton.jit
def _pick(n1, n2, n3, n4, lane):
    return tl.where(
        lane == 0, n1[:, None], tl.where(lane == 1, n2[:, None], tl.where(lane == 2, n3[:, None], n4[:, None]))
    )


@triton.jit
def _z(seed, c, DIST: tl.constexpr):
    """z of counters ``c`` as ``[BLOCK4, 4]``: element ``4·c + lane`` in row ``c``, column ``lane``."""
    n1, n2, n3, n4 = _z4(seed, c, DIST)
    return _pick(n1, n2, n3, n4, tl.arange(0, 4)[None, :])


@triton.jit(do_not_specialize=["seed", "scale"])
def _perturb_kernel(w_ptr, out_ptr, n, start, seed, scale, BLOCK4: tl.constexpr, DIST: tl.constexpr = 0):
    pid = tl.program_id(0)
    c = start // 4 + pid * BLOCK4 + tl.arange(0, BLOCK4)
    lane = tl.arange(0, 4)[None, :]
    loc = c[:, None] * 4 + lane - start
    mask = (loc >= 0) & (loc < n)
    z = _z(seed, c, DIST)
    w = tl.load(w_ptr + loc, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + loc, (w + scale * z).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["idx_hi", "lr", "decay", "adam_eps"])
def _update_kernel(
    t_ptr,
    n,
    start,
    idx_hi,
    seeds_ptr,
    a_ptr,
    b_ptr,
    J: tl.constexpr,
    lr,
    decay,
    adam_eps,
    ok_ptr,
    ADAM: tl.constexpr,
    BLOCK4: tl.constexpr,
    DIST: tl.constexpr = 0,
    HAS_OK: tl.constexpr = False,
):
    pid = tl.program_id(0)
    c = start // 4 + pid * BLOCK4 + tl.arange(0, BLOCK4)
    lane = tl.arange(0, 4)[None, :]
    loc = c[:, None] * 4 + lane - start
    mask = (loc >= 0) & (loc < n)
    m = tl.zeros([BLOCK4, 4], dtype=tl.float32)
    v = tl.zeros([BLOCK4, 4], dtype=tl.float32)
    for j in tl.static_range(J):  # unrolled: the runtime-loop version cost 4-8x one pass (H100)
        s = tl.load(seeds_ptr + j) + idx_hi
        z = _z(s, c, DIST)
        m += tl.load(a_ptr + j) * z
        if ADAM:
            v += tl.load(b_ptr + j) * (z * z)
    t = tl.load(t_ptr + loc, mask=mask, other=0.0).to(tl.float32)
    if ADAM:
        delta = m / (tl.sqrt(v) + adam_eps)
    else:
        delta = m
    new = t * decay - lr * delta
    if HAS_OK:  # a skipped step (non-finite loss) writes the weight back unchanged, whatever delta holds
        new = tl.where(tl.load(ok_ptr) != 0, new, t)
    tl.store(t_ptr + loc, new.to(t_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "lr", "decay"])
def _update1_kernel(
    t_ptr, n, start, seed, a_ptr, lr, decay, ok_ptr, BLOCK4: tl.constexpr, DIST: tl.constexpr = 0,
    HAS_OK: tl.constexpr = False,
):
    pid = tl.program_id(0)
    c = start // 4 + pid * BLOCK4 + tl.arange(0, BLOCK4)
    lane = tl.arange(0, 4)[None, :]
    loc = c[:, None] * 4 + lane - start
    mask = (loc >= 0) & (loc < n)
    z = _z(seed, c, DIST)
    a = tl.load(a_ptr)
    t = tl.load(t_ptr + loc, mask=mask, other=0.0).to(tl.float32)
    new = t * decay - lr * (a * z)
    if HAS_OK:
        new = tl.where(tl.load(ok_ptr) != 0, new, t)
    tl.store(t_ptr + loc, new.to(t_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _multi_block(blk_t, blk_b, numels, starts, keyhi, seed_ptr, BLOCK4: tl.constexpr, ALIGNED: tl.constexpr):
    """(tensor j, its n, start, 64-bit key, counters c, element offsets loc, mask) of this program's block.

    ALIGNED (every n, start and tensor offset a multiple of 4 elements; checked on the host) tells the compiler
    so: values loaded from a table are otherwise opaque and each element becomes its own 2-byte load (4x slower
    than a per-tensor launch on a 6.7B model's update, H100). Tensors are addressed as ``ref + offset`` because a
    hint on a pointer loaded from memory does not reach the loads.
    """
    pid = tl.program_id(0)
    j = tl.load(blk_t + pid)
    # int32 (sizes stay below MAX_NUMEL): 64-bit offsets and masks cost ~12 instructions a counter
    n = tl.load(numels + j).to(tl.int32)
    start = tl.load(starts + j).to(tl.int32)
    if ALIGNED:
        n = tl.multiple_of(n, 4)
        start = tl.multiple_of(start, 4)
    key = tl.load(seed_ptr) + tl.load(keyhi + j)  # low word: the step seed; high word: the parameter index
    c = start // 4 + tl.load(blk_b + pid) * BLOCK4 + tl.arange(0, BLOCK4)
    loc = c[:, None] * 4 + tl.arange(0, 4)[None, :] - start
    return j, key, c, loc, (loc >= 0) & (loc < n)


@triton.jit(do_not_specialize=["scale"])
def _perturb_multi_kernel(
    src_ref,
    src_offs,
    dst_ptr,
    dst_offs,
    numels,
    starts,
    keyhi,
    blk_t,
    blk_b,
    seed_ptr,
    scale,
    BLOCK4: tl.constexpr,
    DIST: tl.constexpr = 0,
    ALIGNED: tl.constexpr = False,
):
    """Many tensors of one dtype in one launch: ``dst[off_j:] = round(src_j + scale·z_j)`` (as _perturb_kernel)."""
    j, key, c, loc, mask = _multi_block(blk_t, blk_b, numels, starts, keyhi, seed_ptr, BLOCK4, ALIGNED)
    z = _z(key, c, DIST)
    so, do = tl.load(src_offs + j), tl.load(dst_offs + j)
    if ALIGNED:  # here, not in a helper: a hint on a function argument is lost
        so, do = tl.multiple_of(so, 4), tl.multiple_of(do, 4)
    src, dst = src_ref + so, dst_ptr + do
    w = tl.load(src + loc, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + loc, (w + scale * z).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["lr", "decay"])
def _update1_multi_kernel(
    ref_ptr,
    t_offs,
    numels,
    starts,
    keyhi,
    blk_t,
    blk_b,
    seed_ptr,
    a_ptr,
    lr,
    decay,
    ok_ptr,
    BLOCK4: tl.constexpr,
    DIST: tl.constexpr = 0,
    ALIGNED: tl.constexpr = False,
    HAS_OK: tl.constexpr = False,
):
    """Many tensors of ``ref_ptr``'s dtype in one launch: ``t_j ← round(decay·t_j − lr·a·z_j)`` (as _update1_kernel);
    tensor j starts ``t_offs[j]`` elements from ``ref_ptr``."""
    j, key, c, loc, mask = _multi_block(blk_t, blk_b, numels, starts, keyhi, seed_ptr, BLOCK4, ALIGNED)
    z = _z(key, c, DIST)
    a = tl.load(a_ptr)
    to = tl.load(t_offs + j)
    if ALIGNED:  # here, not in a helper: a hint on a function argument is lost
        to = tl.multiple_of(to, 4)
    t = ref_ptr + to
    w = tl.load(t + loc, mask=mask, other=0.0).to(tl.float32)
    new = w * decay - lr * (a * z)
    if HAS_OK:
        new = tl.where(tl.load(ok_ptr) != 0, new, w)
    tl.store(t + loc, new.to(ref_ptr.dtype.element_ty), mask=mask)


class _Tables:
    """Device-side tables of a fixed list of tensors of one dtype (element offsets from the first tensor, sizes,
    keys, block map), cached by their pointers."""

    def __init__(
        self, ptrs: list[int], numels: list[int], starts: list[int], indices: list[int], esize: int, device,
        dst: list[int] | None = None,
    ) -> None:
        blk_t, blk_b = [], []
        for j, (n, s) in enumerate(zip(numels, starts)):
            nb = _grid(s, n)[0] if n else 0
            blk_t += [j] * nb
            blk_b += list(range(nb))
        offs, o = [], 0
        for n in numels:  # outputs packed into one buffer, each 64-element aligned (16-byte and beyond for GEMMs)
            offs.append(o)
            o += (n + 63) // 64 * 64
        if dst is not None:  # the caller's layout
            offs, o = list(dst), max((d + n for d, n in zip(dst, numels)), default=0)
        self.total = o
        self.offs = offs
        t = lambda v: torch.tensor(v, dtype=torch.int64, device=device)
        rel = [(p - ptrs[0]) // esize for p in ptrs]  # exact: every address is a multiple of the element size
        self.rel, self.numels, self.starts = t(rel), t(numels), t(starts)
        self.keyhi = t([int(i) << 32 for i in indices])
        self.dst_offs = t(offs)
        self.blk_t, self.blk_b = t(blk_t), t(blk_b)
        self.grid = (len(blk_t),)
        # the kernels' vectorisation hint
        self.aligned = all(v % 4 == 0 for v in (*numels, *starts, *rel, *offs))


_TABLES: dict[tuple, _Tables] = {}


def _tables(ts, starts, indices, dst=None) -> _Tables:
    key = (tuple(t.data_ptr() for t in ts), tuple(t.numel() for t in ts), tuple(starts), tuple(indices),
           None if dst is None else tuple(dst))
    tab = _TABLES.get(key)
    if tab is None:
        if len(_TABLES) > 256:  # parameters moved or re-allocated many times: drop stale tables
            _TABLES.clear()
        tab = _TABLES[key] = _Tables(
            list(key[0]), list(key[1]), list(starts), list(indices), ts[0].element_size(), ts[0].device,
            None if dst is None else list(dst),
        )
    return tab


def perturbed_many(
    ws: list[Tensor], indices: list[int], seed: Tensor, scale: float, dist: int = 0,
    starts: list[int] | None = None, out: Tensor | None = None, dst: list[int] | None = None,
) -> list[Tensor]:
    """``[round(w + scale·z(key(seed, i)))]`` for contiguous tensors of one dtype: one launch, one buffer.

    ``seed`` is a device int64 scalar holding the 32-bit step seed (no host-to-device copy per call). ``starts``:
    each ``w``'s first element's offset in its stream (default 0); ``out`` and ``dst``: write ``w_k``'s result to
    ``out[dst[k]:]`` instead of a new packed buffer.
    """
    tab = _tables(ws, [0] * len(ws) if starts is None else list(starts), indices, dst)
    buf = torch.empty(tab.total, dtype=ws[0].dtype, device=ws[0].device) if out is None else out
    if tab.grid[0]:
        _perturb_multi_kernel[tab.grid](
            ws[0],
            tab.rel,
            buf,
            tab.dst_offs,
            tab.numels,
            tab.starts,
            tab.keyhi,
            tab.blk_t,
            tab.blk_b,
            seed,
            float(scale),
            BLOCK4=BLOCK4,
            DIST=dist,
            ALIGNED=tab.aligned,
        )
    return [buf[o : o + w.numel()].view(w.shape) for o, w in zip(tab.offs, ws)]


def update1_many(
    ts: list[Tensor],
    indices: list[int],
    starts: list[int],
    seed: Tensor,
    a: Tensor,
    lr: float,
    decay: float,
    dist: int = 0,
    ok: Tensor | None = None,
) -> None:
    """In place, for contiguous tensors of one dtype in one launch: ``t ← round(decay·t − lr·a·z)``, one direction;
    where the device bool ``ok`` is false the tensors are left as they are."""
    tab = _tables(ts, starts, indices)
    if tab.grid[0]:
        _update1_multi_kernel[tab.grid](
            ts[0],
            tab.rel,
            tab.numels,
            tab.starts,
            tab.keyhi,
            tab.blk_t,
            tab.blk_b,
            seed,
            a.to(device=ts[0].device, dtype=torch.float32),
            float(lr),
            float(decay),
            ok_flag(ok, a),
            BLOCK4=BLOCK4,
            DIST=dist,
            ALIGNED=tab.aligned,
            HAS_OK=ok is not None,
        )


_ONE_OK = [True]  # the one-direction kernel compiled fine (else use the window kernel)


def _grid(start: int, n: int) -> tuple[int]:
    counters = ((start + n - 1) >> 2) - (start >> 2) + 1
    return (triton.cdiv(counters, BLOCK4),)


def perturbed(w: Tensor, k: int, scale: float, start: int = 0, dist: int = 0) -> Tensor:
    w = w.detach()
    if not w.is_contiguous():
        w = w.contiguous()
    out = torch.empty_like(w)
    if w.numel():
        _perturb_kernel[_grid(start, w.numel())](w, out, w.numel(), start, k, float(scale), BLOCK4=BLOCK4, DIST=dist)
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
    dist: int = 0,
    seed_ints: list[int] | None = None,
    ok: Tensor | None = None,
) -> None:
    """``seed_ints`` (the seeds as Python ints, when known on the host) enables the one-direction SGD kernel."""
    a = a.to(device=t.device, dtype=torch.float32)
    okt = ok_flag(ok, a)
    if seed_ints is not None and len(seed_ints) == 1 and adam_eps is None and _ONE_OK[0]:
        key = (int(seed_ints[0]) & 0xFFFFFFFF) | (int(index) << 32)
        try:
            _update1_kernel[_grid(start, t.numel())](
                t, t.numel(), start, key, a, float(lr), float(decay), okt, BLOCK4=BLOCK4, DIST=dist,
                HAS_OK=ok is not None,
            )
            return
        except Exception:  # noqa: BLE001 - a compile problem on some Triton: the loop kernel computes the same
            _ONE_OK[0] = False
    seeds = seeds.to(device=t.device, dtype=torch.int64)
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
        okt,
        ADAM=adam,
        BLOCK4=BLOCK4,
        DIST=dist,
        HAS_OK=ok is not None,
    )
