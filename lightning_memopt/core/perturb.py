"""Seeded Gaussian directions keyed by (seed, parameter index, element offset), never stored.

Element ``e`` of parameter ``i`` under step seed ``s`` gets ``randn4x(key, e // 4)[e % 4]`` where ``randn4x`` is
Triton's ``tl.randn4x`` (Philox4x32-10 on counter ``(e // 4, 0, 0, 0)``, then Box–Muller on pairs, here with the
angle 2πu kept exact: cos/sin of the float64 angle; the kernel reduces 4u exactly and evaluates polynomials) and
the 64-bit key is ``s + (i << 32)``: the low word is the step seed, the high word the parameter's index in a fixed
by-name order. Because z depends only on the element's position in the *full* tensor, any sharding (FSDP2 dim-0
shards, one module at a time) sees the same numbers, and a 2-process run perturbs exactly like a 1-process run.

Two backends give the same numbers (up to float rounding of ``log``/``cos``/``sin``):

* a Triton kernel (CUDA tensors, Triton importable): z is generated in registers, one launch per tensor, no buffer;
* a pure-torch emulation (any device) that reproduces Philox4x32 with int64 arithmetic on uint32 values, and
  Triton's uint→float exactly as ``triton/language/random.py`` writes it.

Public functions: :func:`normal` (z for a range of one parameter), :func:`perturbed` (``w + scale·z`` out of place),
:func:`update_` (the in-place ZO update with a window of directions, used by MeZO and its momentum/Adam forms), and
their many-tensor forms :func:`perturbed_many` and :func:`update1_many` (one kernel launch for a list of tensors: for
small models the per-tensor launches, not the memory traffic, are the cost).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from lightning_memopt.core._triton import kernels

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_U2F_SCALE = 4.6566127342e-10  # Triton's uint_to_uniform_float scale for 32-bit values
_CHUNK = 1 << 20  # counters per torch-fallback chunk (bounds the int64 temporaries)
MAX_NUMEL = (1 << 31) - 8  # counters and element offsets stay int32 in the kernel (uint32 Philox path)


def key(step_seed: int | Tensor, index: int) -> int | Tensor:
    """The 64-bit Philox key of parameter ``index`` under a 32-bit ``step_seed``.

    ``step_seed`` may be a device int64 scalar (a CUDA graph's seed, rewritten before each replay): the key is then
    a tensor computed on the device, and every torch-backend function below takes it without a host read.
    """
    if isinstance(step_seed, Tensor):
        return (step_seed.to(torch.int64) & _M32) | (int(index) << 32)
    return (int(step_seed) & _M32) | (int(index) << 32)


# ---------------------------------------------------------------------------------------------------------------
# torch emulation of tl.randn4x
# ---------------------------------------------------------------------------------------------------------------
def _mulhilo(a: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of the constant ``a`` and uint32 values ``x`` (int64 storage)."""
    p_lo = (x & 0xFFFF) * a  # < 2**48
    p_hi = (x >> 16) * a  # < 2**48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2**49
    return ((p_hi >> 16) + (mid >> 32)) & _M32, mid & _M32


def philox4x32(
    counter: Tensor, k0: int | Tensor, k1: int | Tensor, rounds: int = 10, words: Sequence[Tensor] | None = None
) -> tuple[Tensor, ...]:
    """Philox4x32 on ``(counter, 0, 0, 0)`` with key ``(k0, k1)``, as in ``triton.language.random.philox_impl``.

    Keys may be int64 tensors (one key per counter) to generate many parameters' z in one vectorised call.
    ``words`` optionally gives the other three counter words (for the Random123 known-answer tests).
    """
    c0 = counter.to(torch.int64) & _M32
    if words is None:
        c1, c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0), torch.zeros_like(c0)
    else:
        c1, c2, c3 = (w.to(torch.int64) & _M32 for w in words)
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def _uniform(x: Tensor) -> Tensor:
    # Triton: bitcast to int32, x<0 -> ~x, then int32 * fp32 scale.
    x = torch.where(x >= 1 << 31, _M32 - x, x)
    return x.to(torch.float32) * torch.tensor(_U2F_SCALE, dtype=torch.float32, device=x.device)


def _box_muller(u1: Tensor, u2: Tensor) -> tuple[Tensor, Tensor]:
    u1 = u1.clamp_min(torch.tensor(1.0e-7, dtype=torch.float32).item())
    # the kernel never rounds the angle 2πu to float32 (it reduces 4u exactly), so compute it in float64
    th = u2.to(torch.float64) * (2.0 * math.pi)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th).to(torch.float32), r * torch.sin(th).to(torch.float32)


