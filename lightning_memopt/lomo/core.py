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
  equals torch SGD's coupled ``weight_decay``; it is computed in fp32 and the weight is rounded once (bf16), in one
  pass (:func:`lightning_memopt.core.axpby.axpby_`).
* ``"adalomo"`` (arXiv 2310.10195, after lomo-optim's ``AdaLomo``): Adafactor-style factored second moment (row and
  column means of ``g^2 + eps_sq``), ``beta2_t = 1 - t^decay_rate``, update ``g / sqrt(v)`` scaled down to RMS
  ``<= clip_threshold`` (per-tensor update clipping), relative step ``lr_t = lr * max(eps_scale, RMS(p))``,
  decoupled weight decay ``p <- p * (1 - lr_t * wd)``. No momentum. On CUDA with Triton a tensor's update takes four
  kernel launches (one for a vector) instead of about 30 (:mod:`lightning_memopt.lomo._adalomo_triton`).

A non-finite loss (or, with clipping, gradient norm) is found on the device before backward; every hook's update is
then a no-op there, so the step is skipped with weights and moments bit-identical and no host sync
(:mod:`lightning_memopt.core.nonfinite`). fp16 keeps its host check: the scaler needs the answer at once. Without a
measure pass, a gradient can still be non-finite under a finite loss (a backward kernel's bug), and the hooks see it
one tensor at a time: LOMO leaves out its non-finite elements (SGD is elementwise), AdaLomo leaves out the tensor
(weights and moments; ``||u||²``, which the step computes anyway, is not finite then), each in the kernel that
updates, and :class:`~lightning_memopt.core.nonfinite.TensorFlags` tells the guard which tensors.

Cheaper clipping: ``clip_grad_value`` (clamp each gradient element; one pass) and AdaLomo's per-tensor update
clipping. Under FSDP2 each hook sees the reduced, sharded DTensor gradient and updates the local shard; AdaLomo's
column statistics and RMS values are all-reduced over the shard group, so the result does not depend on world size.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_memopt.core import validate
from lightning_memopt.core._triton import kernels
from lightning_memopt.core.axpby import axpby_
from lightning_memopt.core.fsdp import all_reduce_, is_dtensor, local, shard_group, sharded_zeros
from lightning_memopt.core.fused_backward import FusedBackward
from lightning_memopt.core.nonfinite import SkipGuard, TensorFlags
from lightning_memopt.core.zero3 import average_grad_, full_shape, is_zero3, partition

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
    """What one step did: ``skipped`` on a non-finite loss or an fp16 overflow (``overflow``: a finite loss whose
    scaled gradient was not); ``grad_norm`` (a 0-d tensor) when a measure pass ran."""

    skipped: bool = False
    grad_norm: Tensor | None = None
    loss_scale: float | None = None
    overflow: bool = False


Rule = Literal["sgd", "adalomo"]


@dataclass
class LomoSettings:
    """Everything that defines a LOMO/AdaLomo step, validated here (the callbacks only pass it on).

    ``lr``/``weight_decay``: None keeps the param groups' values (a number overrides them; the weight-decay override
    applies to matrices only, see :func:`lightning_memopt.core.holder.weight_decays`).
    """

    rule: Rule = "sgd"
    lr: float | None = None
    weight_decay: float | None = None
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    clip_threshold: float = 1.0
    eps_sq: float = 1e-30
    eps_scale: float = 1e-3
    decay_rate: float = -0.8
    init_loss_scale: float = 2.0**16
    loss_scale_window: int = 1000

    def __post_init__(self) -> None:
        if self.rule not in _RULES:
            raise ValueError(f"rule must be one of {sorted(_RULES)}, got {self.rule!r}.")
        self.lr = validate.optional_lr(self.lr)
        if self.weight_decay is not None:
            validate.nonnegative(self.weight_decay, "weight_decay")
        validate.optional_positive(self.clip_grad_norm, "clip_grad_norm")
        validate.optional_positive(self.clip_grad_value, "clip_grad_value")
        validate.positive(self.clip_threshold, "clip_threshold")
        validate.positive(self.eps_sq, "eps_sq")
        validate.positive(self.eps_scale, "eps_scale")
        if validate.finite(self.decay_rate, "decay_rate") >= 0:
            raise ValueError(f"decay_rate must be < 0 (beta2_t = 1 - t^decay_rate), got {self.decay_rate}.")
        validate.positive(self.init_loss_scale, "init_loss_scale")
        validate.at_least(self.loss_scale_window, 1, "loss_scale_window")


_RULES = ("sgd", "adalomo")


class FusedStep:
    """LOMO / AdaLomo updates applied inside backward, with clipping, fp16 loss scaling and non-finite skips.

    Args:
        param_groups: optimizer-style groups (dicts with ``params``, ``lr``, ``weight_decay``); ``lr`` is read at every
            hook, so LR schedulers that edit the groups take effect.
        state: per-parameter state mapping (an optimizer's ``state``; AdaLomo's moments and step live there).
        settings: :class:`LomoSettings` (rule, clipping, AdaLomo's constants).
        scaler: a :class:`DynamicLossScaler` for fp16 (None: no scaling).
        backward: ``backward(loss, retain_graph)``; defaults to ``loss.backward(retain_graph=...)``.
        weight_decays: per-parameter weight decay by ``id`` (overrides the groups'), e.g. from
            :func:`lightning_memopt.core.holder.weight_decays`.
        guard: the :class:`~lightning_memopt.core.nonfinite.SkipGuard` counting skipped steps (default: a new one).
        check_nonfinite: False leaves the updates unguarded (only to measure what the guard costs).
        names: parameter names by ``id``, for messages about tensors left out (default: ``param<i>``).

    A non-finite loss makes every hook's update a no-op on the device (no host sync): the weights and moments stay
    bit-identical, and AdaLomo's host-side step counters are put back once the guard learns of the skip.

    Example::

        opt_groups = [{"params": list(model.parameters()), "lr": 1e-2, "weight_decay": 0.0}]
        fs = FusedStep(opt_groups, state={}, settings=LomoSettings(rule="sgd", clip_grad_norm=1.0))
        info = fs.step(model(x).loss)   # weights updated, no .grad left
    """

    def __init__(
        self,
        param_groups: list[dict[str, Any]],
        state: MutableMapping[Tensor, dict[str, Any]],
        settings: LomoSettings | None = None,
        scaler: DynamicLossScaler | None = None,
        backward: BackwardFn | None = None,
        weight_decays: dict[int, float] | None = None,
        guard: SkipGuard | None = None,
        check_nonfinite: bool = True,
        names: dict[int, str] | None = None,
    ) -> None:
        self.settings = s = settings or LomoSettings()
        self.check_nonfinite = check_nonfinite
        self.param_groups = param_groups
        self.state = state
        self.scaler = scaler
        self.guard = guard or SkipGuard("AdaLomo" if s.rule == "adalomo" else "LOMO")
        self.backward = backward or (lambda loss, retain: loss.backward(retain_graph=retain))
        # Per-parameter lookups done once, so each hook is O(1).
        self._group: dict[Tensor, dict[str, Any]] = {}
        self._wd: dict[Tensor, float] = {}
        self._pg: dict[Tensor, dist.ProcessGroup | None] = {}
        self._dtensors: set[Tensor] = set()  # FSDP2 params: hooks work on their local shards
        # DeepSpeed ZeRO-3 params: the hook sees the gathered weight and this rank's whole gradient; it averages the
        # gradient over the data-parallel ranks, computes on whole tensors and writes this rank's partition only
        self._zero3: set[Tensor] = set()
        params: list[Tensor] = []
        for g in param_groups:
            for p in g["params"]:
                if p.requires_grad and p not in self._group:
                    self._group[p] = g
                    if weight_decays is not None:
                        self._wd[p] = weight_decays.get(id(p), 0.0)
                    self._pg[p] = shard_group(p)
                    if is_dtensor(p):
                        self._dtensors.add(p)
                    if is_zero3(p):
                        self._zero3.add(p)
                    if s.rule == "adalomo" and self._pg[p] is not None and p.ndim > 2:
                        raise NotImplementedError("AdaLomo under FSDP2 supports parameters of at most 2 dims.")
                    params.append(p)
        self._sumsq: Tensor | None = None
        self._coef: Tensor | None = None  # clip coefficient x loss-scale inverse, for the update pass
        self._clip_coef: Tensor | None = None
        self._inv_scale: float = 1.0
        self._value_bound: float | None = None
        self._ok: Tensor | None = None  # this step's non-finite flag (device)
        self._counted: list[Tensor] = []  # AdaLomo: parameters whose step counter this step advanced
        self._slot = {p: i for i, p in enumerate(params)}
        self._flags = TensorFlags([(names or {}).get(id(p), f"param{i}") for i, p in enumerate(params)])
        self._fin: TensorFlags | None = None  # this step's per-tensor flags (a plain update pass only)
        update = {"sgd": self._sgd, "adalomo": self._adalomo}[s.rule]
        self.fused = FusedBackward(params, update=update, measure=self._measure)

    @property
    def params(self) -> list[Tensor]:
        return self.fused.params

    def remove(self) -> None:
        """Remove the hooks (backward then leaves gradients in ``.grad`` as usual)."""
        self.fused.remove()

    # ---- the step ----------------------------------------------------------------------------------------------
    @torch.enable_grad()  # optimizers step under no_grad; scaling the loss must stay in the graph
    def step(self, loss: Tensor, step: int = -1) -> StepInfo:
        """Backward through ``loss`` and update every parameter inside it; no ``.grad`` survives.

        ``step`` (the optimizer step's index) only names the step in messages about skips.
        """
        s = self.settings
        info = StepInfo()
        # earlier steps (their loss checks long done on the device): put back counters of skipped ones first
        self.guard.resolve(lazy=True)
        scale = self.scaler.scale if self.scaler is not None else 1.0
        scaled = loss * scale if self.scaler is not None else loss
        self._inv_scale = 1.0 / scale
        self._value_bound = None if s.clip_grad_value is None else s.clip_grad_value * scale
        self._coef = self._clip_coef = self._ok = self._fin = None
        self._counted = []
        if s.clip_grad_norm is not None or self.scaler is not None:
            norm = self._measure_pass(scaled) * self._inv_scale
            info.grad_norm = norm
            if self.scaler is not None:
                info.loss_scale = scale
                # fp16 only: the scaler needs the answer now (one host sync for both)
                flags = torch.stack([torch.isfinite(loss.detach()).all(), torch.isfinite(norm)]).float()
                all_reduce_(flags, op="min")  # one rank's bad loss: every rank skips alike
                loss_ok, norm_ok = (flags > 0).tolist()
                if not loss_ok:  # not the scale's doing: no lower scale helps, and it counts toward the error
                    self.guard.record(True, step)
                    info.skipped = True
                    return info
                # an overflow only counts toward the error once the scale cannot go lower
                self.guard.record(not norm_ok, step, consecutive=scale <= self.scaler.min_scale,
                                  reason=f"fp16 overflow (a non-finite gradient norm) at the lowest loss scale {scale:g}")
                if not norm_ok:
                    self.scaler.update(overflow=True)
                    info.skipped = info.overflow = True
                    return info
            if s.clip_grad_norm is not None:
                self._clip_coef = (s.clip_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            if self._clip_coef is not None or self.scaler is not None:
                coef = self._clip_coef if self._clip_coef is not None else torch.ones_like(norm)
                self._coef = coef * self._inv_scale
        if self.scaler is None and self.check_nonfinite:
            values = (loss,) if info.grad_norm is None else (loss, info.grad_norm)
            self._ok = self.guard.check(*values, step=step, reduce=True)
            if info.grad_norm is None and self.params:  # no measure pass saw the gradient: each hook checks its own
                self._fin = self._flags
                self._fin.begin(local(self.params[0]).device)
        self.fused.mode = "update"
        self.backward(scaled, False)
        if self._counted and self._ok is not None:
            counted = self._counted
            self.guard.on_skip(lambda: self._uncount(counted))
        if self._fin is not None:
            if s.rule == "adalomo":
                params = self.params
                self.guard.attach(self._fin, lambda bad: self._uncount([params[i] for i in bad]),
                                  "those tensors were left as they were (weights and moments)")
            else:
                self.guard.attach(self._fin, None, "their non-finite elements were not applied, the rest were")
        if self.scaler is not None:
            self.scaler.update(overflow=False)
        return info

    def _uncount(self, params: list[Tensor]) -> None:
        for p in params:
            self.state[p]["step"] -= 1

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
            all_reduce_(self._sumsq, pg)
        return self._sumsq.sqrt()

    # ---- hooks -------------------------------------------------------------------------------------------------
    def _local(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """(weight, gradient) as plain tensors: the local shards under FSDP2."""
        if p in self._dtensors:
            return p.to_local(), p.grad.to_local()
        if p in self._zero3:  # gathered now (its module's backward is running): the whole weight
            return p, average_grad_(p)
        return p, p.grad

    @staticmethod
    def _target(p: Tensor, d: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """Where an update ``u`` of the weight ``d`` is written: ``d`` itself, or this rank's ZeRO-3 partition."""
        if not is_zero3(p):
            return d, u
        part, start = partition(p)
        return part, u.reshape(-1).narrow(0, start, part.numel())

    def _measure(self, p: Tensor) -> None:
        g = self._local(p)[1]
        self._sumsq.add_(torch.linalg.vector_norm(g, 2, dtype=torch.float32).square())

    def _decay(self, p: Tensor, group: dict[str, Any]) -> float:
        return self._wd[p] if self._wd else float(group["weight_decay"])

    def _sgd(self, p: Tensor) -> None:
        group = self._group[p]
        lr, wd = float(group["lr"]), self._decay(p, group)
        d, g = self._target(p, *self._local(p))
        # p·(1 − lr·wd) − lr·coef·clamp(g) in one pass, rounded once; a no-op where the step is skipped
        a: float | Tensor = -lr if self._coef is None else self._coef * -lr
        axpby_(d, g, a, 1.0 - lr * wd, self._ok, self._value_bound, self._slot_of(p))

    def _slot_of(self, p: Tensor) -> Tensor | None:
        """``p``'s slot of this step's :class:`TensorFlags`, or None (a measure pass checked the gradient)."""
        return None if self._fin is None else self._fin.slot(self._slot[p])

    def _adalomo(self, p: Tensor) -> None:
        s = self.settings
        group = self._group[p]
        lr, wd = float(group["lr"]), self._decay(p, group)
        pg = self._pg[p]
        d, g = self._local(p)
        st = self.state.get(p)
        if not st:
            st = self.state[p] = new_adalomo_state(p)
        t = st["step"] + 1
        st["step"] = t
        self._counted.append(p)
        beta = 1.0 - math.pow(t, s.decay_rate)
        if pg is None and not is_zero3(p) and self._adalomo_fused(d, g, st, beta, lr, wd, self._slot_of(p)):
            return
        if self._inv_scale != 1.0 or s.clip_grad_value is not None or self._clip_coef is not None:
            g = g.float()  # fp32 params: the grad itself, modified in place (it is freed after the hook)
            if self._inv_scale != 1.0:
                g.mul_(self._inv_scale)
            if s.clip_grad_value is not None:
                g.clamp_(-s.clip_grad_value, s.clip_grad_value)
            if self._clip_coef is not None:
                g.mul_(self._clip_coef)
        eps0 = s.eps_sq
        f32 = torch.float32
        ok = self._ok
        # Each launch counts: at 1.1B a hook runs ~200 times per backward, so the step is partly host-bound.
        if p.ndim >= 2:
            rows_total, cols = p.shape[-2], p.shape[-1]
            row, col = local(st["row"]), st["col"]
            # EMA of the means of g^2 + eps0 without materialising g^2 (||g||^2 / n + eps0)
            rn = torch.linalg.vector_norm(g, 2, dim=-1, dtype=f32)
            cn = torch.linalg.vector_norm(g, 2, dim=-2, dtype=f32)
            new_row = (row * beta).addcmul_(rn, rn, value=(1.0 - beta) / cols).add_((1.0 - beta) * eps0)
            if pg is not None:  # rows are sharded: column sums and the row-state mean need every shard
                packed = torch.cat([cn.square_().reshape(-1), new_row.sum(-1).reshape(-1)])
                all_reduce_(packed, pg)
                col_sq = packed[: cn.numel()].view_as(cn)
                row_avg = (packed[cn.numel() :] / rows_total).view(row.shape[:-1] + (1,))
                new_col = (col * beta).add_(col_sq, alpha=(1.0 - beta) / rows_total).add_((1.0 - beta) * eps0)
            else:
                row_avg = new_row.mean(dim=-1, keepdim=True)
                new_col = (col * beta).addcmul_(cn, cn, value=(1.0 - beta) / rows_total).add_((1.0 - beta) * eps0)
            moments = [(row, new_row), (col, new_col)]
            fr = torch.rsqrt(new_row / row_avg).unsqueeze_(-1)
            # u in fp32: in place when g is fp32 already, else one new fp32 tensor (no separate upcast pass)
            u = (g.mul_(fr) if g.dtype == f32 else torch.mul(g, fr)).mul_(new_col.rsqrt().unsqueeze_(-2))
        else:
            sq = local(st["sq"])
            new_sq = (sq * beta).addcmul_(g, g, value=1.0 - beta).add_(eps0 * (1.0 - beta))
            moments = [(sq, new_sq)]
            u = g.mul_(new_sq.rsqrt()) if g.dtype == f32 else torch.mul(g, new_sq.rsqrt())
        norms = torch.stack([torch.linalg.vector_norm(u, 2, dtype=f32), torch.linalg.vector_norm(d, 2, dtype=f32)])
        if pg is not None:
            norms = all_reduce_(norms.square_(), pg).sqrt_()
        slot = self._slot_of(p)
        if slot is not None:  # a gradient that is not finite makes ||u|| so (the same on every shard): skip the tensor
            fin = torch.isfinite(norms[0])
            slot.mul_(fin)
            ok = fin if ok is None else ok & fin
        for dst, new in moments:  # small vectors: the moments keep their values on a skipped step
            _commit(dst, new, ok)
        rms = norms.mul_(1.0 / math.sqrt(p.numel()))
        # lr_t = lr·max(rms(θ), eps1); the update is u / max(1, rms(u) / threshold): one scalar, one pass over θ
        lr_t = rms[1].clamp(min=s.eps_scale).mul_(lr)
        step_size = lr_t / (rms[0] / s.clip_threshold).clamp_(min=1.0)
        d, u = self._target(p, d, u)
        axpby_(d, u, -step_size, (1.0 - lr_t * wd) if wd else 1.0, ok)

    def _adalomo_fused(
        self, d: Tensor, g: Tensor, st: dict[str, Any], beta: float, lr: float, wd: float, finite: Tensor | None
    ) -> bool:
        """AdaLomo's step for ``d`` by the Triton kernels (4 launches for a matrix, 1 for a vector, against ~30);
        False where they do not apply (CPU, no Triton, ``MEMOPT_ADALOMO=torch``, sharded rows, other shapes)."""
        kern = _adalomo_kernels(d)
        if kern is None or d.shape != g.shape or not (d.is_contiguous() and g.is_contiguous()):
            return False
        s = self.settings
        kw = dict(beta=beta, eps0=s.eps_sq, lr=lr, wd=wd, eps_scale=s.eps_scale, clip_threshold=s.clip_threshold,
                  ok=self._ok, gscale=self._inv_scale, clamp=s.clip_grad_value, coef=self._clip_coef,
                  finite=finite)
        if d.ndim == 2 and d.numel():
            state = local(st["row"]), st["col"]
            fn = kern.adalomo_matrix_
        elif d.ndim == 1 and 0 < d.numel() <= kern.VEC_MAX:
            state = (local(st["sq"]),)
            fn = kern.adalomo_vector_
        else:
            return False
        if not all(m.is_contiguous() and m.dtype == torch.float32 for m in state):
            return False
        try:
            fn(d, g, *state, **kw)
        except Exception as err:  # noqa: BLE001 - a compile failure on this Triton/GPU: the torch version computes it
            _ADALOMO_KERNELS["failed"] = True  # nothing but scratch was written (see _adalomo_triton)
            warnings.warn(f"AdaLomo's Triton kernels failed ({type(err).__name__}: {str(err).splitlines()[0]}); "
                          f"running the torch version from now on.", stacklevel=2)
            return False
        return True


_ADALOMO_KERNELS: dict[str, bool] = {"failed": False}


def _adalomo_kernels(d: Tensor):
    """The Triton AdaLomo kernels for ``d``'s device, or None (``MEMOPT_ADALOMO=torch`` forces the torch version)."""
    if _ADALOMO_KERNELS["failed"] or os.environ.get("MEMOPT_ADALOMO", "auto") == "torch":
        return None
    if d.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    return kernels("lightning_memopt.lomo._adalomo_triton")


def _commit(dst: Tensor, new: Tensor, ok: Tensor | None) -> None:
    """``dst ← new``, or keep ``dst`` where the step is skipped (``ok`` false on the device)."""
    dst.copy_(new if ok is None else torch.where(ok, new, dst))


def new_adalomo_state(p: Tensor) -> dict[str, Any]:
    """Zero AdaLomo state for ``p``: row/column moments for matrices, a full moment for vectors, all fp32.

    Under FSDP2 the row and full moments are DTensors sharded like ``p`` (the column moment is the same on every rank),
    so distributed checkpoints gather and re-shard them like the weights.
    """
    if is_zero3(p):  # the hook computes on the whole (gathered) tensor: whole, replicated moments
        shape = full_shape(p)
        dev = p.ds_tensor.device
        if len(shape) >= 2:
            return {"step": 0, "row": torch.zeros(shape[:-1], dtype=torch.float32, device=dev),
                    "col": torch.zeros(shape[:-2] + shape[-1:], dtype=torch.float32, device=dev)}
        return {"step": 0, "sq": torch.zeros(shape, dtype=torch.float32, device=dev)}
    if p.ndim >= 2:
        col_shape = tuple(p.shape[:-2]) + tuple(p.shape[-1:])
        col = torch.zeros(col_shape, dtype=torch.float32, device=local(p).device)
        return {"step": 0, "row": sharded_zeros(p, tuple(p.shape[:-1]), torch.float32), "col": col}
    return {"step": 0, "sq": sharded_zeros(p, tuple(p.shape), torch.float32)}


def init_adalomo_state(params: Iterable[Tensor], state: MutableMapping[Tensor, dict[str, Any]]) -> None:
    """Create missing AdaLomo state eagerly (checkpoint loaders under FSDP2 need it as a template)."""
    for p in params:
        if p.requires_grad and not state.get(p):
            state[p] = new_adalomo_state(p)
