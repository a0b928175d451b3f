"""The fireworks algorithm (EFWA with dynFWA's core-firework amplitude) in plain torch, with ask/tell.

Literature: Tan & Zhu 2010 (FWA), Zheng, Janecek & Tan 2013 (EFWA: minimal amplitude check, new explosion
operator, uniform mapping rule, Gaussian sparks towards the best, elitism-random selection), Zheng, Janecek, Li & Tan
2014 (dynFWA: the core firework's amplitude grows by ``ca`` after a success and shrinks by ``cr`` otherwise).

To fit a fixed evaluation batch, one generation is exactly ``popsize`` candidates: the ``n_fireworks`` current
fireworks are re-evaluated (so that, with minibatch fitness, every comparison is made on one batch), then explosion
sparks allotted by fitness, then ``n_gaussian`` Gaussian sparks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


class Fireworks:
    """EFWA/dynFWA fireworks optimizer (minimization) with an ask/tell interface.

    Args:
        mean: the starting point ``x0`` (1-D); the first firework sits exactly there.
        sigma: initial explosion amplitude (of the core firework; the others share ``sigma * n_fireworks``).
        popsize: candidates per generation (fireworks + explosion sparks + Gaussian sparks).
        n_fireworks: fireworks kept per generation (EFWA: 5).
        n_gaussian: Gaussian sparks per generation.
        bound: search box ``[-bound, bound]`` per coordinate for the mapping rule (None: unbounded).
        ca, cr: dynFWA amplification / reduction of the core firework's amplitude.
        amp_min: the minimal amplitude check (EFWA) for the non-core fireworks.
        spark_bounds: (a, b): each firework gets between ``round(a M)`` and ``round(b M)`` of the M sparks.
        seed: seed of this instance's own generator.

    Example::

        fw = Fireworks(torch.zeros(20), sigma=1.0, popsize=20, seed=0)
        for _ in range(300):
            x = fw.ask()
            fw.tell((x ** 2).sum(1))
        print(fw.best_f)
    """

    def __init__(
        self,
        mean: Tensor,
        sigma: float = 1.0,
        popsize: int = 20,
        n_fireworks: int = 5,
        n_gaussian: int = 1,
        bound: float | None = None,
        ca: float = 1.2,
        cr: float = 0.9,
        amp_min: float = 1e-6,
        spark_bounds: tuple[float, float] = (0.04, 0.8),
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if mean.ndim != 1:
            raise ValueError(f"mean must be a 1-D tensor, got shape {tuple(mean.shape)}.")
        if n_fireworks < 1 or popsize < n_fireworks + n_gaussian + 1:
            raise ValueError(
                f"popsize={popsize} must exceed n_fireworks + n_gaussian = {n_fireworks + n_gaussian} so that at "
                f"least one explosion spark is made."
            )
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}.")
        self.n, self.lam, self.nf, self.ng = mean.numel(), int(popsize), int(n_fireworks), int(n_gaussian)
        self.bound, self.ca, self.cr, self.amp_min = bound, float(ca), float(cr), float(amp_min)
        self.spark_bounds = (float(spark_bounds[0]), float(spark_bounds[1]))
        self.amp_total = float(sigma) * self.nf
        dev = mean.device
        self.gen = torch.Generator(device=dev)
        self.gen.manual_seed(int(seed))
        x0 = mean.detach().to(dtype).clone()
        spread = (torch.rand(self.nf - 1, self.n, generator=self.gen, device=dev, dtype=dtype) * 2 - 1) * sigma
        self.X = torch.cat([x0[None], x0 + spread])  # fireworks, X[0] the core (best) one
        self.F = torch.full((self.nf,), math.inf, dtype=dtype, device=dev)  # unknown until evaluated
        self.amp_core = float(sigma)
        self.generation = 0
        self.evaluations = 0
        self.best_f = math.inf
        self.best_x = x0.clone()
        self._asked: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.X.device

    @property
    def mean(self) -> Tensor:
        """The core firework (best of the last generation), the point to use."""
        return self.X[0]

    def _rand(self, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=self.gen, device=self.device, dtype=self.X.dtype)

    def _allocation(self) -> tuple[list[int], Tensor]:
        """Sparks per firework (fitness-proportional, bounded, summing to M) and amplitudes (EFWA, dynFWA core)."""
        m = self.lam - self.nf - self.ng
        f = self.F
        eps = 1e-12
        share = (f.max() - f + eps) / ((f.max() - f).sum() + eps)
        lo, hi = max(1, round(self.spark_bounds[0] * m)), max(1, round(self.spark_bounds[1] * m))
        raw = (share * m).clamp(lo, hi)
        # one host read for the finiteness test and the allocation (on a GPU each read is a sync)
        finite, *rest = torch.cat([torch.isfinite(f).all()[None].to(f.dtype), raw.floor(), raw - raw.floor()]).tolist()
        if not finite:  # first generation: nothing known yet
            counts = [m // self.nf + (1 if i < m % self.nf else 0) for i in range(self.nf)]
            return counts, torch.full((self.nf,), self.amp_core, dtype=f.dtype, device=f.device)
        counts, frac = [int(c) for c in rest[: self.nf]], rest[self.nf :]
        order = sorted(range(self.nf), key=lambda i: (-frac[i], i))
        k = 0
        while sum(counts) < m:  # largest remainder first, then best fireworks
            counts[order[k % self.nf]] += 1
            k += 1
        while sum(counts) > m:
            i = max(range(self.nf), key=lambda j: (counts[j], j))
            counts[i] -= 1
        amps = self.amp_total * (f - f.min() + eps) / ((f - f.min()).sum() + eps)
        amps = amps.clamp(min=self.amp_min)
        amps[0] = self.amp_core
        return counts, amps

    def _map(self, x: Tensor) -> Tensor:
        """EFWA mapping rule: a coordinate out of the box is redrawn uniformly inside it."""
        if self.bound is None:
            return x
        out = x.abs() > self.bound
        if out.any():
            x = torch.where(out, (self._rand(*x.shape) * 2 - 1) * self.bound, x)
        return x

    def offload(self, device: torch.device | str = "cpu") -> None:
        """Nothing to park: the state is a few d-vectors (CMAES.offload moves its n x n matrices)."""

    def ask(self) -> Tensor:
        """``popsize`` candidates: the fireworks, their explosion sparks, then Gaussian sparks."""
        counts, amps = self._allocation()
        parts = [self.X]
        for i, c in enumerate(counts):
            if c == 0:
                continue
            base = self.X[i].expand(c, self.n)
            mask = self._rand(c, self.n) < 0.5  # each dimension takes part with probability 1/2
            hit = torch.randint(self.n, (c,), generator=self.gen, device=self.device)
            mask[torch.arange(c, device=self.device), hit] = True
            step = (self._rand(c, self.n) * 2 - 1) * amps[i]  # EFWA: a separate offset per dimension
            parts.append(self._map(base + mask * step))
        if self.ng:
            pick = torch.randint(self.nf, (self.ng,), generator=self.gen, device=self.device)
            base = self.X[pick]
            mask = self._rand(self.ng, self.n) < 0.5
            e = torch.randn(self.ng, 1, generator=self.gen, device=self.device, dtype=self.X.dtype)
            parts.append(self._map(base + mask * (self.X[0] - base) * e))  # EFWA Gaussian spark towards the best
        self._asked = torch.cat(parts)
        return self._asked

    def tell(self, fitness: Tensor | list[float], solutions: Tensor | None = None) -> None:
        """Select the next fireworks (elitism-random) and adapt the core amplitude (dynFWA)."""
        x = self._asked if solutions is None else solutions.to(self.X)
        if x is None:
            raise RuntimeError("tell() needs the candidates of a previous ask() (or pass solutions=...).")
        f = torch.nan_to_num(torch.as_tensor(fitness, dtype=self.X.dtype).to(self.device).flatten(), nan=math.inf)
        if f.numel() != x.shape[0] or x.shape[0] != self.lam:
            raise ValueError(f"Expected {self.lam} fitness values for {x.shape[0]} candidates, got {f.numel()}.")
        self.evaluations += self.lam
        fl = f.tolist()  # the one host read (on a GPU a sync): the decisions below are the host's
        best = min(range(self.lam), key=lambda i: (fl[i], i))  # the first minimum, as torch.argmin
        core_f = fl[0]  # the core firework, re-evaluated on this generation's data
        if fl[best] < core_f:
            self.amp_core *= self.ca
        else:
            self.amp_core *= self.cr
        if fl[best] < self.best_f:
            self.best_f, self.best_x = fl[best], x[best].clone()
        idx = torch.arange(self.lam, device=self.device)  # index tensors made on the device: no host copy
        rest = torch.cat([idx[:best], idx[best + 1 :]])
        perm = torch.randperm(rest.numel(), generator=self.gen, device=self.device)[: self.nf - 1]
        keep = torch.cat([idx[best : best + 1], rest[perm]])
        self.X, self.F = x[keep].clone(), f[keep].clone()
        self.generation += 1
        self._asked = None

    def forget_ask(self) -> None:
        """Drop the candidates of the last ``ask`` (a generation that was not evaluated)."""
        self._asked = None

    def snapshot(self) -> dict[str, Any]:
        """The state before a ``tell`` that may be taken back (:meth:`restore`): references, no copies (``tell``
        assigns new tensors, it writes none in place)."""
        return {k: getattr(self, k) for k in ("X", "F", "amp_core", "best_f", "best_x", "generation", "evaluations")}

    def restore(self, snap: dict[str, Any]) -> None:
        for k, v in snap.items():
            setattr(self, k, v)

    # ---- checkpointing ------------------------------------------------------------------------------------------
    def tensors(self) -> list[Tensor]:
        """Every tensor of the search state (what memory accounting counts)."""
        return [v for v in vars(self).values() if isinstance(v, Tensor)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "X": self.X.clone(), "F": self.F.clone(), "amp_core": self.amp_core, "generation": self.generation,
            "evaluations": self.evaluations, "best_f": self.best_f, "best_x": self.best_x.clone(),
            "rng": self.gen.get_state(), "asked": None if self._asked is None else self._asked.clone(),
            "n": self.n, "lam": self.lam,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n"]) != self.n or int(state["lam"]) != self.lam:
            raise ValueError(
                f"Fireworks state is for n={state['n']}, popsize={state['lam']}; this instance has n={self.n}, "
                f"popsize={self.lam}."
            )
        self.X, self.F = state["X"].to(self.device).clone(), state["F"].to(self.device).clone()
        self.best_x = state["best_x"].to(self.device).clone()
        for k in ("amp_core", "generation", "evaluations", "best_f"):
            setattr(self, k, state[k])
        self.gen.set_state(state["rng"].cpu())
        asked = state.get("asked")
        self._asked = None if asked is None else asked.to(self.device).clone()
