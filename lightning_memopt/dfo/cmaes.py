"""CMA-ES in plain torch: ask/tell, any device, lazy eigendecomposition, exact ``state_dict``.

The (mu/mu_w, lambda)-CMA-ES of Hansen's tutorial (arXiv 1604.00772) with positive recombination weights,
cumulative step-size adaptation, rank-one and rank-mu covariance updates. As in pycma, the eigendecomposition of C
is refreshed only every ``0.5 / ((c1 + cmu) n)`` generations (26 at n=500), so a generation at n=500 costs a few small
matrix products, not an O(n^3) decomposition.

One instance optimizes one vector. Derivative-free LoRA steps one layer per generation (layers take turns), so
there is never more than one instance to step at a time, and batching instances over layers would buy nothing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


class CMAES:
    """Covariance matrix adaptation evolution strategy (minimization) with an ask/tell interface.

    Args:
        mean: the initial mean (``x0``), a 1-D tensor; its device is where all state lives.
        sigma: the initial step size.
        popsize: candidates per generation (lambda); default ``4 + floor(3 ln n)``.
        seed: seed of this instance's own generator (sampling never touches the global RNG).
        dtype: dtype of the state (float64 like pycma; candidates are returned in it too).

    Example::

        es = CMAES(torch.zeros(50), sigma=0.5, popsize=20, seed=0)
        for _ in range(200):
            x = es.ask()
            es.tell((x ** 2).sum(1))
        print(es.best_f, es.mean)
    """

    def __init__(
        self,
        mean: Tensor,
        sigma: float = 1.0,
        popsize: int | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if mean.ndim != 1:
            raise ValueError(f"mean must be a 1-D tensor, got shape {tuple(mean.shape)}.")
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}.")
        n = mean.numel()
        dev = mean.device
        self.n = n
        self.lam = int(popsize) if popsize is not None else 4 + int(3 * math.log(n))
        if self.lam < 2:
            raise ValueError(f"popsize must be at least 2, got {self.lam}.")
        self.mu = self.lam // 2
        # Active CMA-ES weights (tutorial eq. 49-53, pycma's default): positive ones recombine the mean, negative
        # ones actively shrink the covariance along the worst candidates' directions.
        raw = math.log((self.lam + 1) / 2) - torch.log(torch.arange(1, self.lam + 1, dtype=dtype, device=dev))
        pos, neg = raw.clamp(min=0), raw.clamp(max=0)
        self.mueff = float(pos.sum() ** 2 / (pos**2).sum())
        mueff_neg = float(neg.sum() ** 2 / (neg**2).sum()) if self.lam > 2 * self.mu else 0.0
        mueff = self.mueff
        self.cs = (mueff + 2) / (n + mueff + 5)
        self.ds = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + self.cs
        self.cc = (4 + mueff / n) / (n + 4 + 2 * mueff / n)
        self.c1 = 2 / ((n + 1.3) ** 2 + mueff)
        self.cmu = min(1 - self.c1, 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
        a_mu = 1 + self.c1 / self.cmu
        a_mueff = 1 + 2 * mueff_neg / (mueff + 2)
        a_posdef = (1 - self.c1 - self.cmu) / (n * self.cmu)
        neg_sum = float(-neg.sum())
        scale_neg = min(a_mu, a_mueff, a_posdef) / neg_sum if neg_sum > 0 else 0.0
        self.weights_all = pos / pos.sum() + neg * scale_neg
        self.weights = self.weights_all[: self.mu]
        self._weights_sum = float(self.weights_all.sum())  # constant: read once here, not per generation
        self.chin = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n**2))
        self.eigen_gap = max(1, int(0.5 / ((self.c1 + self.cmu) * n)))  # purecma's lazy gap

        self.mean = mean.detach().to(dtype).clone()
        self._sigma = torch.tensor(float(sigma), dtype=dtype, device=dev)
        self.C = torch.eye(n, dtype=dtype, device=dev)
        self.B = torch.eye(n, dtype=dtype, device=dev)
        self.D = torch.ones(n, dtype=dtype, device=dev)
        self.ps = torch.zeros(n, dtype=dtype, device=dev)
        self.pc = torch.zeros(n, dtype=dtype, device=dev)
        self.generation = 0
        self.eigen_generation = 0
        self.evaluations = 0
        self._best_f = torch.tensor(math.inf, dtype=dtype, device=dev)
        self.best_x = self.mean.clone()
        self.gen = torch.Generator(device=dev)
        self.gen.manual_seed(int(seed))
        self._asked: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def sigma(self) -> float:
        """The step size (a host read of the device value)."""
        return float(self._sigma)

    @sigma.setter
    def sigma(self, value: float) -> None:
        self._sigma = torch.tensor(float(value), dtype=self.mean.dtype, device=self.device)

    @property
    def best_f(self) -> float:
        """The best fitness told so far (a host read of the device value)."""
        return float(self._best_f)

    @best_f.setter
    def best_f(self, value: float) -> None:
        self._best_f = torch.tensor(float(value), dtype=self.mean.dtype, device=self.device)

    def offload(self, device: torch.device | str = "cpu") -> None:
        """Park the two n x n matrices (C and its eigenvectors B: 2·n²·8 bytes, 4 MB at n=500) on ``device`` until
        the next ask/tell brings them back: a layer-wise run keeps only the current layer's on the GPU. From a GPU
        to the host they go to pinned memory, without a sync (the copies run in stream order)."""
        self.C, self.B = _move(self.C, device), _move(self.B, device)

    def _fetch(self) -> None:
        if self.C.device != self.device:
            self.C, self.B = _move(self.C, self.device), _move(self.B, self.device)

    def ask(self) -> Tensor:
        """``popsize`` candidates ``[lambda, n]`` drawn from N(mean, sigma^2 C)."""
        self._fetch()
        z = torch.randn(self.lam, self.n, generator=self.gen, device=self.device, dtype=self.mean.dtype)
        y = (z * self.D) @ self.B.T
        self._asked = self.mean + self._sigma * y  # the device scalar: ``self.sigma`` would sync every generation
        return self._asked

    def tell(self, fitness: Tensor | list[float], solutions: Tensor | None = None, ok: Tensor | None = None) -> None:
        """Update from the fitness (lower is better) of the last ``ask`` (or of explicit ``solutions``).

        ``ok``: a 0-d bool on the state's device. Where it is false the state stays bit for bit as it was (a
        generation to skip, known on the device only: no host read); the host counters advance anyway, and the caller
        puts them back (:meth:`counts`, :meth:`set_counts`) once it learns of the skip.
        """
        self._fetch()
        before = self.snapshot() if ok is not None else None
        x = self._asked if solutions is None else solutions.to(self.mean)
        if x is None:
            raise RuntimeError("tell() needs the candidates of a previous ask() (or pass solutions=...).")
        f = torch.as_tensor(fitness, dtype=self.mean.dtype).to(self.device).flatten()
        if f.numel() != x.shape[0] or x.shape[0] != self.lam:
            raise ValueError(f"Expected {self.lam} fitness values for {x.shape[0]} candidates, got {f.numel()}.")
        f = torch.nan_to_num(f, nan=math.inf)  # NaN ranks last (a no-op where every value is finite)
        order = torch.argsort(f, stable=True)
        self.evaluations += self.lam
        best = order[:1]  # a 1-element index: indexing by the 0-d order[0] would read it on the host
        fb = f.index_select(0, best)[0]
        better = fb < self._best_f
        self._best_f = torch.where(better, fb, self._best_f)
        self.best_x = torch.where(better, x.index_select(0, best)[0], self.best_x)
        n, cs, cc, c1, cmu, w = self.n, self.cs, self.cc, self.c1, self.cmu, self.weights
        y_all = (x[order] - self.mean) / self._sigma  # [lambda, n], best first
        y = y_all[: self.mu]
        yw = w @ y
        self.mean = self.mean + self._sigma * yw
        self.ps = (1 - cs) * self.ps + math.sqrt(cs * (2 - cs) * self.mueff) * self._invsqrt(yw[None])[0]
        self.generation += 1
        ps_norm = self.ps.norm()
        hsig = (ps_norm / math.sqrt(1 - (1 - cs) ** (2 * self.generation)) / self.chin < 1.4 + 2 / (n + 1)).to(f.dtype)
        self.pc = (1 - cc) * self.pc + hsig * math.sqrt(cc * (2 - cc) * self.mueff) * yw
        wa = self.weights_all
        # Negative weights act on Mahalanobis-normalised steps so that C stays positive definite.
        mahal = (self._invsqrt(y_all) ** 2).sum(1).clamp(min=1e-30)
        wo = torch.where(wa >= 0, wa, wa * n / mahal)
        delta_h = (1 - hsig) * (cc * (2 - cc))
        # out of place (the same kernels as mul_/add_, the same bits): a snapshot() taken before stays valid
        C = self.C.mul(1 + c1 * delta_h - c1 - cmu * self._weights_sum)
        C = C.add(torch.outer(self.pc, self.pc), alpha=c1)
        self.C = C.add((y_all.T * wo) @ y_all, alpha=cmu)
        self._sigma = self._sigma * torch.exp(((cs / self.ds) * (ps_norm / self.chin - 1)).clamp(max=1.0))
        if self.generation - self.eigen_generation >= self.eigen_gap:
            self._eigen()
        self._asked = None
        if before is not None:
            for k in (*self._TENSORS, "_sigma", "_best_f"):
                new, old = getattr(self, k), before[k]
                if new is not old:  # into a tensor of new's strides: eigh's B is column-major (see _move)
                    setattr(self, k, torch.where(ok, new, old, out=torch.empty_like(new)))

    def counts(self) -> tuple[int, int, int]:
        """The host counters a ``tell`` advances (generation, eigen_generation, evaluations)."""
        return self.generation, self.eigen_generation, self.evaluations

    def set_counts(self, counts: tuple[int, int, int]) -> None:
        self.generation, self.eigen_generation, self.evaluations = counts

    def forget_ask(self) -> None:
        """Drop the candidates of the last ``ask`` (a generation that was not evaluated)."""
        self._asked = None

    def snapshot(self) -> dict[str, Any]:
        """The state before a ``tell`` that may be taken back (:meth:`restore`): references, no copies."""
        return {k: getattr(self, k) for k in self._STEP_STATE}

    def restore(self, snap: dict[str, Any]) -> None:
        for k, v in snap.items():
            setattr(self, k, v)

    def _invsqrt(self, y: Tensor) -> Tensor:
        """Rows of ``y`` times C^(-1/2) = B D^-1 B^T (of the last decomposition), without storing that matrix."""
        return ((y @ self.B) / self.D) @ self.B.T

    def _eigen(self) -> None:
        self.eigen_generation = self.generation
        self.C = (self.C + self.C.T) / 2  # symmetric up to rounding
        evals, evecs = torch.linalg.eigh(self.C)
        evals = evals.clamp(min=1e-20)
        self.D = evals.sqrt()
        self.B = evecs

    # ---- checkpointing ------------------------------------------------------------------------------------------
    _TENSORS = ("mean", "C", "B", "D", "ps", "pc", "best_x")
    _SCALARS = ("sigma", "generation", "eigen_generation", "evaluations", "best_f", "lam", "n")  # host reads
    # what tell() changes; it reassigns each (never writes into one), so references are a snapshot
    _STEP_STATE = (*_TENSORS, "_sigma", "_best_f", "generation", "eigen_generation", "evaluations", "_asked")

    def tensors(self) -> list[Tensor]:
        """Every tensor of the search state (what memory accounting counts)."""
        return [v for v in vars(self).values() if isinstance(v, Tensor)]

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k).to(self.device, copy=True) for k in self._TENSORS}
        out.update({k: getattr(self, k) for k in self._SCALARS})
        out["rng"] = self.gen.get_state()
        out["asked"] = None if self._asked is None else self._asked.clone()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n"]) != self.n or int(state["lam"]) != self.lam:
            raise ValueError(
                f"CMA-ES state is for n={state['n']}, popsize={state['lam']}; this instance has n={self.n}, "
                f"popsize={self.lam}."
            )
        for k in self._TENSORS:
            setattr(self, k, state[k].to(device=self.device, dtype=self.mean.dtype).clone())
        for k in self._SCALARS:
            setattr(self, k, state[k])
        self.gen.set_state(state["rng"].cpu())
        asked = state.get("asked")
        self._asked = None if asked is None else asked.to(self.device).clone()


def _move(t: Tensor, device: torch.device | str) -> Tensor:
    """``t`` on ``device``; from a GPU to the host into pinned memory, without a sync."""
    device = torch.device(device)
    if t.device == device:
        return t
    if t.is_cuda and device.type == "cpu":
        # the same strides: eigh's B is column-major, and a matmul on another layout rounds differently
        out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)
    return t.to(device, non_blocking=t.is_pinned())
