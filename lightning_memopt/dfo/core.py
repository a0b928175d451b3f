"""Derivative-free LoRA, the whole step in plain PyTorch: layer-wise CMA-ES / fireworks over z-driven LoRA.

One generation (:meth:`LayerwiseDFO.generation_step`) optimizes one layer's z on one batch (layers take turns,
bottom-up): ask the layer's optimizer for ``population`` z's, evaluate them (one forward of the batch expanded by the
population, the layers below computed once; or one forward per candidate), reduce the fitness over data-parallel
ranks, tell, and set the layer's z to the optimizer's mean (CMA-ES) or core firework. No backward pass: base weights
are frozen, forwards run under ``no_grad``, no ``.grad`` is ever made.

Fitness is a mean over the global batch, summed per sample in float64 and all-reduced as sums, so it does not depend
on how the batch is split over ranks: every rank and every world size take the same discrete decisions (fireworks'
spark allocation, CMA-ES's ranking). A generation whose fitness is non-finite for every candidate is skipped with the
optimizer's state (its random generator included) as it was; single non-finite candidates rank last.

Budget: counted in candidate evaluations on one batch, as the paper counts forward passes: a generation counts
``population`` whether it runs batched or sequentially. Statistics forwards and the split check are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_memopt.core import validate
from lightning_memopt.core.fsdp import all_reduce_sum
from lightning_memopt.core.graphs import GraphReplay, graph_batch
from lightning_memopt.core.modes import eval_mode
from lightning_memopt.core.nonfinite import SkipGuard
from lightning_memopt.core.population import member_losses
from lightning_memopt.dfo.cmaes import CMAES
from lightning_memopt.dfo.fireworks import Fireworks
from lightning_memopt.dfo.lora import DEFAULT_PATTERN, ZLoRA

Optim = CMAES | Fireworks
Batch = dict[str, Tensor]
LogitsFn = Callable[[Tensor, Tensor], Tensor]  # (input_ids, attention_mask) -> label-word logits [B, n]


@dataclass
class DFOSettings:
    """Everything that defines a derivative-free LoRA run (see :class:`~lightning_memopt.dfo.callback.DFOLoRA`)."""

    optimizer: Literal["cmaes", "fireworks"] = "cmaes"
    rank: int = 4
    d: int = 500
    population: int = 20
    sigma: float = 1.0
    budget: int | None = 8000
    loss: Literal["ce", "hinge"] = "ce"
    margin: float = 1.0
    batched: bool = True
    split: bool = True
    verify_split: bool = True
    target_pattern: str = DEFAULT_PATTERN
    init_scale: float = 0.05
    stat_batches: int = 4
    n_fireworks: int = 5
    n_gaussian: int = 1
    bound: float | None = None
    amplification: float = 1.0
    reduction: float = 0.9
    population_chunk: int | None = 10
    optimizer_device: str | None = None
    offload_idle: bool = True
    seed: int = 0
    cuda_graph: bool = False
    max_graphs: int | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in ("cmaes", "fireworks"):
            raise ValueError(f"optimizer must be 'cmaes' or 'fireworks', got {self.optimizer!r}.")
        if self.loss not in ("ce", "hinge"):
            raise ValueError(f"loss must be 'ce' or 'hinge', got {self.loss!r}.")
        validate.at_least(self.population, 2, "population")
        if self.optimizer == "cmaes" and self.population < 4:  # its rank-mu update needs two parents of weight > 0
            raise ValueError(f"optimizer='cmaes' needs population >= 4, got {self.population}.")
        validate.at_least(self.rank, 1, "rank")
        validate.regex(self.target_pattern, "target_pattern")
        validate.at_least(self.d, 2, "d")
        validate.positive(self.sigma, "sigma")
        if self.max_graphs is not None:
            validate.at_least(self.max_graphs, 1, "max_graphs")
        validate.positive(self.init_scale, "init_scale")
        validate.finite(self.margin, "margin")
        validate.at_least(self.stat_batches, 1, "stat_batches")
        validate.optional_positive(self.bound, "bound")
        if self.optimizer_device is not None:
            try:
                torch.device(self.optimizer_device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"optimizer_device={self.optimizer_device!r} is not a device, e.g. 'cpu' or "
                                 f"'cuda:0': {err}") from None
        if self.population_chunk is not None:
            validate.at_least(self.population_chunk, 1, "population_chunk")
        if self.optimizer == "fireworks":
            validate.at_least(self.n_fireworks, 1, "n_fireworks")
            validate.at_least(self.n_gaussian, 0, "n_gaussian")
            if self.population < self.n_fireworks + self.n_gaussian + 1:
                raise ValueError(
                    f"population={self.population} leaves no explosion spark besides {self.n_fireworks} fireworks "
                    f"and {self.n_gaussian} Gaussian sparks; raise population or lower n_fireworks/n_gaussian."
                )
        if self.budget is not None and self.budget < self.population:
            raise ValueError(f"budget={self.budget} is below one generation (population={self.population}).")
        if validate.finite(self.amplification, "amplification") < 1.0 or not 0.0 < validate.finite(
            self.reduction, "reduction"
        ) <= 1.0:
            raise ValueError(
                f"Need amplification >= 1 and 0 < reduction <= 1 (got {self.amplification}, {self.reduction})."
            )


def population_losses(logits: Tensor, labels: Tensor, loss: str = "ce", margin: float = 1.0) -> Tensor:
    """Per-sample loss ``[P, B]`` of each candidate from label-word logits ``[P, B, n]`` and labels ``[B]``."""
    p, b, n = logits.shape
    logits = logits.float()
    y = labels.to(logits.device).long()
    if loss == "ce":
        return F.cross_entropy(logits.reshape(p * b, n), y.repeat(p), reduction="none").view(p, b)
    correct = logits.gather(2, y.view(1, b, 1).expand(p, b, 1)).squeeze(2)
    other = logits.masked_fill(F.one_hot(y, n).bool().expand(p, b, n), -math.inf).amax(2)
    return (margin - (correct - other)).clamp(min=0)


def population_fitness(logits: Tensor, labels: Tensor, loss: str = "ce", margin: float = 1.0) -> Tensor:
    """Mean loss per candidate from label-word logits ``[P, B, n]`` and labels ``[B]``: cross-entropy or hinge."""
    return population_losses(logits, labels, loss, margin).mean(1)


def global_fitness(losses: Tensor) -> Tensor:
    """Per-candidate mean of per-sample losses ``[P, B_local]`` over the global batch (all ranks).

    Summed in float64 (exact for fp32 losses of similar magnitude), so the split over ranks does not change it.
    """
    packed = torch.cat([losses.double().sum(1), losses.new_full((1,), losses.shape[1], dtype=torch.float64)])
    packed = all_reduce_sum(packed)
    return (packed[:-1] / packed[-1]).float()


class LayerwiseDFO:
    """Layer-wise derivative-free LoRA on ``module``: z-driven LoRA hooks, one optimizer per layer, population
    evaluation, checkpointable state. Plain PyTorch (no Lightning).

    Fitness comes one of three ways (:attr:`path` says which):

    * ``"logits"`` (default): ``logits_fn(input_ids, attention_mask)`` gives label-word logits of dict batches with
      ``labels``; batched with the layers below the current one computed once (``split``);
    * ``"per_sample"``: ``per_sample(batch)`` gives per-example losses ``[B]`` (any batch type); the batch is
      repeated per candidate (``population_chunk`` candidates per forward, one with ``batched=False``);
    * ``"step"``: ``step_loss(batch)`` gives the batch's scalar loss (e.g. the module's own ``training_step``),
      called once per candidate with that candidate's LoRA active: always correct, not batched.

    Args:
        module: the model (its weights are not touched; the LoRA lives in hooks).
        settings: :class:`DFOSettings`.
        logits_fn: ``logits_fn(input_ids, attention_mask)`` → label-word logits ``[B, n]`` (default: ``module``).
        guard: the :class:`~lightning_memopt.core.nonfinite.SkipGuard` counting skipped generations.
        per_sample: the ``"per_sample"`` path's loss (takes precedence over ``step_loss``).
        step_loss: the ``"step"`` path's loss.

    Example::

        dfo = LayerwiseDFO(model, DFOSettings(population=10, d=100))
        dfo.collect_stats(batches[:2])
        for batch in batches:
            fitness = dfo.generation_step(batch)
    """

    def __init__(
        self,
        module: torch.nn.Module,
        settings: DFOSettings,
        logits_fn: LogitsFn | None = None,
        guard: SkipGuard | None = None,
        per_sample: Callable[[Any], Tensor] | None = None,
        step_loss: Callable[[Any], Tensor] | None = None,
    ) -> None:
        s = self.settings = settings
        self.module = module
        self.per_sample, self.step_loss = per_sample, step_loss
        self.path = "per_sample" if per_sample is not None else "step" if step_loss is not None else "logits"
        if s.loss == "hinge" and self.path != "logits":
            raise ValueError(
                f"DFOLoRA(loss='hinge') needs label-word logits, but this module's fitness comes from its "
                f"{'per_sample_loss' if self.path == 'per_sample' else 'training_step'} loss; use loss='ce' (that "
                "loss), or a prompt classifier with label words (HFCausalLM, objective='classification')."
            )
        self.logits_fn: LogitsFn = logits_fn or (lambda ids, mask: module(ids, mask))
        self.guard = guard or SkipGuard("DFOLoRA")
        self.lora = ZLoRA(module, s.rank, s.d, s.target_pattern, s.seed, s.sigma, s.init_scale)
        self.lora.install()
        dev = torch.device(s.optimizer_device) if s.optimizer_device else self.lora.device
        self.opts: list[Optim] = [self._make_opt(k, dev) for k in range(self.lora.n_blocks)]
        self.split = s.split
        self.layer = 0
        self.evaluations = 0
        self.generation = 0
        self.last_fitness: Tensor | None = None
        self._checked: dict[int, int] = {}  # layer -> the guard's number of the check of its last generation
        self._park_all()
        self.graph: GraphReplay | None = None
        if s.cuda_graph:
            self._install_graph()

    def _install_graph(self) -> None:
        """The population forward (per layer and batch shape) replayed from CUDA graphs; ask/tell stay eager."""
        s = self.settings
        # one graph per layer and batch shape: by default room for every layer at 4 shapes
        # a warm-up call before the first capture only: each is a population forward, and a run captures one graph
        # per layer and shape; nothing is made lazily per layer (the maps exist before any capture, below)
        self.graph = GraphReplay(self._population_fitness, "DFOLoRA(cuda_graph=True)",
                                 s.max_graphs or 4 * self.lora.n_blocks, warmup=1, warmup_once=True)
        self.lora.maps_cache = {}  # the maps at fixed addresses, made outside any capture
        if not s.batched or self.path == "step":
            self.graph.disable("the population is evaluated one candidate (or one training_step) at a time")
        elif torch.distributed.is_available() and torch.distributed.is_initialized() and (
            torch.distributed.get_world_size() > 1
        ):
            self.graph.disable("under several processes the fitness is all-reduced inside the step")
        else:
            self.lora.static_fixed = True  # each block's point and factors too: other layers' graphs read them
            for k in range(self.lora.n_blocks):
                self.lora.set_z(k, self.lora.z[k])

    def _population_fitness(self, batch: Any, z: Tensor, k: int) -> Tensor:
        """Fitness ``[P]`` of candidates ``z`` for layer ``k`` by the module's path (what a graph holds). In eval
        mode (no dropout), as MeZO evaluates; inside what a graph captures, so a replay skips the mode switch (a
        Python walk over every submodule)."""
        with eval_mode(self.module):
            if self.path != "logits":
                return self.eval_members(batch, k, z)
            if self.settings.batched:
                return self.eval_batched(batch, k, z, self.split)
            return self.eval_sequential(batch, k, z)

    def _fitness(self, batch: Any, k: int, z: Tensor) -> Tensor:
        if self.graph is not None and self.graph.disabled is None:
            # the candidates on the weights' device (a graph reads its inputs there); the output is rewritten by
            # the next replay, so it is cloned
            return self.graph(graph_batch(self.module, batch), z.to(self.lora.device), k).clone()
        return self._population_fitness(batch, z, k)

    @property
    def exhausted(self) -> bool:
        b = self.settings.budget
        if b is None or self.evaluations + self.settings.population <= b:
            return False
        self.guard.resolve()  # near the end only: skipped generations not yet taken off the count
        return self.evaluations + self.settings.population > b

    def _make_opt(self, k: int, device: torch.device) -> Optim:
        s = self.settings
        x0 = torch.zeros(s.d, dtype=torch.float64, device=device)
        seed = s.seed * 7919 + k
        if s.optimizer == "cmaes":
            return CMAES(x0, s.sigma, s.population, seed=seed)
        return Fireworks(
            x0, s.sigma, s.population, s.n_fireworks, s.n_gaussian, s.bound, ca=s.amplification, cr=s.reduction,
            seed=seed,
        )

    def _park(self, opt: Optim) -> None:
        """A layer's optimizer matrices to the host (they come back to the GPU at its next ask)."""
        if self.settings.offload_idle and opt.device.type != "cpu":
            opt.offload("cpu")

    def _park_all(self) -> None:
        for opt in self.opts:
            self._park(opt)

    def remove(self) -> None:
        self.lora.remove()

    # ---- statistics ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect_stats(self, batches: list[Batch]) -> None:
        """Hidden-state statistics for the random maps (and the split check) on a few batches."""
        with eval_mode(self.module):
            if self.path == "logits":
                run = lambda b: self.logits_fn(b["input_ids"], b.get("attention_mask"))
            else:
                run = self.per_sample or self.step_loss
            self.lora.collect_stats(run, batches, all_reduce_sum)
            if self.path == "logits" and self.settings.batched and self.split and self.settings.verify_split:
                self.split = self.check_split(batches[0])

    def check_split(self, batch: Batch) -> bool:
        """Whether the split forward (layers below run once) reproduces the fully expanded one, on random candidates
        (the same answer on every rank)."""
        s = self.settings
        gen = torch.Generator().manual_seed(s.seed)
        z = torch.randn(min(3, s.population), s.d, generator=gen, dtype=torch.float64) * s.sigma
        k = self.lora.n_blocks // 2
        b = self.eval_batched(batch, k, z, split=False, raw=True)
        try:
            a = self.eval_batched(batch, k, z, split=True, raw=True)
        except (RuntimeError, ValueError, IndexError):  # e.g. a block argument the expansion cannot see
            a = None
        dt = next(self.module.parameters()).dtype
        half = dt not in (torch.float32, torch.float64) or torch.is_autocast_enabled(b.device.type)
        tol = 5e-2 if half else 1e-3
        wrong = a is None or a.shape != b.shape or bool((a - b).abs().max() > tol * (1 + float(b.abs().max())))
        bad = torch.tensor(float(wrong), dtype=torch.float32, device=b.device)
        return float(all_reduce_sum(bad)) == 0

    # ---- the step ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generation_step(self, batch: Batch, step: int = -1, after_update: Callable[[], Any] | None = None) -> Tensor:
        """One generation of the current layer's optimizer on this batch; returns the population's fitness.

        ``after_update`` (e.g. the module's own training step, for its logged loss) runs once the layer's new point
        is in place; an exception in it takes the whole generation back before it propagates.

        A generation whose candidates all have a non-finite fitness is skipped. With CMA-ES that is decided on the
        device, with no host read: the tell is masked by it (the layer's optimizer and point stay bit for bit as they
        were, and ``after_update`` runs at that point), the layers' turns go on, and the host counters are put back
        when the host learns of the skip (:class:`~lightning_memopt.core.nonfinite.SkipGuard`; at the latest before
        the same layer's next ask). Fireworks' tell reads the fitness on the host, so there the skip is known at
        once: the layer is taken back and tries again with the next batch.
        """
        k = self.layer
        opt = self.opts[k]
        last = self._checked.get(k)
        if last is not None:  # this layer's previous generation is settled (undone if skipped) before its next ask
            self.guard.resolve(upto=last)
        rng = opt.gen.get_state()
        z = opt.ask()
        try:
            fit = self._fitness(batch, k, z)
        except BaseException:  # e.g. a skipped batch (training_step returned None): as if never asked
            self._take_back(opt, k, rng, None, None)
            raise
        self.last_fitness = fit.detach()
        if isinstance(opt, CMAES):
            return self._generation_ahead(opt, k, rng, fit, step, after_update)
        # Every rank holds the same reduced fitness, so every rank decides alike.
        skipped = not bool(fit.isfinite().any())
        snap, point = (opt.snapshot(), self.lora.point(k)) if after_update is not None else (None, None)
        if skipped:
            self._take_back(opt, k, rng, None, None)
        else:
            self._tell(opt, k, fit)
            self._advance(k, fit.shape[0])
        if after_update is not None:
            try:
                after_update()
            except BaseException:
                if not skipped:
                    self._take_back(opt, k, rng, snap, point)
                    self._retreat(fit.shape[0])
                    self.layer = k
                raise
        self.guard.record(skipped, step)
        return fit

    def _generation_ahead(
        self, opt: CMAES, k: int, rng: Tensor, fit: Tensor, step: int, after_update: Callable[[], Any] | None
    ) -> Tensor:
        """CMA-ES's half of :meth:`generation_step`: nothing here waits for the GPU."""
        ok = self.guard.track(fit.isfinite().any(), step)
        seq = self._checked[k] = self.guard.checks - 1
        snap, point, counts = opt.snapshot(), self.lora.point(k), opt.counts()
        self._tell(opt, k, fit, ok=ok.to(opt.device))
        n = fit.shape[0]

        def undo() -> None:  # a skip, learnt later: the host's side of the masked tell
            opt.set_counts(counts)
            opt.gen.set_state(rng)
            self._retreat(n)

        self.guard.on_skip(undo)
        self._advance(k, n)
        if after_update is not None:
            try:
                after_update()
            except BaseException:
                self.guard.drop(seq)
                self._take_back(opt, k, rng, snap, point)
                self._retreat(n)
                self.layer = k
                raise
        return fit

    def _advance(self, k: int, n: int) -> None:
        self.evaluations += n
        self.generation += 1
        self.layer = (k + 1) % self.lora.n_blocks

    def _retreat(self, n: int) -> None:
        """:meth:`_advance`'s counters taken back (the layers' turn stays where it is unless the caller moves it)."""
        self.evaluations -= n
        self.generation -= 1

    def _take_back(self, opt: Optim, k: int, rng: Tensor, snap: Any, point: Any) -> None:
        """Layer ``k``'s optimizer (its generator included) and point as before this generation's ask."""
        if snap is not None:
            opt.restore(snap)
            self.lora.restore_point(k, point)
        opt.gen.set_state(rng)
        opt.forget_ask()
        self._park(opt)

    def _tell(self, opt: Optim, k: int, fit: Tensor, **kw: Any) -> None:
        opt.tell(fit.to(opt.device), **kw)
        self._park(opt)
        self.lora.set_z(k, opt.mean)

    def _losses(self, logits: Tensor, batch: Batch) -> Tensor:
        s = self.settings
        return population_losses(logits, batch["labels"], s.loss, s.margin)

    def eval_batched(self, batch: Batch, k: int, z: Tensor, split: bool, raw: bool = False) -> Tensor:
        """Fitness ``[P]`` of candidates ``z`` for layer ``k``, whole chunks of the population per forward (or the
        raw logits ``[P, B, n]`` with ``raw``)."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        b, p = ids.shape[0], z.shape[0]
        step = self.settings.population_chunk or p
        parts = []
        for i in range(0, p, step):
            zc = z[i : i + step]
            self.lora.begin_population(k, zc, b, expand=split)
            try:
                if split:
                    parts.append(self.logits_fn(ids, mask))
                else:
                    parts.append(self.logits_fn(ids.repeat(zc.shape[0], 1), mask.repeat(zc.shape[0], 1)))
            finally:
                self.lora.end_population()
        logits = torch.cat(parts).reshape(p, b, -1)
        return logits if raw else global_fitness(self._losses(logits, batch))

    def eval_members(self, batch: Any, k: int, z: Tensor) -> Tensor:
        """Fitness ``[P]`` through ``per_sample`` (batched: the batch repeated per candidate) or ``step_loss`` (one
        call per candidate)."""
        s = self.settings

        @contextmanager
        def activate(members: Any) -> Iterator[None]:
            # members are consecutive (a chunk of range(P)): a slice, as indexing by a host list copies the index
            # to the device, which a CUDA graph's capture refuses
            lo = members[0]
            assert list(members) == list(range(lo, lo + len(members)))
            self.lora.begin_population(k, z[lo : lo + len(members)], 0, expand=False)
            try:
                yield
            finally:
                self.lora.end_population()

        chunk = (s.population_chunk if s.batched else 1) if self.per_sample is not None else None
        step = None if self.step_loss is None else (lambda: self.step_loss(batch))
        losses = member_losses(list(range(z.shape[0])), activate, chunk, step, self.per_sample, batch)
        return global_fitness(losses)

    def eval_sequential(self, batch: Batch, k: int, z: Tensor) -> Tensor:
        """Fitness ``[P]`` of candidates ``z`` for layer ``k``, one forward per candidate."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        out = []
        for i in range(z.shape[0]):
            self.lora.begin_population(k, z[i : i + 1], ids.shape[0], expand=False)
            try:
                logits = self.logits_fn(ids, mask)
            finally:
                self.lora.end_population()
            out.append(self._losses(logits[None], batch))
        return global_fitness(torch.cat(out))

    # ---- state -------------------------------------------------------------------------------------------------------
    def tensors(self) -> list[Tensor]:
        """The search state and adapters this holds (what memory accounting counts)."""
        return [*self.lora.tensors(), *(t for o in self.opts for t in o.tensors())]

    def state_dict(self) -> dict[str, Any]:
        self.guard.resolve()  # the counters and generators as the finished generations left them
        return {
            "layer": self.layer, "evaluations": self.evaluations, "generation": self.generation, "split": self.split,
            "z": [z.detach().cpu() for z in self.lora.z], "stats": self.lora.stats(), "maps": self.lora.maps,
            "stats_ready": self.lora.stats_ready, "opts": [o.state_dict() for o in self.opts],
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        if len(s["opts"]) != len(self.opts):
            raise ValueError(f"The checkpoint's DFOLoRA has {len(s['opts'])} layers, this model {len(self.opts)}.")
        self.guard.resolve()
        self._checked.clear()
        self.layer, self.evaluations, self.generation = s["layer"], s["evaluations"], s["generation"]
        self.split = s["split"]
        for o, st in zip(self.opts, s["opts"]):
            o.load_state_dict(st)
        self._park_all()
        self.lora.restore(s)

    def load_adapters(self, s: dict[str, Any]) -> None:
        """The adapters of a saved state (z's, statistics, maps) without its search state: evaluating a checkpoint."""
        self.guard.resolve()
        self.lora.restore(s)

    def merge(self) -> None:
        """Fold the learned LoRA into the module's q/k weights and remove the hooks."""
        self.lora.merge()
