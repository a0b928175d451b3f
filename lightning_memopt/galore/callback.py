"""``GaLore``: turns an unchanged LightningModule's AdamW into GaLore-AdamW (arXiv 2403.03507).

The step is :class:`~lightning_memopt.galore.optim.GaLoreOptimizer`'s; the lifecycle is
:class:`~lightning_memopt.callbacks.method.MethodCallback`'s. Lightning's own backward runs (and its clipping, at the
step boundary); layer-wise mode updates each weight inside backward instead.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_memopt.callbacks import _checks
from lightning_memopt.callbacks.method import MethodCallback
from lightning_memopt.core import validate
from lightning_memopt.core.fsdp import local, reshard_all
from lightning_memopt.core.fused_backward import FusedBackward
from lightning_memopt.galore.optim import GaLoreOptimizer, GaLoreSettings, select_targets


def _adamw_like(opt: Any) -> bool:
    """The optimizer's update is AdamW's: decoupled weight decay, or Adam's without any (bitsandbytes' by name)."""
    name = type(opt).__name__
    if isinstance(opt, torch.optim.AdamW) or "AdamW" in name:
        return True
    if isinstance(opt, torch.optim.Adam) or name in ("Adam8bit", "PagedAdam", "PagedAdam8bit"):
        return all(not g.get("weight_decay") or g.get("decoupled_weight_decay") for g in opt.param_groups)
    return False


class GaLore(MethodCallback):
    """Gradient low-rank projection for an automatic-optimization module whose optimizer is AdamW.

    The module's optimizer is replaced by a :class:`~lightning_memopt.core.holder.HolderOptimizer` that shares its
    ``param_groups`` (so lr, betas, eps and weight_decay come from ``configure_optimizers`` and LR schedulers keep
    driving lr); target weights get GaLore-AdamW, every other parameter plain AdamW. Projectors and moments live in the
    optimizer state, so checkpoints carry them. The gradients are freed as soon as the step has used them (Lightning
    would keep them through the next forward).

    Args:
        rank: subspace rank r.
        update_proj_gap: optimizer steps between subspace refreshes (per parameter).
        scale: GaLore's scale α on the projected-back update.
        proj_type: ``"std"`` (project the smaller side, galore-torch's default), ``"reverse_std"``, ``"left"`` or
            ``"right"``. FSDP2 needs ``"right"``.
        target_modules: ``"all-linear"`` or a regex on module names.
        exclude_modules: regex of module names to leave to plain AdamW (default: the LM head).
        refresh: ``"randomized"`` (fast, default), ``"svd_lowrank"`` or ``"svd"`` (exact, as galore-torch).
        oversample: extra sketch columns of the randomized refresh.
        power_iters: extra power iterations of the randomized refresh.
        moments: what Adam moments do when the subspace changes: ``"reproject"``, ``"keep"`` (galore-torch) or
            ``"reset"``.
        lazy_refresh: double the gap while the subspace is stable (overlap ≥ ``lazy_threshold``), up to
            ``lazy_max_gap``.
        optimizer: the update rule in the subspace (and for the other parameters): ``"adamw"`` (fused, moments in the
            parameters' dtype), ``"adamw8bit"`` (bitsandbytes' blockwise 8-bit AdamW; needs ``bitsandbytes``) or
            ``"adafactor"`` (factored second moment, no momentum). The last two need ``moments="keep"`` or
            ``"reset"``; lr, betas, eps and weight_decay still come from the module's param groups.
        layerwise: update each parameter inside backward (post-accumulate-grad hooks) and free its gradient at once.
        seed: seeds the refresh sketches.
        hf_adamw: galore-torch's own AdamW arithmetic (epsilon before bias correction, decay after the update), op
            for op and unfused. With ``refresh="svd"`` and ``moments="keep"`` this reproduces galore-torch's
            ``GaLoreAdamW`` bit for bit; for parity checks only (slower).
        allow_untested: warn instead of raising for an untested strategy.
        max_consecutive_skips: steps in a row with a non-finite loss (each skipped, weights and moments untouched)
            before the fit stops with an error.

    Example::

        trainer = Trainer(max_steps=1000, callbacks=[GaLore(rank=128, update_proj_gap=200, scale=0.25)])
        trainer.fit(HFCausalLM("HuggingFaceTB/SmolLM2-135M", lr=1e-4), datamodule)
    """

    name = "GaLore"
    skip_backward = False
    keeps_grads = True
    state_settings = ("rank", "proj_type", "optimizer", "target_modules", "exclude_modules")

    def __init__(
        self,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: Literal["std", "reverse_std", "left", "right"] = "std",
        target_modules: str = "all-linear",
        exclude_modules: str | None = r"(^|\.)lm_head$",
        refresh: Literal["randomized", "svd_lowrank", "svd"] = "randomized",
        oversample: int = 8,
        power_iters: int = 1,
        moments: Literal["reproject", "keep", "reset"] = "reproject",
        lazy_refresh: bool = False,
        lazy_threshold: float = 0.9,
        lazy_max_gap: int = 1600,
        optimizer: Literal["adamw", "adamw8bit", "adafactor"] = "adamw",
        layerwise: bool = False,
        seed: int = 0,
        hf_adamw: bool = False,
        allow_untested: bool = False,
        max_consecutive_skips: int = 10,
    ) -> None:
        super().__init__(allow_untested, max_consecutive_skips)
        self.config = GaLoreSettings(
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            refresh=refresh,
            oversample=oversample,
            power_iters=power_iters,
            moments=moments,
            lazy_refresh=lazy_refresh,
            lazy_threshold=lazy_threshold,
            lazy_max_gap=lazy_max_gap,
            seed=seed,
            optimizer=optimizer,
            hf_adamw=hf_adamw,
        )
        if target_modules != "all-linear":
            validate.regex(target_modules, "target_modules")
        if exclude_modules is not None:
            validate.regex(exclude_modules, "exclude_modules")
        self.target_modules = target_modules
        self.exclude_modules = exclude_modules
        self.layerwise = layerwise
        if not layerwise:  # the whole step's gradient is there before any write: it is checked too
            self.guard.checked = "loss or gradient"
        self.galore: GaLoreOptimizer | None = None
        self._fused: FusedBackward | None = None
        self.uses_group_momentum = optimizer != "adafactor"  # the groups' betas; Adafactor keeps no momentum
        self._group_of: dict[int, dict[str, Any]] = {}
        self._counters: dict[str, int] = {}

    @property
    def accumulation_fix(self) -> str | None:  # type: ignore[override]
        if not self.layerwise:
            return None
        return (
            "GaLore layer-wise updates each weight inside backward, so there is no gradient to accumulate; set "
            "accumulate_grad_batches=1, or use GaLore(layerwise=False), which accumulates normally."
        )

    @property
    def clipping_fix(self) -> str | None:  # type: ignore[override]
        if not self.layerwise:
            return None
        return (
            "GaLore layer-wise updates each weight before the global gradient norm is known; remove "
            "gradient_clip_val or use GaLore(layerwise=False), where Lightning clips before the step."
        )

    @override
    def settings(self) -> dict[str, Any]:
        return {
            **asdict(self.config), "target_modules": self.target_modules, "exclude_modules": self.exclude_modules,
            "layerwise": self.layerwise,
        }

    # ---- validation --------------------------------------------------------------------------------------------
    @override
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        kind = _checks.strategy_kind(trainer)
        if self.layerwise and kind == _checks.FSDP2:
            raise MisconfigurationException(
                "GaLore layer-wise mode runs on one device (as galore-torch's). Under FSDP2 use "
                "GaLore(layerwise=False, proj_type='right'): gradients are already sharded, so the step-boundary "
                "update holds only 1/world_size of them."
            )
        if kind == _checks.FSDP2:
            s = self.config
            if s.proj_type != "right":
                raise MisconfigurationException(
                    f"GaLore under FSDP2 projects local row shards and needs proj_type='right' (a column basis all "
                    f"ranks share); got proj_type={s.proj_type!r}. Set GaLore(proj_type='right') (and use it on one "
                    f"device too when comparing runs)."
                )
            if s.optimizer != "adamw":
                raise MisconfigurationException(
                    f"GaLore under FSDP2 supports optimizer='adamw' (sharded moments that checkpoints gather); got "
                    f"optimizer={s.optimizer!r}. Set GaLore(optimizer='adamw') or use one device."
                )
            if s.hf_adamw:
                raise MisconfigurationException(
                    "GaLore(hf_adamw=True) reproduces galore-torch's single-device GaLoreAdamW, op for op, for parity "
                    "runs; under FSDP2 leave hf_adamw=False (the sharded step)."
                )
            if s.refresh != "randomized":
                raise MisconfigurationException(
                    f"GaLore under FSDP2 refreshes from all-reduced sketches; refresh={s.refresh!r} would need whole "
                    f"matrices. Set GaLore(refresh='randomized')."
                )

    # ---- install -----------------------------------------------------------------------------------------------
    @override
    def install(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wrapped = self.holder.wrapped
        odd = [g for g in self.holder.param_groups if g.get("amsgrad") or g.get("maximize") or "betas" not in g]
        if odd or not _adamw_like(wrapped):
            raise MisconfigurationException(
                f"GaLore runs AdamW's update with the hyperparameters (lr, betas, eps, weight_decay) of the optimizer "
                f"from configure_optimizers, so it takes AdamW, or Adam without weight decay (no amsgrad or "
                f"maximize); got {type(wrapped).__name__}. Return torch.optim.AdamW from configure_optimizers."
            )
        targets = select_targets(pl_module, self.target_modules, self.exclude_modules)
        if not targets:
            raise MisconfigurationException(
                f"GaLore found no 2-D weights for target_modules={self.target_modules!r} (exclude_modules="
                f"{self.exclude_modules!r}). Use 'all-linear' or a regex matching module names."
            )
        in_opt = {id(p) for g in self.holder.param_groups for p in g["params"]}
        missing = [p for p in targets if id(p) not in in_opt]
        if missing:
            raise MisconfigurationException(
                f"{len(missing)} GaLore target weights are not in the optimizer from configure_optimizers; add them "
                f"to it or narrow target_modules."
            )
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.galore = GaLoreOptimizer(self.holder, targets, self.config, guard=self.guard, names=names)
        if _checks.strategy_kind(trainer) == _checks.FSDP2:
            self.galore.init_state()  # the checkpoint loader needs the state as a template
        if self.layerwise:
            params = [p for g in self.holder.param_groups for p in g["params"]]
            self._fused = FusedBackward(params, update=self._update_one)
            self._fused.mode = "off"
        ranks = sorted(set(self.galore.ranks().values()))
        if ranks != [self.config.rank]:
            clamped = [tuple(p.shape) for p in targets if min(p.shape) < self.config.rank]
            rank_zero_warn(
                f"GaLore(rank={self.config.rank}) is larger than the smaller side of {len(clamped)} target matrices "
                f"(e.g. {clamped[0]}); their rank is clamped to it. Ranks used: {ranks}."
            )
        n = sum(p.numel() for p in targets)
        shown = ranks[0] if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        rank_zero_info(
            f"GaLore: {len(targets)} weights ({n / 1e6:.2f}M parameters) projected to rank {shown}, "
            f"refresh={self.config.refresh} every {self.config.update_proj_gap} steps"
            f"{', layer-wise' if self.layerwise else ''}."
        )

    @override
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any] | None) -> None:
        if state and self.galore is not None:
            self.galore.refreshes = int(state.get("refreshes", 0))
            self.galore.skipped_refreshes = int(state.get("skipped_refreshes", 0))
            saved = self._saved_settings or {}
            self.galore.retime(was_lazy=bool(saved.get("lazy_refresh", self.config.lazy_refresh)))

    @override
    def uninstall(self) -> None:
        if self._fused is not None:
            self._fused.remove()
            self._fused = None

    # ---- the optimizer step ------------------------------------------------------------------------------------
    @override
    def step(self, closure: Any) -> Any:
        if self.layerwise:
            return self._step_layerwise(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.guard.resolve()  # earlier steps (long done on the device): put back counters of skipped ones first
        # a finite loss can come with a NaN gradient (a backward kernel's bug): that step is skipped too
        ok = None if loss is None else self.guard.check(loss, self._grad_norm(), step=self.step_index, reduce=True)
        reshard_all(self.module)  # FSDP2 root stays unsharded after forward; write to the shards it will use
        self.galore.step(ok)
        return loss

    def _grad_norm(self) -> torch.Tensor:
        """The gradients' total norm (this rank's shards), on the device: not finite where any element is not."""
        grads = [local(p.grad) for g in self.holder.param_groups for p in g["params"] if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())

    def _step_layerwise(self, closure: Any) -> Any:
        self._group_of = {id(p): g for g in self.holder.param_groups for p in g["params"]}
        self.galore.begin(None)  # on_before_backward sets the flag once the loss exists
        self._fused.mode = "update"
        try:
            with torch.enable_grad():
                return closure() if closure is not None else None
        finally:
            self._fused.mode = "off"
            self.galore.end()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self.layerwise and self._fused is not None and self._fused.mode == "update":
            # the last step's flags, copied after its backward: waited for here, with this forward queued, not before
            # it (that kept the GPU idle while the host queued the forward: 1.45x the step on an H200)
            self.guard.resolve()
            self.galore.begin(self.guard.check(loss, step=self.step_index, reduce=True), per_tensor=True, loss=loss)

    def _update_one(self, p: torch.Tensor) -> None:
        self.galore.step_param(p, self._group_of[id(p)])

    @property
    def refreshes(self) -> int:
        return self.galore.refreshes if self.galore is not None else 0

    @override
    def method_state(self) -> dict[str, Any]:
        # Projectors and moments are in the optimizer state; only counters live here.
        g = self.galore
        return {"refreshes": g.refreshes if g else 0, "skipped_refreshes": g.skipped_refreshes if g else 0}
