"""GaLore subspaces: an orthonormal rank-r basis of each gradient's dominant singular subspace.

Two ways to compute it, both batched over matrices of one shape and always in fp32 (bf16 SVD/QR is missing on CUDA,
galore-torch #26/#58):

* ``"svd"``: exact ``torch.linalg.svd`` of the gradient, exactly what galore-torch does (for parity runs).
* ``"randomized"`` (default): a randomized range finder with a Gram sketch. For a row block ``A`` of the matrix,
  ``Y = Aᵀ(AΩ)`` summed over row blocks, then QR, then the top-r eigenvectors of ``(AQ)ᵀ(AQ)`` (also summed). Every
  sum is over row blocks, so under FSDP2 the shards of one matrix (dim-0 row shards) need only all-reduces of
  ``n×k`` and ``k×k`` sketches to agree on a shared right basis; no full matrix is ever gathered.
* ``"svd_lowrank"``: ``torch.svd_lowrank`` (single device only).

Bases are returned as ``[..., d, r]`` with orthonormal columns: a *left* basis ``U`` (m×r, low-rank gradient
``UᵀG``) or a *right* basis ``V`` (n×r, low-rank gradient ``GV``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

Method = Literal["randomized", "svd_lowrank", "svd"]
Reduce = Callable[[Tensor], Tensor]

LEFT, RIGHT = 0, 1  # stored as ints: optimizer.load_state_dict mangles str values in state


def side_for(shape: Sequence[int], proj_type: str) -> int:
    """Which side a ``proj_type`` projects for a matrix of ``shape`` (galore-torch's conventions)."""
    m, n = int(shape[0]), int(shape[1])
    if proj_type == "std":
        return RIGHT if m >= n else LEFT
    if proj_type == "reverse_std":
        return LEFT if m >= n else RIGHT
    if proj_type == "right":
        return RIGHT
    if proj_type == "left":
        return LEFT
    raise ValueError(f"proj_type must be one of 'std', 'reverse_std', 'left', 'right'; got {proj_type!r}.")


def _identity(x: Tensor) -> Tensor:
    return x


def sketch(n: int, k: int, seed: int, device: torch.device) -> Tensor:
    """The Gaussian test matrix Ω (n×k) for one parameter's refresh, a pure function of ``seed`` (and device type)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.randn(n, k, generator=gen, device=device, dtype=torch.float32)


def _canonical_signs(basis: Tensor) -> Tensor:
    # Make each column's largest-magnitude entry positive, so tiny rounding differences (1 vs 2 ranks) cannot flip a
    # column's sign.
    idx = basis.abs().argmax(dim=-2, keepdim=True)
    sign = torch.gather(basis, -2, idx).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return basis * sign


def randomized_right_basis(
    a: Tensor, rank: int, omega: Tensor, power_iters: int = 1, reduce: Reduce = _identity
) -> Tensor:
    """Top-``rank`` right singular subspace of the row-stacked matrix whose (local) rows are ``a`` ``[b, m_local, n]``.

    ``omega`` is ``[b, n, k]`` (k ≥ rank). ``reduce`` sums a tensor over the row blocks (an all-reduce under FSDP2;
    identity on one device), so every rank gets the same ``[b, n, rank]`` basis.
    """
    a = a.float()
    # Normalise so the Gram powers stay far from fp32 overflow; the subspace is scale-invariant.
    sq = reduce(a.square().sum(dim=(-2, -1)))
    a = a / sq.sqrt().clamp_min(1e-30)[..., None, None]
    y = reduce(a.mT @ (a @ omega))
    for _ in range(power_iters):
        y = reduce(a.mT @ (a @ torch.linalg.qr(y).Q))
    q = torch.linalg.qr(y).Q  # [b, n, k]
    aq = a @ q
    c = reduce(aq.mT @ aq)  # [b, k, k]
    _, w = torch.linalg.eigh(c)  # ascending eigenvalues
    w = w.flip(-1)[..., :rank]
    return _canonical_signs(q @ w)


def exact_bases(g: Tensor, rank: int, side: int) -> Tensor:
    """galore-torch's refresh: fp32 ``torch.linalg.svd`` of the gradient ``[b, m, n]``, top-``rank`` vectors."""
    u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
    return u[..., :rank] if side == LEFT else vh[..., :rank, :].mT


def compute_bases(
    grads: Sequence[Tensor],
    rank: int,
    side: int,
    method: Method = "randomized",
    seeds: Sequence[int] | None = None,
    oversample: int = 8,
    power_iters: int = 1,
    reduce: Reduce = _identity,
    shape: Sequence[int] | None = None,
) -> tuple[Tensor, list[bool]]:
    """Bases ``[b, d, rank]`` (fp32) for same-shape gradients, and which gradients were finite.

    Non-finite entries are zeroed before factorising (so nothing crashes); the caller keeps the old basis for any
    gradient whose flag is False. Under FSDP2 ``grads`` are local row shards, ``side`` must be RIGHT and ``shape`` is
    the whole matrix's: the rank is clamped by its rows, not by the shard's (the sketch's products are all-reduced).
    """
    g = torch.stack([t.detach() for t in grads]).float()
    finite = torch.isfinite(g).flatten(1).all(dim=1)
    finite = reduce(finite.float()) >= reduce(torch.ones_like(finite, dtype=torch.float32))  # all ranks finite
    ok = finite.tolist()  # one host sync per refresh group (refreshes are rare)
    if not all(ok):
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    m, n = tuple(shape)[-2:] if shape is not None else g.shape[-2:]
    r = min(rank, m, n)
    if method == "svd":
        return exact_bases(g, r, side), ok
    a = g if side == RIGHT else g.mT  # a right basis of Gᵀ is a left basis of G
    d = a.shape[-1]
    if method == "svd_lowrank":
        _, _, v = torch.svd_lowrank(a, q=min(r + oversample, m, n), niter=power_iters)
        return _canonical_signs(v[..., :r]), ok
    if method != "randomized":
        raise ValueError(f"refresh method must be 'randomized', 'svd_lowrank' or 'svd'; got {method!r}.")
    k = min(r + oversample, d)
    seeds = list(seeds) if seeds is not None else list(range(len(grads)))
    omega = torch.stack([sketch(d, k, s, g.device) for s in seeds])
    return randomized_right_basis(a, r, omega, power_iters, reduce), ok


def subspace_overlap(old: Tensor, new: Tensor) -> Tensor:
    """``‖oldᵀ new‖²_F / r`` in [0, 1]: 1 when the two rank-r subspaces coincide (drives the lazy refresh)."""
    c = old.float().mT @ new.float()
    return c.square().sum(dim=(-2, -1)) / new.shape[-1]
