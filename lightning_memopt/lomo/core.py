"""LOMO and AdaLomo: the whole step, fused into backward (plain PyTorch, no Lightning).

Each parameter's post-accumulate-grad hook applies its gradient and frees it at once, so no gradient buffer and (for
LOMO) no optimizer state ever exist. One step is :meth:`FusedStep.step`:

1. **plain** (no global-norm clipping, no fp16): one backward; every hook updates its parameter.
2. **two-pass** (``clip_grad_norm`` set, or an fp16 loss scaler): a first backward with ``retain_graph=True`` in
   *measure* mode only accumulates the squared gradient norm (all-reduced over FSDP2 ranks), then the second backward
   updates with the clip coefficient. Costs about one more backward; the activations are kept alive between the two
   passes anyway. In fp16 the measure pass also finds overflows (a non-finite norm): the step is then skipped with
   the weights untouched and the loss scale lowered. Updates applied inside backward cannot be undone, so fp16 always
   takes the measure pass.

Update rules (``rule``):

* ``"sgd"`` (LOMO, arXiv 2306.09782): ``p <- p * (1 - lr * wd) - lr * g``. Without momentum, decoupled weight decay
  equals torch SGD's coupled ``weight_decay``; it is computed as ``p - lr * (g + wd * p)`` so the weight is rounded
  once (bf16).
* ``"adalomo"`` (arXiv 2310.10195, after lomo-optim's ``AdaLomo``): Adafactor-style factored second moment (row and
  column means of ``g^2 + eps[0]``), ``beta2_t = 1 - t^decay_rate``, update ``g / sqrt(v)`` scaled down to RMS
  ``<= clip_threshold`` (per-tensor update clipping), relative step ``lr_t = lr * max(eps[1], RMS(p))``, decoupled
  weight decay ``p <- p * (1 - lr_t * wd)``. No momentum.

Cheaper clipping: ``clip_grad_value`` (clamp each gradient element; one pass) and AdaLomo's per-tensor update
clipping. Under FSDP2 each hook sees the reduced, sharded DTensor gradient and updates the local shard; AdaLomo's
column statistics and RMS values are all-reduced over the shard group, so the result does not depend on world size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_memopt.core.fsdp import is_dtensor, local
from lightning_memopt.core.fused_backward import FusedBackward

BackwardFn = Callable[[Tensor, bool], None]


@dataclass
class DynamicLossScaler:
    """fp16 loss scaler: lower the scale on overflow (the step is skipped), raise it after ``growth_interval`` good steps.

    Example::

        scaler = DynamicLossScaler(init_scale=2.0**16)
        scaler.update(overflow=True)   # scale -> 2**15
    """

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 1000
    min_scale: float = 1.0
    scale: float = field(init=False)
    good_steps: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.scale = float(self.init_scale)

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale *= self.growth_factor
                self.good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])


@dataclass
class StepInfo:
    """What one step did: ``skipped`` on fp16 overflow; ``grad_norm`` (a 0-d tensor) when a measure pass ran."""

    skipped: bool = False
    grad_norm: Tensor | None = None
    loss_scale: float | None = None


def _shard_group(p: Tensor) -> dist.ProcessGroup | None:
    """The process group of an FSDP2 (dim-0 sharded) DTensor parameter, None for a plain tensor."""
    if not is_dtensor(p) or p.device_mesh.size() == 1:
        return None
    if p.device_mesh.ndim != 1:
        raise NotImplementedError("LOMO/AdaLomo support 1-D FSDP2 meshes (fully_shard), not HSDP/TP meshes.")
    return p.device_mesh.get_group()


def _all_reduce(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


class FusedStep:
    """LOMO / AdaLomo updates applied inside backward, with clipping and fp16 loss scaling.

    Args:
        param_groups: optimizer-style groups (dicts with ``params``, ``lr``, ``weight_decay``); ``lr`` is read at every
            hook, so LR schedulers that edit the groups take effect.
        state: per-parameter state mapping (an optimizer's ``state``; AdaLomo's moments and step live there).
        rule: ``"sgd"`` (LOMO) or ``"adalomo"``.
        clip_grad_norm: exact global-norm clipping by two backward passes (None: off).
        clip_grad_value: clamp each gradient element to ``[-v, v]`` (None: off).
        scaler: a :class:`DynamicLossScaler` for fp16 (None: no scaling).
        clip_threshold, eps, decay_rate: AdaLomo's update clipping RMS, ``(eps_sq, eps_rms_p)`` and beta2 exponent.
        backward: ``backward(loss, retain_graph)``; defaults to ``loss.backward(retain_graph=...)``.

    Example::

        opt_groups = [{"params": list(model.parameters()), "lr": 1e-2, "weight_decay": 0.0}]
        fs = FusedStep(opt_groups, state={}, rule="sgd", clip_grad_norm=1.0)
        info = fs.step(model(x).loss)   # weights updated, no .grad left
    """

    def __init__(
        self,
        param_groups: list[dict[str, Any]],
        state: MutableMapping[Tensor, dict[str, Any]],
        rule: str = "sgd",
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        scaler: DynamicLossScaler | None = None,
        clip_threshold: float = 1.0,
        eps: tuple[float, float] = (1e-30, 1e-3),
        decay_rate: float = -0.8,
        backward: BackwardFn | None = None,
    ) -> None:
        if rule not in ("sgd", "adalomo"):
            raise ValueError(f"rule must be 'sgd' or 'adalomo', got {rule!r}.")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be positive or None, got {clip_grad_norm}.")
        if clip_grad_value is not None and clip_grad_value <= 0:
            raise ValueError(f"clip_grad_value must be positive or None, got {clip_grad_value}.")
        self.param_groups = param_groups
        self.state = state
        self.rule = rule
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.scaler = scaler
        self.clip_threshold = clip_threshold
        self.eps = eps
        self.decay_rate = decay_rate
        self.backward = backward or (lambda loss, retain: loss.backward(retain_graph=retain))
        # Per-parameter lookups done once, so each hook is O(1).
        self._group: dict[Tensor, dict[str, Any]] = {}
        self._pg: dict[Tensor, dist.ProcessGroup | None] = {}
        self._dtensors: set[Tensor] = set()  # FSDP2 params: hooks work on their local shards
        params: list[Tensor] = []
        for g in param_groups:
            for p in g["params"]:
                if p.requires_grad and p not in self._group:
                    self._group[p] = g
                    self._pg[p] = _shard_group(p)
                    if is_dtensor(p):
                        self._dtensors.add(p)
                    if rule == "adalomo" and self._pg[p] is not None and p.ndim > 2:
                        raise NotImplementedError("AdaLomo under FSDP2 supports parameters of at most 2 dims.")
                    params.append(p)
        self._sumsq: Tensor | None = None
        self._coef: Tensor | None = None  # clip coefficient / loss scale, for the update pass
        self._clip_coef: Tensor | None = None
        self._inv_scale: float = 1.0
        self._value_bound: float | None = None
        update = self._sgd if rule == "sgd" else self._adalomo
        self.fused = FusedBackward(params, update=update, measure=self._measure)

    @property
    def params(self) -> list[Tensor]:
        return self.fused.params

    def remove(self) -> None:
        """Remove the hooks (backward then leaves gradients in ``.grad`` as usual)."""
        self.fused.remove()

    # ---- the step ----------------------------------------------------------------------------------------------
    @torch.enable_grad()  # optimizers step under no_grad; scaling the loss must stay in the graph
    def step(self, loss: Tensor) -> StepInfo:
        """Backward through ``loss`` and update every parameter inside it; no ``.grad`` survives."""
        info = StepInfo()
        scale = self.scaler.scale if self.scaler is not None else 1.0
        scaled = loss * scale if self.scaler is not None else loss
        self._inv_scale = 1.0 / scale
        self._value_bound = None if self.clip_grad_value is None else self.clip_grad_value * scale
        self._coef = self._clip_coef = None
        if self.clip_grad_norm is not None or self.scaler is not None:
            norm = self._measure_pass(scaled) * self._inv_scale
            info.grad_norm = norm
            if self.scaler is not None:
                info.loss_scale = scale
                if not bool(torch.isfinite(norm)):  # the only host sync, and only in this path
                    self.scaler.update(overflow=True)
                    info.skipped = True
                    return info
            if self.clip_grad_norm is not None:
                self._clip_coef = (self.clip_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            if self._clip_coef is not None or self.scaler is not None:
                coef = self._clip_coef if self._clip_coef is not None else torch.ones_like(norm)
                self._coef = coef * self._inv_scale
        self.fused.mode = "update"
        self.backward(scaled, False)
        if self.scaler is not None:
            self.scaler.update(overflow=False)
        return info

    def _measure_pass(self, scaled: Tensor) -> Tensor:
        device = local(self.params[0]).device if self.params else scaled.device
        self._sumsq = torch.zeros((), dtype=torch.float32, device=device)
        self.fused.mode = "measure"
        try:
            self.backward(scaled, True)
        finally:
            self.fused.mode = "update"
        groups = {pg for pg in self._pg.values() if pg is not None}
        for pg in groups:  # FSDP2: every parameter is sharded over the same group in practice
            _all_reduce(self._sumsq, pg)
        return self._sumsq.sqrt()

    # ---- hooks -------------------------------------------------------------------------------------------------
    def _local(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """(weight, gradient) as plain tensors: the local shards under FSDP2."""
        if p in self._dtensors:
            return p.to_local(), p.grad.to_local()
        return p, p.grad

    def _measure(self, p: Tensor) -> None:
        g = self._local(p)[1]
        self._sumsq.add_(torch.linalg.vector_norm(g, 2, dtype=torch.float32).square())

    def _sgd(self, p: Tensor) -> None:
        group = self._group[p]
        lr, wd = group["lr"], group["weight_decay"]
        d, g = self._local(p)
        if self._value_bound is not None:
            g.clamp_(-self._value_bound, self._value_bound)  # bound is in scaled units
        if wd:  # p - lr * (g + wd * p), built in the (discarded) grad so that the weight is rounded once
            if self._coef is not None:
                g.mul_(self._coef)
            d.add_(g.add_(d, alpha=wd), alpha=-lr)
        elif self._coef is None:
            d.add_(g, alpha=-lr)  # the plain path: one kernel per parameter
        else:
            d.addcmul_(g, self._coef, value=-lr)  # one kernel: the 0-d coefficient never leaves the device

    def _adalomo(self, p: Tensor) -> None:
        group = self._group[p]
        lr, wd = group["lr"], group["weight_decay"]
        pg = self._pg[p]
        d, g = self._local(p)
        if self._inv_scale != 1.0 or self.clip_grad_value is not None or self._clip_coef is not None:
            g = g.float()  # fp32 params: the grad itself, modified in place (it is freed after the hook)
            if self._inv_scale != 1.0:
                g.mul_(self._inv_scale)
            if self.clip_grad_value is not None:
                g.clamp_(-self.clip_grad_value, self.clip_grad_value)
            if self._clip_coef is not None:
                g.mul_(self._clip_coef)
        st = self.state.get(p)
        if not st:
            st = self.state[p] = new_adalomo_state(p)
        t = st["step"] + 1
        st["step"] = t
        beta = 1.0 - math.pow(t, self.decay_rate)
        eps0 = self.eps[0]
        f32 = torch.float32
        # Each launch counts: at 1.1B a hook runs ~200 times per backward, so the step is partly host-bound.
        if p.ndim >= 2:
            rows_total, cols = p.shape[-2], p.shape[-1]
            row, col = local(st["row"]), st["col"]
            # EMA of the means of g^2 + eps0 without materialising g^2 (||g||^2 / n + eps0)
            rn = torch.linalg.vector_norm(g, 2, dim=-1, dtype=f32)
            cn = torch.linalg.vector_norm(g, 2, dim=-2, dtype=f32)
            row.mul_(beta).addcmul_(rn, rn, value=(1.0 - beta) / cols).add_((1.0 - beta) * eps0)
            if pg is not None:  # rows are sharded: column sums and the row-state mean need every shard
                packed = torch.cat([cn.square_().reshape(-1), row.sum(-1).reshape(-1)])
                _all_reduce(packed, pg)
                col_sq = packed[: cn.numel()].view_as(cn)
                row_avg = (packed[cn.numel() :] / rows_total).view(row.shape[:-1] + (1,))
                col.mul_(beta).add_(col_sq, alpha=(1.0 - beta) / rows_total).add_((1.0 - beta) * eps0)
            else:
                row_avg = row.mean(dim=-1, keepdim=True)
                col.mul_(beta).addcmul_(cn, cn, value=(1.0 - beta) / rows_total).add_((1.0 - beta) * eps0)
            fr = torch.rsqrt(row / row_avg).unsqueeze_(-1)
            # u in fp32: in place when g is fp32 already, else one new fp32 tensor (no separate upcast pass)
            u = (g.mul_(fr) if g.dtype == f32 else torch.mul(g, fr)).mul_(col.rsqrt().unsqueeze_(-2))
        else:
            sq = local(st["sq"])
            sq.mul_(beta).addcmul_(g, g, value=1.0 - beta).add_(eps0 * (1.0 - beta))
            u = g.mul_(sq.rsqrt()) if g.dtype == f32 else torch.mul(g, sq.rsqrt())
        norms = torch.stack([torch.linalg.vector_norm(u, 2, dtype=f32), torch.linalg.vector_norm(d, 2, dtype=f32)])
        if pg is not None:
            norms = _all_reduce(norms.square_(), pg).sqrt_()
        rms = norms.mul_(1.0 / math.sqrt(p.numel()))
        # lr_t = lr·max(rms(θ), eps1); the update is u / max(1, rms(u) / threshold): one scalar, one pass over θ
        lr_t = rms[1].clamp(min=self.eps[1]).mul_(lr)
        if wd:
            d.mul_(1.0 - lr_t * wd)
        d.addcmul_(u, lr_t.div_((rms[0] / self.clip_threshold).clamp_(min=1.0)), value=-1.0)


def new_adalomo_state(p: Tensor) -> dict[str, Any]:
    """Zero AdaLomo state for ``p``: row/column moments for matrices, a full moment for vectors, all fp32.

    Under FSDP2 the row and full moments are DTensors sharded like ``p`` (the column moment is the same on every rank),
    so distributed checkpoints gather and re-shard them like the weights.
    """
    if p.ndim >= 2:
        row_shape, col_shape = tuple(p.shape[:-1]), tuple(p.shape[:-2]) + tuple(p.shape[-1:])
        col = torch.zeros(col_shape, dtype=torch.float32, device=local(p).device)
        if is_dtensor(p):
            from torch.distributed.tensor import DTensor

            lp = local(p)
            row_local = torch.zeros(lp.shape[:-1], dtype=torch.float32, device=lp.device)
            stride = torch.empty(row_shape, device="meta").stride()
            row = DTensor.from_local(
                row_local, p.device_mesh, p.placements, run_check=False, shape=row_shape, stride=stride
            )
        else:
            row = torch.zeros(row_shape, dtype=torch.float32, device=p.device)
        return {"step": 0, "row": row, "col": col}
    with torch.no_grad():
        sq = torch.zeros_like(p, dtype=torch.float32)
    return {"step": 0, "sq": sq}


def init_adalomo_state(params: Iterable[Tensor], state: MutableMapping[Tensor, dict[str, Any]]) -> None:
    """Create missing AdaLomo state eagerly (checkpoint loaders under FSDP2 need it as a template)."""
    for p in params:
        if p.requires_grad and not state.get(p):
            state[p] = new_adalomo_state(p)


def sgd_reference_groups(params: Iterable[Tensor], lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """A single optimizer-style group (for using :class:`FusedStep` without an optimizer)."""
    return [{"params": [p for p in params if p.requires_grad], "lr": lr, "weight_decay": weight_decay}]