def randn4x(k: int | Tensor, counter: Tensor, dist: str = "normal") -> Tensor:
    """``tl.randn4x(k, counter)`` stacked as ``[..., 4]`` (float32); ``k`` an int or a per-counter int64 tensor.

    ``dist="rademacher"`` gives ±1 from the top bit of each Philox word instead (SPSA's classic directions).
    """
    i1, i2, i3, i4 = philox4x32(counter, k & _M32, (k >> 32) & _M32)
    if dist == "rademacher":
        return torch.stack([1.0 - 2.0 * (i >> 31).to(torch.float32) for i in (i1, i2, i3, i4)], dim=-1)
    if dist != "normal":
        raise ValueError(f"distribution must be 'normal' or 'rademacher', got {dist!r}.")
    n1, n2 = _box_muller(_uniform(i1), _uniform(i2))
    n3, n4 = _box_muller(_uniform(i3), _uniform(i4))
    return torch.stack((n1, n2, n3, n4), dim=-1)


def normal(
    k: int | Tensor, start: int, numel: int, device: torch.device | str = "cpu", dist: str = "normal"
) -> Tensor:
    """z for elements ``[start, start + numel)`` of the parameter keyed ``k`` (an int or a 0-d int64 tensor from
    :func:`key`; float32, torch backend)."""
    if start + numel > MAX_NUMEL:
        raise ValueError(f"Tensors above {MAX_NUMEL} elements are not supported by the perturbation keying.")
    out = torch.empty(numel, dtype=torch.float32, device=device)
    c_first, c_last = start >> 2, (start + numel - 1) >> 2 if numel else (start >> 2) - 1
    pos = 0
    for c in range(c_first, c_last + 1, _CHUNK):
        cnt = torch.arange(c, min(c + _CHUNK, c_last + 1), device=device, dtype=torch.int64)
        z = randn4x(k, cnt, dist).reshape(-1)
        lo = max(start - 4 * c, 0)
        take = min(z.numel() - lo, numel - pos)
        out[pos : pos + take] = z[lo : lo + take]
        pos += take
    return out


def normal_many(
    keys: Sequence[int], numels: Sequence[int], device: torch.device | str = "cpu", dist: str = "normal"
) -> list[Tensor]:
    """Full-tensor z of several parameters in one vectorised pass (the torch backend's fast path for small models)."""
    counts = [(n + 3) >> 2 for n in numels]
    total = sum(counts)
    if total == 0:
        return [torch.empty(0, device=device) for _ in numels]
    cnt = torch.cat([torch.arange(c, device=device, dtype=torch.int64) for c in counts])
    kk = torch.repeat_interleave(
        torch.tensor([int(k) for k in keys], dtype=torch.int64, device=device), torch.tensor(counts, device=device)
    )
    z = randn4x(kk, cnt, dist)
    out, pos = [], 0
    for c, n in zip(counts, numels):
        out.append(z[pos : pos + c].reshape(-1)[:n])
        pos += c
    return out


# ---------------------------------------------------------------------------------------------------------------
# backend choice
# ---------------------------------------------------------------------------------------------------------------
def _triton_kernels():
    return kernels("_perturb_triton")


def use_triton(t: Tensor) -> bool:
    """The Triton kernel runs for CUDA tensors when Triton imports (``MEMOPT_PERTURB=torch`` forces torch)."""
    if os.environ.get("MEMOPT_PERTURB", "auto") == "torch":
        return False
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _triton_kernels() is not None


def _kernel_dist(dist: str) -> int:
    """The kernel's DIST: Rademacher, or normals with precise (0) or fast approximate (1) log/cos/sin.

    Fast math changes z by float rounding only (checked against this file's emulation by gpu_check_perturb).
    """
    if dist == "rademacher":
        return 2
    if dist != "normal":
        raise ValueError(f"distribution must be 'normal' or 'rademacher', got {dist!r}.")
    return 1 if os.environ.get("MEMOPT_FAST_MATH", "0") == "1" else 0


