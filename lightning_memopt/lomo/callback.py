"""LOMO and AdaLomo as Lightning callbacks for an unchanged automatic-optimization LightningModule.

The module's optimizer is replaced by a :class:`~lightning_memopt.core.holder.HolderOptimizer` (it keeps
``param_groups`` for LR schedulers and ``LearningRateMonitor``, and AdaLomo's moments in its ``state`` so checkpoints
hold them). Lightning's closure runs only ``training_step`` (backward is skipped through the shim); the holder's step
then runs :meth:`~lightning_memopt.lomo.core.FusedStep.step`, whose backward updates every parameter inside its hook.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_memopt import _shim
from lightning_memopt.callbacks import _checks
from lightning_memopt.core.holder import HolderOptimizer, set_base_lr, swap_in_holder
from lightning_memopt.lomo.core import DynamicLossScaler, FusedStep, StepInfo, init_adalomo_state


class _FusedBackwardCallback(Callback):
    """Shared Lightning glue of :class:`LOMO` and :class:`AdaLomo` (see their docstrings)."""

    _rule = "sgd"
    _name = "LOMO"

    def __init__(
        self,
        lr: float | None = None,
        weight_decay: float | None = None,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        init_loss_scale: float = 2.0**16,
        loss_scale_window: int = 1000,
        allow_untested: bool = False,
    ) -> None:
        self.lr = lr
        self.weight_decay = weight_decay
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.init_loss_scale = init_loss_scale
        self.loss_scale_window = loss_scale_window
        self.allow_untested = allow_untested
        self.fused: FusedStep | None = None
        self.scaler: DynamicLossScaler | None = None
        self.holder: HolderOptimizer | None = None
        self.last: StepInfo = StepInfo()
        self.skipped_steps = 0
        self._restored: dict[str, Any] | None = None
        self._pl_module: pl.LightningModule | None = None
        self._trainer: pl.Trainer | None = None

    def _rule_kwargs(self) -> dict[str, Any]:
        return {}

    def _init_state(self) -> None:
        """Create the method's optimizer state eagerly (FSDP2 checkpoint loading needs a template)."""

    # ---- validation --------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = self._name
        _checks.check_automatic_optimization(pl_module, name)
        _checks.check_strategy(trainer, name, (_checks.SINGLE, _checks.FSDP2), self.allow_untested)
        _checks.check_no_grad_scaler(
            trainer,
            name,
            fix=f"use precision='16-true' ({name} then runs its own dynamic loss scaler on the fp16 weights) or "
            f"precision='bf16-true' / 'bf16-mixed'",
        )
        _checks.check_no_accumulation(
            trainer,
            name,
            fix=f"{name} updates the weights inside backward and keeps no gradients to accumulate: set "
            f"accumulate_grad_batches=1 and raise the batch size instead (or use GaLore, which accumulates).",
        )
        self._translate_lightning_clipping(trainer)

    def _translate_lightning_clipping(self, trainer: pl.Trainer) -> None:
        val = trainer.gradient_clip_val
        if val is None or val <= 0:
            return
        algo = str(trainer.gradient_clip_algorithm or "norm").lower().split(".")[-1]
        attr = "clip_grad_value" if algo == "value" else "clip_grad_norm"
        own = getattr(self, attr)
        if own is not None and own != val:
            raise MisconfigurationException(
                f"Trainer(gradient_clip_val={val}, gradient_clip_algorithm={algo!r}) conflicts with "
                f"{self._name}({attr}={own}); set only one of them."
            )
        setattr(self, attr, float(val))
        # The gradients never exist after backward, so Lightning must not clip (it would see none).
        trainer.gradient_clip_val = None
        what = (
            "exact global-norm clipping by two backward passes"
            if attr == "clip_grad_norm"
            else "clipping each gradient element by value"
        )
        rank_zero_info(
            f"{self._name}: Trainer(gradient_clip_val={val}) is applied as {self._name}({attr}={val}): "
            f"{what}, inside the fused backward."
        )

    # ---- install -----------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.holder = swap_in_holder(trainer, self._step_fn)
        if self.lr is not None:
            set_base_lr(trainer, self.holder, self.lr)
        if self.weight_decay is not None:
            for g in self.holder.param_groups:
                # Matrices only: biases and norm weights keep no decay (HFCausalLM's convention).
                if all(p.ndim >= 2 for p in g["params"]):
                    g["weight_decay"] = self.weight_decay
        self._init_state()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in on_fit_start: under FSDP, callback and optimizer state are restored after on_fit_start.
        assert self.holder is not None
        if trainer.strategy.optimizers[0] is not self.holder:  # a strategy rebuilt its optimizers
            self.holder = swap_in_holder(trainer, self._step_fn)
        self._init_state()  # the state object may have been replaced by a checkpoint load
        fp16 = any(p.dtype == torch.float16 for g in self.holder.param_groups for p in g["params"])
        self.scaler = None
        if fp16:
            self.scaler = DynamicLossScaler(init_scale=self.init_loss_scale, growth_interval=self.loss_scale_window)
            if self._restored and self._restored.get("scaler"):
                self.scaler.load_state_dict(self._restored["scaler"])
        if self._restored:
            self.skipped_steps = int(self._restored.get("skipped_steps", 0))
        self.fused = FusedStep(
            self.holder.param_groups,
            self.holder.state,
            rule=self._rule,
            clip_grad_norm=self.clip_grad_norm,
            clip_grad_value=self.clip_grad_value,
            scaler=self.scaler,
            backward=self._backward,
            **self._rule_kwargs(),
        )
        self._trainer, self._pl_module = trainer, pl_module
        _shim.set_skip_backward(trainer, True)

    def _backward(self, loss: torch.Tensor, retain_graph: bool) -> None:
        if retain_graph:  # the measure pass: no update, so no on_before/after_backward hooks for it
            loss.backward(retain_graph=True)
        else:  # the updating pass goes through the strategy, so on_before_backward/on_after_backward still fire
            assert self._trainer is not None
            self._trainer.strategy.backward(loss, self.holder)

    def _step_fn(self, closure: Any) -> Any:
        if closure is None:  # e.g. torch.distributed.checkpoint initialising optimizer state
            return None
        out = closure()  # training_step only (backward is skipped); hooks and Lightning's clipping see no grads
        loss = _shim.closure_loss(closure)
        if loss is None or self.fused is None:
            return out
        self.last = self.fused.step(loss)
        if self.last.skipped:
            self.skipped_steps += 1
            rank_zero_info(
                f"{self._name}: fp16 overflow, step skipped (weights untouched); loss scale lowered to "
                f"{self.scaler.scale if self.scaler else None}."
            )
        return out

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.last.grad_norm is not None:
            pl_module.log(
                f"{self._name.lower()}/grad_norm", self.last.grad_norm.detach().float(), on_step=True, batch_size=1
            )
        if self.scaler is not None:
            pl_module.log(f"{self._name.lower()}/loss_scale", float(self.scaler.scale), on_step=True, batch_size=1)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Leave no hooks behind: a later plain backward on this model must not update it.
        if self.fused is not None:
            self.fused.remove()
            self.fused = None
        _shim.set_skip_backward(trainer, False)

    # ---- state -------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler else None, "skipped_steps": self.skipped_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)
        if self.scaler is not None and state_dict.get("scaler"):
            self.scaler.load_state_dict(state_dict["scaler"])


