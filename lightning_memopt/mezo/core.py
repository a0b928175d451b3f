"""The whole MeZO step in plain PyTorch: seeded functional perturbation, projected gradient, windowed update.

One step with seed ``s`` (two-sided, ``n_spsa = 1``)::

    L+ = loss(θ + εz)      # forward with a pre-hook that swaps each weight W for a temporary W + εz
    L- = loss(θ − εz)      # same, −εz; θ itself is never written, so nothing needs restoring
    g  = (L+ − L−) / 2ε    # all-reduced (mean) over data-parallel ranks
    θ ← round((1 − lr·wd)·θ − lr·g·z)   # the only write to θ: one rounding per step

z is regenerated from ``(seed, parameter index, element offset)`` (:mod:`lightning_memopt.core.perturb`) at each
use and never stored. Perturbing functionally makes "restore" exact in any dtype (the official code's in-place
``θ += εz; θ −= 2εz; θ += εz`` drifts in fp16/bf16), and costs 3 z-generations per step instead of 4.

Momentum and Adam keep no parameter-sized buffer: the update replays the last ``window`` steps' (seed, g) pairs.
With weights ``w_k = β^age`` normalised over the window, ``m = Σ_k w_k g_k z_k`` (an EMA with exact bias correction,
truncated to the window) and, for Adam, ``v = Σ_k w'_k g_k² z_k²`` (per-direction squares, so cross terms of the n
directions of one n-SPSA step are dropped), then ``θ ← (1 − lr·wd)·θ − lr·m / (sqrt(v) + eps_adam)``. Cost: ``window``
z-generations per element per update, all in registers on the GPU.

The population estimator (``perturbation="lowrank"``, ``batched=True`` or a ``precondition``) replaces the
Perturber with :mod:`lightning_memopt.mezo.population`: n low-rank (or dense) directions per step evaluated as
antithetic members on the shared population engine (:mod:`lightning_memopt.core.population`), batched through the
module's ``per_sample_loss`` or one loss call per member, and a chunked low-rank update; the window, the guard and
the state are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_memopt.core import perturb, validate
from lightning_memopt.core.fsdp import all_reduce_mean, global_offset, local, reshard_all
from lightning_memopt.core.nonfinite import SkipGuard
from lightning_memopt.core.population import PopulationEngine
from lightning_memopt.core.zero3 import is_zero3
from lightning_memopt.mezo.perturber import InPlacePerturber, Perturber
from lightning_memopt.mezo.population import (
    Directions,
    apply_update_population,
    layer_scales,
    members_of,
    population_grads,
)

Variant = Literal["sgd", "momentum", "adam"]
Perturbation = Literal["dense", "lowrank"]
Precondition = Literal["none", "layer", "curvature"]
_M64 = (1 << 64) - 1


@dataclass
class ZOConfig:
    """Hyperparameters of the ZO estimate and update (lr and weight decay come per step, per group).

    ``perturbation``, ``perturbation_rank``, ``batched``, ``population_chunk`` and ``precondition`` configure the
    population estimator (:mod:`lightning_memopt.mezo.population`; see :class:`~lightning_memopt.mezo.callback.MeZO`).
    """

    eps: float = 1e-3
    n_spsa: int = 1
    one_sided: bool = False
    variant: Variant = "sgd"
    beta1: float = 0.9
    beta2: float = 0.99
    window: int = 10
    adam_eps: float = 1e-8
    distribution: Literal["normal", "rademacher"] = "normal"
    perturbation: Perturbation = "dense"
    perturbation_rank: int = 4
    batched: bool = False
    population_chunk: int | None = 8
    precondition: Precondition = "none"

    @property
    def population(self) -> bool:
        """Whether the population estimator (:mod:`lightning_memopt.mezo.population`) runs instead of the
        per-direction Perturber: low-rank directions, batched evaluation or a preconditioner."""
        return self.perturbation == "lowrank" or self.batched or self.precondition != "none"

    def __post_init__(self) -> None:
        # the checked numbers replace the given ones (a YAML "1e-3" is a string)
        self.eps = validate.positive(self.eps, "eps")
        self.beta1 = validate.unit_interval(self.beta1, "beta1")
        self.beta2 = validate.unit_interval(self.beta2, "beta2")
        self.adam_eps = validate.positive(self.adam_eps, "adam_eps")
        self.n_spsa = validate.at_least(self.n_spsa, 1, "n_spsa")
        self.window = validate.at_least(self.window, 1, "window")
        if self.variant not in ("sgd", "momentum", "adam"):
            raise ValueError(f"variant must be 'sgd', 'momentum' or 'adam', got {self.variant!r}.")
        if self.distribution not in ("normal", "rademacher"):
            raise ValueError(f"distribution must be 'normal' or 'rademacher', got {self.distribution!r}.")
        if self.perturbation not in ("dense", "lowrank"):
            raise ValueError(f"perturbation must be 'dense' or 'lowrank', got {self.perturbation!r}.")
        if self.precondition not in ("none", "layer", "curvature"):
            raise ValueError(f"precondition must be 'none', 'layer' or 'curvature', got {self.precondition!r}.")
        if self.precondition == "curvature" and self.one_sided:
            raise ValueError("precondition='curvature' measures curvature from antithetic pairs; set one_sided=False.")
        validate.at_least(self.perturbation_rank, 1, "perturbation_rank")
        if self.population_chunk is not None:
            validate.at_least(self.population_chunk, 1, "population_chunk")


@dataclass
class ZOParam:
    """A trained parameter: its index in the by-name order keys its z; group/decay select lr and weight decay."""

    name: str
    param: Tensor
    index: int
    group: int = 0
    decay: bool = True


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def step_seeds(base_seed: int, step: int, n: int) -> list[int]:
    """The n 32-bit direction seeds of optimizer step ``step``: a pure function, so resume needs no RNG state."""
    return [_splitmix64(_splitmix64(_splitmix64(int(base_seed)) ^ int(step)) ^ j) & 0xFFFFFFFF for j in range(n)]


def make_params(
    module: torch.nn.Module,
    groups: Sequence[Sequence[Tensor]] | None = None,
    decay_fn: Callable[[str, Tensor], bool] | None = None,
) -> list[ZOParam]:
    """The trainable parameters of ``module`` in by-name order (tied weights once), with group and decay flags.

    ``groups`` (an optimizer's param lists) restricts training to their params and sets each one's group; by default
    every ``requires_grad`` parameter is in group 0. ``decay_fn(name, p)`` says whether weight decay applies.
    """
    named = {id(p): (n, p) for n, p in module.named_parameters() if p.requires_grad}
    group_of: dict[int, int] = {}
    if groups is None:
        group_of = {i: 0 for i in named}
    else:
        for gi, ps in enumerate(groups):
            for p in ps:
                if id(p) in named:
                    group_of[id(p)] = gi
    chosen = sorted((named[i][0], named[i][1], g) for i, g in group_of.items())
    out = []
    for idx, (name, p, g) in enumerate(chosen):
        out.append(ZOParam(name, p, idx, g, True if decay_fn is None else bool(decay_fn(name, p))))
    return out


def projected_grads(
    loss_fn: Callable[[], Tensor],
    perturber: Perturber,
    seeds: Sequence[int],
    eps: float,
    one_sided: bool = False,
    seed_t: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The projected gradients ``g_j`` (float32 ``[n]``) along ``z(seeds[j])`` and the mean of the losses seen.

    Two-sided: ``(L(θ+εz) − L(θ−εz)) / 2ε``, 2n forwards. One-sided: ``(L(θ+εz) − L(θ)) / ε``, n + 1 forwards.
    Runs under ``no_grad``: no graph, no ``.grad``. ``seed_t`` (int64 ``[n]`` on the device, holding ``seeds``)
    makes the kernels read the seeds there: what a CUDA graph of this function needs to draw new directions.
    """
    with torch.no_grad():
        losses, gs = [], []
        base = loss_fn().float() if one_sided else None
        if base is not None:
            losses.append(base)
        for j, s in enumerate(seeds):
            st = None if seed_t is None else seed_t[j]
            with perturber.active(s, eps, st):
                lp = loss_fn().float()
            if one_sided:
                gs.append((lp - base) / eps)
                losses.append(lp)
            else:
                with perturber.active(s, -eps, st):
                    lm = loss_fn().float()
                gs.append((lp - lm) / (2 * eps))
                losses += [lp, lm]
        return torch.stack(gs).reshape(-1), torch.stack(losses).mean()


def window_terms(
    history: Sequence[tuple[Sequence[int], Tensor]], cfg: ZOConfig
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(seeds int64, a, b) of the directions the update sums: the last step for SGD, the window otherwise."""
    recent = list(history[-1:] if cfg.variant == "sgd" else history[-cfg.window :])
    n = len(recent)
    seeds, a, b = [], [], []
    w1 = [cfg.beta1 ** (n - 1 - i) for i in range(n)] if cfg.variant != "sgd" else [1.0]
    w2 = [cfg.beta2 ** (n - 1 - i) for i in range(n)]
    s1, s2 = sum(w1), sum(w2)
    for i, (sd, g) in enumerate(recent):
        k = len(sd)
        seeds += list(sd)
        g = g.float()
        a.append(g * (w1[i] / s1 / k))
        b.append(g * g * (w2[i] / s2 / (k * k)))
    return _device_ints(seeds, recent[-1][1].device), torch.cat(a), torch.cat(b) if cfg.variant == "adam" else None


def _device_ints(values: Sequence[int], device: torch.device) -> Tensor:
    """An int64 tensor on ``device`` without a host-to-device copy (a pageable copy would sync the stream)."""
    if device.type == "cpu":
        return torch.tensor(list(values), dtype=torch.int64)
    return torch.stack([torch.full((), int(v), dtype=torch.int64, device=device) for v in values])


@torch.no_grad()
def apply_update(
    module: torch.nn.Module | None,
    params: Sequence[ZOParam],
    seeds: Tensor,
    a: Tensor,
    b: Tensor | None,
    lrs: Sequence[float],
    wds: Sequence[float],
    adam_eps: float | None = None,
    z_for: Callable[[int, int], Any] | None = None,
    distribution: str = "normal",
    seed_ints: Sequence[int] | None = None,
    ok: Tensor | None = None,
) -> None:
    """``θ ← (1 − lr·wd)·θ − lr·Δ`` for every parameter (local shards under FSDP2, after resharding); a no-op on
    the device where the 0-d bool ``ok`` is false."""
    if module is not None:
        reshard_all(module)  # FSDP2 keeps the root unsharded after forward; shard writes must be seen next time
    if z_for is None and adam_eps is None and seed_ints is not None and len(seed_ints) == 1:
        # One direction (MeZO-SGD): one launch per (dtype, lr, decay) bucket instead of one per tensor.
        buckets: dict[tuple, list[tuple[Tensor, int, int]]] = {}
        for zp in params:
            lr = float(lrs[zp.group])
            wd = float(wds[zp.group]) if zp.decay else 0.0
            t = local(zp.param).detach()
            if t.numel():
                buckets.setdefault((t.dtype, t.device, lr, 1.0 - lr * wd), []).append(
                    (t, zp.index, global_offset(zp.param)[0])
                )
        for (_, dev, lr, decay), items in buckets.items():
            # the step seed as a device scalar: `seeds` already is one where it lives on this device
            seed_t = seeds[:1].reshape(()) if seeds.device == dev else perturb.seed_tensor(int(seed_ints[0]), dev)
            ts, idx, starts = zip(*items)
            perturb.update1_many(
                list(ts), list(idx), list(starts), int(seed_ints[0]), a[:1], lr, decay, distribution, seed_t, ok
            )
        return
    for zp in params:
        lr = float(lrs[zp.group])
        wd = float(wds[zp.group]) if zp.decay else 0.0
        start, _ = global_offset(zp.param)
        t = local(zp.param).detach()
        zs = None
        if z_for is not None:
            host = seed_ints if seed_ints is not None else seeds.tolist()
            zs = [z_for(int(s), zp.index)[start : start + t.numel()] for s in host]
        perturb.update_(
            t,
            zp.index,
            seeds,
            a,
            b,
            lr,
            1.0 - lr * wd,
            start,
            adam_eps,
            zs=zs,
            dist=distribution,
            seed_ints=seed_ints,
            ok=ok,
        )


class ZeroOrder:
    """MeZO on any ``nn.Module``: ``estimate`` (forwards) and ``update`` (the one write to θ), or both in ``step``.

    Args:
        module: the model; its trained parameters are ``params`` (default: every ``requires_grad`` one).
        config: :class:`ZOConfig`.
        seed: base seed; step ``t``'s directions are :func:`step_seeds` ``(seed, t, n_spsa)``.
        params: from :func:`make_params` (fixes groups and weight-decay flags).
        cache_z: keep each seed's z (float32, full size) while it is in use instead of regenerating it: the torch
            backend's speed-up for small CPU models. Default: on for CPU parameters up to 2**24 elements.
        group_bytes: perturb a submodule's parameters in one kernel launch when they total at most this many bytes
            (see :class:`Perturber`); 0 perturbs each parameter-owning module on its own.
        guard: the :class:`~lightning_memopt.core.nonfinite.SkipGuard` that counts steps skipped for a non-finite
            loss (default: a new one).
        check_nonfinite: False leaves the update unguarded (only to measure what the guard costs).
        overlap: make each layer's perturbed copies one layer ahead, on a side CUDA stream, while the layer before
            runs (see :class:`Perturber`); the plain estimator only, the same numbers.

    Example::

        zo = ZeroOrder(model, ZOConfig(eps=1e-3))
        for t, batch in enumerate(loader):
            g, loss = zo.step(lambda: model(**batch).loss, t, lr=1e-6)
    """

    def __init__(
        self,
        module: torch.nn.Module,
        config: ZOConfig | None = None,
        seed: int = 0,
        params: list[ZOParam] | None = None,
        cache_z: bool | None = None,
        group_bytes: int = 64 << 20,
        guard: SkipGuard | None = None,
        check_nonfinite: bool = True,
        scales: dict[int, float] | None = None,
        overlap: bool = False,
    ) -> None:
        self.module = module
        self.guard = guard or SkipGuard("MeZO")
        self.check_nonfinite = check_nonfinite
        self.config = config or ZOConfig()
        self.seed = int(seed)
        self.params = params if params is not None else make_params(module)
        if not self.params:
            raise ValueError("No trainable parameters (none has requires_grad=True).")
        self._full_numel = {zp.index: _prod(global_offset(zp.param)[1]) for zp in self.params}
        if cache_z is None:
            p0 = local(self.params[0].param)
            cache_z = (
                p0.device.type == "cpu" and not perturb.use_triton(p0) and sum(self._full_numel.values()) <= 1 << 24
            )
        self.cache_z = bool(cache_z)
        self._cache: dict[int, dict[int, Tensor]] = {}
        self.history: list[tuple[list[int], Tensor]] = []
        self._curv: Tensor | None = None  # precondition="curvature": (EMA sum, EMA weight) of |c|
        cfg = self.config
        self.perturber: Perturber | InPlacePerturber | None = None
        self.directions: Directions | None = None
        self.engine: PopulationEngine | None = None
        zero3 = self.zero3 = any(is_zero3(zp.param) for zp in self.params)
        if overlap and (zero3 or cfg.population):
            raise ValueError("overlap makes the plain estimator's perturbed copies ahead; the population estimator "
                             "and DeepSpeed ZeRO-3 (in place) make none.")
        if zero3 and cfg.population:
            raise ValueError("The population estimator does not run under DeepSpeed ZeRO-3; use strategy='fsdp2'.")
        if zero3:  # DeepSpeed ZeRO-3: in place, on the partitions
            self.perturber = InPlacePerturber(module, self.params, self._z if self.cache_z else None, cfg.distribution)
            return
        if not cfg.population:
            self.perturber = Perturber(module, self.params, self._z if self.cache_z else None, cfg.distribution,
                                       group_bytes, overlap)
            return
        if cfg.precondition == "layer" and scales is None:
            scales = layer_scales(self.params)
        self.directions = Directions(self.params, cfg.eps, cfg.perturbation, cfg.perturbation_rank,
                                     cfg.distribution, scales)
        self.engine = PopulationEngine(module, [(zp.name, zp.param, zp.index) for zp in self.params],
                                       self.directions)

    @property
    def scales(self) -> dict[int, float] | None:
        """The preconditioner's per-tensor scales (by parameter index), None without one."""
        if self.directions is None or self.config.precondition == "none":
            return None
        return dict(self.directions.scales)

    def _z(self, seed: int, index: int) -> Tensor:
        d = self._cache.get(seed)
        if d is None:
            idx = sorted(self._full_numel)
            dev = local(self.params[0].param).device
            zs = perturb.normal_many(
                [perturb.key(seed, i) for i in idx], [self._full_numel[i] for i in idx], dev, self.config.distribution
            )
            d = self._cache[seed] = dict(zip(idx, zs))
            keep = self.config.n_spsa * (self.config.window + 1)
            for old in list(self._cache)[:-keep]:
                del self._cache[old]
        return d[index]

    def seeds(self, step: int) -> list[int]:
        return step_seeds(self.seed, step, self.config.n_spsa)

    @property
    def forwards_per_estimate(self) -> int:
        """Forward passes of the batch one estimate runs (a batched population member counts as one)."""
        cfg = self.config
        curvature = cfg.precondition == "curvature" and not cfg.one_sided
        return len(members_of(range(cfg.n_spsa), cfg.one_sided, base=curvature))

    def estimate(
        self,
        loss_fn: Callable[[], Tensor] | None,
        seeds: Sequence[int],
        seed_t: Tensor | None = None,
        per_sample: Callable[[Any], Tensor] | None = None,
        batch: Any = None,
    ) -> tuple[Tensor, Tensor]:
        """Local (this rank's) projected gradients and mean loss (``seed_t``: see :func:`projected_grads`).

        Population estimator: batched through ``per_sample(batch)`` (per-example losses of a repeated batch) when
        given, else ``loss_fn`` once per member with that member's perturbation active.
        """
        cfg = self.config
        if self.engine is None:
            assert loss_fn is not None and self.perturber is not None
            return projected_grads(loss_fn, self.perturber, seeds, cfg.eps, cfg.one_sided, seed_t)
        assert self.directions is not None
        self.directions.retain(seeds, seed_t)
        return population_grads(self.engine.active, seeds, cfg.eps, cfg.one_sided, cfg.population_chunk, loss_fn,
                                per_sample, batch, curvature=cfg.precondition == "curvature")

    def update(
        self,
        seeds: Sequence[int],
        g: Tensor,
        lrs: Sequence[float],
        wds: Sequence[float],
        loss: Tensor | None = None,
        step: int = -1,
    ) -> Tensor | None:
        """Apply one update with the (already all-reduced) ``g``; keeps the window for momentum/Adam.

        A non-finite ``g`` (or ``loss``) makes the update a no-op on the device (no host sync); the guard puts the
        window back as it was once the host learns of it, before a later update uses it. Returns that device flag.
        """
        cfg = self.config
        for lr in lrs:
            validate.nonnegative(lr, "lr")
        self.guard.resolve()  # earlier steps: long done on the device; skipped ones leave the window first
        before = list(self.history)
        ok = None
        if self.check_nonfinite:
            ok = self.guard.check(g, *(() if loss is None else (loss,)), step=step)
            # resolved before the next update, so the window is still this step's: put back the one before it
            self.guard.on_skip(lambda: setattr(self, "history", before))
        g = g.detach().float().reshape(-1)
        if cfg.precondition == "curvature":
            g = self._curvature_step(g, ok)
        self.history.append((list(seeds), g))
        del self.history[: -(1 if cfg.variant == "sgd" else cfg.window)]
        s, a, b = window_terms(self.history, cfg)
        recent = self.history[-1:] if cfg.variant == "sgd" else self.history[-cfg.window :]
        if self.directions is not None:
            apply_update_population(
                self.module, self.params, self.directions, s, [x for sd, _ in recent for x in sd], a, b, lrs, wds,
                cfg.adam_eps if cfg.variant == "adam" else None, ok,
            )
            return ok
        apply_update(
            self.module,
            self.params,
            s,
            a,
            b,
            lrs,
            wds,
            cfg.adam_eps if cfg.variant == "adam" else None,
            self._z if self.cache_z else None,
            cfg.distribution,
            [x for sd, _ in recent for x in sd],  # the same seeds as `s`, known on the host
            ok,
        )
        return ok

    def step(
        self, loss_fn: Callable[[], Tensor], step: int, lr: float, weight_decay: float = 0.0
    ) -> tuple[Tensor, Tensor]:
        """Estimate, all-reduce over ranks, update. Returns (g, mean loss) as tensors (no host sync)."""
        seeds = self.seeds(step)
        g, loss = self.estimate(loss_fn, seeds)
        g = all_reduce_mean(g)
        groups = 1 + max(zp.group for zp in self.params)
        self.update(seeds, g, [lr] * groups, [weight_decay] * groups, step=step)
        return g, loss

    def _curvature_step(self, g: Tensor, ok: Tensor | None) -> Tensor:
        """HiZOO's curvature from the same forwards, as one scalar: ``h`` = EMA (rate ``beta2``, bias-corrected) of
        ``|c_j|`` (≈ tr(H) for unit-variance directions), and the update becomes ``lr · Σ_j g_j Δ_j / h``: the
        n-direction estimate's largest stable step is about ``n / tr(H)``, so lr ≈ 1 is near the edge whatever the
        model and n. ``g`` holds the n projected gradients then the n curvatures; a skipped step leaves ``h``."""
        n = g.numel() // 2
        beta = self.config.beta2
        if self._curv is None or self._curv.device != g.device:
            self._curv = torch.zeros(2, dtype=torch.float32, device=g.device)
        new = torch.stack([beta * self._curv[0] + (1 - beta) * g[n:].abs().mean(), beta * self._curv[1] + (1 - beta)])
        self._curv = new if ok is None else torch.where(ok.to(g.device), new, self._curv)
        h = (new[0] / new[1]).clamp_min(1e-12)
        return g[:n] * (n / h)  # the update averages over the n directions: this makes it a sum

    def curvature_state(self) -> list[float] | None:
        return None if self._curv is None else [float(x) for x in self._curv.tolist()]

    def load_curvature_state(self, state: Sequence[float] | None, device: torch.device | str = "cpu") -> None:
        self._curv = None if state is None else torch.tensor(list(state), dtype=torch.float32, device=device)

    def history_state(self) -> list[dict[str, Any]]:
        self.guard.resolve()
        return [{"seeds": list(s), "g": [float(x) for x in g.tolist()]} for s, g in self.history]

    def load_history_state(self, state: Sequence[dict[str, Any]], device: torch.device | str = "cpu") -> None:
        self.history = [(list(h["seeds"]), torch.tensor(h["g"], dtype=torch.float32, device=device)) for h in state]

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    def close(self) -> None:
        if self.perturber is not None:
            self.perturber.remove()
        if self.engine is not None:
            self.engine.remove()