# ---------------------------------------------------------------------------------------------------------------
# operations
# ---------------------------------------------------------------------------------------------------------------
def perturbed(
    w: Tensor, k: int | Tensor, scale: float, start: int = 0, z: Tensor | None = None, dist: str = "normal"
) -> Tensor:
    """A new tensor ``round(w + scale·z)`` in ``w``'s dtype; ``w`` holds elements ``[start, start + w.numel())``.

    ``z`` may be given (a cached float32 copy of this range) to skip regeneration; it must equal ``normal(...)``.
    A tensor key (see :func:`key`) takes the torch backend here; :func:`perturbed_many` has the kernel for it.
    """
    if w.numel() > MAX_NUMEL:
        raise ValueError(f"Tensors above {MAX_NUMEL} elements are not supported by the perturbation keying.")
    if z is None and use_triton(w) and not isinstance(k, Tensor):
        return _triton_kernels().perturbed(w, k, scale, start, _kernel_dist(dist))  # type: ignore[union-attr]
    if z is None:
        z = normal(k, start, w.numel(), w.device, dist)
    out = w.detach().reshape(-1).to(torch.float32) + scale * z
    return out.to(w.dtype).view(w.shape)


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
    zs: Sequence[Tensor] | None = None,
    dist: str = "normal",
    seed_ints: Sequence[int] | None = None,
    ok: Tensor | None = None,
) -> None:
    """In place: ``t ← round(decay·t − lr·Δ)`` over a window of J directions ``z_j`` (keys ``key(seeds[j], index)``).

    ``Δ = m = Σ_j a_j z_j`` (SGD and momentum), or ``Δ = m / (sqrt(v) + adam_eps)`` with ``v = Σ_j b_j z_j²``
    (Adam, when ``adam_eps`` is given). ``seeds`` (int64), ``a`` and ``b`` (float32) are device tensors, so a
    coefficient computed on the GPU needs no host sync. ``t`` is a contiguous tensor (a local FSDP2 shard) holding
    elements ``[start, start + t.numel())`` of the full parameter. ``zs`` optionally gives cached directions;
    ``seed_ints`` (the seeds as host ints, if known) lets the kernel take a one-direction SGD fast path. Where the
    0-d device bool ``ok`` is false (a step skipped for a non-finite loss) ``t`` is left bit-identical, whatever
    ``a``/``b`` hold, with no host sync.
    """
    if t.numel() == 0:
        return
    if not t.is_contiguous():
        raise ValueError("update_ needs a contiguous tensor (FSDP2 local shards are).")
    if zs is None and use_triton(t):
        _triton_kernels().update_(  # type: ignore[union-attr]
            t,
            index,
            seeds,
            a,
            b,
            lr,
            decay,
            start,
            adam_eps,
            _kernel_dist(dist),
            None if seed_ints is None else [int(x) for x in seed_ints],
            ok,
        )
        return
    flat = t.view(-1)
    a32 = a.to(device=t.device, dtype=torch.float32)
    b32 = None if b is None else b.to(device=t.device, dtype=torch.float32)
    # the keys from the device seeds: no host read, so this path also runs inside a CUDA graph
    seeds_dev = seeds.to(device=t.device, dtype=torch.int64).reshape(-1)
    for lo in range(0, flat.numel(), 4 * _CHUNK):
        n = min(4 * _CHUNK, flat.numel() - lo)
        m = torch.zeros(n, dtype=torch.float32, device=t.device)
        v = torch.zeros(n, dtype=torch.float32, device=t.device) if adam_eps is not None else None
        for j in range(seeds_dev.numel()):
            z = zs[j][lo : lo + n] if zs is not None else normal(key(seeds_dev[j], index), start + lo, n, t.device, dist)
            m = m + a32[j] * z
            if v is not None:
                v = v + b32[j] * (z * z)  # type: ignore[index]
        delta = m if v is None else m / (torch.sqrt(v) + adam_eps)
        old = flat[lo : lo + n].to(torch.float32)
        new = old * decay - lr * delta
        if ok is not None:
            new = torch.where(ok.to(t.device), new, old)
        flat[lo : lo + n] = new.to(t.dtype)


def _one_launch(ts: Sequence[Tensor]) -> bool:
    """The many-tensor kernels take CUDA, contiguous tensors of one dtype (Triton importable)."""
    if not ts or not use_triton(ts[0]):
        return False
    dt, dev = ts[0].dtype, ts[0].device
    return all(t.dtype == dt and t.device == dev and t.is_contiguous() and t.numel() <= MAX_NUMEL for t in ts)


def seed_tensor(step_seed: int, device: torch.device | str) -> Tensor:
    """The step seed as a device int64 scalar (what the many-tensor kernels read; made without a host copy)."""
    return torch.full((), int(step_seed) & _M32, dtype=torch.int64, device=device)


