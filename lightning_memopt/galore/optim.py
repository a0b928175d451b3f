"""The GaLore step, whole, in one place.

For a target 2-D weight W with gradient G and a rank-r orthonormal basis P (left ``U``: m×r, or right ``V``: n×r):

1. **Refresh** (every ``update_proj_gap`` optimizer steps per parameter, at the step boundary): compute a new basis
   from the current G (see :mod:`.projector`), batched over same-shape matrices. A non-finite G keeps the old basis
   and retries on the next step. The Adam moments follow the subspace change according to ``moments``:
   ``"reproject"`` (default) rotates them into the new basis with ``R = P_oldᵀ P_new`` (first moment exactly,
   second moment with ``R∘R``, which keeps it non-negative); ``"keep"`` leaves them as they are (galore-torch,
   issue #54); ``"reset"`` zeroes them and restarts bias correction. With ``lazy_refresh`` the gap doubles (up to
   ``lazy_max_gap``) each time the new subspace overlaps the old one by at least ``lazy_threshold``, and falls back
   to ``update_proj_gap`` otherwise (Q-GaLore's idea).
2. **Project**: ``R = UᵀG`` or ``R = GV``.
3. **Adam in the subspace**: one fused ``torch.optim.adam`` call over all low-rank moments, writing the normalised
   step into zero buffers (lr 1, no decay), so it costs one kernel for the whole model.
4. **Project back and apply** in one ``addmm_``: ``W ← (1 − lr·wd)·W − lr·scale·P·N`` (decoupled weight decay as in
   ``torch.optim.AdamW``), no full-size temporary.

A step whose loss was not finite (``step(ok)`` with ``ok`` false on the device) is a no-op there: fused Adam's
``found_inf`` keeps weights, moments and step counts, no refresh is taken, and the host's per-parameter counters are
put back once the guard learns of the skip. The update rules (AdamW, 8-bit AdamW, Adafactor) are in :mod:`.rules`.
In layer-wise mode (``begin(ok, per_tensor=True, loss=loss)``, then :meth:`step_param` from each gradient's hook)
the whole gradient never exists, so each parameter's update waits on its own gradient being finite (the projected
one for a target, smaller): a NaN gradient under a finite loss leaves that parameter, its moments and counters as
they were, and the guard learns which (``SkipGuard.attach``). A hook on the loss's gradient makes every gradient NaN
where the loss is not finite, so that one check per parameter covers both.

Non-target parameters get a plain fused AdamW step with their group's settings. All state lives in
``optimizer.state[p]`` as tensors and ints, so checkpoints carry projectors and moments and resume is exact on any
device. Hyperparameters are read from ``param_groups`` on every step, so LR schedulers keep driving ``lr``.

Under FSDP2 (DTensor parameters sharded on dim 0) the same code runs on local row shards with a RIGHT basis that all
ranks share: the refresh sketches are all-reduced over the shard group (:func:`.projector.randomized_right_basis`).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_memopt.core import validate
from lightning_memopt.core.axpby import axpby_
from lightning_memopt.core.nonfinite import SkipGuard
from lightning_memopt.core.fsdp import all_reduce_sum, is_dtensor, local, shard_group, sharded_zeros
from lightning_memopt.galore import rules
from lightning_memopt.galore.projector import LEFT, RIGHT, Method, compute_bases, side_for, subspace_overlap

Moments = Literal["reproject", "keep", "reset"]
BaseOptimizer = Literal["adamw", "adamw8bit", "adafactor"]

_GALORE_KEYS = ("proj", "side", "n", "gap", "next_refresh")
_STACK_BUDGET = 1 << 27  # fp32 elements per batched refresh (512 MiB), bounds the refresh's extra memory


@dataclass
class GaLoreSettings:
    """Everything that defines the GaLore step apart from the per-group AdamW hyperparameters."""

    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    refresh: Method = "randomized"
    oversample: int = 8
    power_iters: int = 1
    moments: Moments = "reproject"
    lazy_refresh: bool = False
    lazy_threshold: float = 0.9
    lazy_max_gap: int = 1600
    seed: int = 0
    optimizer: BaseOptimizer = "adamw"
    hf_adamw: bool = False  # galore-torch's arithmetic: eps added before bias correction, decay after the update

    def __post_init__(self) -> None:
        validate.at_least(self.rank, 1, "rank")
        validate.at_least(self.update_proj_gap, 1, "update_proj_gap")
        validate.positive(self.scale, "scale")
        _one_of(self.proj_type, ("std", "reverse_std", "left", "right"), "proj_type")
        _one_of(self.refresh, ("randomized", "svd_lowrank", "svd"), "refresh")
        _one_of(self.moments, ("reproject", "keep", "reset"), "moments")
        _one_of(self.optimizer, tuple(rules.RULES), "optimizer")
        validate.at_least(self.oversample, 0, "oversample")
        validate.at_least(self.power_iters, 0, "power_iters")
        if not 0.0 < validate.finite(self.lazy_threshold, "lazy_threshold") <= 1.0:
            raise ValueError(f"lazy_threshold must be in (0, 1], got {self.lazy_threshold}.")
        validate.at_least(self.lazy_max_gap, 1, "lazy_max_gap")
        if self.lazy_refresh and self.lazy_max_gap < self.update_proj_gap:
            raise ValueError(
                f"lazy_max_gap={self.lazy_max_gap} is below update_proj_gap={self.update_proj_gap}: lazy refresh only "
                f"lengthens the gap. Set lazy_max_gap >= update_proj_gap."
            )
        if self.optimizer != "adamw" and self.moments == "reproject":
            raise ValueError(
                f"moments='reproject' rotates AdamW's moments; optimizer={self.optimizer!r} keeps quantized or "
                f"factored state that cannot be rotated. Set moments='keep' (galore-torch's behaviour) or 'reset'."
            )
        if self.hf_adamw and self.optimizer != "adamw":
            raise ValueError("hf_adamw=True reproduces galore-torch's GaLoreAdamW; it needs optimizer='adamw'.")
        if self.optimizer == "adamw8bit":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise ImportError(
                    "optimizer='adamw8bit' needs bitsandbytes: pip install 'lightning_memopt[bnb]'"
                ) from None


def _one_of(value: Any, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}.")


def select_targets(
    module: torch.nn.Module, target_modules: str = "all-linear", exclude_modules: str | None = r"(^|\.)lm_head$"
) -> list[torch.nn.Parameter]:
    """The 2-D weights GaLore projects, in module order.

    ``"all-linear"`` takes every ``nn.Linear`` weight; any other string is a regex searched in module names (any module
    with a 2-D ``weight``). Modules whose name matches ``exclude_modules`` are skipped, and so is any weight they share
    (a tied ``lm_head`` keeps the embedding out too).
    """
    excluded: set[int] = set()
    chosen: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    pattern = None if target_modules == "all-linear" else re.compile(target_modules)
    for name, mod in module.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.nn.Parameter):
            continue
        if exclude_modules and re.search(exclude_modules, name):
            excluded.add(id(w))
            continue
        hit = isinstance(mod, torch.nn.Linear) if pattern is None else bool(pattern.search(name))
        if hit and w.ndim == 2 and w.requires_grad and id(w) not in seen:
            seen.add(id(w))
            chosen.append(w)
    return [w for w in chosen if id(w) not in excluded]


def _store(basis: Tensor, dtype: torch.dtype, side: int) -> Tensor:
    # Own storage (not a view into the batch), in galore-torch's memory layout (LAPACK's column-major U; V's rows),
    # so the parity path's matmuls round exactly as galore-torch's do.
    if side == LEFT:
        return basis.mT.to(dtype, copy=True).contiguous().mT
    return basis.to(dtype, copy=True).contiguous()


_KEYS = "__keys__"  # a snapshot's entry: the state's keys before the step


def _put_back(s: dict[str, Any], snap: dict[str, Any]) -> None:
    """Undo a skipped step's host-side counters: their values before it, and none it created."""
    for k in [k for k, v in s.items() if type(v) is int and k not in snap[_KEYS]]:
        del s[k]
    s.update({k: v for k, v in snap.items() if k != _KEYS})


