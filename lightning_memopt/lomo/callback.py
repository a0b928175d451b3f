"""LOMO and AdaLomo as Lightning callbacks for an unchanged automatic-optimization LightningModule.

The lifecycle (holder, skip-backward, state, teardown) is :class:`~lightning_memopt.callbacks.method.MethodCallback`'s.
Lightning's closure runs only ``training_step`` (backward is skipped); the holder's step then runs
:meth:`~lightning_memopt.lomo.core.FusedStep.step`, whose backward updates every parameter inside its hook. AdaLomo's
moments live in the holder's ``state``, so checkpoints hold them.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_memopt import _shim
from lightning_memopt.callbacks import _checks
from lightning_memopt.callbacks.method import MethodCallback
from lightning_memopt.core.fsdp import reshard_all
from lightning_memopt.core.zero3 import is_zero3
from lightning_memopt.lomo.core import DynamicLossScaler, FusedStep, LomoSettings, StepInfo, init_adalomo_state


class _Lomo(MethodCallback):
    """Shared Lightning glue of :class:`LOMO` and :class:`AdaLomo` (see their docstrings)."""

    scaler_fix = (
        "use precision='16-true' (the method then runs its own dynamic loss scaler on the fp16 weights) or "
        "precision='bf16-true' / 'bf16-mixed'"
    )
    state_settings = ("rule",)
    strategies = (_checks.SINGLE, _checks.FSDP2, _checks.ZERO3)  # "zero3": DeepSpeed ZeRO-3 (ZeRO3Strategy)

    def __init__(self, settings: LomoSettings, allow_untested: bool, max_consecutive_skips: int) -> None:
        super().__init__(allow_untested, max_consecutive_skips)
        self.config = settings
        self.lr, self.weight_decay = settings.lr, settings.weight_decay
        self.fused: FusedStep | None = None
        self.scaler: DynamicLossScaler | None = None
        self.last: StepInfo = StepInfo()
        self._scaler_state: dict[str, Any] | None = None
        self._zero3 = False

    @property
    def accumulation_fix(self) -> str:  # type: ignore[override]
        return (
            f"{self.name} updates the weights inside backward and keeps no gradients to accumulate: set "
            f"accumulate_grad_batches=1 and raise the batch size instead (or use GaLore, which accumulates)."
        )

    @property
    def clipping_hook_fix(self) -> str:  # type: ignore[override]
        return f"Clip with {self.name}(clip_grad_norm=...) or Trainer(gradient_clip_val=...), applied inside backward."

    @override
    def settings(self) -> dict[str, Any]:
        return asdict(self.config)

    @override
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clipping_from_trainer(trainer)
        if _checks.strategy_kind(trainer) != _checks.ZERO3:
            return
        two_pass = [what for what, on in (
            (f"clip_grad_norm={self.config.clip_grad_norm}", self.config.clip_grad_norm is not None),
            ("precision='16-true' (its loss scaler)", "16" in str(trainer.precision) and "bf16" not in str(trainer.precision)),
        ) if on]
        if two_pass:
            raise MisconfigurationException(
                f"{self.name} under DeepSpeed ZeRO-3 (strategy='zero3') runs one backward per step: {two_pass[0]} needs "
                f"a second backward through the same graph, whose gathered weights DeepSpeed has freed by then. Use "
                f"clip_grad_value (or AdaLomo's per-tensor update clipping) and precision='bf16-true' or '32-true', "
                f"or strategy='fsdp2'."
            )

    def _clipping_from_trainer(self, trainer: pl.Trainer) -> None:
        val = trainer.gradient_clip_val
        if val is None or val <= 0:
            return
        algo = str(trainer.gradient_clip_algorithm or "norm").lower().split(".")[-1]
        attr = "clip_grad_value" if algo == "value" else "clip_grad_norm"
        own = getattr(self.config, attr)
        if own is not None and own != val:
            raise MisconfigurationException(
                f"Trainer(gradient_clip_val={val}, gradient_clip_algorithm={algo!r}) conflicts with "
                f"{self.name}({attr}={own}); set only one of them."
            )
        # for this fit only: teardown puts both back, so a later fit without the Trainer's value does not clip.
        # The gradients never exist after backward, so Lightning must not clip (it would see none).
        self.set_for_fit(self.config, attr, float(val))
        self.set_for_fit(trainer, "gradient_clip_val", None)
        what = (
            "exact global-norm clipping by two backward passes"
            if attr == "clip_grad_norm"
            else "clipping each gradient element by value"
        )
        rank_zero_info(
            f"{self.name}: Trainer(gradient_clip_val={val}) is applied as {self.name}({attr}={val}): "
            f"{what}, inside the fused backward."
        )

    @override
    def install(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _checks.check_no_float64(self.holder.param_groups, self.name, "updates")
        self._init_state()  # FSDP2 checkpoint loading needs the state as a template

    def _init_state(self) -> None:
        if self.config.rule == "adalomo":
            init_adalomo_state((p for g in self.holder.param_groups for p in g["params"]), self.holder.state)

    @override
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any] | None) -> None:
        self._init_state()  # the state object may have been replaced by a checkpoint load
        fp16 = any(p.dtype == torch.float16 for g in self.holder.param_groups for p in g["params"])
        self.scaler = None
        if fp16:
            self.scaler = DynamicLossScaler(
                init_scale=self.config.init_loss_scale, growth_interval=self.config.loss_scale_window
            )
            if state and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        self._zero3 = any(is_zero3(p) for g in self.holder.param_groups for p in g["params"])
        self.fused = FusedStep(
            self.holder.param_groups,
            self.holder.state,
            self.config,
            scaler=self.scaler,
            backward=self._backward,
            weight_decays=self.weight_decays(pl_module),
            guard=self.guard,
            names={id(p): n for n, p in pl_module.named_parameters()},
        )

    @override
    def uninstall(self) -> None:
        # Leave no hooks behind: a later plain backward on this model must not update it.
        if self.fused is not None:
            self.fused.remove()
            self.fused = None

    def _backward(self, loss: torch.Tensor, retain_graph: bool) -> None:
        if retain_graph:  # the measure pass: no update, so no on_before/after_backward hooks for it
            loss.backward(retain_graph=True)
        else:  # the updating pass goes through the strategy, so on_before_backward/on_after_backward still fire
            self.trainer.strategy.backward(loss, self.holder)

    @override
    def step(self, closure: Any) -> Any:
        if closure is None:  # e.g. torch.distributed.checkpoint initialising optimizer state
            return None
        out = closure()  # training_step only (backward is skipped); hooks and Lightning's clipping see no grads
        loss = _shim.closure_loss(closure)
        if loss is None or self.fused is None:
            return out
        self.last = self.fused.step(loss, self.step_index)
        if self._zero3:  # DeepSpeed leaves the first module gathered after backward: the next forward must regather
            reshard_all(self.module)
        if self.last.overflow:  # a non-finite loss was warned about by the guard
            rank_zero_info(
                f"{self.name}: fp16 overflow, step skipped (weights untouched); loss scale lowered to "
                f"{self.scaler.scale if self.scaler else None}."
            )
        return out

    @override
    def log_step(self, pl_module: pl.LightningModule) -> None:
        key = self.name.lower()
        if self.last.grad_norm is not None:
            pl_module.log(f"{key}/grad_norm", self.last.grad_norm.detach().float(), on_step=True, batch_size=1)
        if self.scaler is not None:
            self.log_number(pl_module, f"{key}/loss_scale", float(self.scaler.scale), on_step=True, batch_size=1)

    @override
    def method_state(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler else None}


class LOMO(_Lomo):
    """LOMO: SGD fused into backward; each gradient is applied and freed in its post-accumulate-grad hook.

    No gradient buffers and no optimizer state, so training memory is about the weights plus activations.

    Args:
        lr: learning rate; None keeps the module's (an LR scheduler keeps its shape either way).
        weight_decay: decoupled weight decay of matrices (biases and norm weights get none); None keeps the
            module's groups' values.
        clip_grad_norm: exact global-norm clipping by two backward passes (≈ one more backward per step).
        clip_grad_value: clamp each gradient element to ``[-v, v]`` (no extra pass).
        init_loss_scale: first fp16 loss scale (fp16 weights, ``precision="16-true"``, only).
        loss_scale_window: good steps before the fp16 loss scale doubles.
        allow_untested: warn instead of raising on strategies other than single device and FSDP2.
        max_consecutive_skips: steps in a row with a non-finite loss (each skipped, weights untouched) before the
            fit stops with an error.

    ``Trainer(gradient_clip_val=...)`` is translated into ``clip_grad_norm`` or ``clip_grad_value``. fp16 weights
    take the measure pass every step (an overflow skips the step with the weights untouched).

    Example::

        trainer = Trainer(max_steps=1000, precision="bf16-true", callbacks=[LOMO(lr=1e-2, clip_grad_norm=1.0)])
        trainer.fit(HFCausalLM(model_name_or_path="HuggingFaceTB/SmolLM2-135M"), datamodule)
    """

    name = "LOMO"
    lr_range = (1e-2, 1e-1)

    def __init__(
        self,
        lr: float | None = None,
        weight_decay: float | None = None,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        init_loss_scale: float = 2.0**16,
        loss_scale_window: int = 1000,
        allow_untested: bool = False,
        max_consecutive_skips: int = 10,
    ) -> None:
        settings = LomoSettings(
            "sgd", lr, weight_decay, clip_grad_norm, clip_grad_value,
            init_loss_scale=init_loss_scale, loss_scale_window=loss_scale_window,
        )
        super().__init__(settings, allow_untested, max_consecutive_skips)


class AdaLomo(_Lomo):
    """AdaLomo: Adafactor-style factored second moments and per-tensor update clipping, fused into backward.

    Args:
        lr: learning rate (relative: the step is ``lr * max(eps_scale, RMS(p))``); None keeps the module's.
        weight_decay: decoupled weight decay of matrices (biases and norm weights get none); None keeps the
            module's groups' values.
        clip_grad_norm: exact global-norm clipping by two backward passes (≈ one more backward per step).
        clip_grad_value: clamp each gradient element to ``[-v, v]`` (no extra pass).
        clip_threshold: per-tensor update clipping: the update's RMS is scaled down to at most this.
        eps_sq: added to ``g^2`` in the second-moment estimate.
        eps_scale: floor of the parameter RMS in the relative step.
        decay_rate: ``beta2_t = 1 - t^decay_rate``.
        init_loss_scale, loss_scale_window, allow_untested, max_consecutive_skips: as in :class:`LOMO`.

    The row/column moments live in the replaced optimizer's ``state`` (fp32), so checkpoints hold them.

    Example::

        trainer = Trainer(max_steps=1000, precision="bf16-true", callbacks=[AdaLomo(lr=1e-3)])
        trainer.fit(HFCausalLM(model_name_or_path="HuggingFaceTB/SmolLM2-135M"), datamodule)
    """

    name = "AdaLomo"
    lr_range = (1e-4, 1e-2)
    state_settings = ("rule", "decay_rate")

    def __init__(
        self,
        lr: float | None = None,
        weight_decay: float | None = None,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        clip_threshold: float = 1.0,
        eps_sq: float = 1e-30,
        eps_scale: float = 1e-3,
        decay_rate: float = -0.8,
        init_loss_scale: float = 2.0**16,
        loss_scale_window: int = 1000,
        allow_untested: bool = False,
        max_consecutive_skips: int = 10,
    ) -> None:
        settings = LomoSettings(
            "adalomo", lr, weight_decay, clip_grad_norm, clip_grad_value, clip_threshold, eps_sq, eps_scale,
            decay_rate, init_loss_scale, loss_scale_window,
        )
        super().__init__(settings, allow_untested, max_consecutive_skips)

    @override
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().validate(trainer, pl_module)
        # peft starts lora_B at zero, and AdaLomo's step is relative to the weight's RMS (floored at eps_scale)
        zero = [n for n, p in pl_module.named_parameters() if p.requires_grad and "lora_" in n and not p.any()]
        if zero and self.config.eps_scale < 0.1:
            rank_zero_warn(
                f"AdaLomo: {len(zero)} trainable LoRA weights start at zero (e.g. {zero[0]}), and AdaLomo's step is "
                f"lr * max(eps_scale, RMS(p)) = lr * {self.config.eps_scale:g} for them: they barely move. Train "
                f"LoRA adapters with LOMO or AdamW, or raise eps_scale (e.g. AdaLomo(eps_scale=1.0))."
            )
