"""``MeZO``: zeroth-order fine-tuning of an unchanged automatic-optimization LightningModule (a thin callback).

The algorithm lives in :mod:`lightning_memopt.mezo.core`; the lifecycle (holder, skip-backward, state, teardown) in
:class:`~lightning_memopt.callbacks.method.MethodCallback`. Here:

* the module's ``training_step`` is wrapped on the instance: each call runs the original 2n times under ``no_grad``
  (θ ± εz, eval mode by default) and accumulates the projected gradient, so gradient accumulation uses the same z
  over the micro-batches and averages g. (Running the forwards inside the holder's step instead would see only the
  last micro-batch: Lightning calls the step once per accumulated batch.)
* the holder's step all-reduces g over data-parallel ranks and applies the update (a no-op on the device for a
  non-finite loss).
* ``cuda_graph=True`` replays the 2n perturbed forwards of each batch shape from a CUDA graph
  (:class:`~lightning_memopt.core.graphs.GraphReplay`): the directions' seeds live in a device tensor the replay
  reads, the module's own ``self.log`` calls are recorded at capture and re-issued with each replay's values.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from typing_extensions import override

from lightning_memopt.callbacks import _checks
from lightning_memopt.callbacks.graphed import clone_tensors, last_per_name, recording_logs, replay_logs
from lightning_memopt.callbacks.method import MethodCallback, SkipBatch
from lightning_memopt.core import validate
from lightning_memopt.core.fsdp import all_reduce_mean, is_fsdp2, local
from lightning_memopt.core.graphs import DeviceValues, GraphReplay, graph_batch
from lightning_memopt.core.holder import decays
from lightning_memopt.core.modes import eval_mode
from lightning_memopt.core.population import per_sample_fn
from lightning_memopt.core.zero3 import is_zero3
from lightning_memopt.mezo.core import Perturbation, Precondition, Variant, ZeroOrder, ZOConfig, make_params
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
        distribution: directions z: ``"normal"`` (MeZO's Gaussian: Philox and Box–Muller) or ``"rademacher"``
            (±1, classic SPSA; same second moment, cheaper to generate).
        perturbation: ``"dense"`` (MeZO's z on every element) or ``"lowrank"``: each weight matrix ``[m, n]`` moves
            along ``U Vᵀ / sqrt(r)`` with seeded factors ``U [m, r]``, ``V [n, r]`` (never stored), vectors along
            dense z (see :mod:`lightning_memopt.mezo.population`).
        perturbation_rank: r of the low-rank directions.
        batched: evaluate the step's 2·n_spsa members (antithetic pairs) in batched forwards of the batch repeated
            per member, when the module defines ``per_sample_loss(batch)`` (per-example losses; ``HFCausalLM`` does)
            and no ``metric`` is set; otherwise each member runs the module's ``training_step`` (the log says which).
        population_chunk: members per batched forward (bounds activation memory; None: all at once).
        precondition: ``"none"``; ``"layer"``: each tensor is perturbed and updated in proportion to its RMS
            relative to the whole model's (a diagonal preconditioner, fixed at the start of the fit);
            ``"curvature"``: HiZOO's Hessian estimate from the same forwards (one more, unperturbed member per step),
            ``(L+ + L− − 2·L0)/ε²``, kept as an EMA (rate ``beta2``) and dividing the projected gradients, so lr is
            the fraction of a Newton step along the directions (population estimator only).
        seed: base seed; step t's directions depend only on (seed, t), so resume is exact.
        eval_mode: run the two forwards in eval mode (dropout off), as the paper does.
        metric: optional class path of a torchmetrics metric (e.g. ``"torchmetrics.classification.MulticlassAccuracy"``)
            that replaces the loss as the ZO objective (negated when higher is better); non-differentiable
            objectives are fine. It is computed on ``preds``/``target`` when ``training_step`` returns them (e.g.
            generated answers and references for an F1 objective), else on ``logits``/``labels``.
        metric_kwargs: arguments of the metric (e.g. ``{"num_classes": 2}``).
        record_trajectory: keep the (seeds, g, lr, wd) of every step in ``self.trajectory`` (and checkpoints).
        trajectory_path: write the trajectory as JSON there at the end of fit (implies ``record_trajectory``);
            ``{log_dir}`` in it is the Trainer's ``log_dir`` (the logger's version folder). A file already there is
            refused on a fresh fit (it would be overwritten); a resume writes its own run's file again.
        allow_untested: warn instead of raising on a strategy outside single-device and FSDP2.
        max_consecutive_skips: steps in a row with a non-finite loss (each skipped, weights untouched) before the
            fit stops with an error.
        cuda_graph: replay each batch shape's perturbed forwards from a CUDA graph instead of running them eagerly:
            the same kernels and the same weights, without Python and launch overhead per step (the speed-up on
            small and medium models). Needs fixed batch shapes (``padding="max_length"`` or ``"bucket"``) and a
            ``training_step`` whose computation depends on the batch tensors only (``batch_idx`` and other
            arguments are taken as at capture). Where it cannot work (CPU, several processes, a ``metric``
            objective, a capture that fails) it warns once with the reason and runs the eager step.
        max_graphs: batch shapes captured at most with ``cuda_graph`` (each keeps one forward's activations).
        group_bytes: the plain estimator perturbs a submodule's weights in one kernel launch when they total at most
            this many bytes (a decoder layer of a small model); its perturbed copies exist during that submodule's
            forward. Larger: fewer launches, that much more memory inside a layer. 0: one launch per weight's module.
        overlap: the plain estimator makes each layer's (or group's) perturbed copies one ahead, on a side CUDA
            stream, while the one before runs its forward: the Gaussian pass is compute-bound and can share the GPU
            with the forward's GEMMs. The same weights either way; one more group's copies at a time. Experimental:
            on an H100 at 1.1B the forward hid none of the pass and the step was no faster (docs/mezo.md). Not for
            the population estimator (an error); on CPU, under FSDP2 or DeepSpeed ZeRO-3 it warns once and makes
            the copies as without it.

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
    state_settings = (
        "eps", "n_spsa", "one_sided", "variant", "beta1", "beta2", "window", "distribution", "seed", "perturbation",
        "perturbation_rank", "precondition",
    )
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
        perturbation: Perturbation = "dense",
        perturbation_rank: int = 4,
        batched: bool = False,
        population_chunk: int | None = 8,
        precondition: Precondition = "none",
        seed: int = 0,
        eval_mode: bool = True,
        metric: str | None = None,
        metric_kwargs: dict[str, Any] | None = None,
        record_trajectory: bool = False,
        trajectory_path: str | None = None,
        allow_untested: bool = False,
        max_consecutive_skips: int = 10,
        cuda_graph: bool = False,
        max_graphs: int = 8,
        group_bytes: int = 64 << 20,
        overlap: bool = False,
    ) -> None:
        super().__init__(allow_untested, max_consecutive_skips)
        self.cuda_graph = bool(cuda_graph)
        self.max_graphs = validate.at_least(max_graphs, 1, "max_graphs")
        self.group_bytes = validate.at_least(group_bytes, 0, "group_bytes")
        self._graph: GraphReplay | None = None
        self._seed_dev: DeviceValues | None = None
        self._graph_call: tuple | None = None
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
            perturbation=perturbation,
            perturbation_rank=perturbation_rank,
            batched=batched,
            population_chunk=population_chunk,
            precondition=precondition,
        )
        self.overlap = bool(overlap)
        if self.overlap and self.config.population:
            raise MisconfigurationException(
                "MeZO(overlap=True) makes the plain estimator's per-layer perturbed copies ahead; the population "
                "estimator (perturbation='lowrank', batched=True or a precondition) makes none. "
                "Drop overlap=True."
            )
        self.lr = validate.optional_lr(lr)
        self.weight_decay = None if weight_decay is None else validate.nonnegative(weight_decay, "weight_decay")
        self.seed = int(seed)
        self.eval_mode = eval_mode
        self.metric_path = metric
        self.metric_kwargs = dict(metric_kwargs or {})
        self.record_trajectory = record_trajectory or trajectory_path is not None
        self.trajectory_path = trajectory_path
        self._trajectory_file: str | None = None  # trajectory_path with {log_dir} resolved at setup
        self.trajectory: dict[str, Any] | None = None
        self._traj_pending: list[tuple[dict[str, Any], torch.Tensor]] = []
        self.zo: ZeroOrder | None = None
        self._metric: Any = None
        self._higher_is_better = False
        self._per_sample: Any = None
        self._reset_accumulators()
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._evaluations = 0
        self._rounding_checked = False
        self._metrics_warned = False
        self._metric_modules: tuple[pl.LightningModule, list[tuple[str, Any]]] | None = None

    @property
    def evaluations(self) -> int:
        """Forward passes of one training batch run so far (a replayed or batched member counts one, a skipped
        step's too; kept in checkpoints): the x axis of accuracy against forward passes."""
        return self._evaluations

    def _reset_accumulators(self) -> None:
        self._g_sum: torch.Tensor | None = None
        self._loss_sum: torch.Tensor | None = None
        self._micro = 0
        self._seeds: list[int] | None = None

    @override
    def settings(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {**asdict(self.config), "seed": self.seed, "lr": self.lr, "weight_decay": self.weight_decay,
                "cuda_graph": self.cuda_graph, "overlap": self.overlap}

    @override
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.trajectory_path is not None and trainer.fast_dev_run:
            rank_zero_info("MeZO: fast_dev_run writes no trajectory file (nor Lightning a checkpoint).")
            self._trajectory_file = None
        elif self.trajectory_path is not None:
            log_dir = trainer.log_dir or trainer.default_root_dir  # no logger: the Trainer's root folder
            self._trajectory_file = self.trajectory_path.replace("{log_dir}", str(log_dir))
            self._check_trajectory_path()
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

    def _check_trajectory_path(self) -> None:
        """Found now, not after the whole fit, where the trajectory is written."""
        path = os.path.abspath(self._trajectory_file)
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as err:
            problem = f"cannot create {parent} ({err.strerror})"
        else:
            problem = (
                f"{path} is a directory" if os.path.isdir(path)
                else None if os.access(parent, os.W_OK) else f"{parent} is not writable"
            )
        if problem:
            raise MisconfigurationException(
                f"MeZO(trajectory_path={self.trajectory_path!r}): {problem}. Give a file path in a writable directory."
            )

    # ---- wiring ----------------------------------------------------------------------------------------------
    @override
    def install(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        decay_fn = decays if self.weight_decay is not None else None
        params = make_params(pl_module, [g["params"] for g in self.holder.param_groups], decay_fn)
        if not params:
            raise MisconfigurationException("MeZO found no trainable parameter in the optimizer's param groups.")
        _checks.check_no_float64(self.holder.param_groups, "MeZO", "perturbs and updates")
        overlap = self.overlap
        if overlap:
            why = (f"it needs CUDA streams (this run is on {pl_module.device.type})" if pl_module.device.type != "cuda"
                   else "under FSDP2 the weights are sharded until each unit's own forward" if is_fsdp2(pl_module)
                   else "DeepSpeed ZeRO-3 perturbs in place" if any(is_zero3(zp.param) for zp in params)
                   else None)
            if why is not None:
                rank_zero_warn(f"MeZO(overlap=True): {why}; the perturbed copies are made as without overlap.")
                overlap = False
        self.zo = ZeroOrder(pl_module, self.config, self.seed, params, group_bytes=self.group_bytes, guard=self.guard,
                            overlap=overlap)
        self._per_sample = None
        c = self.config
        if c.population:
            hook = per_sample_fn(pl_module)
            if c.batched and hook is not None and self._metric is None:
                self._per_sample = hook
                how = f"batched: {c.population_chunk or 'all'} members per forward through per_sample_loss"
            else:
                why = ("batched=False" if not c.batched else "a metric objective needs training_step's outputs"
                       if self._metric is not None else f"{type(pl_module).__name__} has no per_sample_loss(batch)")
                how = f"one training_step per member ({why})"
            members = c.n_spsa + 1 if c.one_sided else 2 * c.n_spsa + (c.precondition == "curvature")
            rank_zero_info(f"MeZO population: {members} members per step, {c.perturbation} directions, {how}.")
        if self._metric is not None:
            self._metric = self._metric.to(pl_module.device)

        def wrap(original: Any) -> Any:
            def training_step(*args: Any, **kwargs: Any) -> Any:
                return self._zo_training_step(original, pl_module, args, kwargs)

            return training_step

        self.wrap_training_step(pl_module, wrap)
        # each fresh fit records its own (a checkpoint's replaces it in start); fit() again on the same Trainer goes
        # on from its step, so the trajectory goes on too
        if self.record_trajectory and not (trainer.global_step > 0 and self.trajectory is not None):
            self.trajectory = new_trajectory(_base_reference(pl_module), params, self.config, self.seed,
                                             self.zo.scales)
            self._traj_pending.clear()
        n = sum(zp.param.numel() for zp in params)
        rank_zero_info(f"MeZO: {len(params)} tensors ({n / 1e6:.2f}M elements), {self.config}.")
        if self.cuda_graph:
            self._install_graph(trainer, pl_module)

    def _install_graph(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._graph = GraphReplay(self._graph_step, "MeZO(cuda_graph=True)", self.max_graphs)
        if pl_module.device.type != "cuda":
            reason = f"CUDA graphs need a CUDA device (this run is on {pl_module.device.type})"
        elif trainer.world_size > 1 or is_fsdp2(pl_module) or (self.zo is not None and self.zo.zero3):
            reason = ("under several processes, FSDP2 or ZeRO-3 the step holds collectives or in-place writes, which "
                      "this capture does not take")
        elif self._metric is not None:
            reason = "a metric objective is computed on the host"
        elif self.config.population and (self.config.perturbation != "lowrank" or self._per_sample is None):
            reason = ("the population estimator is captured with low-rank directions evaluated batched through "
                      "per_sample_loss only (dense directions would keep every member's z; one training_step per "
                      "member is not captured)")
        else:
            self._seed_dev = DeviceValues(self.config.n_spsa, torch.int64, pl_module.device)
            self.warn_dynamic_padding(trainer)
            return
        self._graph.disable(reason)

    @override
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any] | None) -> None:
        if state is None and trainer.global_step == 0 and self._trajectory_file is not None:
            # rank 0 writes it; every rank must agree to stop
            there = trainer.strategy.broadcast(os.path.exists(self._trajectory_file), src=0)
            if there:
                raise MisconfigurationException(
                    f"MeZO(trajectory_path={self.trajectory_path!r}): {self._trajectory_file} already exists, and this "
                    f"fresh fit would overwrite it with its own trajectory. Give another path ('{{log_dir}}/"
                    f"trajectory.json' writes it into the logger's version folder), move the file away, or resume "
                    f"the run that wrote it from its checkpoint."
                )
        if state is None or self.zo is None:
            return
        self.zo.load_history_state(state.get("history", []), pl_module.device)
        self.zo.load_curvature_state(state.get("curvature"), pl_module.device)
        if state.get("scales") is not None and self.zo.directions is not None:
            self.zo.directions.scales = {int(k): float(v) for k, v in state["scales"].items()}
        if state.get("trajectory") is not None:
            self.trajectory = state["trajectory"]
        elif self.record_trajectory and (self.zo.history and self.config.variant != "sgd"
                                         or state.get("curvature") is not None):
            raise MisconfigurationException(
                "MeZO(record_trajectory=True) would start recording mid-run: the checkpoint holds no trajectory, and "
                f"the {self.config.variant} window (or the curvature estimate) it restores is in no record, so a replay "
                "could not reproduce the weights. Record from the first step, or resume without record_trajectory."
            )
        self._evaluations = int(state.get("evaluations", 0))

    @override
    def uninstall(self) -> None:
        try:
            self._flush_trajectory()  # a fit that stopped early keeps every recorded step
        except Exception:  # noqa: BLE001 - after a device error the original exception is the one to see
            pass
        if self.zo is not None:
            self.zo.close()
        self._graph, self._seed_dev, self._graph_call = None, None, None  # the graphs' memory goes with them
        self._metric_modules = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._flush_trajectory()
        if self._trajectory_file is not None and self.trajectory is not None:
            _save(self.trajectory, self._trajectory_file)

    # ---- the step --------------------------------------------------------------------------------------------
    def _objective(self, out: Any) -> torch.Tensor:
        if self._metric is not None and out is not None:
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
        return self.loss_of(out)

    def _zo_training_step(self, original: Any, pl_module: pl.LightningModule, args: tuple, kwargs: dict) -> Any:
        assert self.zo is not None
        seeds = self.zo.seeds(pl_module.trainer.global_step)
        if self._seeds is not None and self._seeds != seeds:  # a new step without an update: should not happen
            self._reset_accumulators()
        if self._graph is not None and self._graph.disabled is None and args:
            try:
                g, loss, out = self._graphed_estimate(original, pl_module, args, kwargs, seeds)
            except SkipBatch:
                return None
        else:
            last: list[Any] = [None]
            skipped = False
            counts = self._metric_counts(pl_module)
            with recording_logs(pl_module) as logs:
                try:
                    with eval_mode(pl_module, self.eval_mode):
                        g, loss = self._estimate(lambda: self._objective(_kept(original(*args, **kwargs), last)),
                                                 seeds, args[0] if args else kwargs.get("batch"))
                except SkipBatch:
                    skipped = True
            # training_step ran once per perturbed forward: its logs count once, with the last forward's values
            replay_logs(pl_module, last_per_name(logs))
            self._warn_metric_updates(counts)
            if skipped:
                return None  # this batch adds nothing to the step (with no other micro-batch, no update)
            out = last[0]
        if self._per_sample is not None and out is None:
            # training_step did not run (the batched population): the module's own log of the loss, where it has one
            # (a ModelCheckpoint monitoring train_loss saved nothing without it)
            log_loss = getattr(pl_module, "log_train_loss", None)
            if callable(log_loss):
                log_loss(loss, args[0] if args else kwargs.get("batch"))
        self._seeds = seeds
        self._evaluations += self.zo.forwards_per_estimate
        self._g_sum = g if self._g_sum is None else self._g_sum + g
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._micro += 1
        # the module's other outputs (the last perturbed forward's) reach on_train_batch_end as they would
        return {**out, "loss": loss} if isinstance(out, dict) else {"loss": loss}

    def _metric_counts(self, pl_module: pl.LightningModule) -> dict[str, tuple[Any, int]]:
        if self._metrics_warned:
            return {}
        if self._metric_modules is None or self._metric_modules[0] is not pl_module:  # found once per module
            from torchmetrics import Metric  # Lightning's own dependency

            self._metric_modules = (pl_module, [(name, m) for name, m in pl_module.named_modules()
                                                if isinstance(m, Metric) and hasattr(m, "_update_count")])
        return {name: (m, m._update_count) for name, m in self._metric_modules[1]}

    def _warn_metric_updates(self, counts: dict[str, tuple[Any, int]]) -> None:
        # a torchmetrics state cannot be replayed like a log call: say so once instead of counting silently
        many = sorted(name for name, (m, n) in counts.items() if getattr(m, "_update_count", 0) - n > 1)
        if many:
            self._metrics_warned = True
            per_step = self.zo.forwards_per_estimate if self.zo is not None else 2
            rank_zero_warn(
                f"MeZO: training_step runs once per perturbed forward ({per_step} per step), so the metric(s) "
                f"{many} it updates count every perturbed forward. Its self.log calls "
                "count once (the last forward's values); update metrics in on_train_batch_end from the outputs "
                "training_step returns (MeZO passes them on) to count each batch once."
            )

    def _estimate(
        self, loss_fn: Any, seeds: list[int], batch: Any, seed_t: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's estimate: batched through ``per_sample_loss`` where the population runs that way (the
        estimator ignores ``batch`` otherwise), else through ``loss_fn``."""
        assert self.zo is not None
        return self.zo.estimate(loss_fn, seeds, seed_t, per_sample=self._per_sample, batch=batch)

    def _graphed_estimate(
        self, original: Any, pl_module: pl.LightningModule, args: tuple, kwargs: dict, seeds: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        assert self._graph is not None and self._seed_dev is not None
        self._seed_dev.set(seeds)  # read by the replay: this step's directions
        self._graph_call = (original, pl_module, args[1:], kwargs, seeds)
        g, loss, logs, directions, out = self._graph(graph_batch(pl_module, args[0]))
        if directions is not None and self.zo is not None and self.zo.directions is not None:
            cache, captured = directions  # the replay rewrote the captured factors with this step's
            self.zo.directions.adopt(cache, captured, seeds)
        replay_logs(pl_module, logs)  # the module's own logging, with this replay's values
        return g.clone(), loss.clone(), clone_tensors(out)  # the graph's outputs are rewritten by the next replay

    def _graph_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, list, Any, Any]:
        """What the graph holds: the 2n perturbed forwards of ``batch`` (or the population's batched forwards),
        seeds read from the device. Returns g, the loss, the module's log calls (the last of each name), (population)
        the factor cache with the seeds it was captured for, and the last forward's ``training_step`` output."""
        assert self.zo is not None and self._graph_call is not None and self._seed_dev is not None
        original, pl_module, rest, kwargs, seeds = self._graph_call
        last: list[Any] = [None]
        with recording_logs(pl_module) as logs, eval_mode(pl_module, self.eval_mode):
            g, loss = self._estimate(lambda: self._objective(_kept(original(batch, *rest, **kwargs), last)), seeds,
                                     batch, self._seed_dev.tensor)
        directions = self.zo.directions
        snapshot = None if directions is None else (directions.snapshot(), list(seeds))
        return g, loss, last_per_name(logs), snapshot, last[0]

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
        sample = self._low_precision_sample(lrs)
        ok = self.zo.update(self._seeds, g, lrs, wds, loss=loss, step=self.step_index)
        if sample is not None:
            self._warn_if_rounded_away(sample, ok, g, lrs)
        if self.trajectory is not None:
            entry = {"step": self.step_index, "seeds": list(self._seeds), "g": None, "lr": lrs, "wd": wds}
            self.trajectory["steps"].append(entry)
            # g is read to the host in batches (a read per step would sync the stream every step)
            self._traj_pending.append((entry, g.detach()))
            steps = self.trajectory["steps"]
            self.guard.on_skip(lambda: steps.remove(entry) if entry in steps else None)  # a skipped step: no update
            if len(self._traj_pending) >= 256:
                self._flush_trajectory()
        self._last = (g[: self.config.n_spsa].mean(), loss)  # curvature's g also holds the n curvatures
        self._reset_accumulators()
        return result

    def _low_precision_sample(self, lrs: list[float]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Before the first update with lr > 0: copies of up to 64k elements of the three largest bf16/fp16 trained
        tensors, to see whether the update moved them (None once checked, or with fp32 weights: no cost then)."""
        if self._rounding_checked or self.zo is None or max(lrs, default=0.0) <= 0.0:
            return None
        low = [local(zp.param).detach() for zp in self.zo.params if zp.param.dtype in (torch.bfloat16, torch.float16)]
        low = sorted((t for t in low if t.numel()), key=lambda t: -t.numel())[:3]
        if not low:
            self._rounding_checked = True
            return None
        return [(t, t.reshape(-1)[: 1 << 16].clone()) for t in low]

    def _warn_if_rounded_away(
        self, sample: list[tuple[torch.Tensor, torch.Tensor]], ok: torch.Tensor | None, g: torch.Tensor,
        lrs: list[float],
    ) -> None:
        """MeZO's updates (lr·g·z ≈ 1e-6) are far below a bf16 weight's resolution (≈ 2⁻⁸ relative): they round away
        and the model never trains, silently. One host read, at the first update that should move the weights."""
        same = torch.stack([(t.reshape(-1)[: b.numel()] == b).sum() for t, b in sample]).sum().float()
        moved = (g != 0).any().to(same.device)  # g = 0 (equal losses) moves nothing whatever the dtype
        if ok is not None:
            moved = moved & ok.to(same.device)
        flags = torch.stack([same, moved.float()]).tolist()
        if not flags[1]:  # a skipped step (non-finite loss) or g = 0 leaves the weights: look at the next one
            return
        self._rounding_checked = True
        total = sum(b.numel() for _, b in sample)
        if flags[0] / total > 0.9:
            rank_zero_warn(
                f"MeZO: an update at lr={max(lrs):.3g} left {flags[0] / total:.0%} of the sampled "
                f"{sample[0][1].dtype} weights unchanged: lr·g·z is below their resolution, so the updates round "
                "away and the model does not train. Keep the trained weights in fp32 (precision='bf16-mixed' or "
                "'32-true'), or raise lr if a schedule starts it low."
            )

    @override
    def log_step(self, pl_module: pl.LightningModule) -> None:
        if self._last is not None:
            g, loss = self._last
            self._last = None
            pl_module.log("mezo/projected_grad", g, on_step=True, on_epoch=False)
            pl_module.log("mezo/loss", loss, on_step=True, on_epoch=False, prog_bar=True)

    # ---- state -----------------------------------------------------------------------------------------------
    def _flush_trajectory(self) -> None:
        if self._traj_pending:
            values = torch.stack([g.float().reshape(-1) for _, g in self._traj_pending]).tolist()
            for (entry, _), v in zip(self._traj_pending, values):
                entry["g"] = [float(x) for x in v]
            self._traj_pending.clear()

    @override
    def method_state(self) -> dict[str, Any]:
        self._flush_trajectory()
        return {
            "history": self.zo.history_state() if self.zo is not None else [],
            "curvature": None if self.zo is None else self.zo.curvature_state(),
            "scales": None if self.zo is None or self.zo.scales is None else {str(k): v for k, v in
                                                                             self.zo.scales.items()},
            "trajectory": self.trajectory,
            "evaluations": self._evaluations,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        traj = (state_dict.get("state") or {}).get("trajectory")
        if self.record_trajectory and traj is not None:
            self.trajectory = traj


def _kept(out: Any, last: list[Any]) -> Any:
    last[0] = out  # the latest training_step output (the step returns it, its loss replaced)
    return out


def _base_reference(pl_module: pl.LightningModule) -> Any:
    hp = dict(getattr(pl_module, "hparams", {}) or {})
    ref = {k: hp[k] for k in ("model_name_or_path", "model_config", "gguf_file", "init_seed") if k in hp}
    ref["module"] = f"{type(pl_module).__module__}.{type(pl_module).__qualname__}"
    return ref


@rank_zero_only
def _save(trajectory: dict[str, Any], path: str) -> None:
    save_trajectory(trajectory, path)