def _zero_adam_state(p: Tensor, shape: tuple[int, ...]) -> dict[str, Any]:
    """Zero Adam moments of the GLOBAL ``shape`` in ``p``'s dtype. Under FSDP2 (only right projections, so the
    moments keep the weight's rows) they are DTensors sharded like ``p``: checkpoints gather and re-shard them."""
    w = local(p)
    return {
        "step": torch.zeros((), dtype=torch.float32, device=w.device),
        "exp_avg": sharded_zeros(p, shape, w.dtype),
        "exp_avg_sq": sharded_zeros(p, shape, w.dtype),
    }




class GaLoreOptimizer:
    """Applies GaLore to an optimizer's ``param_groups`` and ``state`` (a ``HolderOptimizer``'s, usually).

    Args:
        optimizer: anything with ``param_groups`` (lr, betas, eps, weight_decay per group) and a ``state`` dict.
        targets: the 2-D weights to project, in a fixed order (the order seeds each one's random sketch).
        settings: rank, gap, scale, projection type, refresh method, moments policy, lazy refresh, seed, rule.
        guard: the :class:`~lightning_memopt.core.nonfinite.SkipGuard` that learns of skipped steps (optional).
        names: parameter names by ``id``, for messages about tensors left out in layer-wise mode.

    ``step(ok)`` with a device flag ``ok`` false (a non-finite loss) leaves weights and state bit-identical: fused
    Adam's ``found_inf`` on the device, the host's step counters put back through ``guard``, and no refresh.

    Example::

        base = torch.optim.AdamW(model.parameters(), lr=1e-3)
        holder = HolderOptimizer(base)
        galore = GaLoreOptimizer(holder, [m.weight for m in model.modules() if isinstance(m, nn.Linear)],
                                 GaLoreSettings(rank=8))
        loss.backward(); galore.step(); holder.zero_grad()
    """

    def __init__(
        self,
        optimizer: Any,
        targets: Iterable[Tensor],
        settings: GaLoreSettings,
        guard: SkipGuard | None = None,
        names: dict[int, str] | None = None,
    ) -> None:
        self.opt = optimizer
        self.settings = settings
        self.guard = guard
        self.index = {id(p): i for i, p in enumerate(targets)}
        self.refreshes = 0
        self.skipped_refreshes = 0
        self._update = rules.RULES[settings.optimizer]
        self._ok: Tensor | None = None
        self._touched: list[tuple[dict[str, Any], dict[str, int]]] = []
        self._names = names or {}
        self._slots: dict[int, int] = {}  # layer-wise: each parameter's number (made on first use)
        self._slot_names: list[str] = []
        self._fins: list[tuple[int, Tensor]] | None = None  # this step's (slot, gradient finite), layer-wise
        self._folded = False  # the loss's own check is carried into every gradient (begin's loss hook)
        self._slot = -1  # the parameter step_param is updating
        self._slot_touched: dict[int, list[tuple[dict[str, Any], dict[str, int]]]] = {}

    def ranks(self) -> dict[int, int]:
        """The rank each target is projected to, by ``id``: ``rank`` clamped to the smaller side of its matrix."""
        out = {}
        for g in self.opt.param_groups:
            for p in g["params"]:
                if id(p) in self.index:
                    out[id(p)] = min(self.settings.rank, *p.shape)
        return out

    # ---- public entry points -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, ok: Tensor | None = None) -> None:
        """Update every parameter that has a gradient (call after backward, at an optimizer-step boundary)."""
        self.begin(ok)
        for group in self.opt.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            self._plain(group, [p for p in params if id(p) not in self.index])
            self._galore(group, [p for p in params if id(p) in self.index])
        self.end()

    def begin(self, ok: Tensor | None, per_tensor: bool = False, loss: Tensor | None = None) -> None:
        """Start a step whose updates ``ok`` guards (layer-wise mode calls :meth:`step_param` in between). With
        ``per_tensor`` (layer-wise, with a guard that checked ``ok``) each parameter's update also needs its own
        gradient finite, and :meth:`end` tells the guard which were not. With ``loss`` (the tensor about to be
        backpropagated), its gradient is made NaN where ``ok`` is false, so every gradient carries the loss's check
        and one check per parameter does (half the launches of checking both, in a host-bound backward)."""
        self._ok, self._touched, self._fins, self._slot_touched, self._folded = ok, [], None, {}, False
        if per_tensor and self.guard is not None and ok is not None:
            if not self._slots:
                params = [p for g in self.opt.param_groups for p in g["params"] if p.requires_grad]
                self._slots = {id(p): i for i, p in enumerate(params)}
                self._slot_names = [self._names.get(id(p), f"param{i}") for i, p in enumerate(params)]
            self._fins = []
            if loss is not None and loss.requires_grad:
                loss.register_hook(lambda g: torch.where(ok, g, float("nan")))
                self._folded = True

    def end(self) -> None:
        """Finish the step: if the guard later finds it skipped, the host-side counters it advanced are put back."""
        if self.guard is not None and self._ok is not None and self._touched:
            saved = [(s, {k: v for k, v in snap.items()}) for s, snap in self._touched]
            self.guard.on_skip(lambda: [_put_back(s, snap) for s, snap in saved])
        if self._fins and self.guard is not None:
            slots = [slot for slot, _ in self._fins]
            flags = torch.stack([fin for _, fin in self._fins])  # one launch a step, not one a parameter
            by_slot = self._slot_touched
            self.guard.attach(
                flags, lambda bad: [_put_back(s, snap) for i in bad for s, snap in by_slot.get(slots[i], [])],
                "those tensors were left as they were (weights, moments and counters)",
                names=[self._slot_names[slot] for slot in slots])
        self._ok, self._touched, self._fins, self._slot_touched, self._folded = None, [], None, {}, False

    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict[str, Any]) -> None:
        """Update one parameter (layer-wise mode: called from its post-accumulate-grad hook)."""
        if p.grad is None:
            return
        update = self._galore if id(p) in self.index else self._plain
        if self._fins is None:
            update(group, [p])
            return
        ok, first = self._ok, len(self._touched)
        self._slot = self._slots[id(p)]
        try:
            update(group, [p])
        finally:
            self._ok = ok  # _gate narrowed it to this parameter
            self._slot_touched[self._slot] = self._touched[first:]

    def _gate(self, t: Tensor) -> None:
        """Layer-wise, per tensor: the current parameter's update also needs ``t`` (its gradient, or the projected
        gradient) finite, which :meth:`end` reports. A no-op otherwise."""
        if self._fins is None:
            return
        fin = torch.isfinite(t.sum())  # NaN and inf carry into the sum; no bool copy of t (an embedding: 28M elements)
        self._fins.append((self._slot, fin))
        self._ok = fin if self._folded or self._ok is None else self._ok & fin

    def init_state(self) -> None:
        """Create every parameter's state now, zero, with a placeholder basis due for refresh on the first step.

        FSDP2 checkpoint loading needs the state as a template before the first step; the result equals lazy
        creation (the first refresh rotates zero moments).
        """
        ranks = self.ranks()
        for group in self.opt.param_groups:
            for p in group["params"]:
                s = self.opt.state[p]
                if s or not p.requires_grad:
                    continue
                if id(p) not in self.index:
                    s.update(_zero_adam_state(p, tuple(p.shape)))
                    continue
                m, n = p.shape
                side = side_for(p.shape, self.settings.proj_type)
                r = ranks[id(p)]
                shape = (r, n) if side == LEFT else (m, r)
                s.update(_zero_adam_state(p, shape))
                basis = torch.zeros((m if side == LEFT else n, r), dtype=torch.float32, device=local(p).device)
                s.update(
                    proj=_store(basis, p.dtype, side), side=side, n=0, gap=self.settings.update_proj_gap,
                    next_refresh=0,
                )

    def _snapshot(self, states: list[dict[str, Any]]) -> None:
        """Remember the host-side ints a step is about to advance (undone if the step turns out skipped), and which
        there were: a counter the step creates (Adafactor's first ``step``) goes again."""
        if self._ok is not None:
            self._touched += [(s, {**{k: v for k, v in s.items() if type(v) is int}, _KEYS: frozenset(s)})
                              for s in states]

    # ---- plain AdamW for non-target parameters -----------------------------------------------------------------
    def _plain(self, group: dict[str, Any], ps: list[Tensor]) -> None:
        if not ps:
            return
        states = []
        for p in ps:
            s = self.opt.state[p]
            if "exp_avg" not in s and self.settings.optimizer == "adamw":
                s.update(_zero_adam_state(p, tuple(p.shape)))
            states.append(s)
        self._gate(local(ps[0].grad))
        self._snapshot(states)
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        if self.settings.hf_adamw:
            for p, s in zip(ps, states):
                rules.hf_adamw(group, local(p), local(p.grad), s, lr, wd, ok=self._ok)
            return
        self._update(group, [local(p) for p in ps], [local(p.grad) for p in ps], states, lr, wd, self._ok)

    # ---- GaLore ------------------------------------------------------------------------------------------------
    def _galore(self, group: dict[str, Any], ps: list[Tensor]) -> None:
        if not ps:
            return
        st = self.opt.state
        due = [p for p in ps if "proj" not in st[p] or st[p]["n"] >= st[p]["next_refresh"]]
        # A refresh from a non-finite gradient is not taken: it would change the subspace (a host check, only on
        # refresh steps, which sync anyway).
        if due and not (self._ok is not None and not bool(self._ok)):
            self._refresh(due)
        ps = [p for p in ps if "proj" in st[p]]  # a skipped first step has no subspace yet: nothing to update
        if not ps:
            return
        states = [st[p] for p in ps]
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        if self.settings.hf_adamw:
            self._gate(local(ps[0].grad))
            self._snapshot(states)
            for p, s in zip(ps, states):
                rules.hf_adamw(group, local(p), local(p.grad), s, lr, wd, self.settings.scale, ok=self._ok)
                s["n"] += 1
            return
        grads = [local(p.grad) for p in ps]
        low = [s["proj"].mT @ g if s["side"] == LEFT else g @ s["proj"] for s, g in zip(states, grads)]
        self._gate(low[0])  # a non-finite G makes its projection so (rank r: cheaper to check than G)
        self._snapshot(states)
        out = [torch.zeros_like(g) for g in low]
        self._update(group, out, low, states, 1.0, 0.0, self._ok)  # out = -(Adam direction); stays 0 if skipped
        alpha = lr * self.settings.scale
        # With a skip flag, weight decay is its own masked pass (addmm_'s beta is a host float), and only if wd > 0.
        beta = 1.0 - lr * wd if self._ok is None else 1.0
        for p, s, o in zip(ps, states, out):
            w = local(p)
            if wd and self._ok is not None:
                axpby_(w, w, -lr * wd, 1.0, self._ok)
            if s["side"] == LEFT:
                w.addmm_(s["proj"], o, beta=beta, alpha=alpha)
            else:
                w.addmm_(o, s["proj"].mT, beta=beta, alpha=alpha)
            s["n"] += 1

    def _reduce_for(self, p: Tensor) -> Callable[[Tensor], Tensor] | None:
        group = shard_group(p)
        return None if group is None else (lambda t: all_reduce_sum(t, group))

    def _seed(self, p: Tensor) -> int:
        n = self.opt.state[p].get("n", 0)
        return (self.settings.seed * 1_000_003 + self.index[id(p)] * 7_919 + n) % (2**62)

    def _refresh(self, ps: list[Tensor]) -> None:
        buckets: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in ps:
            g = p.grad
            side = side_for(p.shape, self.settings.proj_type)
            mesh = id(p.device_mesh) if is_dtensor(p) else None
            # Key on the GLOBAL shape: every rank must form the same buckets and chunks (they all-reduce together).
            buckets[(side, tuple(p.shape), g.dtype, g.device, mesh)].append(p)
        for (side, shape, _, _, _), items in buckets.items():
            per = max(1, _STACK_BUDGET // max(1, math.prod(shape)))
            for i in range(0, len(items), per):
                chunk = items[i : i + per]
                reduce = self._reduce_for(chunk[0])
                bases, ok = compute_bases(
                    [local(p.grad) for p in chunk],
                    self.settings.rank,
                    side,
                    self.settings.refresh,
                    seeds=[self._seed(p) for p in chunk],
                    oversample=self.settings.oversample,
                    power_iters=self.settings.power_iters,
                    **({"reduce": reduce} if reduce else {}),
                    shape=shape,
                )
                for p, basis, fine in zip(chunk, bases, ok):
                    self._install(p, side, basis, fine)

    def retime(self, was_lazy: bool) -> None:
        """Fit each weight's refresh gap to the settings, which a resume may have changed (else a no-op): a lazy gap
        carries over, capped at ``lazy_max_gap``; any other becomes ``update_proj_gap``. The next refresh is the new
        gap after the last one, or the next step where that has passed."""
        st = self.settings
        for s in self.opt.state.values():
            if "proj" in s:
                old = s["gap"]
                s["gap"] = min(old, st.lazy_max_gap) if st.lazy_refresh and was_lazy else st.update_proj_gap
                s["next_refresh"] = max(s["next_refresh"] - old + s["gap"], s["n"])

    def _install(self, p: Tensor, side: int, basis: Tensor, ok: bool) -> None:
        s = self.opt.state[p]
        w = local(p)
        gap = self.settings.update_proj_gap
        if "proj" not in s:
            r = basis.shape[-1]
            shape = (r, p.shape[1]) if side == LEFT else (p.shape[0], r)  # global shape
            if self.settings.optimizer == "adamw":  # the others create their state on first update
                s.update(_zero_adam_state(p, shape))
            s.update(
                proj=_store(basis, w.dtype, side),
                side=side,
                n=0,
                gap=gap,
                next_refresh=gap if ok else 1,
            )
            self.refreshes += 1
            self.skipped_refreshes += int(not ok)
            return
        if not ok:  # keep the old subspace, try again next step
            s["next_refresh"] = s["n"] + 1
            self.skipped_refreshes += 1
            return
        old = s["proj"].float()
        rot = old.mT @ basis  # r×r: new coordinates of the old basis vectors
        if self.settings.lazy_refresh:
            overlap = float(subspace_overlap(old, basis))
            s["gap"] = min(2 * s["gap"], self.settings.lazy_max_gap) if overlap >= self.settings.lazy_threshold else gap
        if self.settings.moments == "reproject":
            m, v = local(s["exp_avg"]), local(s["exp_avg_sq"])
            rot2 = rot.square()
            if side == RIGHT:
                m.copy_(m.float() @ rot)
                v.copy_(v.float() @ rot2)
            else:
                m.copy_(rot.mT @ m.float())
                v.copy_(rot2.mT @ v.float())
        elif self.settings.moments == "reset":
            if self.settings.optimizer == "adamw":
                local(s["exp_avg"]).zero_()
                local(s["exp_avg_sq"]).zero_()
                s["step"].zero_()
            else:  # recreated from zero on the next update
                for k in [k for k in s if k not in _GALORE_KEYS]:
                    del s[k]
        s["proj"] = _store(basis, w.dtype, side)
        s["next_refresh"] = s["n"] + s["gap"]
        self.refreshes += 1