class LOMO(_FusedBackwardCallback):
    """LOMO: SGD fused into backward; each gradient is applied and freed in its post-accumulate-grad hook.

    No gradient buffers and no optimizer state, so training memory is about the weights plus activations.

    Args:
        lr: learning rate; None keeps the module's (an LR scheduler keeps its shape either way).
        weight_decay: decoupled weight decay for groups of matrices; None keeps the module's groups' values.
        clip_grad_norm: exact global-norm clipping by two backward passes (≈ one more backward per step).
        clip_grad_value: clamp each gradient element to ``[-v, v]`` (no extra pass).
        init_loss_scale: first fp16 loss scale (fp16 weights, ``precision="16-true"``, only).
        loss_scale_window: good steps before the fp16 loss scale doubles.
        allow_untested: warn instead of raising on strategies other than single device and FSDP2.

    ``Trainer(gradient_clip_val=...)`` is translated into ``clip_grad_norm`` or ``clip_grad_value``. fp16 weights
    take the measure pass every step (an overflow skips the step with the weights untouched).

    Example::

        trainer = Trainer(max_steps=1000, precision="bf16-true", callbacks=[LOMO(lr=1e-2, clip_grad_norm=1.0)])
        trainer.fit(HFCausalLM(model_name_or_path="HuggingFaceTB/SmolLM2-135M"), datamodule)
    """

    _rule = "sgd"
    _name = "LOMO"


class AdaLomo(_FusedBackwardCallback):
    """AdaLomo: Adafactor-style factored second moments and per-tensor update clipping, fused into backward.

    Args:
        lr: learning rate (relative: the step is ``lr * max(eps[1], RMS(p))``); None keeps the module's.
        weight_decay: decoupled weight decay for groups of matrices; None keeps the module's groups' values.
        clip_grad_norm: exact global-norm clipping by two backward passes (≈ one more backward per step).
        clip_grad_value: clamp each gradient element to ``[-v, v]`` (no extra pass).
        clip_threshold: per-tensor update clipping: the update's RMS is scaled down to at most this.
        eps_sq: added to ``g^2`` in the second-moment estimate.
        eps_scale: floor of the parameter RMS in the relative step.
        decay_rate: ``beta2_t = 1 - t^decay_rate``.
        init_loss_scale, loss_scale_window, allow_untested: as in :class:`LOMO`.

    The row/column moments live in the replaced optimizer's ``state`` (fp32), so checkpoints hold them.

    Example::

        trainer = Trainer(max_steps=1000, precision="bf16-true", callbacks=[AdaLomo(lr=1e-3)])
        trainer.fit(HFCausalLM(model_name_or_path="HuggingFaceTB/SmolLM2-135M"), datamodule)
    """

    _rule = "adalomo"
    _name = "AdaLomo"

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
    ) -> None:
        super().__init__(
            lr, weight_decay, clip_grad_norm, clip_grad_value, init_loss_scale, loss_scale_window, allow_untested
        )
        self.clip_threshold = clip_threshold
        self.eps_sq = eps_sq
        self.eps_scale = eps_scale
        self.decay_rate = decay_rate

    def _init_state(self) -> None:
        assert self.holder is not None
        init_adalomo_state((p for g in self.holder.param_groups for p in g["params"]), self.holder.state)

    def _rule_kwargs(self) -> dict[str, Any]:
        return {
            "clip_threshold": self.clip_threshold,
            "eps": (self.eps_sq, self.eps_scale),
            "decay_rate": self.decay_rate,
        }
