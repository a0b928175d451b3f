"""``GaLore``: turns an unchanged LightningModule's AdamW into GaLore-AdamW (arXiv 2403.03507)."""

from __future__ import annotations

import re
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_memopt.callbacks import _checks
from lightning_memopt.core.fsdp import reshard_all
from lightning_memopt.core.fused_backward import FusedBackward
from lightning_memopt.core.holder import HolderOptimizer, swap_in_holder
from lightning_memopt.galore.optim import GaLoreAdamW, GaLoreSettings

_METHOD = "GaLore"


def select_targets(
    module: torch.nn.Module, target_modules: str = "all-linear", exclude_modules: str | None = r"(^|\.)lm_head$"
) -> list[torch.nn.Parameter]:
    """The 2-D weights GaLore projects, in module order.

    ``"all-linear"`` takes every ``nn.Linear`` weight; any other string is a regex searched in module names (any module
    with a 2-D ``weight``). Modules whose name matches ``exclude_modules`` are skipped, and so is any weight they share
    (a tied ``lm_head`` keeps the embedding out too).
    """
    excluded: set[int] = set()
    chosen: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    pattern = None if target_modules == "all-linear" else re.compile(target_modules)
    for name, mod in module.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.nn.Parameter):
            continue
        if exclude_modules and re.search(exclude_modules, name):
            excluded.add(id(w))
            continue
        hit = isinstance(mod, torch.nn.Linear) if pattern is None else bool(pattern.search(name))
        if hit and w.ndim == 2 and w.requires_grad and id(w) not in seen:
            seen.add(id(w))
            chosen.append(w)
    return [w for w in chosen if id(w) not in excluded]


