"""``MeZO``: zeroth-order fine-tuning of an unchanged automatic-optimization LightningModule (a thin callback).

The algorithm lives in :mod:`lightning_memopt.mezo.core`. Here we only adapt Lightning:

* ``on_fit_start`` swaps the module's optimizer for a :class:`~lightning_memopt.core.holder.HolderOptimizer` (its
  ``param_groups`` stay the module's, so LR schedulers and ``LearningRateMonitor`` keep driving ``lr``) and tells the
  loop to skip backward;
* the module's ``training_step`` is wrapped on the instance: each call runs the original twice under ``no_grad``
  (θ+εz, θ−εz; eval mode by default) and accumulates the projected gradient. Gradient accumulation therefore uses
  the same z over the micro-batches and averages g;
* the holder's ``step`` all-reduces g over data-parallel ranks and applies the update.
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from lightning_memopt import _shim
from lightning_memopt.callbacks import _checks
from lightning_memopt.core.fsdp import all_reduce_mean
from lightning_memopt.core.holder import no_decay, set_base_lr, swap_in_holder
from lightning_memopt.mezo.core import Variant, ZeroOrder, ZOConfig, make_params
from lightning_memopt.mezo.trajectory import new_trajectory, save_trajectory


class MeZO(Callback):
    """Memory-efficient zeroth-order fine-tuning (MeZO, arXiv 2305.17333): two forwards per step, no backward.

    Args:
        eps: perturbation scale ε.
        lr: overrides the module's optimizer lr (the LR scheduler, if any, keeps its shape). None keeps it.
        weight_decay: overrides the optimizer groups' weight decay, applied to matrices only (not biases or norm
            weights, as in the paper). None uses each group's own ``weight_decay``.
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
            computed on the ``logits``/``labels`` that ``training_step`` returns; it replaces the loss as the ZO
            objective (negated when higher is better). Non-differentiable objectives are fine.
        metric_kwargs: arguments of the metric (e.g. ``{"num_classes": 2}``).
        record_trajectory: keep the (seeds, g, lr, wd) of every step in ``self.trajectory`` (and checkpoints).
        trajectory_path: write the trajectory as JSON there at the end of fit (implies ``record_trajectory``).
        allow_untested: warn instead of raising on a strategy outside single-device and FSDP2.

    Example::

        model = HFCausalLM(model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", lr=1e-6)
        trainer = Trainer(max_steps=2000, precision="bf16-true", callbacks=[MeZO(eps=1e-3)])
        trainer.fit(model, datamodule=PromptClassificationDataModule(data_dir="data/sst2", k=512))
    """

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
    ) -> None:
        super().__init__()
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
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = int(seed)
        self.eval_mode = eval_mode
        self.metric_path = metric
        self.metric_kwargs = dict(metric_kwargs or {})
        self.record_trajectory = record_trajectory or trajectory_path is not None
        self.trajectory_path = trajectory_path
        self.allow_untested = allow_untested
        self.trajectory: dict[str, Any] | None = None
        self.zo: ZeroOrder | None = None
        self._metric: Any = None
        self._higher_is_better = False
        self._holder: Any = None
        self._module: pl.LightningModule | None = None
        self._had_instance_step = False
        self._loaded: dict[str, Any] | None = None
        self._reset_accumulators()
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def _reset_accumulators(self) -> None:
        self._g_sum: torch.Tensor | None = None
        self._loss_sum: torch.Tensor | None = None
        self._micro = 0
        self._seeds: list[int] | None = None

    # ---- validation ------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _checks.check_strategy(trainer, "MeZO", (_checks.SINGLE, _checks.FSDP2), self.allow_untested)
        _checks.check_no_grad_scaler(trainer, "MeZO")
        _checks.check_no_clipping(
            trainer,
            "MeZO",
            "MeZO has no gradient to clip (it estimates one scalar per step); remove "
            "gradient_clip_val and lower lr or eps instead.",
        )
        _checks.check_automatic_optimization(pl_module, "MeZO")
        if self.metric_path is not None:
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
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        holder = swap_in_holder(trainer, self._step_fn)
        self._holder = holder
        if self.lr is not None:
            set_base_lr(trainer, holder, self.lr)
        _shim.set_skip_backward(trainer, True)
        decay_fn = None
        if self.weight_decay is not None:

            def decay_fn(name: str, p: torch.Tensor) -> bool:
                return not no_decay(name) and p.ndim >= 2

        params = make_params(pl_module, [g["params"] for g in holder.param_groups], decay_fn)
        if not params:
            raise MisconfigurationException("MeZO found no trainable parameter in the optimizer's param groups.")
        self.zo = ZeroOrder(pl_module, self.config, self.seed, params)
        if self._metric is not None:
            self._metric = self._metric.to(pl_module.device)
        self._module = pl_module
        self._had_instance_step = "training_step" in pl_module.__dict__
        original = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._zo_training_step(original, pl_module, args, kwargs)

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._original_step = original
        if self.record_trajectory and self.trajectory is None:
            self.trajectory = new_trajectory(_base_reference(pl_module), params, self.config, self.seed)
        n = sum(zp.param.numel() for zp in params)
        rank_zero_info(f"MeZO: {len(params)} tensors ({n / 1e6:.2f}M elements), {self.config}.")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Under FSDP, callback state arrives after on_fit_start: apply it here.
        if self._loaded is not None and self.zo is not None:
            st, self._loaded = self._loaded, None
            if int(st.get("seed", self.seed)) != self.seed:
                raise MisconfigurationException(
                    f"MeZO(seed={self.seed}) resumes a run made with seed={st['seed']}; use the same seed."
                )
            self.zo.load_history_state(st.get("history", []), pl_module.device)
            if st.get("trajectory") is not None:
                self.trajectory = st["trajectory"]

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._module is None:
            return
        if not self._had_instance_step:
            self._module.__dict__.pop("training_step", None)
        else:
            self._module.training_step = self._original_step  # type: ignore[method-assign]
        _shim.set_skip_backward(trainer, False)
        if self.zo is not None:
            self.zo.close()
        self._module = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.trajectory_path is not None and self.trajectory is not None:
            _save(self.trajectory, self.trajectory_path)

    # ---- the step --------------------------------------------------------------------------------------------
    def _objective(self, out: Any) -> torch.Tensor:
        if self._metric is not None:
            if not isinstance(out, dict) or "logits" not in out or "labels" not in out:
                raise MisconfigurationException(
                    "MeZO(metric=...) needs training_step to return a dict with 'logits' and 'labels' (as "
                    "HFCausalLM's classification objective does); this module returns "
                    f"{type(out).__name__ if not isinstance(out, dict) else sorted(out)}."
                )
            self._metric.reset()
            value = self._metric(out["logits"], out["labels"]).float()
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
        modes = {m: m.training for m in pl_module.modules()} if self.eval_mode else {}
        if self.eval_mode:
            pl_module.eval()
        try:
            g, loss = self.zo.estimate(lambda: self._objective(original(*args, **kwargs)), seeds)
        finally:
            for m, mode in modes.items():
                m.training = mode
        self._seeds = seeds
        self._g_sum = g if self._g_sum is None else self._g_sum + g
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._micro += 1
        return {"loss": loss}

    def _step_fn(self, closure: Any) -> Any:
        result = closure() if closure is not None else None
        if self._micro == 0 or self.zo is None:
            return result
        assert self._g_sum is not None and self._loss_sum is not None and self._seeds is not None
        packed = torch.cat([self._g_sum / self._micro, (self._loss_sum / self._micro).reshape(1)])
        packed = all_reduce_mean(packed)  # each rank's loss is its shard's mean: the mean is the global batch's
        g, loss = packed[:-1], packed[-1]
        groups = self._holder.param_groups
        lrs = [float(grp["lr"]) for grp in groups]
        if self.weight_decay is not None:
            wds = [float(self.weight_decay)] * len(groups)
        else:
            wds = [float(grp.get("weight_decay", 0.0)) for grp in groups]
        self.zo.update(self._seeds, g, lrs, wds)
        if self.trajectory is not None:
            step = self._module.trainer.global_step if self._module is not None else -1
            self.trajectory["steps"].append(
                {
                    "step": int(step),
                    "seeds": list(self._seeds),
                    "g": [float(x) for x in g.tolist()],
                    "lr": lrs,
                    "wd": wds,
                }
            )
        self._last = (g.mean(), loss)
        self._reset_accumulators()
        return result

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._last is not None:
            g, loss = self._last
            self._last = None
            pl_module.log("mezo/projected_grad", g, on_step=True, on_epoch=False)
            pl_module.log("mezo/loss", loss, on_step=True, on_epoch=False, prog_bar=True)

    # ---- state -----------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "config": self.zo.config_dict() if self.zo is not None else None,
            "history": self.zo.history_state() if self.zo is not None else [],
            "trajectory": self.trajectory,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
        if self.record_trajectory and state_dict.get("trajectory") is not None:
            self.trajectory = state_dict["trajectory"]


def _base_reference(pl_module: pl.LightningModule) -> Any:
    hp = dict(getattr(pl_module, "hparams", {}) or {})
    ref = {k: hp[k] for k in ("model_name_or_path", "model_config", "gguf_file", "init_seed") if k in hp}
    ref["module"] = f"{type(pl_module).__module__}.{type(pl_module).__qualname__}"
    return ref


@rank_zero_only
def _save(trajectory: dict[str, Any], path: str) -> None:
    save_trajectory(trajectory, path)