def perturbed_many(
    ws: Sequence[Tensor],
    indices: Sequence[int],
    step_seed: int,
    scale: float,
    dist: str = "normal",
    seed_t: Tensor | None = None,
    starts: Sequence[int] | None = None,
    out: Tensor | None = None,
    dst: Sequence[int] | None = None,
) -> list[Tensor]:
    """``[perturbed(w, key(step_seed, i), scale, start)]``, in one launch per call on the GPU.

    ``w_k`` holds elements ``[starts[k], starts[k] + numel)`` of its stream (default: from 0). The outputs are views
    of one new buffer, or, with ``out`` (contiguous, ``w``'s dtype) and ``dst``, written to ``out[dst[k]:]``.
    ``seed_t`` (from :func:`seed_tensor`) saves a launch when reused.
    """
    ws = [w.detach() for w in ws]
    if (out is None) != (dst is None):
        raise ValueError("perturbed_many: give both out and dst, or neither.")
    if out is not None and (not out.is_contiguous() or any(out.dtype != w.dtype for w in ws)
                            or any(int(d) < 0 or int(d) + w.numel() > out.numel() for d, w in zip(dst, ws))):
        raise ValueError("perturbed_many: out must be contiguous, of the tensors' dtype, and hold every dst range.")
    starts = [0] * len(ws) if starts is None else [int(x) for x in starts]
    if _one_launch(ws):
        seed_t = seed_tensor(step_seed, ws[0].device) if seed_t is None else seed_t
        return _triton_kernels().perturbed_many(  # type: ignore[union-attr]
            ws, [int(i) for i in indices], seed_t, scale, _kernel_dist(dist), starts, out,
            None if dst is None else [int(d) for d in dst],
        )
    seed = step_seed if seed_t is None else seed_t
    res = [perturbed(w, key(seed, i), scale, st, dist=dist) for w, i, st in zip(ws, indices, starts)]
    if out is None:
        return res
    views = []
    for r, d in zip(res, dst):  # type: ignore[arg-type]
        v = out[int(d) : int(d) + r.numel()]
        v.copy_(r.reshape(-1))
        views.append(v.view(r.shape))
    return views


def update1_many(
    ts: Sequence[Tensor],
    indices: Sequence[int],
    starts: Sequence[int],
    step_seed: int,
    a: Tensor,
    lr: float,
    decay: float,
    dist: str = "normal",
    seed_t: Tensor | None = None,
    ok: Tensor | None = None,
) -> None:
    """In place, one direction: ``t ← round(decay·t − lr·a·z(key(step_seed, i)))`` for each tensor (``t`` holds
    elements ``[start, start + numel)`` of its parameter); one launch per call on the GPU. ``a`` is a 1-element
    float32 device tensor (the projected gradient: no host sync); ``ok`` as in :func:`update_`."""
    ts = [t.detach() for t in ts]
    if _one_launch(ts):
        seed_t = seed_tensor(step_seed, ts[0].device) if seed_t is None else seed_t
        _triton_kernels().update1_many(  # type: ignore[union-attr]
            ts, [int(i) for i in indices], [int(x) for x in starts], seed_t, a, lr, decay, _kernel_dist(dist), ok
        )
        return
    if seed_t is not None:  # the device seed (a CUDA graph's): the window kernel reads it, nothing baked in
        seeds, ints = seed_t.reshape(1), None
    else:
        seeds, ints = torch.tensor([int(step_seed) & _M32], dtype=torch.int64), [int(step_seed)]
    for t, i, st in zip(ts, indices, starts):
        update_(t, int(i), seeds, a, None, lr, decay, int(st), dist=dist, seed_ints=ints, ok=ok)


def warn_unperturbed(names: Iterable[str]) -> None:
    """Warn, naming them, about trained parameters the first perturbed forward never reached (their owner's forward
    did not run), which the perturbation hooks can therefore never move."""
    listed = sorted(names)
    if not listed:
        return
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(
        f"MeZO: {len(listed)} trained parameters were not perturbed in the first forward, because no forward of the "
        f"module owning them ran ({', '.join(listed[:5])}{', ...' if len(listed) > 5 else ''}). MeZO perturbs a weight "
        f"inside its module's forward, and updates every trained weight by the estimate times its direction: a "
        f"weight the forwards never perturb (one used directly in training_step) moves by noise alone. Hold it in a "
        f"submodule (an nn.Module whose forward uses it), or freeze it (requires_grad=False). (In a mixture of "
        f"experts, an expert a step skips gets that step's noise too; one the first batch skipped is not an error.)"
    )