class GaLore(Callback):
    """Gradient low-rank projection for an automatic-optimization module whose optimizer is AdamW.

    The module's optimizer is replaced by a :class:`~lightning_memopt.core.holder.HolderOptimizer` that shares its
    ``param_groups`` (so lr, betas, eps and weight_decay come from ``configure_optimizers`` and LR schedulers keep
    driving lr); target weights get GaLore-AdamW, every other parameter plain AdamW. Projectors and moments live in the
    optimizer state, so checkpoints carry them.

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

    Example::

        trainer = Trainer(max_steps=1000, callbacks=[GaLore(rank=128, update_proj_gap=200, scale=0.25)])
        trainer.fit(HFCausalLM("HuggingFaceTB/SmolLM2-135M", lr=1e-4), datamodule)
    """

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
    ) -> None:
        if rank < 1 or update_proj_gap < 1:
            raise ValueError(
                f"rank and update_proj_gap must be >= 1; got rank={rank}, update_proj_gap={update_proj_gap}."
            )
        if proj_type not in ("std", "reverse_std", "left", "right"):
            raise ValueError(f"proj_type must be 'std', 'reverse_std', 'left' or 'right'; got {proj_type!r}.")
        if refresh not in ("randomized", "svd_lowrank", "svd"):
            raise ValueError(f"refresh must be 'randomized', 'svd_lowrank' or 'svd'; got {refresh!r}.")
        if moments not in ("reproject", "keep", "reset"):
            raise ValueError(f"moments must be 'reproject', 'keep' or 'reset'; got {moments!r}.")
        if optimizer not in ("adamw", "adamw8bit", "adafactor"):
            raise ValueError(f"optimizer must be 'adamw', 'adamw8bit' or 'adafactor'; got {optimizer!r}.")
        if optimizer != "adamw" and moments == "reproject":
            raise ValueError(
                f"moments='reproject' rotates AdamW's moments; optimizer={optimizer!r} keeps quantized or factored "
                f"state that cannot be rotated. Set moments='keep' (galore-torch's behaviour) or 'reset'."
            )
        if optimizer == "adamw8bit":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise ImportError(
                    "optimizer='adamw8bit' needs bitsandbytes: pip install 'lightning_memopt[bnb]'"
                ) from None
        self.settings = GaLoreSettings(
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
        self.target_modules = target_modules
        self.exclude_modules = exclude_modules
        self.layerwise = layerwise
        self.allow_untested = allow_untested
        self.galore: GaLoreAdamW | None = None
        self.holder: HolderOptimizer | None = None
        self._fused: FusedBackward | None = None
        self._module: torch.nn.Module | None = None
        self._group_of: dict[int, dict[str, Any]] = {}

    # ---- validation --------------------------------------------------------------------------------------------
    def _validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.layerwise and _checks.strategy_kind(trainer) == _checks.FSDP2:
            raise MisconfigurationException(
                "GaLore layer-wise mode runs on one device (as galore-torch's). Under FSDP2 use "
                "GaLore(layerwise=False, proj_type='right'): gradients are already sharded, so the step-boundary "
                "update holds only 1/world_size of them."
            )
        allowed = [_checks.SINGLE] if self.layerwise else [_checks.SINGLE, _checks.FSDP2]
        kind = _checks.check_strategy(
            trainer, _METHOD + (" layer-wise" if self.layerwise else ""), allowed, self.allow_untested
        )
        _checks.check_automatic_optimization(pl_module, _METHOD)
        _checks.check_no_grad_scaler(trainer, _METHOD)
        if self.layerwise:
            _checks.check_no_accumulation(
                trainer,
                "GaLore layer-wise",
                "It updates each weight inside backward, so there is no gradient to accumulate; set "
                "accumulate_grad_batches=1, or use GaLore(layerwise=False), which accumulates normally.",
            )
            _checks.check_no_clipping(
                trainer,
                "GaLore layer-wise",
                "Each weight is updated before the global gradient norm is known; remove gradient_clip_val or use "
                "GaLore(layerwise=False), where Lightning clips before the step.",
            )
        if kind == _checks.FSDP2:
            if self.settings.proj_type != "right":
                raise MisconfigurationException(
                    f"GaLore under FSDP2 projects local row shards and needs proj_type='right' (a column basis all "
                    f"ranks share); got proj_type={self.settings.proj_type!r}. Set GaLore(proj_type='right') (and "
                    f"use it on one device too when comparing runs)."
                )
            if self.settings.optimizer != "adamw":
                raise MisconfigurationException(
                    f"GaLore under FSDP2 supports optimizer='adamw' (sharded moments that checkpoints gather); got "
                    f"optimizer={self.settings.optimizer!r}. Set GaLore(optimizer='adamw') or use one device."
                )
            if self.settings.refresh != "randomized":
                raise MisconfigurationException(
                    f"GaLore under FSDP2 refreshes from all-reduced sketches; refresh={self.settings.refresh!r} "
                    f"would need whole matrices. Set GaLore(refresh='randomized')."
                )
        for g in trainer.strategy.optimizers[0].param_groups:
            if g.get("amsgrad") or g.get("maximize") or "betas" not in g:
                raise MisconfigurationException(
                    "GaLore adapts an AdamW/Adam optimizer (betas, eps, weight_decay; no amsgrad or maximize). Return "
                    "torch.optim.AdamW from configure_optimizers."
                )

    # ---- hooks -------------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validate(trainer, pl_module)
        targets = select_targets(pl_module, self.target_modules, self.exclude_modules)
        if not targets:
            raise MisconfigurationException(
                f"GaLore found no 2-D weights for target_modules={self.target_modules!r} (exclude_modules="
                f"{self.exclude_modules!r}). Use 'all-linear' or a regex matching module names."
            )
        in_opt = {id(p) for g in trainer.strategy.optimizers[0].param_groups for p in g["params"]}
        missing = [p for p in targets if id(p) not in in_opt]
        if missing:
            raise MisconfigurationException(
                f"{len(missing)} GaLore target weights are not in the optimizer from configure_optimizers; add them "
                f"to it or narrow target_modules."
            )
        self._module = pl_module
        self.holder = swap_in_holder(trainer, self._step_layerwise if self.layerwise else self._step)
        self.galore = GaLoreAdamW(self.holder, targets, self.settings)
        if _checks.strategy_kind(trainer) == _checks.FSDP2:
            self.galore.init_state()  # the checkpoint loader needs the state as a template
        if self.layerwise:
            params = [p for g in self.holder.param_groups for p in g["params"]]
            self._fused = FusedBackward(params, update=self._update_one)
            self._fused.mode = "off"
        n = sum(p.numel() for p in targets)
        rank_zero_info(
            f"GaLore: {len(targets)} weights ({n / 1e6:.2f}M parameters) projected to rank {self.settings.rank}, "
            f"refresh={self.settings.refresh} every {self.settings.update_proj_gap} steps"
            f"{', layer-wise' if self.layerwise else ''}."
        )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fused is not None:
            self._fused.remove()
            self._fused = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_fit_end(trainer, pl_module)

    # ---- the optimizer step ------------------------------------------------------------------------------------
    def _step(self, closure: Any) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        reshard_all(self._module)  # FSDP2 root stays unsharded after forward; write to the shards it will use
        self.galore.step()
        return loss

    def _step_layerwise(self, closure: Any) -> Any:
        self._group_of = {id(p): g for g in self.holder.param_groups for p in g["params"]}
        self._fused.mode = "update"
        try:
            with torch.enable_grad():
                return closure() if closure is not None else None
        finally:
            self._fused.mode = "off"

    def _update_one(self, p: torch.Tensor) -> None:
        self.galore.step_param(p, self._group_of[id(p)])

    @property
    def refreshes(self) -> int:
        return self.galore.refreshes if self.galore is not None else 0

    @override
    def state_dict(self) -> dict[str, Any]:
        # Projectors and moments are in the optimizer state; only counters live here.
        g = self.galore
        return {"refreshes": g.refreshes if g else 0, "skipped_refreshes": g.skipped_refreshes if g else 0}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaded = getattr(self, "_loaded", None)
        if loaded and self.galore is not None:
            self.galore.refreshes = int(loaded.get("refreshes", 0))
            self.galore.skipped_refreshes = int(loaded.get("skipped_refreshes", 0))
