"""BestWeights: keep the trained weights of the best validation score in host memory, and load them when fit ends."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_memopt.callbacks._checks import weight_averaging
from lightning_memopt.callbacks.method import MethodCallback
from lightning_memopt.core.fsdp import is_dtensor, local, reshard_all


class BestWeights(Callback):
    """Keeps a host copy of the trained weights at the best value of a validation metric and loads it back into the
    module when fit ends, so that ``trainer.test``, a saved model and anything after fit see the best weights, not the
    last ones. MeZO's official runs select their model this way; few-shot runs of the population estimator
    overfit when trained too long.

    Only trained parameters (``requires_grad``) are copied, into pinned host memory allocated at the first
    improvement, and what a method trains outside them (DFOLoRA's per-layer z, which sets its adapters). A copy
    costs one device-to-host pass over them and one sync, only when validation improves. Under FSDP2 (or DeepSpeed
    ZeRO-3) each rank keeps its own shards. Rank zero's metric decides whether a validation improved, so every rank
    keeps the same step.

    Checkpoints hold the best score and step. On one process they hold the weights too, so a resumed fit still ends
    at the best weights from before the resume. A multi-process checkpoint does not hold them (they are per-rank
    shards). After such a resume the callback warns and tracks the best from the resume on. DFOLoRA's z, the same on
    every rank, is held at any number of processes, so its best survives any resume. A method's own record
    of the run (MeZO's trajectory, optimizer state) stays that of the last step: replaying a trajectory gives the
    last weights, not the best.

    Args:
        monitor: a metric the module logs in validation, e.g. ``"val_acc"``.
        mode: ``"max"`` or ``"min"``.
        restore: load the best weights when fit ends. False: keep them (``best_weights``) and call :meth:`restore`.

    Example::

        trainer = Trainer(max_steps=5000, val_check_interval=500,
                          callbacks=[MeZO(n_spsa=16, batched=True, ...), BestWeights(monitor="val_acc")])
        trainer.fit(model, datamodule)  # the module now holds the weights of the best validation
        trainer.test(model, datamodule)
    """

    def __init__(self, monitor: str = "val_acc", mode: str = "max", restore: bool = True):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
        if not monitor:
            raise ValueError("monitor must name a metric the module logs in validation, e.g. 'val_acc'.")
        self.monitor = monitor
        self.mode = mode
        self.restore_at_end = restore
        self.best_score: Optional[float] = None
        self.best_step: Optional[int] = None
        self.best_weights: Optional[dict[str, torch.Tensor]] = None  # parameter name -> host copy of its local part
        # a method's trained tensors outside the module (DFOLoRA's z: replicated on every rank), host copies
        self.best_method_tensors: dict[str, torch.Tensor] = {}
        self._method: Optional[MethodCallback] = None
        self._world_size = 1
        self._dropped_step: Optional[int] = None  # a resumed multi-process run's best, whose weights it lacks

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._world_size = trainer.world_size
        self._method = next((cb for cb in trainer.callbacks if isinstance(cb, MethodCallback)), None)
        if not is_overridden("validation_step", pl_module):
            raise MisconfigurationException(
                f"BestWeights keeps the weights of the best {self.monitor!r}, but {type(pl_module).__name__} has no "
                "validation_step; add one, or remove BestWeights to keep the last weights."
            )
        if trainer.limit_val_batches == 0:
            raise MisconfigurationException(
                f"BestWeights keeps the weights of the best {self.monitor!r}, but limit_val_batches=0 turns validation "
                "off; set limit_val_batches above 0, or remove BestWeights to keep the last weights."
            )
        averaging = weight_averaging(trainer)
        if averaging:
            # the average is swapped in for validation and out after it, so the copy would be the training weights
            raise MisconfigurationException(
                f"BestWeights cannot run beside {type(averaging[0]).__name__}: validation scores the averaged weights, "
                "and BestWeights would keep the training weights. Keep one of them: the averaging callback ends the "
                "fit on the average."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = self._method_tensors()
        if not any(p.requires_grad for p in pl_module.parameters()) and not now:
            raise MisconfigurationException(
                "BestWeights keeps the module's trained parameters, and none has requires_grad=True; remove "
                "BestWeights, or train some parameters."
            )
        if self.best_method_tensors:
            if {k: tuple(v.shape) for k, v in now.items()} != {
                    k: tuple(v.shape) for k, v in self.best_method_tensors.items()}:
                method = type(self._method).__name__ if self._method is not None else "no method"
                raise MisconfigurationException(
                    f"BestWeights: the checkpoint's best (step {self.best_step}) holds a method's trained tensors "
                    f"{sorted(self.best_method_tensors)}, which this fit ({method}: {sorted(now)}) cannot take. Resume "
                    "with the method and model the checkpoint was written with."
                )
        if self._dropped_step is not None:
            rank_zero_warn(
                f"BestWeights: the checkpoint of this {self._world_size}-process run does not hold the best weights "
                f"from before the resume (step {self._dropped_step}); the best is tracked from the resume on."
            )
            self._dropped_step = None

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            msg = (f"BestWeights monitors {self.monitor!r}, which validation did not log; logged: "
                   f"{sorted(trainer.callback_metrics) or 'nothing'}. Set monitor= to one of them.")
            if not trainer.sanity_checking:
                raise MisconfigurationException(msg)
            # a warning before any training (a module may log only outside the sanity check)
            rank_zero_warn(msg + " (Seen in the sanity check; fit stops at the first validation if it persists.)")
        if trainer.sanity_checking:
            return
        score = float(value)
        improved = not math.isnan(score) and (
            self.best_score is None or (score > self.best_score if self.mode == "max" else score < self.best_score)
        )
        # one decision for all ranks: each keeps its own shards of the same step
        if trainer.strategy.broadcast(improved, src=0):
            self.best_score = trainer.strategy.broadcast(score, src=0)
            self.best_step = trainer.global_step
            self._snapshot(pl_module)

    @torch.no_grad()
    def _snapshot(self, pl_module: pl.LightningModule) -> None:
        weights = self.best_weights or {}
        cuda = False
        reshard_all(pl_module)  # FSDP2's root stays unsharded after a forward: keep shards, as restore writes them
        for name, p in pl_module.named_parameters():
            if not p.requires_grad:
                continue
            t = local(p.detach())
            buf = weights.get(name)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
                weights[name] = buf
            buf.copy_(t, non_blocking=t.is_cuda)
            cuda = cuda or t.is_cuda
        if cuda:
            torch.cuda.current_stream().synchronize()  # the copies read weights the next step changes in place
        self.best_weights = weights
        self.best_method_tensors = {k: t.detach().to("cpu", copy=True) for k, t in self._method_tensors().items()}

    def _method_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self._method is None else self._method.trained_tensors()

    @torch.no_grad()
    def restore(self, pl_module: pl.LightningModule) -> None:
        """Load the best weights into ``pl_module`` (the module they were taken from, or one of the same layout)."""
        if self.best_weights is None:
            raise RuntimeError(f"BestWeights has no weights yet: no validation reported {self.monitor!r} in fit.")
        # first: writes to FSDP2 shards must not be shadowed by a stale unsharded copy, and an unsharded root's
        # registered parameters are its full tensors, freed by the reshard
        reshard_all(pl_module)
        params = dict(pl_module.named_parameters())
        missing = sorted(set(self.best_weights) - set(params))
        if missing:
            raise RuntimeError(f"BestWeights: the module lacks parameters the best weights hold: {missing[:5]}.")
        for name, w in self.best_weights.items():
            p = params[name].detach()
            dst = local(p)
            if w.shape != dst.shape and is_dtensor(p) and w.shape == p.shape:
                # whole weights from a one-process checkpoint resumed under FSDP2: this rank's shard of them
                from torch.distributed.tensor import distribute_tensor

                w = distribute_tensor(w.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()
            dst.copy_(w)
        if self.best_method_tensors:
            if self._method is None:
                raise RuntimeError("BestWeights: the best holds a method's trained tensors, and no method is running.")
            self._method.load_trained_tensors(self.best_method_tensors)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.restore_at_end:
            return
        if self.best_weights is None:
            rank_zero_warn(f"BestWeights: no validation reported {self.monitor!r} during fit; the last weights stay.")
            return
        self.restore(pl_module)
        rank_zero_info(
            f"BestWeights: loaded the weights of step {self.best_step} ({self.monitor} = {self.best_score:.4f})."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"best_score": self.best_score, "best_step": self.best_step}
        # per-rank shards are not kept in a multi-process checkpoint; none at all (DFOLoRA trains none) is whole
        if self.best_weights is not None and (self._world_size == 1 or not self.best_weights):
            state["weights"] = self.best_weights
        if self.best_method_tensors:  # the same on every rank: kept at any world size
            state["method_tensors"] = self.best_method_tensors
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score, self.best_step = state_dict["best_score"], state_dict["best_step"]
        self.best_weights = state_dict.get("weights")
        self.best_method_tensors = state_dict.get("method_tensors") or {}
        if self.best_weights is None and self.best_step is not None:
            # without its weights, the old best would only block later ones: start again from the resume
            self._dropped_step, self.best_score, self.best_step = self.best_step, None, None
            self.best_method_tensors = {}
