"""A stand-in optimizer for methods that update weights themselves.

The holder shares ``param_groups`` with the module's own optimizer, so LR schedulers (bound to that optimizer) and
``LearningRateMonitor`` keep driving ``lr``. Its ``state`` holds the method's own state, so checkpoints carry it.
``step(closure)`` hands the closure to the method's step function.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterator, Optional

import torch
from torch.optim import Optimizer

from lightning_memopt._torch_shim import mark_stepped
from lightning_memopt.core.fsdp import full_ndim

StepFn = Callable[[Optional[Callable[[], Any]]], Any]


class HolderOptimizer(Optimizer):
    """Keeps ``param_groups`` (shared with ``wrapped``) and method state; ``step`` calls ``step_fn``.

    Args:
        wrapped: the module's optimizer from ``configure_optimizers``; it never steps and allocates no state.
        step_fn: called as ``step_fn(closure)``; defaults to just running the closure.
        owner: the method callback that installed the holder (two methods on one trainer are refused).
    """

    def __init__(self, wrapped: Optimizer, step_fn: Optional[StepFn] = None, owner: Any = None) -> None:
        # Optimizer.__init__ on a placeholder sets torch's own bookkeeping (hooks, profiling); the groups are then the
        # wrapped optimizer's own list, not copies: LR schedulers hold those dicts.
        super().__init__([torch.empty(0, requires_grad=True)], dict(wrapped.defaults))
        self.param_groups = wrapped.param_groups
        self.state = defaultdict(dict)
        self.wrapped = wrapped
        self.step_fn = step_fn
        self.owner = owner

    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer: LearningRateMonitor names lr columns after it (one column per group, not two)."""
        return self.wrapped

    def __repr__(self) -> str:
        return f"HolderOptimizer(wrapping {type(self.wrapped).__name__}, {len(self.param_groups)} groups)"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like ``Optimizer``, but keep sharing the wrapped groups and keep the method state's own dtypes.

        ``Optimizer.load_state_dict`` installs new group dicts (LR schedulers bound to the wrapped optimizer would no
        longer reach them) and casts all tensor state to the parameter's dtype (fp32 moments of bf16 weights would be
        rounded, uint8 8-bit state would turn float), so both are undone here.
        """
        super().load_state_dict(state_dict)
        for wg, ng in zip(self.wrapped.param_groups, self.param_groups):
            for k, v in ng.items():
                if k != "params":
                    wg[k] = v
        self.param_groups = self.wrapped.param_groups
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        index = dict(zip(saved_ids, params))
        for key, saved in state_dict["state"].items():
            p = index.get(key)
            if p is None or p not in self.state:
                continue
            for k, v in saved.items():
                if isinstance(v, torch.Tensor):
                    self.state[p][k] = v.to(device=self.state[p][k].device, copy=True)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        mark_stepped(self.wrapped)
        if self.step_fn is None:
            if closure is None:
                return None
            with torch.enable_grad():
                return closure()
        return self.step_fn(closure)


def swap_in_holder(trainer: Any, step_fn: Optional[StepFn] = None, owner: Any = None) -> HolderOptimizer:
    """Replace the trainer's single optimizer with a holder (call from ``on_fit_start``).

    A holder the same ``owner`` installed earlier (a strategy that rebuilt its optimizers, a second ``fit``) is
    reused; one installed by another method callback is an error: two methods cannot both update the weights.
    """
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    optimizers = trainer.strategy.optimizers
    if len(optimizers) != 1:
        raise MisconfigurationException(
            f"This method supports a LightningModule with exactly one optimizer; configure_optimizers returned "
            f"{len(optimizers)}."
        )
    opt = optimizers[0]
    if isinstance(opt, HolderOptimizer):
        if opt.owner is not None and owner is not None and opt.owner is not owner:
            raise MisconfigurationException(
                f"Two method callbacks on one Trainer: {type(opt.owner).__name__} and {type(owner).__name__} would "
                f"both update the weights. Keep one of them in Trainer(callbacks=[...])."
            )
        opt.step_fn, opt.owner = step_fn, owner
        return opt
    holder = HolderOptimizer(opt, step_fn, owner)
    trainer.strategy.optimizers = [holder]
    return holder


def _schedulers(sched: Any) -> Iterator[Any]:
    """A scheduler and those it drives (SequentialLR, ChainedScheduler)."""
    yield sched
    for inner in getattr(sched, "_schedulers", ()):
        yield from _schedulers(inner)


def _rescalable() -> tuple[type, ...]:
    """Schedulers whose every lr is the group's lr or one of the attributes :func:`set_base_lr` scales."""
    from torch.optim import lr_scheduler as L

    names = (
        "LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR",
        "PolynomialLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "OneCycleLR", "CyclicLR",
        "ReduceLROnPlateau", "SequentialLR", "ChainedScheduler",
    )
    return tuple(getattr(L, n) for n in names if hasattr(L, n))


