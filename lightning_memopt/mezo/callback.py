"""``MeZO``: zeroth-order fine-tuning of an unchanged automatic-optimization LightningModule (a thin callback).

The algorithm lives in :mod:`lightning_memopt.mezo.core`; the lifecycle (holder, skip-backward, state, teardown) in
:class:`~lightning_memopt.callbacks.method.MethodCallback`. Here:

* the module's ``training_step`` is wrapped on the instance: each call runs the original 2n times under ``no_grad``
  (θ ± εz, eval mode by default) and accumulates the projected gradient, so gradient accumulation uses the same z
  over the micro-batches and averages g. (Running the forwards inside the holder's step instead would see only the
  last micro-batch: Lightning calls the step once per accumulated batch.)
* the holder's step all-reduces g over data-parallel ranks and applies the update (a no-op on the device for a
  non-finite loss).
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from lightning_memopt.callbacks import _checks
from lightning_memopt.callbacks.method import MethodCallback
from lightning_memopt.core import validate
from lightning_memopt.core.fsdp import all_reduce_mean
from lightning_memopt.core.holder import decays
from lightning_memopt.core.modes import eval_mode
from lightning_memopt.mezo.core import Variant, ZeroOrder, ZOConfig, make_params
from lightning_memopt.mezo.trajectory import new_trajectory, save_trajectory


class MeZO(MethodCallback):
    """Memory-efficient zeroth-order fine-tuning (MeZO, arXiv 2305.17333): two forwards per step, no backward.

    Args:
        eps: perturbation scale ε.
        lr: overrides the module's optimizer lr (the LR scheduler, if any, keeps its shape). None keeps it.
        weight_decay: overrides the weight decay of matrices (not biases or norm weights, as in the paper; they get
            none). None uses each group's own ``weight_decay``.
        n_spsa: directions per step (n-SPSA): 2n forwards, g averaged in the update.
        one_sided: ``(L(θ+εz) − L(θ))/ε`` with n+1 forwards instead of the two-sided estimate.
        variant: ``"sgd"`` (MeZO), ``"momentum"`` or ``"adam"``. Momentum/Adam keep no parameter-sized buffer: they
            replay the last ``window`` steps' directions (see :mod:`lightning_memopt.mezo.core`).
        beta1, beta2, window, adam_eps: momentum/Adam settings.
        distribution: directions z: ``"normal"`` (MeZO's Gaussian, Triton's ``tl.randn4x``) or ``"rademacher"``
            (±1, classic SPSA; same second moment, cheaper to generate).
        seed: base seed; step t's directions depend only on (seed, t), so resume is exact.
        eval_mode: run the two forwards in eval mode (dropout off), as the paper does.
        metric: optional class path of a torchmetrics metric (e.g. ``"torchmetrics.classification.MulticlassAccuracy"``)
            that replaces the loss as the ZO objective (negated when higher is better); non-differentiable
            objectives are fine. It is computed on ``preds``/``target`` when ``training_step`` returns them (e.g.
            generated answers and references for an F1 objective), else on ``logits``/``labels``.
        metric_kwargs: arguments of the metric (e.g. ``{"num_classes": 2}``).
        record_trajectory: keep the (seeds, g, lr, wd) of every step in ``self.trajectory`` (and checkpoints).
        trajectory_path: write the trajectory as JSON there at the end of fit (implies ``record_trajectory``).
        allow_untested: warn instead of raising on a strategy outside single-device and FSDP2.
        max_consecutive_skips: steps in a row with a non-finite loss (each skipped, weights untouched) before the
            fit stops with an error.

    Example::

        model = HFCausalLM(model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", lr=1e-6)
        trainer = Trainer(max_steps=2000, precision="bf16-true", callbacks=[MeZO(eps=1e-3)])
        trainer.fit(model, datamodule=PromptClassificationDataModule(data_dir="data/sst2", k=512))
    """

    name = "MeZO"
    strategies = (_checks.SINGLE, _checks.FSDP2, _checks.ZERO3)  # "zero3": DeepSpeed ZeRO-3 (ZeRO3Strategy)
    clipping_fix = (
        "MeZO has no gradient to clip (it estimates one scalar per step); remove gradient_clip_val and lower lr or "
        "eps instead."
    )
    state_settings = ("eps", "n_spsa", "one_sided", "variant", "beta1", "beta2", "window", "distribution", "seed")
    lr_range = (1e-7, 2e-5)  # full weights; LoRA adapters take 1e-4 to 1e-3 (README)

    def __init__(
        self,
        eps: float = 1e-3,
        lr: float | None = None,
        weight_decay: float | None = None,
        n_spsa: int = 1,
        one_sided: bool = False,
        variant: Variant = "sgd",
        beta1: float = 0.9,
        beta2: float = 0.99,
        window: int = 10,
        adam_eps: float = 1e-8,
        distribution: Literal["normal", "rademacher"] = "normal",
        seed: int = 0,
        eval_mode: bool = True,
        metric: str | None = None,
        metric_kwargs: dict[str, Any] | None = None,
        record_trajectory: bool = False,
        trajectory_path: str | None = None,
        allow_untested: bool = False,
        max_consecutive_skips: int = 10,
    ) -> None:
        super().__init__(allow_untested, max_consecutive_skips)
        self.config = ZOConfig(
            eps=eps,
            n_spsa=n_spsa,
            one_sided=one_sided,
            variant=variant,
            beta1=beta1,
            beta2=beta2,
            window=window,
            adam_eps=adam_eps,
            distribution=distribution,
        )
        self.lr = validate.optional_lr(lr)
        self.weight_decay = None if weight_decay is None else validate.nonnegative(weight_decay, "weight_decay")
        self.seed = int(seed)
        self.eval_mode = eval_mode
        self.metric_path = metric
        self.metric_kwargs = dict(metric_kwargs or {})
        self.record_trajectory = record_trajectory or trajectory_path is not None
        self.trajectory_path = trajectory_path
        self.trajectory: dict[str, Any] | None = None
        self.zo: ZeroOrder | None = None
        self._metric: Any = None
        self._higher_is_better = False
        self._had_instance_step = False
        self._original_step: Any = None
        self._reset_accumulators()
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def _reset_accumulators(self) -> None:
        self._g_sum: torch.Tensor | None = None
        self._loss_sum: torch.Tensor | None = None
        self._micro = 0
        self._seeds: list[int] | None = None

    @override
    def settings(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {**asdict(self.config), "seed": self.seed, "lr": self.lr, "weight_decay": self.weight_decay}

    @override
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.metric_path is None:
            return
        mod, _, name = self.metric_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError, ValueError):
            raise MisconfigurationException(
                f"MeZO(metric={self.metric_path!r}): cannot import it; give a class path such as "
                f"'torchmetrics.classification.MulticlassAccuracy'."
            ) from None
        self._metric = cls(**self.metric_kwargs)
        self._higher_is_better = bool(getattr(self._metric, "higher_is_better", False))

    # ---- wiring ----------------------------------------------------------------------------------------------
    @override
    def install(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        decay_fn = decays if self.weight_decay is not None else None
        params = make_params(pl_module, [g["params"] for g in self.holder.param_groups], decay_fn)
        if not params:
            raise MisconfigurationException("MeZO found no trainable parameter in the optimizer's param groups.")
        self.zo = ZeroOrder(pl_module, self.config, self.seed, params, guard=self.guard)
        if self._metric is not None:
            self._metric = self._metric.to(pl_module.device)
        self._had_instance_step = "training_step" in pl_module.__dict__
        original = self._original_step = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._zo_training_step(original, pl_module, args, kwargs)

        pl_module.training_step = training_step  # type: ignore[method-assign]
        if self.record_trajectory and self.trajectory is None:
            self.trajectory = new_trajectory(_base_reference(pl_module), params, self.config, self.seed)
        n = sum(zp.param.numel() for zp in params)
        rank_zero_info(f"MeZO: {len(params)} tensors ({n / 1e6:.2f}M elements), {self.config}.")

    @override
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any] | None) -> None:
        if state is None or self.zo is None:
            return
        self.zo.load_history_state(state.get("history", []), pl_module.device)
        if state.get("trajectory") is not None:
            self.trajectory = state["trajectory"]

    @override
    def uninstall(self) -> None:
        if self.module is not None and self._original_step is not None:
            if not self._had_instance_step:
                self.module.__dict__.pop("training_step", None)
            else:
                self.module.training_step = self._original_step  # type: ignore[method-assign]
            self._original_step = None
        if self.zo is not None:
            self.zo.close()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.trajectory_path is not None and self.trajectory is not None:
            _save(self.trajectory, self.trajectory_path)

    # ---- the step --------------------------------------------------------------------------------------------
    def _objective(self, out: Any) -> torch.Tensor:
        if self._metric is not None:
            if isinstance(out, dict) and "preds" in out and "target" in out:
                args = (out["preds"], out["target"])
            elif isinstance(out, dict) and "logits" in out and "labels" in out:
                args = (out["logits"], out["labels"])
            else:
                raise MisconfigurationException(
                    "MeZO(metric=...) needs training_step to return a dict with 'preds' and 'target' (e.g. generated "
                    "answers and references) or with 'logits' and 'labels' (as HFCausalLM's classification objective "
                    f"does); this module returns "
                    f"{type(out).__name__ if not isinstance(out, dict) else sorted(out)}."
                )
            self._metric.reset()
            value = torch.as_tensor(self._metric(*args)).float().to(self.module.device)
            self._metric.reset()
            return -value if self._higher_is_better else value
        loss = out.get("loss") if isinstance(out, dict) else out
        if not isinstance(loss, torch.Tensor):
            raise MisconfigurationException(
                f"MeZO needs training_step to return a loss tensor or a dict with 'loss'; got {type(out).__name__}."
            )
        return loss

    def _zo_training_step(self, original: Any, pl_module: pl.LightningModule, args: tuple, kwargs: dict) -> Any:
        assert self.zo is not None
        seeds = self.zo.seeds(pl_module.trainer.global_step)
        if self._seeds is not None and self._seeds != seeds:  # a new step without an update: should not happen
            self._reset_accumulators()
        with eval_mode(pl_module, self.eval_mode):
            g, loss = self.zo.estimate(lambda: self._objective(original(*args, **kwargs)), seeds)
        self._seeds = seeds
        self._g_sum = g if self._g_sum is None else self._g_sum + g
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._micro += 1
        return {"loss": loss}

    @override
    def step(self, closure: Any) -> Any:
        result = closure() if closure is not None else None
        if self._micro == 0 or self.zo is None:
            return result
        assert self._g_sum is not None and self._loss_sum is not None and self._seeds is not None
        packed = torch.cat([self._g_sum / self._micro, (self._loss_sum / self._micro).reshape(1)])
        packed = all_reduce_mean(packed)  # each rank's loss is its shard's mean: the mean is the global batch's
        g, loss = packed[:-1], packed[-1]
        groups = self.holder.param_groups
        lrs = [float(grp["lr"]) for grp in groups]
        wd = self.weight_decay
        wds = [float(wd if wd is not None else grp.get("weight_decay", 0.0)) for grp in groups]
        self.zo.update(self._seeds, g, lrs, wds, loss=loss, step=self.step_index)
        if self.trajectory is not None:
            self.trajectory["steps"].append(
                {"step": self.step_index, "seeds": list(self._seeds), "g": [float(x) for x in g.tolist()],
                 "lr": lrs, "wd": wds}
            )
        self._last = (g.mean(), loss)
        self._reset_accumulators()
        return result

    @override
    def log_step(self, pl_module: pl.LightningModule) -> None:
        if self._last is not None:
            g, loss = self._last
            self._last = None
            pl_module.log("mezo/projected_grad", g, on_step=True, on_epoch=False)
            pl_module.log("mezo/loss", loss, on_step=True, on_epoch=False, prog_bar=True)

    # ---- state -----------------------------------------------------------------------------------------------
    @override
    def method_state(self) -> dict[str, Any]:
        return {
            "history": self.zo.history_state() if self.zo is not None else [],
            "trajectory": self.trajectory,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        traj = (state_dict.get("state") or {}).get("trajectory")
        if self.record_trajectory and traj is not None:
            self.trajectory = traj


def _base_reference(pl_module: pl.LightningModule) -> Any:
    hp = dict(getattr(pl_module, "hparams", {}) or {})
    ref = {k: hp[k] for k in ("model_name_or_path", "model_config", "gguf_file", "init_seed") if k in hp}
    ref["module"] = f"{type(pl_module).__module__}.{type(pl_module).__qualname__}"
    return ref


@rank_zero_only
def _save(trajectory: dict[str, Any], path: str) -> None:
    save_trajectory(trajectory, path)
