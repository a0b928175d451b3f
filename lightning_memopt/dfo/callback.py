"""DFOLoRA: derivative-free LoRA (C-LoRA with CMA-ES, F-LoRA with fireworks) as a Lightning callback (glue only).

The step is :class:`~lightning_memopt.dfo.core.LayerwiseDFO`'s; the lifecycle is
:class:`~lightning_memopt.callbacks.method.MethodCallback`'s. Here: the module's classification contract, the batch,
the statistics batches (taken without consuming the train loader's epoch), logging and the budget stop. After each
generation the module's own ``training_step`` runs under the new z (with CMA-ES queued behind the population forward:
a generation reads nothing on the host), so ``train_loss`` and the progress bar work.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Subset
from typing_extensions import override

from lightning_memopt.callbacks.graphed import GraphedTrainingStep
from lightning_memopt.callbacks.method import MethodCallback, SkipBatch
from lightning_memopt.core.population import per_sample_fn
from lightning_memopt.dfo.core import DFOSettings, LayerwiseDFO
from lightning_memopt.dfo.lora import DEFAULT_PATTERN


class DFOLoRA(MethodCallback):
    """Forward-only LoRA tuning with CMA-ES (C-LoRA) or fireworks (F-LoRA) for an unchanged LightningModule.

    Any automatic-optimization module works; the fitness of a candidate comes (the log says which):

    * from label-word logits, for a prompt classifier like :class:`~lightning_memopt.HFCausalLM` with label words
      (``module(input_ids, attention_mask)`` returns ``[B, n_labels]``, batches carry ``labels``): batched, with
      the layers below the current one computed once;
    * else from the module's ``per_sample_loss(batch)`` (per-example losses ``[B]`` whose mean is the training
      loss), batched over the batch repeated per candidate;
    * else from the module's own ``training_step`` (its loss, or ``"loss"`` of the dict it returns), called once
      per candidate with that candidate's LoRA active: always correct, not batched.

    Args:
        optimizer: ``"cmaes"`` (C-LoRA) or ``"fireworks"`` (F-LoRA: EFWA with dynFWA's core amplitude).
        rank: LoRA rank r.
        d: dimension of each layer's z (split evenly over the A and B factors of each target).
        population: candidates per generation.
        sigma: initial step size (CMA-ES) / core explosion amplitude (fireworks).
        budget: total candidate evaluations (forward passes of one batch); training stops when it is spent.
            None: only ``max_steps`` bounds the run.
        loss: ``"ce"`` (cross-entropy over label words: the module's own loss) or ``"hinge"`` (multiclass hinge on
            the label-word logits with ``margin``).
        margin: hinge margin.
        batched: evaluate the population in one forward (expanded batch); False: one forward per candidate.
        split: with ``batched``, compute the layers below the current one once and expand only from its input;
            False expands the input ids (every layer runs on the expanded batch).
        verify_split: on the first statistics batch, check the split forward against the fully expanded one and
            fall back to ``split=False`` (with a warning) if they differ.
        target_pattern: regex over module names selecting the LoRA targets (default: query and key projections).
        init_scale: scale of the random map relative to the targets' output std (BBTv2's alpha): a candidate at
            ``|z| ≈ sigma·sqrt(d)`` changes a target's output by about this fraction of its std. Small values protect
            a pretrained model's attention (docs/results.md has the SST-2 sweep behind the default).
        stat_batches: training batches whose hidden-state statistics set the random map's std.
        n_fireworks, n_gaussian, bound: fireworks settings (fireworks kept, Gaussian sparks, search box).
        amplification, reduction: dynFWA's factors for the core firework's amplitude after a generation whose best
            spark beat (or did not beat) the core. dynFWA uses 1.2 / 0.9 on exact functions; with minibatch
            fitness some spark beats the core by noise alone in nearly every generation, so amplification above 1
            makes the amplitude grow without bound. The default 1.0 never grows it.
        population_chunk: evaluate at most this many candidates per forward (bounds the expanded batch's memory;
            the layers below the current one then run once per chunk). None: the whole population at once (faster,
            more memory; docs/dfo_lora.md has the measured trade-off).
        optimizer_device: where the optimizers' state lives and computes (default: the module's device).
        offload_idle: between a layer's generations, park its CMA-ES covariance and eigenvectors (2·d² float64,
            4 MB per layer at d=500; 120 MB for SmolLM2's 30 layers) in host memory, so the GPU holds one layer's.
            Costs a 4 MB copy each way per generation. No effect when the state is on the CPU.
        seed: seed of the random maps and of the optimizers' sampling.
        cuda_graph: replay the population forward (each layer's, per batch shape) from CUDA graphs, and the
            module's own ``training_step`` that follows each generation (one graph per batch shape; its ``self.log``
            calls re-issued with each replay's values); the optimizer's ask/tell stay eager. Needs fixed batch
            shapes (``padding="max_length"`` or ``"bucket"``); where it cannot work (CPU, several processes, one
            candidate at a time) it warns once with the reason and runs eagerly (see docs/mezo.md, the same
            machinery).
        max_graphs: graphs kept at most with ``cuda_graph`` (default: 4 batch shapes for every layer).
        allow_untested: warn instead of raising on strategies other than single device and FSDP2.
        max_consecutive_skips: generations in a row whose every candidate had a non-finite fitness (each skipped,
            state untouched) before the fit stops with an error.

    Example::

        model = HFCausalLM(model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
        trainer = Trainer(max_steps=400, callbacks=[DFOLoRA(optimizer="cmaes", budget=8000)])
        trainer.fit(model, PromptClassificationDataModule(data_dir="data/sst2", k=16))
    """

    name = "DFOLoRA"
    trains_parameters = False  # the adapters live in hooks; the module's own weights stay frozen
    accumulation_fix = "Each generation is evaluated on one batch; raise the batch size instead."
    clipping_fix = "DFOLoRA computes no gradients; remove gradient_clip_val."
    state_settings = (
        "optimizer", "rank", "d", "population", "target_pattern", "init_scale", "sigma", "seed", "n_fireworks",
        "n_gaussian",
    )

    def __init__(
        self,
        optimizer: Literal["cmaes", "fireworks"] = "cmaes",
        rank: int = 4,
        d: int = 500,
        population: int = 20,
        sigma: float = 1.0,
        budget: int | None = 8000,
        loss: Literal["ce", "hinge"] = "ce",
        margin: float = 1.0,
        batched: bool = True,
        split: bool = True,
        verify_split: bool = True,
        target_pattern: str = DEFAULT_PATTERN,
        init_scale: float = 0.05,
        stat_batches: int = 4,
        n_fireworks: int = 5,
        n_gaussian: int = 1,
        bound: float | None = None,
        amplification: float = 1.0,
        reduction: float = 0.9,
        population_chunk: int | None = 10,
        optimizer_device: str | None = None,
        offload_idle: bool = True,
        seed: int = 0,
        allow_untested: bool = False,
        max_consecutive_skips: int = 10,
        cuda_graph: bool = False,
        max_graphs: int | None = None,
    ) -> None:
        super().__init__(allow_untested, max_consecutive_skips)
        self.config = DFOSettings(
            optimizer, rank, d, population, sigma, budget, loss, margin, batched, split, verify_split, target_pattern,
            init_scale, stat_batches, n_fireworks, n_gaussian, bound, amplification, reduction, population_chunk,
            optimizer_device, offload_idle, seed, cuda_graph, max_graphs,
        )
        self.dfo: LayerwiseDFO | None = None
        self._graphed_step: GraphedTrainingStep | None = None
        self._in_generation = False
        self._batch: Any = None
        self._batch_idx = 0
        self._logged = True
        self._merged = False  # merge() folded the adapters into the weights: this callback cannot train again

    @property
    def lora(self):  # noqa: ANN201 - the ZLoRA of the running fit
        return None if self.dfo is None else self.dfo.lora

    @property
    def evaluations(self) -> int:
        return 0 if self.dfo is None else self.dfo.evaluations

    @property
    def generation(self) -> int:
        return 0 if self.dfo is None else self.dfo.generation

    @property
    def last_fitness(self) -> torch.Tensor | None:
        return None if self.dfo is None else self.dfo.last_fitness

    @property
    def exhausted(self) -> bool:
        return self.dfo is not None and self.dfo.exhausted

    @override
    def validate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dev = self.config.optimizer_device
        if dev is not None and torch.device(dev).type == "cuda" and not torch.cuda.is_available():
            raise MisconfigurationException(
                f"DFOLoRA(optimizer_device={dev!r}) needs a GPU, and this machine has none; use optimizer_device='cpu' "
                "or leave it None (the module's device)."
            )
        if self._merged:
            raise MisconfigurationException(
                "DFOLoRA.merge() folded this callback's adapters into the weights and removed its hooks, so it cannot "
                "train again. Fit with a fresh DFOLoRA(...), which adds new adapters on the merged weights."
            )

    @override
    def settings(self) -> dict[str, Any]:
        return asdict(self.config)

    def _paths(self, pl_module: LightningModule) -> dict[str, Any]:
        """The fitness path for this module (see the class docstring) as LayerwiseDFO's arguments."""
        objective = getattr(getattr(pl_module, "hparams", {}), "get", lambda *_: None)("objective")
        if getattr(pl_module, "label_token_ids", None) is not None and objective in (None, "classification"):
            return {}
        hook = per_sample_fn(pl_module)
        if hook is not None:
            return {"per_sample": hook}
        return {"step_loss": self._step_loss}

    def _step_loss(self, batch: Any) -> torch.Tensor:
        assert self.module is not None
        return self.loss_of(self.module.training_step(batch, self._batch_idx))

    @override
    def install(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for p in pl_module.parameters():
            if p.requires_grad:  # forward-only: autograd records nothing; the flags come back after the fit
                self.set_for_fit(p, "requires_grad", False)
        if self.dfo is not None and self.dfo.module is pl_module:
            self._graph_training_step(pl_module)
            return  # a second fit of the same module continues with the adapters it has
        if self.dfo is not None:
            self.dfo.remove()
            self._graphed_step = None  # its graphs read the old module's factors
        try:
            self.dfo = LayerwiseDFO(pl_module, self.config, guard=self.guard, **self._paths(pl_module))
            if self.config.cuda_graph and pl_module.device.type == "cuda":
                self.warn_dynamic_padding(trainer)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        self._graph_training_step(pl_module)
        c = self.config
        t = sum(len(b.targets) for b in self.dfo.lora.blocks)
        rank_zero_info(
            f"DFOLoRA[{c.optimizer}]: rank-{c.rank} LoRA on {t} modules in {self.dfo.lora.n_blocks} layers, "
            f"z of {c.d} per layer, population {c.population}, budget {c.budget} forwards, "
            f"{self._describe()}. It has no learning rate: the optimizer's lr and any LR scheduler leave it as it is "
            f"(sigma={c.sigma} sets the search's first step)."
        )

    def _graph_training_step(self, pl_module: LightningModule) -> None:
        """Where the population forward replays, the module's training_step after each generation replays too (an
        eager Hugging Face forward reads its attention mask on the host, and its launches cost as much as the
        replayed population forward at small batches). Its LoRA factors sit at fixed addresses (``static_fixed``)."""
        assert self.dfo is not None
        graph = self.dfo.graph
        if graph is None or graph.disabled is not None or not _on_cuda(pl_module):
            return  # the population forward's own warning says why
        if self._graphed_step is None:
            shapes = max(1, (self.config.max_graphs or 4 * self.dfo.lora.n_blocks) // self.dfo.lora.n_blocks)
            self._graphed_step = GraphedTrainingStep("DFOLoRA(cuda_graph=True), the module's training_step", shapes)

        def wrap(original: Any) -> Any:
            def training_step(*args: Any, **kwargs: Any) -> Any:
                if self._in_generation and args and self._graphed_step is not None:
                    return self._graphed_step(original, pl_module, args[0], args[1:], kwargs)
                return original(*args, **kwargs)

            return training_step

        self.wrap_training_step(pl_module, wrap)

    def _describe(self) -> str:
        assert self.dfo is not None
        c = self.config
        if self.dfo.path == "logits":
            return f"{'batched' if c.batched else 'sequential'} evaluation on label-word logits"
        if self.dfo.path == "per_sample":
            n = (c.population_chunk or c.population) if c.batched else 1
            return f"fitness from per_sample_loss, {n} candidates per forward"
        return "fitness from one training_step per candidate (define per_sample_loss(batch) to batch them)"

    @override
    def start(self, trainer: Trainer, pl_module: LightningModule, state: dict[str, Any] | None) -> None:
        assert self.dfo is not None
        if state and state.get("merged"):
            raise MisconfigurationException(
                "This checkpoint was saved after DFOLoRA.merge(): its adapters are in the weights and no search state "
                "is left to resume. Resume from a checkpoint saved before merge(), or fit a fresh DFOLoRA from its "
                "weights (load them, then trainer.fit without ckpt_path)."
            )
        if state:  # FSDP restores callback state after on_fit_start: applied here
            try:
                self.dfo.load_state_dict(state)
            except ValueError as err:
                raise MisconfigurationException(str(err)) from None
            return
        if self.dfo.lora.stats_ready:
            return
        with trainer.precision_plugin.forward_context():  # the precision the training forwards use
            self.dfo.collect_stats(self._stat_batches(trainer))
        if self.config.batched and self.config.split and not self.dfo.split:
            rank_zero_warn(
                "DFOLoRA: computing the layers below the current one once (split=True) does not reproduce the "
                "full forward for this model; falling back to expanding the whole batch (split=False)."
            )

    def _stat_batches(self, trainer: Trainer) -> list[dict[str, torch.Tensor]]:
        """The first batches of this process's share in dataset order, from a loader of our own: iterating the train
        loader would draw from its sampler's generator and shift the epoch's order."""
        loader = trainer.train_dataloader
        if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset) and loader.batch_size:
            ds, sampler = loader.dataset, loader.sampler
            if isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1:
                # this rank's share, in dataset order: every rank reading the same rows counted them twice
                ds = Subset(ds, range(sampler.rank, len(ds), sampler.num_replicas))
            loader = DataLoader(ds, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
        out = []
        with torch.random.fork_rng(devices=[]):
            for b in loader:
                out.append(trainer.strategy.batch_to_device(b))
                if len(out) >= self.config.stat_batches:
                    break
        if not out:
            raise MisconfigurationException("DFOLoRA needs at least one training batch for its statistics.")
        return out

    @override
    def uninstall(self) -> None:
        pass  # the LoRA hooks stay: the trained module keeps its adapters (merge() folds them into the weights)

    # ---- the step ------------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch, self._batch_idx = batch, batch_idx

    @override
    def step(self, closure: Any) -> Any:
        def run_closure() -> Any:
            with torch.enable_grad():  # the closure expects it; nothing requires grad, so no graph is built
                return closure()

        if self.dfo is None or self.dfo.exhausted or self._batch is None:
            return run_closure()
        # the module's own training_step (train_loss, the progress bar) runs under the new point; with CMA-ES nothing
        # has waited for the population forward, so its launches queue behind it (up to its own first host read)
        out: list[Any] = []

        def after_update() -> None:
            self._in_generation = True  # the wrapped training_step replays (cuda_graph)
            try:
                out.append(run_closure())
            finally:
                self._in_generation = False
            if out[-1] is None:  # training_step returned None (skip this batch): the generation is taken back
                self.loss_of(None)

        try:
            with self.trainer.precision_plugin.forward_context():  # autocast as in training_step
                self.dfo.generation_step(self._batch, self.step_index, after_update=after_update)
        except SkipBatch:  # training_step returned None for this batch: no generation
            return out[-1] if out else run_closure()
        self._logged = False
        return out[-1]

    @override
    def log_step(self, pl_module: LightningModule) -> None:
        fit = self.last_fitness
        if fit is not None and not self._logged:
            self._logged = True
            bs = self._batch["input_ids"].shape[0] if isinstance(self._batch, dict) else 1
            pl_module.log("dfo_best_fitness", fit.min().float(), prog_bar=True, batch_size=bs)
            self.log_number(pl_module, "dfo_evaluations", self.evaluations, batch_size=bs)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.exhausted and not trainer.should_stop:
            rank_zero_info(
                f"DFOLoRA: budget of {self.config.budget} forwards spent after {self.generation} generations."
            )
            trainer.should_stop = True

    # ---- evaluating a checkpoint ----------------------------------------------------------------------------------
    def _checkpoint_adapters(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``trainer.validate/test/predict(ckpt_path=...)``: the adapters live in this callback's state, not in the
        module's weights, so the checkpoint's are installed here (else the base model, or the last fit's adapters,
        would be evaluated under the checkpoint's name)."""
        if trainer.state.fn == "fit" or self._pending is None:
            return  # in a fit, on_train_start applies it
        pending, self._pending = self._pending, None
        state = pending.get("state") or {}
        if state.get("merged"):  # its weights hold the adapters: hooks of this callback would add them twice
            if self.dfo is not None:
                self.dfo.remove()
                self.dfo, self._graphed_step = None, None
            rank_zero_info("DFOLoRA: the checkpoint's adapters were merged into its weights; evaluating those.")
            return
        try:
            if self.dfo is None or self.dfo.module is not pl_module:
                if self.dfo is not None:
                    self.dfo.remove()
                self.dfo = LayerwiseDFO(pl_module, self.config, guard=self.guard, **self._paths(pl_module))
                self._graphed_step = None
            # the adapters only, as Lightning loads the weights: the search state is not a later fit's start
            self.dfo.load_adapters(state)
        except (ValueError, KeyError) as err:
            raise MisconfigurationException(f"DFOLoRA cannot apply the checkpoint's adapters: {err}") from None
        rank_zero_info(f"DFOLoRA: evaluating the checkpoint's adapters (generation {state.get('generation')}).")

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._checkpoint_adapters(trainer, pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._checkpoint_adapters(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._checkpoint_adapters(trainer, pl_module)

    def merge(self) -> None:
        """Fold the learned LoRA into the module's q/k weights and remove the hooks (e.g. before saving the module
        for plain inference). Training cannot continue with this callback afterwards."""
        if self.dfo is None:
            raise RuntimeError("DFOLoRA.merge(): nothing to merge before fit has run.")
        self.dfo.merge()
        self._graphed_step = None
        self._merged = True

    # ---- state -----------------------------------------------------------------------------------------------
    @override
    def method_state(self) -> dict[str, Any]:
        if self._merged:  # the weights hold the adapters; a state with z's would have them applied a second time
            return {"merged": True}
        return {} if self.dfo is None else self.dfo.state_dict()

    @override
    def state_tensors(self) -> list[torch.Tensor]:
        return [] if self.dfo is None else self.dfo.tensors()

    @override
    def trained_tensors(self) -> dict[str, torch.Tensor]:
        if self.dfo is None:
            return {}
        self.guard.resolve()  # a skipped generation puts its layer's point back
        return {f"z.{k}": z for k, z in enumerate(self.dfo.lora.z)}

    @override
    def load_trained_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.dfo is None:
            raise RuntimeError("DFOLoRA has no adapters before fit has run.")
        lora = self.dfo.lora
        if sorted(tensors) != sorted(f"z.{k}" for k in range(lora.n_blocks)):
            raise ValueError(f"DFOLoRA adapts {lora.n_blocks} layers; the tensors given are {sorted(tensors)}.")
        for k in range(lora.n_blocks):
            lora.set_z(k, tensors[f"z.{k}"])


def _on_cuda(pl_module: LightningModule) -> bool:
    """Whether the module's training_step may be graphed (a function of its own: a CPU test forces the wrapper)."""
    return pl_module.device.type == "cuda"
