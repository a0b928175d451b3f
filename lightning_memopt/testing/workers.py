"""Worker functions for :func:`run_distributed` (also callable in-process with ``world_size=1``)."""

from __future__ import annotations

import importlib
from typing import Any, Optional

import lightning.pytorch as pl
import torch

from lightning_memopt.core.fsdp import full
from lightning_memopt.testing.tiny import full_state, tiny_datamodule, tiny_model, tiny_trainer


class LossRecorder(pl.Callback):
    """Records the training loss the module logged at each optimizer step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        v = trainer.callback_metrics.get("train_loss")
        if v is not None:
            self.losses.append(float(v))


class ScriptedScore(pl.Callback):
    """Logs the next of ``scores`` as ``score`` at each validation, and records the full weights each one saw."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = list(scores)
        self.seen: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("score", self.scores[len(self.seen)], sync_dist=True)
        self.seen[trainer.global_step] = full_state(pl_module)


def best_weights_result(trainer: pl.Trainer, model: torch.nn.Module) -> dict[str, Any]:
    from lightning_memopt.callbacks.best_weights import BestWeights

    best = next(c for c in trainer.callbacks if isinstance(c, BestWeights))
    seen = next(c for c in trainer.callbacks if isinstance(c, ScriptedScore)).seen
    return {"best_step": best.best_step, "seen": seen}


def build_callback(spec: Optional[dict[str, Any]]) -> list[pl.Callback]:
    if not spec:
        return []
    mod, name = spec["class_path"].rsplit(".", 1)
    return [getattr(importlib.import_module(mod), name)(**spec.get("init_args", {}))]


def _resolve(target: str) -> Any:
    mod, name = target.split(":")
    return getattr(importlib.import_module(mod), name)


