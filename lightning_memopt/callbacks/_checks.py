"""Early validation shared by the method callbacks: every refusal names the fix."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_memopt import _shim

SINGLE, DDP, FSDP2, FSDP1, DEEPSPEED, ZERO3, OTHER = "single", "ddp", "fsdp2", "fsdp1", "deepspeed", "zero3", "other"


def strategy_kind(trainer: Any) -> str:
    from lightning.pytorch import strategies as S

    s = trainer.strategy
    if isinstance(s, S.ModelParallelStrategy):
        return FSDP2
    if isinstance(s, S.FSDPStrategy):
        return FSDP1
    from lightning_memopt.strategies.zero3 import ZeRO3Strategy

    if isinstance(s, ZeRO3Strategy):
        return ZERO3
    if isinstance(s, S.DeepSpeedStrategy):
        return DEEPSPEED
    if isinstance(s, S.DDPStrategy):
        return DDP
    if isinstance(s, S.SingleDeviceStrategy):
        return SINGLE
    return OTHER


def check_strategy(trainer: Any, method: str, allowed: Iterable[str], allow_untested: bool = False) -> str:
    """Raise unless the strategy is on the tested allow-list (or warn with ``allow_untested=True``)."""
    kind = strategy_kind(trainer)
    allowed = set(allowed)
    if kind in allowed:
        return kind
    if kind == FSDP1:
        msg = (f"{method} does not support FSDPStrategy (FSDP1: flat-parameter shards, post-accumulate-grad hooks do "
               f"not fire on the original parameters). Use FSDP2 instead: strategy='fsdp2' (lightning_memopt's "
               f"FSDP2Strategy) or ModelParallelStrategy with fully_shard.")
    elif kind == DEEPSPEED and ZERO3 in allowed:
        msg = (f"{method} does not support Lightning's DeepSpeedStrategy: it wraps the module's optimizer in ZeRO's "
               f"own (fp32 master weights, moments, its own step), which {method} replaces. Use strategy='zero3' "
               f"(lightning_memopt's ZeRO3Strategy: DeepSpeed ZeRO-3 partitions the weights, {method} updates them) "
               f"or strategy='fsdp2'.")
    elif kind in (DEEPSPEED, ZERO3):
        msg = (f"{method} does not run under DeepSpeed. Use FSDP2 instead: strategy='fsdp2' (lightning_memopt's "
               f"FSDP2Strategy), which shards the model as ZeRO-3 does.")
    elif kind == DDP:
        msg = (f"{method} does not support DDP. Use FSDP2 instead: strategy='fsdp2' (lightning_memopt's "
               f"FSDP2Strategy), which shards the model and averages gradients before any update.")
    else:
        msg = (f"{method} has not been tested with {type(trainer.strategy).__name__}. Supported: "
               f"{sorted(allowed)}. Use a single device or strategy='fsdp2', or pass allow_untested=True to try it.")
    if allow_untested and kind not in (FSDP1,):
        rank_zero_warn(msg + " (allow_untested=True: continuing.)")
        return kind
    raise MisconfigurationException(msg)


def check_no_grad_scaler(trainer: Any, method: str, fix: str = "use precision='bf16-mixed', 'bf16-true' or '32'") -> None:
    if _shim.grad_scaler(trainer) is not None or str(trainer.precision) == "16-mixed":
        raise MisconfigurationException(
            f"{method} cannot run with precision='16-mixed': its GradScaler unscales and steps an optimizer that "
            f"{method} replaces. Instead, {fix}."
        )


def check_no_clipping(trainer: Any, method: str, fix: str) -> None:
    if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:
        raise MisconfigurationException(
            f"{method} cannot use Trainer(gradient_clip_val={trainer.gradient_clip_val}). {fix}"
        )


def check_no_accumulation(trainer: Any, method: str, fix: str) -> None:
    if trainer.accumulate_grad_batches != 1:
        raise MisconfigurationException(
            f"{method} cannot use Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}). {fix}"
        )
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    # it sets accumulate_grad_batches at each epoch's start, after this check
    for cb in getattr(trainer, "callbacks", ()):
        if isinstance(cb, GradientAccumulationScheduler) and any(v != 1 for v in cb.scheduling.values()):
            raise MisconfigurationException(
                f"{method} cannot use GradientAccumulationScheduler(scheduling={cb.scheduling}). {fix}"
            )


def check_no_finetuning_schedule(trainer: Any, method: str) -> None:
    from lightning.pytorch.callbacks import BaseFinetuning

    found = [cb for cb in getattr(trainer, "callbacks", ()) if isinstance(cb, BaseFinetuning)]
    if found:
        raise MisconfigurationException(
            f"{method} trains the parameters the optimizer holds at the fit's start, so {type(found[0]).__name__}, "
            f"which unfreezes (or freezes) modules during the fit, would change nothing {method} does. Remove it, and "
            f"fit each stage on its own: set requires_grad, then call trainer.fit with the checkpoint of the last."
        )


def check_no_clipping_hook(pl_module: Any, method: str, fix: str) -> None:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if is_overridden("configure_gradient_clipping", pl_module):
        raise MisconfigurationException(
            f"{type(pl_module).__name__}.configure_gradient_clipping would see no gradients under {method}: "
            f"Lightning calls it after the step's gradients are used and freed (or, without a backward, never made). "
            f"Remove the override. {fix}"
        )


def check_no_float64(param_groups: Iterable[dict[str, Any]], method: str, what: str) -> None:
    """``what`` (e.g. "updates") runs in float32: float64 weights would be rounded to it at every step."""
    if any(p.dtype == torch.float64 for g in param_groups for p in g["params"]):
        raise MisconfigurationException(
            f"{method} {what} in float32, so float64 weights would be rounded to it at every step. Use "
            "precision='32-true' (or 'bf16-true')."
        )


def check_lr_monitor(trainer: Any, method: str, momentum: bool, weight_decay_note: str | None) -> None:
    """``LearningRateMonitor`` reads momentum (beta1) and weight decay from the module's optimizer's groups; where the
    method's update does not use them, its curves would show values that drive nothing. ``momentum``: the method
    uses the groups' momentum/betas; ``weight_decay_note``: why the groups' weight decay is not what it applies."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    for cb in getattr(trainer, "callbacks", ()):
        if not isinstance(cb, LearningRateMonitor):
            continue
        if cb.log_momentum and not momentum:
            raise MisconfigurationException(
                f"LearningRateMonitor(log_momentum=True) would log the momentum (beta1) of the module's optimizer, "
                f"which {method}'s update does not use. Set log_momentum=False."
            )
        if getattr(cb, "log_weight_decay", False) and weight_decay_note is not None:
            raise MisconfigurationException(
                f"LearningRateMonitor(log_weight_decay=True) would log the weight_decay of the module's optimizer's "
                f"groups, {weight_decay_note}. Set log_weight_decay=False."
            )


