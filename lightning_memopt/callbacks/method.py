"""``MethodCallback``: the Lightning lifecycle every method shares, written once.

A method callback adapts an unchanged automatic-optimization LightningModule: it swaps the module's optimizer for a
:class:`~lightning_memopt.core.holder.HolderOptimizer` (LR schedulers, ``LearningRateMonitor``, ``global_step``,
``max_steps`` and checkpoints keep working) and runs its own step where Lightning calls ``optimizer.step``. This base
owns everything around that step:

* ``setup``: the refusals (automatic optimization, strategy allow-list, GradScaler, accumulation, clipping, a second
  method callback), each naming the fix, then the method's own :meth:`validate`;
* ``on_load_checkpoint`` / ``load_state_dict``: a checkpoint of another method, of a plain optimizer, or with
  settings that change the meaning of the saved state is refused with both names and how to start from the weights;
* ``on_fit_start``: the holder swap (with an owner check), the lr and weight-decay overrides, skip-backward, then
  :meth:`install`, and the module's ``prog_bar`` logging made free of a host sync per step
  (:mod:`lightning_memopt.callbacks.pbar_values`);
* ``on_train_start``: the one deferred-state slot (under FSDP callback state arrives after ``on_fit_start``) handed
  to :meth:`start`;
* the holder's step: :meth:`step`, then the non-finite bookkeeping (:mod:`lightning_memopt.core.nonfinite`) and, for
  methods that keep ``.grad``, releasing the gradients at once (Lightning would keep them through the next forward);
* ``teardown`` / ``on_exception``: :meth:`uninstall`, and every trainer attribute this callback changed (and a
  ``training_step`` it wrapped: :meth:`wrap_training_step`) put back.

A method gives its step and its state: :meth:`install`, :meth:`start`, :meth:`step`, :meth:`uninstall`,
:meth:`method_state`, :meth:`settings` and the class attributes below. See docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_memopt import _shim
from lightning_memopt.callbacks import _checks
from lightning_memopt.callbacks.pbar_values import ProgressBarValues
from lightning_memopt.core.holder import HolderOptimizer, set_base_lr, swap_in_holder, weight_decays
from lightning_memopt.core.nonfinite import SkipGuard, nonfinite_weights_note

_WEIGHTS_ONLY = (
    "To start from its weights only, load them into the module and fit without ckpt_path, e.g. "
    "`model = MyModule.load_from_checkpoint(path)` (or `model.load_state_dict(torch.load(path, weights_only=False)"
    "['state_dict'])`), then `trainer.fit(model, datamodule)`."
)


class SkipBatch(Exception):
    """``training_step`` returned None, Lightning's "skip this batch": a forward-only method's step ends without an
    update (:meth:`MethodCallback.loss_of`)."""


class MethodCallback(Callback):
    """Base of the method callbacks (MeZO, LOMO, AdaLomo, GaLore, DFOLoRA); see the module docstring.

    Class attributes a method sets:
        name: shown in messages, logs and checkpoints.
        skip_backward: Lightning's backward is skipped (the method runs forwards only, or its own backward).
        trains_parameters: the method changes the module's parameters (weight averaging has something to average).
        keeps_grads: the method reads ``.grad`` after Lightning's backward; they are released after its step.
        strategies: the tested strategy allow-list.
        accumulation_fix / clipping_fix: None accepts ``accumulate_grad_batches`` / ``gradient_clip_val``; a string
            refuses it with that fix.
        fixed_params: the trained set is bound when the fit starts (a finetuning schedule is refused).
        clipping_hook_fix: None where Lightning's clipping sees the step's gradients; a string refuses a module's own
            ``configure_gradient_clipping`` with that fix (``clipping_fix`` by default).
        scaler_fix: the fix named when ``precision="16-mixed"`` (a GradScaler) is refused.
        state_settings: settings whose change makes a checkpoint's state meaningless (resume is refused).
        uses_group_momentum: the update reads the module's optimizer's momentum/betas (what ``LearningRateMonitor``
            logs with ``log_momentum``; refused where it does not).
        lr_range: the usual lr range, logged when ``lr`` is inherited from the module's optimizer.
    """

    name: ClassVar[str] = "method"
    skip_backward: ClassVar[bool] = True
    trains_parameters: ClassVar[bool] = True
    keeps_grads: ClassVar[bool] = False
    fixed_params: ClassVar[bool] = True
    strategies: ClassVar[tuple[str, ...]] = (_checks.SINGLE, _checks.FSDP2)
    accumulation_fix: ClassVar[str | None] = None
    clipping_fix: ClassVar[str | None] = None
    scaler_fix: ClassVar[str] = "use precision='bf16-mixed', 'bf16-true' or '32'"
    state_settings: ClassVar[tuple[str, ...]] = ()
    uses_group_momentum: ClassVar[bool] = False
    lr_range: ClassVar[tuple[float, float] | None] = None

    def __init__(self, allow_untested: bool = False, max_consecutive_skips: int = 10) -> None:
        super().__init__()
        self.allow_untested = allow_untested
        self.guard = SkipGuard(self.name, max_consecutive_skips, notify=rank_zero_warn)
        self.holder: HolderOptimizer | None = None
        self.module: pl.LightningModule | None = None
        self.trainer: pl.Trainer | None = None
        self._pending: dict[str, Any] | None = None
        self._saved_settings: dict[str, Any] | None = None
        self._restore: list[tuple[Any, str, Any]] = []  # (object, attribute, the value teardown puts back)
        self._numbers: dict[str, tuple[float, torch.Tensor]] = {}
        self._wrapped_step: tuple[pl.LightningModule, Any, bool] | None = None
        self._pbar = ProgressBarValues()
        # every parameter, and its requires_grad, when training started (a list: module.parameters() walks every
        # submodule, about 0.5 ms a step on SmolLM2's shape, on MeZO's host-bound path)
        self._watched: list[torch.Tensor] = []
        self._trained: tuple[bool, ...] | None = None

    # ---- what a method provides ----------------------------------------------------------------------------------
    @property
    def clipping_hook_fix(self) -> str | None:
        return self.clipping_fix

    def settings(self) -> dict[str, Any]:
        """Every setting, JSON-able (saved with the state; :attr:`state_settings` name the ones checked on resume)."""
        return {}

    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Method-specific refusals at ``setup`` (raise ``MisconfigurationException`` naming the fix)."""

    def install(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the method's core objects (``self.holder`` is in place); called in ``on_fit_start``."""

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any] | None) -> None:
        """Apply restored state (``None`` on a fresh run); called in ``on_train_start``."""

    def step(self, closure: Any) -> Any:
        """The optimizer step: run ``closure`` (Lightning's training_step, and backward unless skipped) and update."""
        raise NotImplementedError

    def uninstall(self) -> None:
        """Remove hooks and anything else :meth:`install` added; called at teardown and on exceptions."""

    def method_state(self) -> dict[str, Any]:
        """The method's state for checkpoints (besides what lives in the holder's optimizer state)."""
        return {}

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """What the method trains outside the module's parameters (DFOLoRA's per-layer z), by name: what BestWeights
        keeps beside the trained parameters."""
        return {}

    def load_trained_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set what :meth:`trained_tensors` returned (BestWeights loading its best)."""
        if tensors:
            raise NotImplementedError(f"{self.name} trains nothing outside the module's parameters.")

    def state_tensors(self) -> Iterable[torch.Tensor]:
        """Tensors of method state kept outside the holder's ``state`` (MemoryReport counts them as optimizer state)."""
        return ()

    def log_step(self, pl_module: pl.LightningModule) -> None:
        """Log the method's per-step values (called after each optimizer step)."""

    # ---- helpers for methods ---------------------------------------------------------------------------------------
    @property
    def step_index(self) -> int:
        return int(self.trainer.global_step) if self.trainer is not None else 0

    @property
    def skipped_steps(self) -> int:
        return self.guard.skipped_steps

    def wrap_training_step(self, pl_module: pl.LightningModule, make: Callable[[Any], Any]) -> None:
        """Replace the module's ``training_step`` by ``make(original)`` for this fit; teardown puts it back."""
        self.restore_training_step()
        had = "training_step" in pl_module.__dict__  # an instance attribute of the user's is put back as it was
        original = pl_module.training_step
        self._wrapped_step = (pl_module, original, had)
        pl_module.training_step = make(original)  # type: ignore[method-assign]

    def restore_training_step(self) -> None:
        if self._wrapped_step is None:
            return
        module, original, had = self._wrapped_step
        if had:
            module.training_step = original  # type: ignore[method-assign]
        else:
            module.__dict__.pop("training_step", None)
        self._wrapped_step = None

    def loss_of(self, out: Any) -> torch.Tensor:
        """The loss in what ``training_step`` returned: a tensor, or a dict with ``'loss'``.

        None is Lightning's "skip this batch": it raises :class:`SkipBatch`, which a forward-only method's step turns
        into a step without an update (Lightning still counts the step, as it does for a backprop method). Under
        several processes it is refused, as Lightning documents: the other ranks would wait in a collective.
        """
        if out is None:
            if self.trainer is not None and self.trainer.world_size > 1:
                raise MisconfigurationException(
                    f"{self.name}: training_step returned None (skip this batch) under {self.trainer.world_size} "
                    "processes, where the other ranks would wait for this one in a collective. Lightning does not "
                    "support it with several processes either: filter such batches out in the data instead."
                )
            raise SkipBatch("training_step returned None (skip this batch): a CUDA graph replays one fixed step, "
                            "so it cannot skip some batches only")
        loss = out.get("loss") if isinstance(out, dict) else out
        if not isinstance(loss, torch.Tensor):
            raise MisconfigurationException(
                f"{self.name} needs training_step to return a loss tensor, a dict with 'loss', or None to skip the "
                f"batch; got {type(out).__name__}."
            )
        return loss

    def set_for_fit(self, obj: Any, attr: str, value: Any) -> None:
        """Change ``obj.attr`` (the trainer's, or this callback's settings) for this fit; teardown puts it back."""
        self._restore.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def weight_decay_note(self) -> str | None:
        """Why the module's optimizer's weight_decay is not what the method applies; None where it is."""
        if not self.trains_parameters:
            return f"which {self.name} does not apply: it changes none of the module's weights"
        wd = getattr(self, "weight_decay", None)
        if wd is not None:
            return (f"but {self.name}(weight_decay={wd}) applies its own to the matrices and none to the rest (leave "
                    f"weight_decay unset to apply the groups' own)")
        return None

    def weight_decays(self, pl_module: pl.LightningModule) -> dict[int, float] | None:
        """Per-parameter weight decay when the callback overrides it (matrices only), else None (groups' own)."""
        wd = getattr(self, "weight_decay", None)
        return None if wd is None else weight_decays(pl_module, self.holder, wd)

    # ---- Lightning hooks -------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        others = [cb for cb in getattr(trainer, "callbacks", ()) if isinstance(cb, MethodCallback) and cb is not self]
        if others:
            raise MisconfigurationException(
                f"Two method callbacks on one Trainer: {self.name} and {others[0].name} would both update the weights. "
                f"Keep one of them in Trainer(callbacks=[...])."
            )
        _checks.check_automatic_optimization(pl_module, self.name)
        _checks.check_strategy(trainer, self.name, self.strategies, self.allow_untested)
        _checks.check_no_grad_scaler(trainer, self.name, self.scaler_fix)
        _checks.check_weight_averaging(trainer, self.name, self.skip_backward, self.trains_parameters)
        _checks.check_lr_monitor(trainer, self.name, self.uses_group_momentum, self.weight_decay_note())
        if self.accumulation_fix is not None:
            _checks.check_no_accumulation(trainer, self.name, self.accumulation_fix)
        if self.clipping_fix is not None:
            _checks.check_no_clipping(trainer, self.name, self.clipping_fix)
        if self.fixed_params:
            _checks.check_no_finetuning_schedule(trainer, self.name)
        if self.clipping_hook_fix is not None:
            _checks.check_no_clipping_hook(pl_module, self.name, self.clipping_hook_fix)
        self.validate(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trainer, self.module = trainer, pl_module
        self.holder = swap_in_holder(trainer, self._holder_step, owner=self)
        self._apply_lr(trainer)
        if self.skip_backward:
            self._restore.append((trainer, "_skip_backward", _shim.get_skip_backward(trainer)))
            _shim.set_skip_backward(trainer, True)
        self.install(trainer, pl_module)
        self._pbar.install(trainer, pl_module)  # prog_bar values without a sync per step
        self.guard.diagnose = lambda: nonfinite_weights_note(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.strategy.optimizers[0] is not self.holder:  # a strategy rebuilt its optimizers
            self.holder = swap_in_holder(trainer, self._holder_step, owner=self)
        state, self._pending = self._pending, None
        if state is not None:
            self.guard.load_state_dict(state.get("skips", {}))
            self._log_changed_settings(trainer)
        elif trainer.global_step == 0:  # a fresh fit: an earlier fit's skips (the callback reused) are not its own
            self.guard.load_state_dict({})
        self.start(trainer, pl_module, None if state is None else state.get("state", {}))
        self._watched = list(pl_module.parameters())
        self._trained = tuple(p.requires_grad for p in self._watched)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.guard.resolve(wait=False)
        self.log_step(pl_module)
        self.log_number(pl_module, "skipped_steps", self.guard.skipped_steps, on_step=True, on_epoch=False, batch_size=1)
        if self.guard.partial_steps:  # steps that left out tensors with a non-finite gradient (in-backward methods)
            self.log_number(pl_module, "partial_steps", self.guard.partial_steps, on_step=True, on_epoch=False,
                            batch_size=1)

    def warn_dynamic_padding(self, trainer: pl.Trainer) -> None:
        """With ``cuda_graph``: a data module padding each batch to its own longest prompt makes a new batch shape
        (a new graph) for most batches; say so once, with the fix."""
        dm = getattr(trainer, "datamodule", None)
        if (getattr(dm, "hparams", None) or {}).get("padding") == "longest":
            rank_zero_warn(
                f"{self.name}(cuda_graph=True): the data module pads each batch to its longest prompt "
                f"(padding='longest'), so batch shapes vary and each new one is captured (up to max_graphs, then "
                f"eager). Set padding='bucket' (a few lengths) or 'max_length' on {type(dm).__name__}."
            )

    def log_number(self, pl_module: pl.LightningModule, name: str, value: float, **kwargs: Any) -> None:
        """Log a host number without a sync per step: Lightning turns a float into a device tensor with a blocking
        copy (a stream sync), so the tensor is made once and later values are written into it by a fill kernel,
        which takes the number as an argument."""
        cached = self._numbers.get(name)
        if cached is None or cached[1].device != pl_module.device:
            cached = self._numbers[name] = (value, torch.tensor(float(value), device=pl_module.device))
        elif cached[0] != value:
            cached[1].fill_(float(value))
            cached = self._numbers[name] = (value, cached[1])
        pl_module.log(name, cached[1].clone(), **kwargs)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.guard.resolve()
        self._pbar.flush()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._cleanup(trainer)
        else:  # a checkpoint read by validate/test/predict(ckpt_path=...) is not a later fit's starting state
            self._pending = self._saved_settings = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._cleanup(trainer)

    def _cleanup(self, trainer: pl.Trainer) -> None:
        self.uninstall()
        self._pbar.uninstall()
        self.restore_training_step()
        while self._restore:
            obj, attr, value = self._restore.pop()
            if attr == "_skip_backward":
                _shim.set_skip_backward(obj, value)
            else:
                setattr(obj, attr, value)
        if self.holder is not None and self.holder.owner is self:
            self.holder.owner = None  # a later fit may install another method

    def _holder_step(self, closure: Any) -> Any:
        if closure is None:
            # Lightning always passes its closure. Without one this is torch.distributed.checkpoint initialising an
            # empty optimizer state (``_init_optim_state``: zero grads, lr 0, ``step()``) while it saves or loads a
            # checkpoint: no training step may run then (DFO would evaluate a whole generation).
            return None
        self._check_trained_set()
        out = self.step(closure)
        if self.keeps_grads:  # used by the step: free them now rather than after the next forward
            for g in self.holder.param_groups:
                for p in g["params"]:
                    p.grad = None
        return out

    def _check_trained_set(self) -> None:
        """Methods fix the trained parameters when training starts (MeZO's list, the in-backward hooks): a flag that
        a module flips during the fit would be ignored, so it is an error."""
        if self._trained is None or self.module is None or not self.fixed_params:
            return
        if tuple(p.requires_grad for p in self._watched) == self._trained:
            return
        names = [n for (n, p), was in zip(self.module.named_parameters(), self._trained) if p.requires_grad != was]
        raise MisconfigurationException(
            f"{self.name}: requires_grad changed during the fit for {len(names)} parameters ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}). {self.name} fixes the trained parameters when training starts, "
            "so the change would be ignored. Fit each stage with its own trainer.fit call (freeze or unfreeze "
            "between them)."
        )

    def _apply_lr(self, trainer: pl.Trainer) -> None:
        if not hasattr(self, "lr"):
            return
        if self.lr is not None:
            own = sorted({float(g.get("initial_lr", g["lr"])) for g in self.holder.param_groups})
            if len(own) > 1:
                rank_zero_warn(
                    f"{self.name}(lr={float(self.lr):g}) sets every parameter group's lr to {float(self.lr):g}, so the "
                    f"module's per-group lrs ({', '.join(f'{x:g}' for x in own)}) and their ratios are not kept. "
                    f"Leave {self.name}(lr=None) and set the groups' lrs in configure_optimizers to keep them."
                )
            self._set_lr(trainer, float(self.lr))
        elif self.lr_range is not None:
            lr = self.holder.param_groups[0]["lr"]
            lo, hi = self.lr_range
            rank_zero_info(
                f"{self.name}: lr not set, so the module's optimizer lr {lr:g} is used; {self.name} usually needs "
                f"{lo:g} to {hi:g}. Set {self.name}(lr=...) to choose."
            )

    def _set_lr(self, trainer: pl.Trainer, lr: float) -> None:
        try:
            set_base_lr(trainer, self.holder, lr)
        except ValueError as err:
            raise MisconfigurationException(f"{self.name}(lr={lr:g}): {err}, and leave {self.name}(lr=None).") from err

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "memopt_method": self.name,
            "settings": self.settings(),
            "skips": self.guard.state_dict(),
            "state": self.method_state(),
        }

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        foreign = [v["memopt_method"] for v in states.values() if isinstance(v, dict) and "memopt_method" in v]
        if foreign:
            raise MisconfigurationException(
                f"This checkpoint was written by {foreign[0]}, and this run uses {self.name}: {self.name} cannot "
                f"continue {foreign[0]}'s optimizer state. Resume with {foreign[0]} in Trainer(callbacks=[...]). "
                + _WEIGHTS_ONLY
            )
        opt_states = checkpoint.get("optimizer_states") or []
        if any(isinstance(s, dict) and s.get("state") for s in opt_states):
            raise MisconfigurationException(
                f"This checkpoint holds a plain optimizer's state (no method callback wrote it), and this run uses "
                f"{self.name}, which cannot continue it (AdamW moments would be kept or misread). " + _WEIGHTS_ONLY
            )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("settings") or {}
        mine = self.settings()
        changed = [k for k in self.state_settings if k in saved and k in mine and saved[k] != mine[k]]
        if changed:
            diff = ", ".join(f"{k}: checkpoint {saved[k]!r}, now {mine[k]!r}" for k in changed)
            raise MisconfigurationException(
                f"{self.name}'s checkpoint was written with other settings that change the meaning of its state "
                f"({diff}). Resume with the checkpoint's settings. " + _WEIGHTS_ONLY
            )
        self._saved_settings = dict(saved)
        self._pending = dict(state_dict)

    def _log_changed_settings(self, trainer: pl.Trainer) -> None:
        saved, mine = self._saved_settings or {}, self.settings()
        changed = {k: (saved[k], mine[k]) for k in mine if k in saved and saved[k] != mine[k]}
        if not changed:
            return
        if "lr" in changed and mine.get("lr") is not None:
            self._set_lr(trainer, float(mine["lr"]))  # the restored optimizer state brought the old one
        rank_zero_info(
            f"{self.name}: resuming with changed settings "
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            + "."
        )

