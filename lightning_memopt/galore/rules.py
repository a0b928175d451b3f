"""The update rules GaLore runs in the subspace (and on the other parameters): one entry of :data:`RULES` each.

A rule is ``rule(group, params, grads, states, lr, weight_decay, ok)``: it updates ``params`` in place from ``grads``
with its state in ``states`` (one dict per parameter, created on first use). ``ok`` is the step's non-finite flag
(a 0-d bool on the device, or None): where it is false the rule leaves parameters and state bit-identical, on the
device where it can (fused Adam's ``found_inf``, masked writes), with a host check otherwise (bitsandbytes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.optim.adam import adam

from lightning_memopt.core.axpby import axpby_
from lightning_memopt.core.fsdp import local
from lightning_memopt.galore.projector import LEFT


class Rule(Protocol):
    def __call__(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        lr: float,
        weight_decay: float,
        ok: Tensor | None = None,
    ) -> None: ...


def _skipped(ok: Tensor | None) -> bool:
    """Host check of the flag, for rules that cannot mask on the device (a sync)."""
    return ok is not None and not bool(ok)


def _fused_ok(tensors: Iterable[Tensor]) -> bool:
    return all(
        t.device.type in ("cuda", "cpu") and t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in tensors
    )


def _commit(dst: Tensor, new: Tensor, ok: Tensor | None) -> None:
    dst.copy_(new if ok is None else torch.where(ok, new, dst))


def adamw(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    lr: float,
    weight_decay: float,
    ok: Tensor | None = None,
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
    fused = _fused_ok(params + grads)
    if not fused and _skipped(ok):
        return
    adam(
        params,
        grads,
        [local(s["exp_avg"]) for s in states],
        [local(s["exp_avg_sq"]) for s in states],
        [],
        steps,
        fused=fused or None,
        # found_inf: the fused kernel leaves params, moments and step counts as they were
        found_inf=None if ok is None or not fused else (~ok).to(device=params[0].device, dtype=torch.float32),
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=group["eps"],
        maximize=False,
        decoupled_weight_decay=True,
    )


def adamw8bit(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    lr: float,
    weight_decay: float,
    ok: Tensor | None = None,
) -> None:
    """bitsandbytes' blockwise 8-bit AdamW kernel (the optional ``bitsandbytes`` extra), state in ``states``."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:  # pragma: no cover - checked in GaLoreSettings
        raise ImportError("optimizer='adamw8bit' needs bitsandbytes: pip install 'lightning_memopt[bnb]'") from None
    if _skipped(ok):
        return
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


def adafactor(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    lr: float,
    weight_decay: float,
    ok: Tensor | None = None,
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
            new_row = (row * beta2t).add_(g2.mean(dim=-1), alpha=1.0 - beta2t)
            new_col = (col * beta2t).add_(g2.mean(dim=-2), alpha=1.0 - beta2t)
            _commit(row, new_row, ok)
            _commit(col, new_col, ok)
            r = (new_row / new_row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            u = g32.mul_(r).mul_(new_col.rsqrt().unsqueeze(-2))
        else:
            v = s["exp_avg_sq"]
            new_v = (v * beta2t).add_(g2, alpha=1.0 - beta2t)
            _commit(v, new_v, ok)
            u = g32.mul_(new_v.rsqrt())
        u.div_((u.square().mean().sqrt() / 1.0).clamp_(min=1.0))
        axpby_(p, u.to(p.dtype), -lr, 1.0 - lr * weight_decay if weight_decay > 0.0 else 1.0, ok)


def hf_adamw(
    group: dict[str, Any],
    p: Tensor,
    g: Tensor,
    s: dict[str, Any],
    lr: float,
    weight_decay: float,
    scale: float = 1.0,
    ok: Tensor | None = None,
) -> None:
    """galore-torch's (Hugging Face's legacy) AdamW step, op for op, projection included: for parity runs only."""
    if _skipped(ok):
        return
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


RULES: dict[str, Rule] = {"adamw": adamw, "adamw8bit": adamw8bit, "adafactor": adafactor}
