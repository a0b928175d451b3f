"""DFOLoRA: derivative-free LoRA (C-LoRA with CMA-ES, F-LoRA with fireworks) as a Lightning callback.

The whole step, in :meth:`DFOLoRA.generation_step`: one optimizer step is one generation for one layer (layers take
turns, bottom-up) on the current batch: ask the layer's optimizer for ``population`` z's, evaluate them (one forward
of the batch expanded by the population, the layers below computed once; or one forward per candidate), all-reduce
the fitness over data-parallel ranks, tell, and set the layer's z to the optimizer's mean (CMA-ES) or core firework.
Then the module's own ``training_step`` runs once under the new z, so ``train_loss`` and the progress bar work.
No backward pass: base weights are frozen, forwards run under ``no_grad``, no ``.grad`` is ever made.

Budget: counted in candidate evaluations on one batch, as the paper counts forward passes: a generation counts
``population`` whether it runs batched or sequentially. The statistics forwards, the batched-vs-split check and the
logging ``training_step`` are not counted.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_memopt import _shim
from lightning_memopt.callbacks import _checks
from lightning_memopt.core.fsdp import all_reduce_mean, all_reduce_sum
from lightning_memopt.core.holder import swap_in_holder
from lightning_memopt.dfo.cmaes import CMAES
from lightning_memopt.dfo.fireworks import Fireworks
from lightning_memopt.dfo.lora import DEFAULT_PATTERN, ZLoRA

Optim = CMAES | Fireworks


def population_fitness(logits: Tensor, labels: Tensor, loss: str = "ce", margin: float = 1.0) -> Tensor:
    """Mean loss per candidate from label-word logits ``[P, B, n]`` and labels ``[B]``: cross-entropy or hinge."""
    p, b, n = logits.shape
    logits = logits.float()
    y = labels.to(logits.device).long()
    if loss == "ce":
        return F.cross_entropy(logits.reshape(p * b, n), y.repeat(p), reduction="none").view(p, b).mean(1)
    correct = logits.gather(2, y.view(1, b, 1).expand(p, b, 1)).squeeze(2)
    other = logits.masked_fill(F.one_hot(y, n).bool().expand(p, b, n), -math.inf).amax(2)
    return (margin - (correct - other)).clamp(min=0).mean(1)


class DFOLoRA(Callback):
    """Forward-only LoRA tuning with CMA-ES (C-LoRA) or fireworks (F-LoRA) for an unchanged LightningModule.

    The module must be a prompt classifier like :class:`~lightning_memopt.HFCausalLM`: ``module(input_ids,
    attention_mask)`` returns label-word logits ``[B, n_labels]`` and batches carry ``labels``.

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
            ``|z| ≈ sigma·sqrt(d)`` changes a target's output by about this fraction of its std. On SmolLM2-135M /
            SST-2 (k=512, C-LoRA) dev accuracy was 84.2 at 0.05, 82.2 at 0.1, 69.5 at 0.3 and 51.7 at 1.0: large
            candidates wreck the pretrained attention faster than selection can repair it.
        stat_batches: training batches whose hidden-state statistics set the random map's std.
        n_fireworks, n_gaussian, bound: fireworks settings (fireworks kept, Gaussian sparks, search box).
        amplification, reduction: dynFWA's factors for the core firework's amplitude after a generation whose best
            spark beat (or did not beat) the core. dynFWA uses 1.2 / 0.9 on exact functions; with minibatch
            fitness some spark beats the core by noise alone in nearly every generation, so 1.2 makes the
            amplitude grow without bound (F-LoRA on SST-2 k=512 fell from 85.6 to 69.2 val accuracy). The default
            1.0 never grows it.
        population_chunk: evaluate at most this many candidates per forward (bounds the expanded batch's memory;
            the layers below the current one then run once per chunk). None: the whole population at once. The
            default 10 (two forwards for the default population of 20) kept the peak within 1.24x of inference on
            SmolLM2 and 1.14x on a 1.1B Llama (H100, 4x128 per candidate), against 1.46x / 1.29x for None, at 1.5x /
            1.17x the time per generation.
        optimizer_device: where the optimizers' state lives and computes (default: the module's device).
        offload_idle: between a layer's generations, park its CMA-ES covariance and eigenvectors (2·d² float64,
            4 MB per layer at d=500; 120 MB for SmolLM2's 30 layers) in host memory, so the GPU holds one layer's.
            Costs a 4 MB copy each way per generation. No effect when the state is on the CPU.
        seed: seed of the random maps and of the optimizers' sampling.
        allow_untested: warn instead of raising on strategies other than single device and FSDP2.

    Example::

        model = HFCausalLM(model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
        trainer = Trainer(max_steps=400, callbacks=[DFOLoRA(optimizer="cmaes", budget=8000)])
        trainer.fit(model, PromptClassificationDataModule(data_dir="data/sst2", k=16))
    """

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
    ) -> None:
        super().__init__()
        if optimizer not in ("cmaes", "fireworks"):
            raise ValueError(f"optimizer must be 'cmaes' or 'fireworks', got {optimizer!r}.")
        if loss not in ("ce", "hinge"):
            raise ValueError(f"loss must be 'ce' or 'hinge', got {loss!r}.")
        if population < 2 or rank < 1 or d < 2 or sigma <= 0:
            raise ValueError(f"Need population >= 2, rank >= 1, d >= 2, sigma > 0 (got {population}, {rank}, {d}, "
                             f"{sigma}).")
        if optimizer == "fireworks" and population < n_fireworks + n_gaussian + 1:
            raise ValueError(
                f"population={population} leaves no explosion spark besides {n_fireworks} fireworks and {n_gaussian} "
                f"Gaussian sparks; raise population or lower n_fireworks/n_gaussian."
            )
        if budget is not None and budget < population:
            raise ValueError(f"budget={budget} is below one generation (population={population}).")
        self.optimizer, self.rank, self.d, self.population, self.sigma = optimizer, rank, d, population, sigma
        self.budget, self.loss, self.margin = budget, loss, margin
        self.batched, self.split, self.verify_split = batched, split, verify_split
        self.target_pattern, self.init_scale, self.stat_batches = target_pattern, init_scale, stat_batches
        if amplification < 1.0 or not 0.0 < reduction <= 1.0:
            raise ValueError(f"Need amplification >= 1 and 0 < reduction <= 1 (got {amplification}, {reduction}).")
        self.n_fireworks, self.n_gaussian, self.bound = n_fireworks, n_gaussian, bound
        self.amplification, self.reduction = amplification, reduction
        self.optimizer_device, self.seed, self.allow_untested = optimizer_device, seed, allow_untested
        self.population_chunk, self.offload_idle = population_chunk, offload_idle
        self.lora: ZLoRA | None = None
        self.opts: list[Optim] = []
        self.layer = 0
        self.evaluations = 0
        self.generation = 0
        self.last_fitness: Tensor | None = None
        self._batch: dict[str, Tensor] | None = None
        self._loaded: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return f"DFOLoRA[{self.optimizer}]"

    @property
    def exhausted(self) -> bool:
        return self.budget is not None and self.evaluations + self.population > self.budget

    # ---- setup ---------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = "DFOLoRA"
        _checks.check_strategy(trainer, name, [_checks.SINGLE, _checks.FSDP2], self.allow_untested)
        _checks.check_automatic_optimization(pl_module, name)
        _checks.check_no_grad_scaler(trainer, name, fix="use precision='bf16-true', 'bf16-mixed' or '32'")
        _checks.check_no_accumulation(
            trainer, name, "Each generation is evaluated on one batch; raise the batch size instead."
        )
        _checks.check_no_clipping(trainer, name, "DFOLoRA computes no gradients; remove gradient_clip_val.")
        objective = getattr(getattr(pl_module, "hparams", {}), "get", lambda *_: None)("objective")
        if objective not in (None, "classification"):
            raise MisconfigurationException(
                f"DFOLoRA optimizes a classification loss over label-word logits; the module has objective="
                f"{objective!r}. Use objective='classification' with PromptClassificationDataModule."
            )

    def _make_opt(self, k: int, device: torch.device) -> Optim:
        x0 = torch.zeros(self.d, dtype=torch.float64, device=device)
        seed = self.seed * 7919 + k
        if self.optimizer == "cmaes":
            return CMAES(x0, self.sigma, self.population, seed=seed)
        return Fireworks(x0, self.sigma, self.population, self.n_fireworks, self.n_gaussian, self.bound,
                         ca=self.amplification, cr=self.reduction, seed=seed)

    def build(self, module: torch.nn.Module) -> None:
        """Install the z-driven LoRA hooks on ``module`` and make one optimizer per layer (also usable without a
        Trainer: then call :meth:`collect_stats` and :meth:`generation` yourself)."""
        if self.lora is None:
            try:
                self.lora = ZLoRA(module, self.rank, self.d, self.target_pattern, self.seed, self.sigma,
                                  self.init_scale)
            except ValueError as err:
                raise MisconfigurationException(str(err)) from None
        self.lora.install()
        dev = torch.device(self.optimizer_device) if self.optimizer_device else self.lora.device
        self.opts = [self._make_opt(k, dev) for k in range(self.lora.n_blocks)]
        self._park_all()

    def _park(self, opt: Optim) -> None:
        """A layer's optimizer matrices to the host (they come back to the GPU at its next ask)."""
        if self.offload_idle and opt.device.type != "cpu":
            opt.offload("cpu")

    def _park_all(self) -> None:
        for opt in self.opts:
            self._park(opt)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for p in pl_module.parameters():
            p.requires_grad_(False)  # forward-only: the base model is frozen, autograd records nothing
        self.build(pl_module)
        swap_in_holder(trainer, self._step)
        _shim.set_skip_backward(trainer, True)
        t = sum(len(b.targets) for b in self.lora.blocks)
        rank_zero_info(
            f"DFOLoRA[{self.optimizer}]: rank-{self.rank} LoRA on {t} modules in {self.lora.n_blocks} layers, "
            f"z of {self.d} per layer, population {self.population}, budget {self.budget} forwards, "
            f"{'batched' if self.batched else 'sequential'} evaluation."
        )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.lora is not None
        if self._loaded is not None:  # state-dependent setup here: FSDP restores callback state after on_fit_start
            self._apply_state(self._loaded)
            self._loaded = None
            return
        if self.lora.stats_ready:
            return
        with trainer.precision_plugin.forward_context():  # the precision the training forwards use
            self.collect_stats(pl_module, self._stat_batches(trainer))

    def collect_stats(self, module: torch.nn.Module, batches: list[dict[str, Tensor]]) -> None:
        """Hidden-state statistics for the random maps (and the split check) on a few batches."""
        assert self.lora is not None
        was = module.training
        module.eval()
        try:
            with torch.no_grad():
                self.lora.collect_stats(
                    lambda b: module(b["input_ids"], b.get("attention_mask")), batches, all_reduce_sum
                )
                if self.batched and self.split and self.verify_split:
                    self._check_split(module, batches[0])
        finally:
            module.train(was)

    def _stat_batches(self, trainer: Trainer) -> list[dict[str, Tensor]]:
        loader = trainer.train_dataloader
        out = []
        with torch.random.fork_rng(devices=[]):  # a separate pass over the loader must not shift the data order
            for b in loader:
                out.append(trainer.strategy.batch_to_device(b))
                if len(out) >= self.stat_batches:
                    break
        if not out:
            raise MisconfigurationException("DFOLoRA needs at least one training batch for its statistics.")
        return out

    def _check_split(self, pl_module: LightningModule, batch: dict[str, Tensor]) -> None:
        """Split forward (layers below run once) vs fully expanded forward, on random candidates."""
        assert self.lora is not None
        gen = torch.Generator().manual_seed(self.seed)
        z = torch.randn(min(3, self.population), self.d, generator=gen, dtype=torch.float64) * self.sigma
        k = self.lora.n_blocks // 2
        b = self._eval_batched(pl_module, batch, k, z, split=False, raw=True)
        try:
            a = self._eval_batched(pl_module, batch, k, z, split=True, raw=True)
        except (RuntimeError, ValueError, IndexError):  # e.g. a block argument the expansion cannot see
            a = None
        dt = next(pl_module.parameters()).dtype
        half = dt not in (torch.float32, torch.float64) or torch.is_autocast_enabled(b.device.type)
        tol = 5e-2 if half else 1e-3
        wrong = a is None or a.shape != b.shape or bool((a - b).abs().max() > tol * (1 + float(b.abs().max())))
        bad = torch.tensor(float(wrong), device=b.device)
        if float(all_reduce_sum(bad)) > 0:
            rank_zero_warn(
                "DFOLoRA: computing the layers below the current one once (split=True) does not reproduce the "
                "full forward for this model; falling back to expanding the whole batch (split=False)."
            )
            self.split = False

    # ---- the step ------------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch = batch
        self._module = pl_module
        self._precision = trainer.precision_plugin

    def _step(self, closure: Any) -> Any:
        if not self.exhausted and self._batch is not None:
            with self._precision.forward_context():  # autocast as in training_step (optimizer.step runs outside it)
                self.generation_step(self._module, self._batch)
        if closure is None:
            return None
        with torch.enable_grad():  # the closure expects it; nothing requires grad, so no graph is built
            return closure()

    def generation_step(self, pl_module: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """One generation of the current layer's optimizer on this batch; returns the population's fitness."""
        assert self.lora is not None
        k = self.layer
        opt = self.opts[k]
        z = opt.ask()
        was = pl_module.training
        pl_module.eval()  # deterministic fitness (no dropout), as MeZO evaluates
        try:
            with torch.no_grad():
                if self.batched:
                    fit = self._eval_batched(pl_module, batch, k, z, self.split)
                else:
                    fit = self._eval_sequential(pl_module, batch, k, z)
        finally:
            pl_module.train(was)
        fit = all_reduce_mean(fit)  # each rank saw its shard of the batch; every rank tells the same fitness
        opt.tell(fit.to(opt.device))
        self._park(opt)
        self.lora.set_z(k, opt.mean)
        self.last_fitness = fit.detach()
        self.evaluations += z.shape[0]
        self.generation += 1
        self.layer = (k + 1) % self.lora.n_blocks
        return fit

    def _eval_batched(
        self, pl_module: LightningModule, batch: dict[str, Tensor], k: int, z: Tensor, split: bool, raw: bool = False
    ) -> Tensor:
        assert self.lora is not None
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        b, p = ids.shape[0], z.shape[0]
        step = self.population_chunk or p
        parts = []
        for i in range(0, p, step):
            zc = z[i : i + step]
            self.lora.begin_population(k, zc, b, expand=split)
            try:
                if split:
                    parts.append(pl_module(ids, mask))
                else:
                    parts.append(pl_module(ids.repeat(zc.shape[0], 1), mask.repeat(zc.shape[0], 1)))
            finally:
                self.lora.end_population()
        logits = torch.cat(parts)
        logits = logits.reshape(p, b, -1)
        return logits if raw else population_fitness(logits, batch["labels"], self.loss, self.margin)

    def _eval_sequential(self, pl_module: LightningModule, batch: dict[str, Tensor], k: int, z: Tensor) -> Tensor:
        assert self.lora is not None
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        out = []
        for i in range(z.shape[0]):
            self.lora.begin_population(k, z[i : i + 1], ids.shape[0], expand=False)
            try:
                logits = pl_module(ids, mask)
            finally:
                self.lora.end_population()
            out.append(population_fitness(logits[None], batch["labels"], self.loss, self.margin))
        return torch.cat(out)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.last_fitness is not None:
            bs = batch["input_ids"].shape[0]
            pl_module.log("dfo_best_fitness", self.last_fitness.min().float(), prog_bar=True, batch_size=bs)
            pl_module.log("dfo_evaluations", float(self.evaluations), batch_size=bs)
        if self.exhausted and not trainer.should_stop:
            rank_zero_info(f"DFOLoRA: budget of {self.budget} forwards spent after {self.generation} generations.")
            trainer.should_stop = True

    def merge(self) -> None:
        """Fold the learned LoRA into the module's q/k weights and remove the hooks (e.g. before saving the module
        for plain inference). Training cannot continue with this callback afterwards."""
        if self.lora is None:
            raise RuntimeError("DFOLoRA.merge(): nothing to merge before fit (or build) has run.")
        self.lora.merge()

    # ---- state -----------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.lora is None:
            return {}
        return {
            "layer": self.layer, "evaluations": self.evaluations, "generation": self.generation, "split": self.split,
            "z": [z.detach().cpu() for z in self.lora.z], "stats": self.lora.stats(),
            "stats_ready": self.lora.stats_ready, "opts": [o.state_dict() for o in self.opts],
            "optimizer": self.optimizer, "d": self.d, "population": self.population,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        for key in ("optimizer", "d", "population"):
            if state_dict[key] != getattr(self, key):
                raise MisconfigurationException(
                    f"The checkpoint's DFOLoRA has {key}={state_dict[key]!r}, this one {getattr(self, key)!r}; "
                    f"resume with the same settings."
                )
        self._loaded = state_dict
        if self.opts:  # already set up (restore after on_train_start is not a Lightning path, but be safe)
            self._apply_state(state_dict)
            self._loaded = None

    def _apply_state(self, s: dict[str, Any]) -> None:
        assert self.lora is not None
        if len(s["opts"]) != len(self.opts):
            raise MisconfigurationException(
                f"The checkpoint's DFOLoRA has {len(s['opts'])} layers, this model {len(self.opts)}."
            )
        self.layer, self.evaluations, self.generation, self.split = s["layer"], s["evaluations"], s["generation"], \
            s["split"]
        for o, st in zip(self.opts, s["opts"]):
            o.load_state_dict(st)
        self._park_all()
        if s["stats_ready"]:
            self.lora.load_stats(s["stats"])
        for k, z in enumerate(s["z"]):
            self.lora.set_z(k, z)