def set_base_lr(trainer: Any, optimizer: Optimizer, lr: float) -> None:
    """Override the module's lr with a method-specific one, keeping any scheduler's shape.

    Every lr of group ``i`` (the group's, and each scheduler's copies, nested ones included) is scaled by
    ``lr / base_i``, where ``base_i`` is the lr the schedule is built around: the optimizer's (``initial_lr``), or
    the peak of OneCycleLR and CyclicLR. Schedulers whose lrs hide elsewhere are refused with a ValueError.
    """
    from torch.optim import lr_scheduler as L

    groups = optimizer.param_groups
    scheds = [s for cfg in trainer.lr_scheduler_configs for s in _schedulers(cfg.scheduler)]
    unknown = sorted({type(s).__name__ for s in scheds if not isinstance(s, _rescalable())})
    if unknown:
        raise ValueError(
            f"the lr override cannot rescale {', '.join(unknown)} to keep its shape (it knows torch's own schedulers "
            f"and LambdaLR, which Hugging Face's schedules are); set the lr in configure_optimizers instead"
        )
    if not scheds or (len(scheds) == 1 and type(scheds[0]) is L.LambdaLR):
        # exactly lr and lr·f(step) (Hugging Face's schedules), not a product that may round to a neighbour
        for g in groups:
            g["lr"] = lr
            if "initial_lr" in g:
                g["initial_lr"] = lr
        if scheds:
            sched, step = scheds[0], max(scheds[0].last_epoch, 0)
            sched.base_lrs = [lr for _ in sched.base_lrs]
            for g, f in zip(groups, sched.lr_lambdas):
                g["lr"] = lr * f(step)
            sched._last_lr = [g["lr"] for g in groups]
        return
    base = [float(g.get("initial_lr", g["lr"])) for g in groups]
    for s in scheds:
        if isinstance(s, L.OneCycleLR):
            base = [float(g["max_lr"]) for g in groups]
        elif isinstance(s, L.CyclicLR):
            base = [float(m) for m in s.max_lrs]
    if scheds and any(b == 0 for b in base):
        raise ValueError("the module's lr is 0, so its schedule has no scale to change; set a nonzero lr there")
    ratio = [lr / b if b else 1.0 for b in base]
    floors = [s for s in scheds if getattr(s, "eta_min", 0)]  # the cosine schedules': one number for every group
    if floors and len(set(ratio)) > 1:
        raise ValueError(
            f"{type(floors[0]).__name__}(eta_min={floors[0].eta_min}) is one floor for groups the override scales "
            f"differently; set the lr in configure_optimizers instead"
        )
    for g, r, b in zip(groups, ratio, base):
        if not b:  # an lr of 0 and no scheduler: nothing to keep
            g["lr"] = lr
            continue
        for k in ("lr", "initial_lr", "max_lr", "min_lr"):  # max_lr, min_lr: OneCycleLR's
            if k in g:
                g[k] = g[k] * r
    for s in scheds:
        for attr in ("base_lrs", "max_lrs", "min_lrs", "_last_lr"):
            v = getattr(s, attr, None)
            if isinstance(v, list) and len(v) == len(ratio):
                setattr(s, attr, [x * r for x, r in zip(v, ratio)])
        if s in floors:
            s.eta_min *= ratio[0]


_NO_DECAY = ("bias", "norm", "ln_", "layernorm", "rmsnorm")


def no_decay(name: str) -> bool:
    """Bias and normalisation weights get no weight decay (the MeZO/HF convention)."""
    low = name.lower()
    return any(k in low for k in _NO_DECAY)


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether a ``weight_decay`` override applies to ``p``: matrices, not biases or norm weights."""
    return full_ndim(p) >= 2 and not no_decay(name)


def weight_decays(module: torch.nn.Module, optimizer: Optimizer, override: Optional[float]) -> dict[int, float]:
    """Per-parameter weight decay, by ``id``: the one meaning of every method's ``weight_decay`` argument.

    ``override=None`` keeps each group's own ``weight_decay``; a number applies to the matrices of :func:`decays`
    and sets 0 for the rest, whatever group they are in.
    """
    names = {id(p): n for n, p in module.named_parameters()}
    out: dict[int, float] = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            if override is None:
                out[id(p)] = float(g.get("weight_decay", 0.0))
            else:
                out[id(p)] = float(override) if decays(names.get(id(p), ""), p) else 0.0
    return out
