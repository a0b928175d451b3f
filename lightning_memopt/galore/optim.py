"""The GaLore-AdamW step, whole, in one place.

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

Non-target parameters get a plain fused AdamW step with their group's settings. All state lives in
``optimizer.state[p]`` as tensors and ints, so checkpoints carry projectors and moments and resume is exact on any
device. Hyperparameters are read from ``param_groups`` on every step, so LR schedulers keep driving ``lr``.

Under FSDP2 (DTensor parameters sharded on dim 0) the same code runs on local row shards with a RIGHT basis that all
ranks share: the refresh sketches are all-reduced over the shard group (:func:`.projector.randomized_right_basis`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim.adam import adam

from lightning_memopt.core.fsdp import all_reduce_sum, is_dtensor, local
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


def _store(basis: Tensor, dtype: torch.dtype, side: int) -> Tensor:
    # Own storage (not a view into the batch), in galore-torch's memory layout (LAPACK's column-major U; V's rows),
    # so the parity path's matmuls round exactly as galore-torch's do.
    if side == LEFT:
        return basis.mT.to(dtype, copy=True).contiguous().mT
    return basis.to(dtype, copy=True).contiguous()


def _zero_adam_state(p: Tensor, shape: tuple[int, ...]) -> dict[str, Any]:
    """Zero Adam moments of the GLOBAL ``shape`` in ``p``'s dtype. Under FSDP2 (only right projections, so the
    moments keep the weight's rows) they are DTensors sharded like ``p``: checkpoints gather and re-shard them."""
    w = local(p)
    step = torch.zeros((), dtype=torch.float32, device=w.device)
    if not is_dtensor(p):
        return {
            "step": step,
            "exp_avg": torch.zeros(shape, dtype=w.dtype, device=w.device),
            "exp_avg_sq": torch.zeros(shape, dtype=w.dtype, device=w.device),
        }
    from torch.distributed.tensor import DTensor

    local_shape = (w.shape[0], *shape[1:])
    stride = torch.empty(shape, device="meta").stride()

    def zeros() -> Tensor:
        t = torch.zeros(local_shape, dtype=w.dtype, device=w.device)
        return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)

    return {"step": step, "exp_avg": zeros(), "exp_avg_sq": zeros()}


def _fused_ok(tensors: Iterable[Tensor]) -> bool:
    return all(
        t.device.type in ("cuda", "cpu") and t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in tensors
    )


def _hf_adamw(
    group: dict[str, Any], p: Tensor, g: Tensor, s: dict[str, Any], lr: float, weight_decay: float, scale: float = 1.0
) -> None:
    """galore-torch's (Hugging Face's legacy) AdamW step, op for op, projection included: for parity runs only."""
    beta1, beta2 = group["betas"]
    proj, side = s.get("proj"), s.get("side")
    if proj is not None:
        g = torch.matmul(proj.mT, g) if side == LEFT else torch.matmul(g, proj)
    s["step"] += 1
    t = float(s["step"])
    m, v = s["exp_avg"], s["exp_avg_sq"]
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = v.sqrt().add_(group["eps"])
    step_size = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
    norm = m / denom
    if proj is not None:
        norm = (torch.matmul(proj, norm) if side == LEFT else torch.matmul(norm, proj.mT)) * scale
    p.add_(norm, alpha=-step_size)
    if weight_decay > 0.0:
        p.add_(p, alpha=-lr * weight_decay)


def _adam(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    lr: float,
    weight_decay: float,
) -> None:
    """One fused (decoupled-decay) Adam step over matching lists; state tensors live in ``states``."""
    if not params:
        return
    beta1, beta2 = group["betas"]
    steps = []
    for s, p in zip(states, params):
        if s["step"].device != p.device:  # a checkpoint restores "step" on CPU
            s["step"] = s["step"].to(p.device)
        steps.append(s["step"])
    adam(
        params,
        grads,
        [local(s["exp_avg"]) for s in states],
        [local(s["exp_avg_sq"]) for s in states],
        [],
        steps,
        fused=_fused_ok(params + grads) or None,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=group["eps"],
        maximize=False,
        decoupled_weight_decay=True,
    )