def fit_tiny(
    world_size: int = 1,
    steps: int = 10,
    global_batch: int = 16,
    callback: Optional[dict[str, Any]] = None,
    model_kwargs: Optional[dict[str, Any]] = None,
    dm_kwargs: Optional[dict[str, Any]] = None,
    trainer_kwargs: Optional[dict[str, Any]] = None,
    seed: int = 0,
    callbacks: Optional[list[dict[str, Any]]] = None,
    inspect: Optional[str] = None,
    num_nodes: int = 1,
    strategy_kwargs: Optional[dict[str, Any]] = None,
    strategy: Optional[str] = None,
    ckpt_path: Optional[str] = None,
) -> dict[str, Any]:
    """Fit the tiny model for ``steps`` on ``world_size`` CPU processes (FSDP2 when > 1); same global batch.

    ``callback``/``callbacks`` are class-path specs; ``inspect`` ("module:function") is called as
    ``f(trainer, model)`` after the fit and its dict joins the result (what a test compares across world sizes).
    ``num_nodes`` splits the processes over nodes (``devices = world_size // num_nodes``); ``strategy_kwargs`` go to
    :class:`FSDP2Strategy` (e.g. ``{"hsdp": True}``). ``strategy="zero3"`` runs :class:`ZeRO3Strategy` instead
    (DeepSpeed ZeRO-3, at any ``world_size`` including 1).
    """
    from lightning_memopt.strategies import FSDP2Strategy

    pl.seed_everything(seed, verbose=False)
    model = tiny_model(**(model_kwargs or {}))
    dm = tiny_datamodule(batch_size=global_batch // world_size, **(dm_kwargs or {}))
    rec = LossRecorder()
    extra = [cb for spec in callbacks or [] for cb in build_callback(spec)]
    kw: dict[str, Any] = dict(max_steps=steps, callbacks=[rec, *build_callback(callback), *extra])
    if strategy == "zero3":
        from lightning_memopt.strategies import ZeRO3Strategy

        kw.update(devices=world_size // num_nodes, num_nodes=num_nodes,
                  strategy=ZeRO3Strategy(**(strategy_kwargs or {})), use_distributed_sampler=False)
    elif world_size > 1:
        strategy = FSDP2Strategy(**{"save_distributed_checkpoint": False, **(strategy_kwargs or {})})
        kw.update(devices=world_size // num_nodes, num_nodes=num_nodes, strategy=strategy,
                  use_distributed_sampler=False)
    kw.update(trainer_kwargs or {})
    trainer = tiny_trainer(**kw)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    out = {"state": full_state(model), "losses": rec.losses, "global_step": trainer.global_step,
           "mesh": mesh_of(model)}
    if inspect is not None:
        out.update(_resolve(inspect)(trainer, model))
    return out


def mesh_of(model: torch.nn.Module) -> Optional[dict[str, Any]]:
    """The device mesh and placements of the model's first parameter (None when it is not a DTensor)."""
    from lightning_memopt.core.fsdp import is_dtensor, reshard_all

    reshard_all(model)  # after a forward-only step the root group holds unsharded plain tensors
    p = next(model.parameters())
    if not is_dtensor(p):
        return None
    from lightning_memopt.core.fsdp import _world, shard_group

    mesh = p.device_mesh
    return {"names": mesh.mesh_dim_names, "shape": tuple(mesh.shape), "placements": [str(x) for x in p.placements],
            "shard_group_size": _world(shard_group(p)) if shard_group(p) is not None else 1}


class _NaNGradColumns(torch.autograd.Function):
    """The value as it is; its gradient NaN in the last dim's first ``n`` entries."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int) -> torch.Tensor:
        ctx.n = n
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        g = g.clone()
        g[..., : ctx.n] = float("nan")
        return g, None


class NaNGradAt(pl.Callback):
    """At training step ``step``, the gradient of ``module``'s output is NaN in its first ``n`` features: that
    Linear's weight gradient is NaN in its first ``n`` rows (under FSDP2, on the first rank's shard only) and every
    tensor before it is NaN all through; the loss stays finite (a backward kernel's bug)."""

    def __init__(self, module: str, step: int, n: int = 2) -> None:
        self.module, self.step, self.n = module, step, n
        self._handle: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def hook(mod: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            if pl_module.training and trainer.global_step == self.step and torch.is_grad_enabled():
                return _NaNGradColumns.apply(out, self.n)
            return out

        self._handle = pl_module.get_submodule(self.module).register_forward_hook(hook)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._handle.remove()


class NaNLossOnRank(pl.Callback):
    """Rank ``rank``'s training loss is NaN at step ``step`` (a bad batch on one rank)."""

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        original = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if trainer.global_rank == self.rank and trainer.global_step == self.step:
                return {**out, "loss": out["loss"] * float("nan")} if isinstance(out, dict) else out * float("nan")
            return out

        pl_module.training_step = training_step


def scaler_state(trainer: pl.Trainer, model: torch.nn.Module) -> dict[str, Any]:
    """LOMO/AdaLomo's fp16 loss scaler and skip count (``fit_tiny``'s ``inspect``)."""
    from lightning_memopt.lomo.callback import _Lomo

    cb = next(c for c in trainer.callbacks if isinstance(c, _Lomo))
    return {"scaler": cb.scaler.state_dict() if cb.scaler else None, "skipped": cb.skipped_steps}


def skip_counts(trainer: pl.Trainer, model: torch.nn.Module) -> dict[str, Any]:
    """The method callback's counts of skipped steps and of tensors left out (``fit_tiny``'s ``inspect``)."""
    from lightning_memopt.callbacks.method import MethodCallback

    guard = next(c for c in trainer.callbacks if isinstance(c, MethodCallback)).guard
    return {"skips": (guard.skipped_steps, guard.partial_steps, guard.skipped_tensors)}


def mezo_trajectory(trainer: pl.Trainer, model: torch.nn.Module) -> dict[str, Any]:
    """MeZO's recorded trajectory (``fit_tiny``'s ``inspect``)."""
    from lightning_memopt.mezo.callback import MeZO

    return {"trajectory": next(c for c in trainer.callbacks if isinstance(c, MeZO)).trajectory}


class FitnessRecorder(pl.Callback):
    """Records DFOLoRA's population fitness after each step."""

    def __init__(self) -> None:
        self.fitness: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from lightning_memopt.dfo.callback import DFOLoRA

        dfo = next(c for c in trainer.callbacks if isinstance(c, DFOLoRA))
        if dfo.last_fitness is not None:
            self.fitness.append(dfo.last_fitness.detach().cpu().double())


def dfo_result(trainer: pl.Trainer, model: torch.nn.Module) -> dict[str, Any]:
    from lightning_memopt.dfo.callback import DFOLoRA

    cb = next(c for c in trainer.callbacks if isinstance(c, DFOLoRA))
    rec = next(c for c in trainer.callbacks if isinstance(c, FitnessRecorder))
    return {
        "z": [z.cpu().double() for z in cb.lora.z], "fitness": rec.fitness, "stats": cb.lora.stats(),
        "grads": sum(p.grad is not None for p in model.parameters()),
    }


def fit_dfo(world_size: int = 1, dfo: Optional[dict[str, Any]] = None, **kwargs: Any) -> dict[str, Any]:
    """Fit the tiny model with DFOLoRA (settings ``dfo``); returns z's, fitness per step and statistics too."""
    kwargs.setdefault("steps", 4)
    return fit_tiny(
        world_size,
        callback={"class_path": "lightning_memopt.DFOLoRA", "init_args": dfo or {}},
        callbacks=[{"class_path": f"{__name__}.FitnessRecorder"}],
        inspect=f"{__name__}:dfo_result",
        **kwargs,
    )


def memory_report_result(trainer: pl.Trainer, model: torch.nn.Module) -> dict[str, Any]:
    from dataclasses import asdict

    from lightning_memopt.callbacks.memory_report import MemoryReport

    report = next(c for c in trainer.callbacks if isinstance(c, MemoryReport))
    # a second trainer call on the same (already sharded) module, as `memopt fit --test_after_fit` does
    (metrics,) = trainer.test(model, datamodule=trainer.datamodule, verbose=False)
    return {"memory": asdict(report.breakdown), "test_acc": float(metrics["test_acc"])}


def fit_with_memory_report(world_size: int = 1, **kwargs: Any) -> dict[str, Any]:
    """Fit the tiny model with a MemoryReport, then test it with the same trainer."""
    spec = {"class_path": "lightning_memopt.MemoryReport", "init_args": {"print_table": False}}
    return fit_tiny(world_size, callback=spec, inspect=f"{__name__}:memory_report_result", **kwargs)


def fit_tiny_checkpointed(
    world_size: int,
    ckpt_dir: str,
    steps: int,
    callback: dict[str, Any],
    every: int,
    ckpt_path: Optional[str] = None,
    warmup_steps: int = 0,
    k: int = 64,
    global_batch: int = 16,
) -> dict[str, Any]:
    """FSDP2 fit of the tiny model with a checkpoint every ``every`` steps, or resumed from ``ckpt_path``.

    Returns full weights, the holder's method state gathered to full tensors (``"<param>.<key>"``) and the lr, so a
    test can compare an uninterrupted run with a resumed one.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_memopt.strategies import FSDP2Strategy

    pl.seed_everything(0, verbose=False)
    model = tiny_model(lr_schedule="constant", warmup_steps=warmup_steps)
    cbs = build_callback(callback)
    if ckpt_path is None:
        cbs.append(ModelCheckpoint(ckpt_dir, every_n_train_steps=every, save_top_k=-1))
    trainer = tiny_trainer(
        max_steps=steps, callbacks=cbs, enable_checkpointing=ckpt_path is None, devices=world_size,
        strategy=FSDP2Strategy(save_distributed_checkpoint=False), use_distributed_sampler=False,
    )
    trainer.fit(model, tiny_datamodule(k=k, batch_size=global_batch // world_size), ckpt_path=ckpt_path)
    holder = trainer.strategy.optimizers[0]
    names = {id(p): n for n, p in model.named_parameters()}
    opt = {}
    for p, st in holder.state.items():
        for key, v in st.items():
            opt[f"{names[id(p)]}.{key}"] = full(v) if isinstance(v, torch.Tensor) else v
    return {"state": full_state(model), "opt": opt, "lr": holder.param_groups[0]["lr"]}


class SaveAt(pl.callbacks.Checkpoint):
    """Saves one checkpoint at optimizer step ``step``: sharded (``<dir>/dcp``, torch.distributed.checkpoint, one
    file per rank) and full (``<dir>/full.ckpt``, gathered on rank 0). A ``Checkpoint`` so that Lightning runs it
    after every other callback's ``on_train_batch_end``, as it runs ModelCheckpoint."""

    def __init__(self, dirpath: str, step: int) -> None:
        self.dirpath, self.step = dirpath, step
        self.snapshot: Optional[dict[str, Any]] = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        import os

        self.snapshot = snapshot(trainer, pl_module)
        strategy = trainer.strategy
        sharded = getattr(strategy, "_save_distributed_checkpoint", None)
        trainer.save_checkpoint(os.path.join(self.dirpath, "dcp" if sharded else "full.ckpt"))
        if sharded:  # the same state once more through the full (rank-0) path: an independent reference
            strategy._save_distributed_checkpoint = False
            try:
                trainer.save_checkpoint(os.path.join(self.dirpath, "full.ckpt"))
            finally:
                strategy._save_distributed_checkpoint = True


class SnapshotAtStart(pl.Callback):
    """Records :func:`snapshot` before the first batch of a fit (a resumed run: the state the checkpoint gave)."""

    def __init__(self) -> None:
        self.snapshot: Optional[dict[str, Any]] = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.snapshot is None:
            self.snapshot = snapshot(trainer, pl_module)


def snapshot(trainer: pl.Trainer, model: torch.nn.Module) -> dict[str, Any]:
    """Full weights, the holder's state gathered to full tensors (``"<param>.<key>"``), the method callback's state
    and the lr, on CPU: what a test compares across world sizes and checkpoint formats."""
    from lightning_memopt.callbacks.method import MethodCallback

    holder = trainer.strategy.optimizers[0]
    names = {id(p): n for n, p in model.named_parameters()}
    opt = {f"{names[id(p)]}.{key}": _cpu(v) for p, st in holder.state.items() for key, v in st.items()}
    method = next((c for c in trainer.callbacks if isinstance(c, MethodCallback)), None)
    return {
        "state": full_state(model), "opt": opt, "lr": holder.param_groups[0]["lr"],
        "method": None if method is None else _cpu(method.state_dict()["state"]), "global_step": trainer.global_step,
    }


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return full(obj).detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def fit_resumable(
    world_size: int,
    callback: dict[str, Any],
    steps: int,
    save_dir: Optional[str] = None,
    save_at: Optional[int] = None,
    ckpt_path: Optional[str] = None,
    k: int = 8,
    global_batch: int = 8,
    model_kwargs: Optional[dict[str, Any]] = None,
    dm_kwargs: Optional[dict[str, Any]] = None,
    strategy_kwargs: Optional[dict[str, Any]] = None,
    strategy_name: str = "fsdp2",
) -> dict[str, Any]:
    """FSDP2 fit of the tiny model on ``world_size`` processes (1 included: a one-rank mesh), saving a sharded and a
    full checkpoint at step ``save_at``, or resumed from ``ckpt_path`` (either kind). ``strategy_name="zero3"``:
    :class:`ZeRO3Strategy` (its checkpoints are full files: ``full.ckpt`` only); ``"auto"``: Lightning's default on
    one process, without FSDP2 (``full.ckpt`` holds the optimizer's own ``state_dict``).

    Returns the :func:`snapshot` at the end, plus ``"saved"`` (the snapshot at ``save_at``) or ``"loaded"`` (the
    snapshot before the first batch of a resumed fit).
    """
    from lightning_memopt.strategies import FSDP2Strategy

    pl.seed_everything(0, verbose=False)
    model = tiny_model(**{"lr_schedule": "constant", **(model_kwargs or {})})
    cbs = build_callback(callback)
    probe: Any = SaveAt(save_dir, save_at) if save_at is not None else SnapshotAtStart()
    cbs.append(probe)
    if strategy_name == "zero3":
        from lightning_memopt.strategies import ZeRO3Strategy

        strategy: Any = ZeRO3Strategy(**(strategy_kwargs or {}))
    elif strategy_name == "auto":
        strategy = "auto"
    else:
        strategy = FSDP2Strategy(**{"save_distributed_checkpoint": True, **(strategy_kwargs or {})})
    trainer = tiny_trainer(max_steps=steps, callbacks=cbs, devices=world_size, strategy=strategy,
                           use_distributed_sampler=False, enable_checkpointing=save_at is not None)
    dm = tiny_datamodule(k=k, batch_size=global_batch // world_size, **(dm_kwargs or {}))
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    out = snapshot(trainer, model)
    out["saved" if save_at is not None else "loaded"] = probe.snapshot
    return out


def run_jobs(world_size: int, jobs: list[dict[str, Any]]) -> list[Any]:
    """Run several worker functions one after another in the same processes (one launch, several fits): each job is
    ``{"target": "module:function", "kwargs": {...}}`` and gets ``world_size`` too. Returns their results in order."""
    return [_resolve(job["target"])(world_size=world_size, **job.get("kwargs", {})) for job in jobs]


def abort_once(world_size: int, marker: str) -> int:
    """Dies from SIGABRT (as a native crash does) on its first launch, returns the launch count on the next: the
    launcher's relaunch-after-a-crash test."""
    import os
    from pathlib import Path

    path = Path(marker)
    launches = (len(path.read_text()) if path.exists() else 0) + 1
    path.write_text("x" * launches)
    if launches == 1:
        os.abort()
    return launches


def gloo_sum(world_size: int) -> float:
    """One gloo all-reduce of rank + 1 over the launch (the launcher's port test)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return t.item()


def raise_on_rank0(world_size: int, marker: str) -> None:
    """Rank 0 fails as Python code fails while the other ranks are stuck (as one connecting to a store that is gone
    stays: gloo's own peers notice a closed connection, a store client retries until its timeout)."""
    import os
    import time

    if os.environ["RANK"] == "0":
        raise_error(world_size, marker)
    time.sleep(3600)


def raise_error(world_size: int, marker: str) -> None:
    """Counts its launches in ``marker``, then fails as Python code fails (never relaunched)."""
    from pathlib import Path

    path = Path(marker)
    path.write_text((path.read_text() if path.exists() else "") + "x")
    raise ValueError("a Python error in the worker")


def fit_tiny_deepspeed_picked_cuda(world_size: int, **kwargs: Any) -> dict[str, Any]:
    """:func:`fit_tiny` after DeepSpeed chose its CUDA accelerator, as it does on a GPU machine (a ZeRO-3 fit on a CPU
    Trainer there); returns the fit's result and the accelerator DeepSpeed ends with."""
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    set_accelerator(CUDA_Accelerator())
    out = fit_tiny(world_size, **kwargs)
    out["deepspeed_accelerator"] = get_accelerator().device_name()
    return out


def class_test_metrics(world_size: int = 1, test_limit: int = 64, eval_batch_size: int = 4) -> dict[str, Any]:
    """The tiny classifier's test accuracy, macro F1 and loss on the first ``test_limit`` synthetic test rows, on
    ``world_size`` CPU processes (FSDP2 when > 1)."""
    from lightning_memopt.strategies import FSDP2Strategy

    pl.seed_everything(0, verbose=False)
    model, dm = tiny_model(), tiny_datamodule(k=8, test_limit=test_limit, eval_batch_size=eval_batch_size)
    kw: dict[str, Any] = {}
    if world_size > 1:
        kw.update(devices=world_size, strategy=FSDP2Strategy(save_distributed_checkpoint=False))
    res = tiny_trainer(**kw).test(model, dm, verbose=False)[0]
    return {"acc": float(res["test_acc"]), "f1": float(res["test_f1"]), "loss": float(res["test_loss"])}


def squad_test_metrics(world_size: int = 1, data_file: str = "", max_new_tokens: int = 6,
                       stop_text: Optional[str] = None, test_limit: int = 8,
                       eval_batch_size: Optional[int] = None) -> dict[str, Any]:
    """The tiny generation model's greedy test answers on a SQuAD-format file, on ``world_size`` CPU processes (FSDP2
    when > 1: every rank runs the same number of decoding steps, its rows stopping apart): test EM, F1 and loss,
    and the token ids this rank generated."""
    from lightning_memopt.data.qa import SQuADDataModule
    from lightning_memopt.strategies import FSDP2Strategy

    pl.seed_everything(0, verbose=False)
    model = tiny_model(objective="generation", max_new_tokens=max_new_tokens, stop_text=stop_text)
    made: list[list[int]] = []
    generate = model.generate_ids

    def recorded(*args: Any, **kwargs: Any) -> list[list[int]]:
        out = generate(*args, **kwargs)
        made.extend(out)
        return out

    model.generate_ids = recorded  # type: ignore[method-assign]
    dm = SQuADDataModule(data_file=data_file, train_articles=[0], test_articles=[3, 4], test_limit=test_limit,
                         val_size=4, eval_batch_size=eval_batch_size or 8 // world_size, max_length=256)
    kw: dict[str, Any] = {}
    if world_size > 1:
        kw.update(devices=world_size, strategy=FSDP2Strategy(save_distributed_checkpoint=False))
    res = tiny_trainer(**kw).test(model, dm, verbose=False)[0]
    return {"em": float(res["test_em"]), "f1": float(res["test_f1"]), "loss": float(res["test_loss"]), "ids": made}