def check_automatic_optimization(pl_module: Any, method: str) -> None:
    if not pl_module.automatic_optimization:
        raise MisconfigurationException(
            f"{method} adapts automatic-optimization LightningModules; this one sets automatic_optimization=False. "
            f"Remove that (let Lightning call the optimizer), or drive the method's core functions yourself."
        )


def weight_averaging(trainer: Any) -> list[Any]:
    """Lightning's weight-averaging callbacks on ``trainer`` (WeightAveraging, its EMA, StochasticWeightAveraging)."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging, WeightAveraging

    kinds = (WeightAveraging, StochasticWeightAveraging)
    return [cb for cb in getattr(trainer, "callbacks", ()) if isinstance(cb, kinds)]


def check_weight_averaging(trainer: Any, method: str, skip_backward: bool, trains_parameters: bool = True) -> None:
    """Lightning's ``StochasticWeightAveraging`` sets the fit loop's skip-backward flag back to False after every
    epoch (a method that skips Lightning's backward then gets one); ``WeightAveraging`` averages module parameters,
    which a method that trains none leaves untouched, and cannot update its copy from sharded ones."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    found = weight_averaging(trainer)
    if found and not trains_parameters:
        raise MisconfigurationException(
            f"{method} trains adapters held outside the module's parameters, so {type(found[0]).__name__} "
            f"would average only the frozen weights it never changes. Remove it from Trainer(callbacks=[...])."
        )
    kind = strategy_kind(trainer)
    averaging = [cb for cb in found if not isinstance(cb, StochasticWeightAveraging)]
    if averaging and kind in (FSDP2, ZERO3):
        # its copy is made from the unsharded module at setup, then fed sharded parameters at the first step
        raise MisconfigurationException(
            f"{type(averaging[0]).__name__} cannot average a sharded model ({kind}): Lightning copies the module "
            f"before it is sharded and fails at the first step. Remove it, or train on one device."
        )
    if skip_backward and any(isinstance(cb, StochasticWeightAveraging) for cb in found):
        raise MisconfigurationException(
            f"{method} cannot run with StochasticWeightAveraging: at each epoch's end it turns Lightning's backward "
            f"back on, which {method} replaces. Use lightning.pytorch.callbacks.EMAWeightAveraging, or "
            f"WeightAveraging (an equal average, the default), which average after each step and leave the backward "
            f"alone."
        )
