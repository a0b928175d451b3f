"""MeZO's population estimator: n directions per step, low-rank or dense, evaluated together or one by one.

Directions. Step seed ``s`` and trained parameter ``i`` (index in the by-name order) give, from the Philox stream
``key(s, i)`` of :mod:`lightning_memopt.core.perturb`:

* a 2-D parameter ``[m, n]`` with ``perturbation="lowrank"``: ``Δ = U Vᵀ / sqrt(r)``, ``U = stream[0 : m·r]`` as
  ``[m, r]`` and ``V = stream[m·r : (m+n)·r]`` as ``[n, r]``. Entries of Δ have unit variance, like dense z, so eps
  and lr keep their meaning. The factors are of the FULL shape: under FSDP2 a rank updates its shard's rows of U.
* every other parameter (vectors: norm weights, biases; or everything with ``perturbation="dense"``): dense z,
  exactly MeZO's (same key, same offsets).

Members. Two-sided: ``(s_j, +1), (s_j, −1)`` for each direction (antithetic pairs), ``g_j = (L+ − L−) / 2ε``.
One-sided: an unperturbed member ``(·, 0)`` first, then ``(s_j, +1)``, ``g_j = (L+ − L0) / ε``. Member j's weights are
``θ + sign·ε·S·Δ_j`` where S is the preconditioner's per-tensor scale (1 without one).

Update: ``θ ← (1 − lr·wd)·θ − lr·S·Σ_j a_j Δ_j`` with MeZO's window coefficients ``a_j`` (``g_j / n`` for SGD), in
place, in row chunks; a low-rank Δ is never formed beyond one chunk (``U_chunk · diag(a) · Vᵀ``).

Preconditioner ``"layer"``: ``S_t = rms(W_t) / rms(θ)`` per tensor (from the weights at the start of the fit,
saved in checkpoints and trajectories): each tensor is perturbed and updated in proportion to its own scale, a
diagonal preconditioner ``P = S²`` (so ``E[update] = −lr·S²·∇L``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from lightning_memopt.core import perturb
from lightning_memopt.core.axpby import axpby_, axpby_many_
from lightning_memopt.core.fsdp import all_reduce_sum, global_offset, is_dtensor, local, reshard_all
from lightning_memopt.core.population import member_losses

if TYPE_CHECKING:
    from lightning_memopt.mezo.core import ZOParam

Member = tuple[int, float]  # (direction seed, sign: +1, -1, or 0 for the unperturbed point)
_UPDATE_ELEMS = 1 << 22  # elements of one update chunk (bounds the temporaries of a low-rank update)


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class Directions:
    """The :class:`~lightning_memopt.core.population.DeltaSource` of MeZO's population: seeded factors or dense z,
    scaled per member by ``sign·ε·S_i``. Factors of the step's seeds are cached while the step runs
    (:meth:`retain`), never across steps."""

    def __init__(
        self,
        params: Sequence[ZOParam],
        eps: float,
        perturbation: str = "lowrank",
        rank: int = 4,
        distribution: str = "normal",
        scales: dict[int, float] | None = None,
    ) -> None:
        self.eps, self.rank, self.distribution = float(eps), int(rank), distribution
        self.shapes = {zp.index: tuple(global_offset(zp.param)[1]) for zp in params}
        self.device = local(params[0].param).device
        self._lowrank = {i: perturbation == "lowrank" and len(s) == 2 for i, s in self.shapes.items()}
        self.scales = dict(scales or {})
        self._cache: dict[tuple[int, int], Any] = {}
        self._keep: set[int] | None = None
        self._zeros: Tensor | None = None  # the zero source of the one-launch factor generation (CUDA)
        self._signs: dict[tuple[float, ...], Tensor] = {}
        # The seeds' rows: every tensor's direction of seed j in row j, U parts and dense z first (the part a member
        # scales), then the V parts; the cache's tensors are views of it. A chunk's members gather their rows into
        # one bank (:meth:`begin`), so each layer's factors are views, not a stack and a scaling per layer.
        self._cols: dict[int, tuple[int, int]] = {}  # index -> (offset of U or z, offset of V)
        ns = 0
        for i in self.shapes:
            self._cols[i] = (ns, 0)
            ns += self._signed_numel(i)
        nv = ns
        for i in self.shapes:
            if self._lowrank[i]:
                self._cols[i] = (self._cols[i][0], nv)
                nv += self.shapes[i][1] * self.rank
        self._ns, self._width = ns, nv
        self._rows: Tensor | None = None
        self._row_of: dict[int, int] = {}
        self._ridx: dict[tuple[int, ...], Tensor] = {}
        self._pcoef: tuple[tuple, Tensor] | None = None
        self._bank: tuple[list, Tensor, dict] | None = None  # (members, fp32 bank, its casts by dtype)

    def lowrank(self, index: int) -> bool:
        return self._lowrank[index]

    def scale(self, index: int) -> float:
        return float(self.scales.get(index, 1.0))

    def _numel(self, index: int) -> int:
        shape = self.shapes[index]
        return (shape[0] + shape[1]) * self.rank if self._lowrank[index] else _prod(shape)

    def _signed_numel(self, index: int) -> int:
        """The numbers of parameter ``index``'s direction that a member's sign and scale multiply: U, or dense z."""
        return self.shapes[index][0] * self.rank if self._lowrank[index] else _prod(self.shapes[index])

    def retain(self, seeds: Sequence[int], seed_t: Tensor | None = None) -> None:
        """Cache the directions of these seeds from now on and drop every other; each new seed's factors and small
        dense tensors are generated in one vectorised pass (the per-tensor calls, not the numbers, are the cost).

        ``seed_t`` (int64 ``[n]`` on the device, holding ``seeds``): the kernels read the seeds there, and every
        tensor's direction is generated here (none later from a host seed), so a CUDA graph of the step draws its
        replay's directions; :meth:`adopt` then re-labels the cache with each replay's seeds."""
        self._keep = {int(s) for s in seeds}
        # With seed_t every direction is drawn here, from the device seeds: a graph's capture must not find the
        # tensors of its own warm-up cached (it would replay those directions forever).
        self._cache = {} if seed_t is not None else {k: v for k, v in self._cache.items() if k[0] in self._keep}
        idx = [i for i in self.shapes if seed_t is not None or self.drawable(i)]
        triton = perturb.use_triton(torch.empty(0, device=self.device))
        ints = [int(x) for x in seeds]
        if len(idx) == len(self.shapes) and (seed_t is not None or self._rows is None or list(self._row_of) != ints):
            # every tensor's direction is drawn: into new rows (eagerly, a repeated seed list keeps them)
            self._cache, self._bank = {}, None
            self._rows = torch.empty(len(ints), self._width, dtype=torch.float32, device=self.device)
            self._row_of = {}
        elif len(idx) != len(self.shapes):
            self._rows, self._row_of, self._bank = None, {}, None
        for j, s in enumerate(ints):
            todo = [i for i in idx if (s, i) not in self._cache]  # empty for a repeated seed
            if not todo:
                continue
            st = None if seed_t is None else seed_t[j]
            if (triton or st is not None) and self._rows is not None and len(todo) == len(self.shapes):
                # straight into row j, U and V parts where the row keeps them (no copy)
                parts = self._row_parts(todo)
                zeros = self._zeros_for([n for _, n, _, _ in parts])
                perturb.perturbed_many([zeros[:n] for _, n, _, _ in parts], [i for i, _, _, _ in parts], s, 1.0,
                                       self.distribution, st, starts=[p[2] for p in parts], out=self._rows[j],
                                       dst=[p[3] for p in parts])
                self._cache_row(j, s, todo)
                continue
            flats = self._draw(s, todo, st)
            if self._rows is not None and len(todo) == len(self.shapes):
                self._into_row(j, s, todo, flats)
                continue
            for i, flat in zip(todo, flats):
                self._cache[(s, i)] = self._split(i, flat)

    def _zeros_for(self, numels: Sequence[int]) -> Tensor:
        """The zero source of the one-launch generation (``z = 0 + 1·z``), at least ``max(numels)`` long."""
        n = max(numels)
        if self._zeros is None or self._zeros.numel() < n or self._zeros.device != self.device:
            self._zeros = torch.zeros(n, dtype=torch.float32, device=self.device)
        return self._zeros

    def _draw(self, seed: int, todo: Sequence[int], seed_t: Tensor | None = None) -> list[Tensor]:
        """Seed ``seed``'s directions of parameters ``todo``, flat float32: one launch for all of them on the GPU
        (from ``seed_t`` where given), one vectorised torch emulation on the CPU."""
        numels = [self._numel(i) for i in todo]
        if seed_t is not None or perturb.use_triton(torch.empty(0, device=self.device)):
            zeros = self._zeros_for(numels)
            flats = perturb.perturbed_many([zeros[:n] for n in numels], todo, seed, 1.0, self.distribution, seed_t)
            return [f.reshape(-1) for f in flats]
        return perturb.normal_many([perturb.key(seed, i) for i in todo], numels, self.device, self.distribution)

    def _split(self, index: int, flat: Tensor) -> Any:
        """A drawn direction as the cache keeps it: ``(U, V)`` views of a low-rank tensor's, dense z as it is."""
        if not self._lowrank[index]:
            return flat
        m, n = self.shapes[index]
        return flat[: m * self.rank].view(m, self.rank), flat[m * self.rank :].view(n, -1)

    def drawable(self, index: int) -> bool:
        """Whether the update reads parameter ``index``'s directions from the cache (low-rank factors, small dense
        z); a large dense tensor's z is regenerated inside the update's kernel instead."""
        return self._lowrank[index] or _prod(self.shapes[index]) <= 1 << 16

    @contextlib.contextmanager
    def drawn(self, seeds: Sequence[int], indices: Sequence[int]) -> Iterator[None]:
        """The directions of ``seeds`` for parameters ``indices`` that the cache lacks (a momentum or Adam window's
        earlier steps), drawn one launch per seed and dropped on exit. Drawing them one (seed, tensor) at a time
        cost a launch pair each: about 30,000 per step on SmolLM2 (211 matrices) with 16 directions and a
        window of 10."""
        added = []
        for s in () if self.kept(seeds) else dict.fromkeys(int(x) for x in seeds):
            todo = [i for i in indices if (s, i) not in self._cache]
            if todo:
                for i, flat in zip(todo, self._draw(s, todo)):
                    self._cache[(s, i)] = self._split(i, flat)
                added += [(s, i) for i in todo]
        try:
            yield
        finally:
            for k in added:
                self._cache.pop(k, None)

    def kept(self, seeds: Sequence[int]) -> bool:
        """Whether all of ``seeds`` are the step's own (:meth:`retain`), whose cached directions :meth:`drawn` needs no
        more of: SGD's update, without a lookup per seed and tensor."""
        return self._keep is not None and all(int(x) in self._keep for x in seeds)

    def drawn_numel(self, index: int) -> int:
        """Numbers :meth:`drawn` holds for one seed of parameter ``index`` (none where the update's kernel draws)."""
        return self._numel(index) if self.drawable(index) else 0

    def footprint(self) -> int:
        """Numbers the step's own cached directions take."""
        return len(self._keep or ()) * sum(self.drawn_numel(i) for i in self.shapes)

    def missing(self, seeds: Sequence[int], index: int) -> int:
        """How many of ``seeds`` lack parameter ``index``'s direction in the cache."""
        return sum((int(s), index) not in self._cache for s in dict.fromkeys(int(x) for x in seeds))

    def _row_parts(self, todo: Sequence[int]) -> list[tuple[int, int, int, int]]:
        """(index, numel, offset in its stream, offset in the row) of each part of these tensors' directions: a
        low-rank tensor's U and V, a dense tensor's z."""
        parts = []
        for i in todo:
            a, b = self._cols[i]
            if self._lowrank[i]:
                m, n = self.shapes[i]
                parts += [(i, m * self.rank, 0, a), (i, n * self.rank, m * self.rank, b)]
            else:
                parts.append((i, _prod(self.shapes[i]), 0, a))
        return parts

    def _into_row(self, j: int, seed: int, todo: Sequence[int], flats: Sequence[Tensor]) -> None:
        """Copy seed ``seed``'s directions into row ``j`` (one cat) and cache them as views of it."""
        row = self._rows[j]  # type: ignore[index]
        cols = []
        for i, flat in zip(todo, flats):
            k = self._signed_numel(i)
            cols.append((self._cols[i][0], flat[:k]))
            if self._lowrank[i]:
                cols.append((self._cols[i][1], flat[k:]))
        torch.cat([t for _, t in sorted(cols, key=lambda c: c[0])], out=row)
        self._cache_row(j, seed, todo)

    def _cache_row(self, j: int, seed: int, todo: Sequence[int]) -> None:
        """Cache seed ``seed``'s directions as views of row ``j``, which holds them."""
        row = self._rows[j]  # type: ignore[index]
        self._row_of[seed] = j
        for i in todo:
            a, b = self._cols[i]
            if self._lowrank[i]:
                m, n = self.shapes[i]
                self._cache[(seed, i)] = (row[a : a + m * self.rank].view(m, self.rank),
                                          row[b : b + n * self.rank].view(n, self.rank))
            else:
                self._cache[(seed, i)] = row[a : a + _prod(self.shapes[i])]

    def snapshot(self) -> dict[tuple[int, int], Any]:
        """The cache as it is (a CUDA graph's capture keeps it: its tensors are the ones each replay rewrites)."""
        return dict(self._cache)

    def adopt(self, cache: dict[tuple[int, int], Any], old: Sequence[int], new: Sequence[int]) -> None:
        """Take ``cache``, keyed by the seeds ``old``, as holding the directions of ``new`` (position by position):
        after a replay, the captured tensors hold the replay's directions."""
        relabel = {int(a): int(b) for a, b in zip(old, new)}
        self._cache = {(relabel[s], i): v for (s, i), v in cache.items() if s in relabel}
        self._keep = set(relabel.values())
        # the rows of the last capture (maybe another graph's) no longer describe the cache; the next estimate draws
        self._rows, self._row_of, self._bank = None, {}, None

    def cached(self, seed: int, index: int) -> bool:
        return (int(seed), index) in self._cache

    def clear(self) -> None:
        self._keep, self._cache = None, {}

    def _stream(self, seed: int, index: int, numel: int) -> Tensor:
        """The first ``numel`` numbers of the Philox stream ``key(seed, index)``: the Triton kernel on CUDA (one
        launch), else the torch emulation (the same numbers up to float rounding, as for MeZO's dense z)."""
        k = perturb.key(seed, index)
        zeros = torch.zeros(numel, dtype=torch.float32, device=self.device)
        if perturb.use_triton(zeros):
            return perturb.perturbed(zeros, k, 1.0, dist=self.distribution)
        return perturb.normal(k, 0, numel, self.device, self.distribution)

    def uv(self, seed: int, index: int) -> tuple[Tensor, Tensor]:
        """Full-shape factors ``(U [m, r], V [n, r])`` float32 of parameter ``index`` under ``seed`` (unscaled)."""
        hit = self._cache.get((seed, index))
        if hit is None:
            m, n = self.shapes[index]
            r = self.rank
            flat = self._stream(seed, index, (m + n) * r)
            hit = (flat[: m * r].view(m, r), flat[m * r :].view(n, r))
            if self._keep is not None and seed in self._keep:
                self._cache[(seed, index)] = hit
        return hit

    def z(self, seed: int, index: int) -> Tensor:
        """Full dense z (flat float32) of parameter ``index`` under ``seed``: MeZO's."""
        hit = self._cache.get((seed, index))
        if hit is None:
            hit = self._stream(seed, index, _prod(self.shapes[index]))
            if self._keep is not None and seed in self._keep:
                self._cache[(seed, index)] = hit
        return hit

    def _coef(self, member: Member, index: int) -> float:
        c = float(member[1]) * self.eps * self.scale(index)
        return c / math.sqrt(self.rank) if self._lowrank[index] else c

    def _coefs(self, members: Sequence[Member], index: int) -> Tensor:
        """``[P]`` float32: each member's ``sign·ε·S_i`` (over ``sqrt(r)`` for low-rank), one multiply on a device
        tensor of the signs, which is made once per sign pattern (the same every step: a graph's capture finds it
        made by its warm-up)."""
        return self._signs_of(members) * self._coef((0, 1.0), index)

    def begin(self, members: Sequence[Member]) -> None:
        """A chunk of members starts (:meth:`PopulationEngine.active`): gather their rows into one bank and scale its
        signed part, a few launches for every tensor, so that :meth:`factors` and :meth:`dense` return views."""
        self._bank = None
        if self._rows is None or any(int(m[0]) not in self._row_of for m in members):
            return
        rows = tuple(self._row_of[int(m[0])] for m in members)
        ridx = self._ridx.get(rows)
        if ridx is None:  # made once per pattern, like the signs (a graph's capture finds it made by its warm-up)
            ridx = self._ridx[rows] = torch.tensor(rows, dtype=torch.int64, device=self.device)
        bank = self._rows.index_select(0, ridx)
        # sign first (exact), then one rounding by the tensor's coefficient: what `u * (sign·coef)` gives
        bank[:, : self._ns].mul_(self._signs_of(members)[:, None]).mul_(self._coef_row())
        self._bank = (list(members), bank, {})

    def end(self) -> None:
        self._bank = None

    def _coef_row(self) -> Tensor:
        """``[ns]`` float32: each element's ``ε·S_i`` (over ``sqrt(r)`` in a U part), rebuilt when the scales change."""
        key = (self.eps, tuple(sorted(self.scales.items())))
        if self._pcoef is None or self._pcoef[0] != key:
            coefs = [self._coef((0, 1.0), i) for i in self.shapes]
            counts = [self._signed_numel(i) for i in self.shapes]
            row = torch.repeat_interleave(torch.tensor(coefs, dtype=torch.float32), torch.tensor(counts))
            self._pcoef = (key, row.to(self.device))
        return self._pcoef[1]

    def stacked_v(self, index: int, members: Sequence[Member], dtype: torch.dtype | None = None) -> Tensor | None:
        """``[n, P'·r]``: every member's V of parameter ``index`` side by side (P' = P rounded up to even, the rest
        zero), so ``x·V_j`` for all members is one matmul (``stacked`` of :func:`~lightning_memopt.core.population.
        add_lowrank_delta`); None without an active bank. The V parts of the whole bank are laid out this
        way once per chunk (one copy)."""
        bank = self._banked(members, dtype)
        if bank is None or not self._lowrank[index]:
            return None
        casts = self._bank[2]  # type: ignore[index]
        key = ("vT", bank.dtype)
        vt = casts.get(key)
        if vt is None:
            p, r = bank.shape[0], self.rank
            vt = torch.zeros((self._width - self._ns) // r, p + p % 2, r, dtype=bank.dtype, device=bank.device)
            vt[:, :p].copy_(bank[:, self._ns :].view(p, -1, r).transpose(0, 1))
            casts[key] = vt
        n, row = self.shapes[index][1], (self._cols[index][1] - self._ns) // self.rank
        return vt[row : row + n].view(n, -1)

    def _banked(self, members: Sequence[Member], dtype: torch.dtype | None) -> Tensor | None:
        if self._bank is None or self._bank[0] != list(members):
            return None
        _, bank, casts = self._bank
        if dtype is None or dtype == bank.dtype:
            return bank
        if dtype not in casts:
            casts[dtype] = bank.to(dtype)
        return casts[dtype]

    def _signs_of(self, members: Sequence[Member]) -> Tensor:
        key = tuple(float(m[1]) for m in members)
        signs = self._signs.get(key)
        if signs is None:
            signs = self._signs[key] = torch.tensor(key, dtype=torch.float32, device=self.device)
        return signs

    def factors(
        self, index: int, members: Sequence[Member], dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(U [P, m, r], V [P, n, r])``, each member's ``sign·ε·S/sqrt(r)`` folded into U; float32, or ``dtype``
        where the members' bank is active (views of it, cast once per chunk)."""
        bank = self._banked(members, dtype)
        if bank is not None:
            (m, n), r, (a, b) = self.shapes[index], self.rank, self._cols[index]
            return bank[:, a : a + m * r].view(len(members), m, r), bank[:, b : b + n * r].view(len(members), n, r)
        # one stack and one multiply for all members (not one scaling per member): kernels, not numbers, cost here;
        # the unperturbed member's coefficient is 0, so its factors of a cached seed give a zero delta
        us, vs = zip(*(self.uv(int(mem[0]), index) for mem in members))
        return torch.stack(us) * self._coefs(members, index)[:, None, None], torch.stack(vs)

    def dense(self, index: int, members: Sequence[Member]) -> Tensor:
        bank = self._banked(members, None)
        if bank is not None:
            a = self._cols[index][0]
            return bank[:, a : a + _prod(self.shapes[index])]
        return torch.stack([self.z(int(mem[0]), index) for mem in members]) * self._coefs(members, index)[:, None]


def members_of(seeds: Sequence[int], one_sided: bool, base: bool = False) -> list[Member]:
    """The population of one step: antithetic pairs (after the unperturbed point with ``base``), or the
    unperturbed point then one member per direction (``one_sided``)."""
    if one_sided:
        return [(int(seeds[0]), 0.0)] + [(int(s), 1.0) for s in seeds]
    pairs = [m for s in seeds for m in ((int(s), 1.0), (int(s), -1.0))]
    return [(int(seeds[0]), 0.0)] + pairs if base else pairs


def population_grads(
    activate: Callable[[Sequence[Member]], Any],
    seeds: Sequence[int],
    eps: float,
    one_sided: bool = False,
    chunk: int | None = None,
    loss_fn: Callable[[], Tensor] | None = None,
    per_sample: Callable[[Any], Tensor] | None = None,
    batch: Any = None,
    curvature: bool = False,
) -> tuple[Tensor, Tensor]:
    """Projected gradients ``g [n]`` and the mean loss of the population, like
    :func:`~lightning_memopt.mezo.core.projected_grads` (batched through ``per_sample``, else ``loss_fn`` per
    member). With ``curvature`` (two-sided) the unperturbed point is a member too and ``g`` is ``[2n]``: the n
    projected gradients, then the n curvatures ``c_j = (L+ + L− − 2·L0) / ε²`` along the directions."""
    members = members_of(seeds, one_sided, base=curvature and not one_sided)
    with torch.no_grad():
        losses = member_losses(members, activate, chunk, loss_fn, per_sample, batch).mean(1)
        if one_sided:
            g = (losses[1:] - losses[0]) / eps
        elif curvature:
            lp, lm = losses[1::2], losses[2::2]
            g = torch.cat([(lp - lm) / (2 * eps), (lp + lm - 2 * losses[0]) / (eps * eps)])
        else:
            g = (losses[0::2] - losses[1::2]) / (2 * eps)
        return g.reshape(-1), losses.mean()


def layer_scales(params: Sequence[ZOParam]) -> dict[int, float]:
    """``rms(W_t) / rms(θ)`` per tensor (1 for an all-zero tensor), the same on every rank (sums all-reduced)."""
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
    dev = local(params[0].param).device
    sums = []
    for zp in params:
        t = local(zp.param).detach().double()
        s = t.square().sum() if t.numel() else torch.zeros((), dtype=torch.float64, device=t.device)
        sums.append(s.to(dev) if is_dtensor(zp.param) else s.to(dev) / world)
    total = all_reduce_sum(torch.stack(sums)).cpu()
    numels = [_prod(global_offset(zp.param)[1]) for zp in params]
    rms_all = math.sqrt(float(total.sum()) / max(1, sum(numels)))
    out = {}
    for zp, s, n in zip(params, total.tolist(), numels):
        rms = math.sqrt(s / max(1, n))
        out[zp.index] = rms / rms_all if rms > 0 and rms_all > 0 else 1.0
    return out


@torch.no_grad()
def apply_update_population(
    module: torch.nn.Module | None,
    params: Sequence[ZOParam],
    directions: Directions,
    seeds: Tensor,
    seed_ints: Sequence[int],
    a: Tensor,
    b: Tensor | None,
    lrs: Sequence[float],
    wds: Sequence[float],
    adam_eps: float | None = None,
    ok: Tensor | None = None,
) -> None:
    """``θ ← (1 − lr·wd)·θ − lr·S·Δ`` with ``Δ = Σ_j a_j D_j`` (or Adam's ``m / (sqrt(v) + adam_eps)``) over the
    window's directions ``D_j``, written in place to each rank's local rows; a no-op where ``ok`` is false.

    Without Adam, tensors of one local shape are updated together (:func:`_grouped_update_`): a few launches per
    shape instead of a dozen per tensor, since on a GPU the launches, not the arithmetic, bound this step.

    The step's own directions are cached (:meth:`Directions.retain`). A window's earlier ones are drawn for a part
    of the tensors at a time (:meth:`Directions.drawn`), at most as many numbers as the step's own directions take,
    so momentum and Adam hold no more than SGD does."""
    if module is not None:
        reshard_all(module)
    for part in _draw_parts(params, directions, seed_ints):
        with directions.drawn(seed_ints, [zp.index for zp in part if directions.drawable(zp.index)]):
            _update_part(part, directions, seeds, seed_ints, a, b, lrs, wds, adam_eps, ok)


def _draw_parts(
    params: Sequence[ZOParam], directions: Directions, seed_ints: Sequence[int]
) -> list[Sequence[ZOParam]]:
    """``params`` in consecutive parts whose missing directions (the window's earlier seeds) hold at most the
    step's own directions' numbers; one part where every seed is the step's own (SGD)."""
    if directions.kept(seed_ints):
        return [params]
    budget = max(_UPDATE_ELEMS, directions.footprint())
    parts: list[Sequence[ZOParam]] = []
    part: list[ZOParam] = []
    size = 0
    for zp in params:
        need = directions.missing(seed_ints, zp.index) * directions.drawn_numel(zp.index)
        if part and size + need > budget:
            parts.append(part)
            part, size = [], 0
        part.append(zp)
        size += need
    return [*parts, part] if part else parts


def _update_part(
    params: Sequence[ZOParam],
    directions: Directions,
    seeds: Tensor,
    seed_ints: Sequence[int],
    a: Tensor,
    b: Tensor | None,
    lrs: Sequence[float],
    wds: Sequence[float],
    adam_eps: float | None,
    ok: Tensor | None,
) -> None:
    """The update of ``params``, whose directions the cache holds (or the update's kernel draws)."""
    groups: dict[tuple, list[_Item]] = {}
    for zp in params:
        lr = float(lrs[zp.group])
        wd = float(wds[zp.group]) if zp.decay else 0.0
        s = directions.scale(zp.index)
        start, shape = global_offset(zp.param)
        t = local(zp.param).detach()
        if t.numel() == 0:
            continue
        item = _Item(t, zp.index, start, tuple(shape), lr * s, 1.0 - lr * wd)
        lowrank = directions.lowrank(zp.index)
        if adam_eps is None and t.is_contiguous() and (lowrank or _dense_groupable(directions, item, seed_ints)):
            groups.setdefault((lowrank, tuple(t.shape), t.dtype, t.device), []).append(item)
        elif lowrank:
            _lowrank_update_(t, start // shape[1], directions, zp.index, seed_ints, a, b, lr, s, 1.0 - lr * wd,
                             adam_eps, ok)
        else:
            zs = None  # cached z of this step (CPU speed), else regenerated by the kernel
            if all(directions.cached(int(x), zp.index) for x in seed_ints):
                zs = [directions.z(int(x), zp.index)[start : start + t.numel()] for x in seed_ints]
            perturb.update_(t, zp.index, seeds, a, b, lr * s, 1.0 - lr * wd, start, adam_eps, zs=zs,
                            dist=directions.distribution, seed_ints=seed_ints, ok=ok)
    for (lowrank, _, _, _), items in groups.items():
        _grouped_update_(items, lowrank, directions, seed_ints, a, ok)


class _Item(NamedTuple):
    t: Tensor  # the local tensor (contiguous)
    index: int
    start: int  # its first element's offset in the full parameter
    shape: tuple[int, ...]  # the full parameter's shape
    coef: float  # lr·S
    decay: float  # 1 − lr·wd


def _dense_groupable(directions: Directions, item: _Item, seed_ints: Sequence[int]) -> bool:
    """A dense tensor joins a group when every direction's z is cached and its J rows fit one update chunk."""
    return item.t.numel() * len(seed_ints) <= _UPDATE_ELEMS and all(
        directions.cached(int(x), item.index) for x in seed_ints
    )


def _grouped_update_(
    items: Sequence[_Item], lowrank: bool, directions: Directions, seed_ints: Sequence[int], a: Tensor,
    ok: Tensor | None,
) -> None:
    """SGD/momentum update of tensors of one local shape: ``Δ_i = Σ_j a_j D_ij`` for a chunk of tensors at once (a
    batched matmul over the stacked factors, or over the stacked cached z), then ``t_i ← round(decay_i·t_i −
    coef_i·Δ_i)`` in fp32 (:func:`_apply`: one pass, a no-op where ``ok`` is false). At most ``_UPDATE_ELEMS``
    elements of Δ exist at a time; a larger tensor is done in row chunks."""
    t0 = items[0].t
    dev, j = t0.device, len(seed_ints)
    okd = None if ok is None else ok.to(dev)
    if not lowrank:
        a32 = a.to(device=dev, dtype=torch.float32)[:j]
        n = t0.numel()
        per = max(1, _UPDATE_ELEMS // max(1, n * j))
        for lo in range(0, len(items), per):
            part = items[lo : lo + per]
            z = torch.stack([_rows(directions.z(int(x), it.index), it.start, n) for it in part for x in seed_ints])
            delta = torch.bmm(a32.view(1, 1, j).expand(len(part), 1, j), z.view(len(part), j, n))
            _apply(part, [it.t.view(-1) for it in part], delta.view(len(part), n), okd)
        return
    rows, n = t0.shape
    r = directions.rank
    a32 = (a.to(device=dev, dtype=torch.float32) * (1.0 / math.sqrt(r)))[:j]
    per = max(1, _UPDATE_ELEMS // max(1, rows * n))
    step = _UPDATE_ELEMS // max(1, n) if per == 1 else rows
    for lo in range(0, len(items), per):
        part = items[lo : lo + per]
        uvs = [(directions.uv(int(x), it.index), it.start // it.shape[1]) for it in part for x in seed_ints]
        # [L, rows, J·r] (block j of tensor i = a_j U_ij) and [L, n, J·r]: one stack, one scale, one copy each
        us = torch.stack([_rows(u, r0, rows) for (u, _), r0 in uvs]).view(len(part), j, rows, r)
        ucat = (us * a32.view(1, j, 1, 1)).transpose(1, 2).reshape(len(part), rows, j * r)
        vcat = torch.stack([v for (_, v), _ in uvs]).view(len(part), j, n, r).transpose(1, 2).reshape(
            len(part), n, j * r)
        for r_lo in range(0, rows, max(1, step)):
            r_hi = min(rows, r_lo + max(1, step))
            delta = torch.bmm(ucat[:, r_lo:r_hi], vcat.transpose(1, 2))
            _apply(part, [it.t[r_lo:r_hi] for it in part], delta, okd)


def _apply(items: Sequence[_Item], ts: Sequence[Tensor], delta: Tensor, ok: Tensor | None) -> None:
    """``t_i ← round(decay·t_i − coef·delta[i])``: one launch for all where they share lr, decay and scale (the
    usual case), else one per tensor."""
    if len({(it.coef, it.decay) for it in items}) == 1:
        axpby_many_(ts, delta, -items[0].coef, items[0].decay, ok)
        return
    for k, (it, t) in enumerate(zip(items, ts)):
        axpby_(t, delta[k], -it.coef, it.decay, ok)


def _rows(x: Tensor, lo: int, n: int) -> Tensor:
    """``x[lo : lo + n]``, without a slice where that is all of ``x`` (a slice costs host time; there are J per
    tensor)."""
    return x if lo == 0 and n == x.shape[0] else x[lo : lo + n]


def _lowrank_update_(
    t: Tensor,
    row0: int,
    directions: Directions,
    index: int,
    seed_ints: Sequence[int],
    a: Tensor,
    b: Tensor | None,
    lr: float,
    scale: float,
    decay: float,
    adam_eps: float | None,
    ok: Tensor | None,
) -> None:
    rows, n = t.shape
    inv = 1.0 / math.sqrt(directions.rank)
    a32 = a.to(device=t.device, dtype=torch.float32) * inv
    uvs = [directions.uv(int(x), index) for x in seed_ints]
    us = [u[row0 : row0 + rows] for u, _ in uvs]
    step = max(1, _UPDATE_ELEMS // max(1, n))
    if adam_eps is None:
        # [rows, J·r] and [n, J·r], block j = direction j (a few launches, not two per direction)
        ucat = (torch.stack(us, dim=1) * a32[: len(us)].view(1, -1, 1)).reshape(rows, -1)
        vcat = torch.stack([v for _, v in uvs], dim=1).reshape(n, -1)
    else:
        b32 = b.to(device=t.device, dtype=torch.float32) * (inv * inv)  # type: ignore[union-attr]
    okd = None if ok is None else ok.to(t.device)
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        if adam_eps is None:
            delta = ucat[lo:hi] @ vcat.T
        else:
            m = torch.zeros(hi - lo, n, dtype=torch.float32, device=t.device)
            v2 = torch.zeros_like(m)
            for j, (u, (_, v)) in enumerate(zip(us, uvs)):
                d = u[lo:hi] @ v.T
                m += a32[j] * d
                v2 += b32[j] * d * d
            delta = m / (torch.sqrt(v2) + adam_eps)
        old = t[lo:hi].to(torch.float32)
        new = old * decay - (lr * scale) * delta
        if okd is not None:
            new = torch.where(okd, new, old)
        t[lo:hi] = new.to(t.dtype)