def _adamw8bit(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    lr: float,
    weight_decay: float,
) -> None:
    """bitsandbytes' blockwise 8-bit AdamW kernel (the optional ``bitsandbytes`` extra), state in ``states``."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:  # pragma: no cover - checked at setup
        raise ImportError("optimizer='adamw8bit' needs bitsandbytes: pip install 'lightning_memopt[bnb]'") from None
    beta1, beta2 = group["betas"]
    for p, g, s in zip(params, grads, states):
        if "state1" not in s:
            blocks = (p.numel() + 255) // 256
            s.update(
                step=0,
                state1=torch.zeros_like(p, dtype=torch.uint8),
                state2=torch.zeros_like(p, dtype=torch.uint8),
                qmap1=bnbf.create_dynamic_map(signed=True).to(p.device),
                qmap2=bnbf.create_dynamic_map(signed=False).to(p.device),
                absmax1=torch.zeros(blocks, dtype=torch.float32, device=p.device),
                absmax2=torch.zeros(blocks, dtype=torch.float32, device=p.device),
            )
        s["step"] += 1
        bnbf.optimizer_update_8bit_blockwise(
            "adam",
            g.contiguous(),
            p,
            s["state1"],
            s["state2"],
            beta1,
            beta2,
            0.0,
            0.0,
            group["eps"],
            s["step"],
            lr,
            s["qmap1"],
            s["qmap2"],
            s["absmax1"],
            s["absmax2"],
            weight_decay,
        )


def _adafactor(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    lr: float,
    weight_decay: float,
) -> None:
    """Adafactor (Shazeer & Stern 2018) without momentum, as galore-torch's GaLoreAdafactor runs it for fine-tuning
    (``relative_step=False, scale_parameter=False``): factored fp32 second moment for matrices, β2_t = 1 − t^-0.8,
    update RMS clipped to 1, decoupled weight decay."""
    for p, g, s in zip(params, grads, states):
        factored = g.ndim == 2
        if "step" not in s:
            if factored:
                s.update(
                    step=0,
                    exp_avg_sq_row=torch.zeros(g.shape[0], dtype=torch.float32, device=g.device),
                    exp_avg_sq_col=torch.zeros(g.shape[1], dtype=torch.float32, device=g.device),
                )
            else:
                s.update(step=0, exp_avg_sq=torch.zeros_like(g, dtype=torch.float32))
        s["step"] += 1
        beta2t = 1.0 - s["step"] ** -0.8
        g32 = g.to(torch.float32, copy=True)
        g2 = g32.square().add_(1e-30)
        if factored:
            row, col = s["exp_avg_sq_row"], s["exp_avg_sq_col"]
            row.mul_(beta2t).add_(g2.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(g2.mean(dim=-2), alpha=1.0 - beta2t)
            r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            u = g32.mul_(r).mul_(col.rsqrt().unsqueeze(-2))
        else:
            v = s["exp_avg_sq"]
            v.mul_(beta2t).add_(g2, alpha=1.0 - beta2t)
            u = g32.mul_(v.rsqrt())
        u.div_((u.square().mean().sqrt() / 1.0).clamp_(min=1.0))
        if weight_decay > 0.0:
            p.mul_(1.0 - lr * weight_decay)
        p.add_(u.to(p.dtype), alpha=-lr)


_UPDATES = {"adamw": _adam, "adamw8bit": _adamw8bit, "adafactor": _adafactor}


class GaLoreAdamW:
    """Applies GaLore-AdamW to an optimizer's ``param_groups`` and ``state`` (a ``HolderOptimizer``'s, usually).

    Args:
        optimizer: anything with ``param_groups`` (lr, betas, eps, weight_decay per group) and a ``state`` dict.
        targets: the 2-D weights to project, in a fixed order (the order seeds each one's random sketch).
        settings: rank, gap, scale, projection type, refresh method, moments policy, lazy refresh, seed.

    Example::

        base = torch.optim.AdamW(model.parameters(), lr=1e-3)
        holder = HolderOptimizer(base)
        galore = GaLoreAdamW(holder, [m.weight for m in model.modules() if isinstance(m, nn.Linear)],
                             GaLoreSettings(rank=8))
        loss.backward(); galore.step(); holder.zero_grad()
    """

    def __init__(self, optimizer: Any, targets: Iterable[Tensor], settings: GaLoreSettings) -> None:
        self.opt = optimizer
        self.s = settings
        self.index = {id(p): i for i, p in enumerate(targets)}
        self.refreshes = 0
        self.skipped_refreshes = 0
        if settings.optimizer not in _UPDATES:
            raise ValueError(f"optimizer must be one of {sorted(_UPDATES)}; got {settings.optimizer!r}.")
        if settings.optimizer != "adamw" and settings.moments == "reproject":
            raise ValueError(
                f"moments='reproject' rotates AdamW's moments; {settings.optimizer}'s state (quantized or factored) "
                f"cannot be rotated. Use moments='keep' (galore-torch's behaviour) or 'reset'."
            )
        if settings.hf_adamw and settings.optimizer != "adamw":
            raise ValueError("hf_adamw=True reproduces galore-torch's GaLoreAdamW; it needs optimizer='adamw'.")
        self._update = _UPDATES[settings.optimizer]

    # ---- public entry points -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Update every parameter that has a gradient (call after backward, at an optimizer-step boundary)."""
        for group in self.opt.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            self._plain(group, [p for p in params if id(p) not in self.index])
            self._galore(group, [p for p in params if id(p) in self.index])

    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict[str, Any]) -> None:
        """Update one parameter (layer-wise mode: called from its post-accumulate-grad hook)."""
        if p.grad is None:
            return
        (self._galore if id(p) in self.index else self._plain)(group, [p])

    def init_state(self) -> None:
        """Create every parameter's state now, zero, with a placeholder basis due for refresh on the first step.

        FSDP2 checkpoint loading needs the state as a template before the first step; the result equals lazy
        creation (the first refresh rotates zero moments).
        """
        for group in self.opt.param_groups:
            for p in group["params"]:
                s = self.opt.state[p]
                if s or not p.requires_grad:
                    continue
                if id(p) not in self.index:
                    s.update(_zero_adam_state(p, tuple(p.shape)))
                    continue
                m, n = p.shape
                side = side_for(p.shape, self.s.proj_type)
                r = min(self.s.rank, m, n)
                shape = (r, n) if side == LEFT else (m, r)
                s.update(_zero_adam_state(p, shape))
                basis = torch.zeros((m if side == LEFT else n, r), dtype=torch.float32, device=local(p).device)
                s.update(proj=_store(basis, p.dtype, side), side=side, n=0, gap=self.s.update_proj_gap, next_refresh=0)

    # ---- plain AdamW for non-target parameters -----------------------------------------------------------------
    def _plain(self, group: dict[str, Any], ps: list[Tensor]) -> None:
        if not ps:
            return
        states = []
        for p in ps:
            s = self.opt.state[p]
            if "exp_avg" not in s and self.s.optimizer == "adamw":
                s.update(_zero_adam_state(p, tuple(p.shape)))
            states.append(s)
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        if self.s.hf_adamw:
            for p, s in zip(ps, states):
                _hf_adamw(group, local(p), local(p.grad), s, lr, wd)
            return
        self._update(group, [local(p) for p in ps], [local(p.grad) for p in ps], states, lr, wd)

    # ---- GaLore ------------------------------------------------------------------------------------------------
    def _galore(self, group: dict[str, Any], ps: list[Tensor]) -> None:
        if not ps:
            return
        st = self.opt.state
        due = [p for p in ps if "proj" not in st[p] or st[p]["n"] >= st[p]["next_refresh"]]
        if due:
            self._refresh(due)
        states = [st[p] for p in ps]
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        if self.s.hf_adamw:
            for p, s in zip(ps, states):
                _hf_adamw(group, local(p), local(p.grad), s, lr, wd, self.s.scale)
                s["n"] += 1
            return
        grads = [local(p.grad) for p in ps]
        low = [s["proj"].mT @ g if s["side"] == LEFT else g @ s["proj"] for s, g in zip(states, grads)]
        out = [torch.zeros_like(g) for g in low]
        self._update(group, out, low, states, 1.0, 0.0)  # out = -(Adam direction) in the subspace
        beta, alpha = 1.0 - lr * wd, lr * self.s.scale
        for p, s, o in zip(ps, states, out):
            w = local(p)
            if s["side"] == LEFT:
                w.addmm_(s["proj"], o, beta=beta, alpha=alpha)
            else:
                w.addmm_(o, s["proj"].mT, beta=beta, alpha=alpha)
            s["n"] += 1

    def _reduce_for(self, p: Tensor) -> Callable[[Tensor], Tensor] | None:
        if not is_dtensor(p):
            return None
        group = p.device_mesh.get_group()
        return lambda t: all_reduce_sum(t, group)

    def _seed(self, p: Tensor) -> int:
        n = self.opt.state[p].get("n", 0)
        return (self.s.seed * 1_000_003 + self.index[id(p)] * 7_919 + n) % (2**62)

    def _refresh(self, ps: list[Tensor]) -> None:
        buckets: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in ps:
            g = p.grad
            side = side_for(p.shape, self.s.proj_type)
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
                    self.s.rank,
                    side,
                    self.s.refresh,
                    seeds=[self._seed(p) for p in chunk],
                    oversample=self.s.oversample,
                    power_iters=self.s.power_iters,
                    **({"reduce": reduce} if reduce else {}),
                )
                for p, basis, fine in zip(chunk, bases, ok):
                    self._install(p, side, basis, fine)

    def _install(self, p: Tensor, side: int, basis: Tensor, ok: bool) -> None:
        s = self.opt.state[p]
        w = local(p)
        gap = self.s.update_proj_gap
        if "proj" not in s:
            r = basis.shape[-1]
            shape = (r, p.shape[1]) if side == LEFT else (p.shape[0], r)  # global shape
            if self.s.optimizer == "adamw":  # the others create their state on first update
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
        if self.s.lazy_refresh:
            overlap = float(subspace_overlap(old, basis))
            s["gap"] = min(2 * s["gap"], self.s.lazy_max_gap) if overlap >= self.s.lazy_threshold else gap
        if self.s.moments == "reproject":
            m, v = local(s["exp_avg"]), local(s["exp_avg_sq"])
            rot2 = rot.square()
            if side == RIGHT:
                m.copy_(m.float() @ rot)
                v.copy_(v.float() @ rot2)
            else:
                m.copy_(rot.mT @ m.float())
                v.copy_(rot2.mT @ v.float())
        elif self.s.moments == "reset":
            if self.s.optimizer == "adamw":
                local(s["exp_avg"]).zero_()
                local(s["exp_avg_sq"]).zero_()
                s["step"].zero_()
            else:  # recreated from zero on the next update
                for k in [k for k in s if k not in _GALORE_KEYS]:
                    del s[k]
        s["proj"] = _store(basis, w.dtype, side)
        s["next_refresh"] = s["n"] + s["gap"]
        self.refreshes += 1
