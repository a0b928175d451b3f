"""Methods as users run them: a LightningModule under a Trainer, with the method's callback.

The module is ordinary (``training_step`` returns ``model(input_ids=x, labels=x).loss``, ``configure_optimizers``
returns AdamW); the Trainer runs bf16-true on one GPU. A timing callback records CUDA events around each optimizer
step (``on_train_batch_start`` to ``on_train_batch_end``) and the peak over the timed steps, after 2 warm-up steps,
so the figures sit beside the bare-step cases of the other modules and the peers.

* ``galore_lightning``: ``GaLore(rank=128, scale=0.25)`` (the anchors' settings), gradients freed after the step;
* ``galore_lightning_keepgrads``: the same with the gradients left to Lightning (the behaviour before they were
  freed: Lightning zeroes them after the next forward, so they live through it);
* ``adamw_lightning``: the module's AdamW as Lightning runs it (gradients set to None by Lightning's zero_grad);
* ``mezo_lightning`` / ``lomo_lightning``: ``MeZO(lr=1e-6)`` and ``LOMO(lr=1e-3)``; ``lomo_lightning_ckpt`` and
  ``adalomo_lightning_ckpt``: ``LOMO(lr=1e-3)`` and ``AdaLomo(lr=1e-3)`` with Hugging Face's activation checkpointing
  (the bare ``lomo_ckpt`` / ``adalomo_ckpt`` cases' and lomo-optim's setting);
* ``mezo_lightning_graph``: ``MeZO(lr=1e-6, cuda_graph=True)`` (the perturbed forwards replayed from a CUDA graph);
  ``MEZO_GROUP_MB`` sets both plain cases' ``group_bytes`` (default 64: at 1.1B, 16 decoder layers of 116 MiB, a
  perturbed forward takes 99 launches; 19 at 128);
* ``mezo_pop_lightning`` / ``mezo_pop_lightning_graph``: the population estimator as
  ``configs/sst2_smollm2_mezo_pop.yaml`` sets it (``MEZO_POP=16`` directions of rank 4, ``MEZO_POP_CHUNK=8``
  members per forward, MeZO's default; the config's 16 with ``MEZO_POP_CHUNK=16``; ``MEZO_ONE_SIDED=1``: n + 1
  members instead of 2n; ``MEZO_VARIANT=momentum`` or ``adam`` with ``MEZO_WINDOW`` steps, default 10), on a module
  whose loader yields the batch and which defines ``per_sample_loss``, so the members run batched.
* ``mezo_label_lightning_graph``, ``mezo_pop_label_lightning[_graph]``: plain MeZO (graphed) and the population
  estimator on the prompt classifier below (the SST-2 configs' objective: label-word logits at the last position,
  no full-vocabulary logits), the shape to compare directions per second at (e.g. 16 × 32 tokens: SST-2's prompts
  average 17).
* ``dfo_lightning`` / ``dfo_lightning_graph``: ``DFOLoRA`` (C-LoRA: population 20, z of 500, 10 candidates per
  forward) on a prompt classifier like HFCausalLM (label-word logits at the last position), so the fitness is
  batched with the layers below the current one computed once, as C-LoRA's configs run; the module's own
  ``training_step`` runs once a generation (train_loss) as in a real fit; the graph case warms up over every layer
  first, so the timed generations replay. ``benchmarks.cases.dfo``'s ``dfo_forward_chunk10_graph`` is the batched
  forward they compare with.

Usage: ``python -m benchmarks.cases.lightning CASE SIZE [BATCH] [SEQ]``; ``DEV=cpu`` smoke-tests it.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks.common import DEV, build, parse_case_args, report
from lightning_memopt.core.population import token_losses


class _Module(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        self.model, self.x = model, x

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=self.x, labels=self.x).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(list(range(64)), batch_size=1, pin_memory=torch.cuda.is_available())


class _PopModule(_Module):
    """Trains on the loader's batch (the population repeats it per member) and gives per-row losses."""

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def per_sample_loss(self, batch: torch.Tensor) -> torch.Tensor:
        return token_losses(self.model(input_ids=batch).logits[:, :-1], batch[:, 1:]).mean(1)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader([self.x.cpu()] * 64, batch_size=None, pin_memory=torch.cuda.is_available())


class _LabelModule(_Module):
    """A prompt classifier as :class:`~lightning_memopt.HFCausalLM` is one (label-word logits at the last position,
    dict batches with labels), so DFOLoRA's fitness takes the path C-LoRA's configs take: batched, the layers below
    the current one computed once."""

    label_token_ids = (3, 5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        # the ids on the logits' device, made once (as HFCausalLM does): indexing with a Python list copies it from
        # the host at every call, which a CUDA graph cannot capture
        ids = self.__dict__.get("_ids")
        if ids is None or ids.device != out.logits.device:
            ids = self.__dict__["_ids"] = torch.tensor(self.label_token_ids, device=out.logits.device)
        return out.logits[:, -1, ids].float()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def per_sample_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")

    def train_dataloader(self) -> Any:
        x = self.x.cpu()
        batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.arange(len(x)) % 2}
        return torch.utils.data.DataLoader([batch] * 64, batch_size=None, pin_memory=torch.cuda.is_available())


class _Timer(pl.Callback):
    """Per-step times after ``warm`` steps. ``latency``: CUDA events around each step, synchronised at its end (the
    step alone, as the bare-step cases time it). ``throughput``: an event at each step's start and no sync until the
    end, so the host runs ahead as in a real fit; a step is the time between two starts (data, hooks and all)."""

    def __init__(self, warm: int, mode: str = "latency") -> None:
        self.warm, self.mode, self.times, self.peak, self.peak_reserved = warm, mode, [], 0.0, 0.0
        self._start: Any = None
        self._starts: list[Any] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warm and DEV == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if DEV == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()
        if self.mode == "throughput" and trainer.global_step >= self.warm:
            self._starts.append(self._start)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step <= self.warm or self.mode == "throughput":
            return
        if DEV == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            self.times.append(self._start.elapsed_time(end) / 1e3)
        else:
            self.times.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer, pl_module) -> None:
        if DEV == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**30
            self.peak_reserved = torch.cuda.max_memory_reserved() / 2**30
        if self.mode == "throughput":
            s = self._starts
            if DEV == "cuda":
                self.times = [a.elapsed_time(b) / 1e3 for a, b in zip(s, s[1:])]
            else:
                self.times = [b - a for a, b in zip(s, s[1:])]


def _galore(keep_grads: bool) -> pl.Callback:
    from lightning_memopt import GaLore

    class KeepGrads(GaLore):
        keeps_grads = False  # the step reads .grad but leaves it to Lightning's zero_grad, as before

    cls = KeepGrads if keep_grads else GaLore
    return cls(rank=128, update_proj_gap=200, scale=0.25)


def _mezo(cuda_graph: bool = False) -> pl.Callback:
    from lightning_memopt import MeZO

    return MeZO(lr=1e-6, eps=1e-3, cuda_graph=cuda_graph, distribution=os.environ.get("MEZO_DIST", "normal"),
                group_bytes=int(os.environ.get("MEZO_GROUP_MB", "64")) << 20,
                overlap=os.environ.get("MEZO_OVERLAP", "0") == "1")


def _mezo_pop(cuda_graph: bool = False) -> pl.Callback:
    from lightning_memopt import MeZO

    chunk = int(os.environ.get("MEZO_POP_CHUNK", "8")) or None  # 8: MeZO's default; 0: all members in one forward
    return MeZO(lr=1e-6, eps=1e-3, n_spsa=int(os.environ.get("MEZO_POP", "16")), perturbation="lowrank",
                perturbation_rank=int(os.environ.get("MEZO_RANK", "4")), batched=True, population_chunk=chunk,
                one_sided=os.environ.get("MEZO_ONE_SIDED", "0") == "1", cuda_graph=cuda_graph,
                variant=os.environ.get("MEZO_VARIANT", "sgd"), window=int(os.environ.get("MEZO_WINDOW", "10")))


def _dfo(cuda_graph: bool = False) -> pl.Callback:
    from lightning_memopt import DFOLoRA

    return DFOLoRA(population=int(os.environ.get("POP", "20")), d=500, budget=None, population_chunk=10,
                   stat_batches=1, cuda_graph=cuda_graph)


def _lomo() -> pl.Callback:
    from lightning_memopt import LOMO

    return LOMO(lr=1e-3)


def _adalomo() -> pl.Callback:
    from lightning_memopt import AdaLomo

    return AdaLomo(lr=1e-3)


CASES: dict[str, Callable[[], pl.Callback | None]] = {
    "galore_lightning": lambda: _galore(False),
    "galore_lightning_keepgrads": lambda: _galore(True),
    "adamw_lightning": lambda: None,
    "mezo_lightning": _mezo,
    "mezo_lightning_graph": lambda: _mezo(True),
    "lomo_lightning": _lomo,
    # with Hugging Face's activation checkpointing, as the bare ``lomo_ckpt`` / ``adalomo_ckpt`` cases and lomo-optim's
    "lomo_lightning_ckpt": _lomo,
    "adalomo_lightning_ckpt": _adalomo,
    "mezo_pop_lightning": _mezo_pop,
    "mezo_pop_lightning_graph": lambda: _mezo_pop(True),
    # the same two methods on the prompt classifier (label-word logits at the last position), as the SST-2 configs
    "mezo_label_lightning_graph": lambda: _mezo(True),
    "mezo_pop_label_lightning": _mezo_pop,
    "mezo_pop_label_lightning_graph": lambda: _mezo_pop(True),
    "dfo_lightning": _dfo,
    "dfo_lightning_graph": lambda: _dfo(True),
}


def run(case: str, size: str, batch: int, seq: int, warm: int = 2, reps: int = 5,
        timing: str = "latency", callbacks: tuple[pl.Callback, ...] = ()) -> dict[str, Any]:
    """One case through a Trainer; ``callbacks`` join the method and the timer (a profiler, for one)."""
    res: dict[str, Any] = dict(method=case, size=size, batch=batch, seq=seq, impl="lightning_memopt (Trainer)")
    try:
        model = build(size)
        if case.endswith("_ckpt"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        res["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
        x = torch.randint(0, model.config.vocab_size, (batch, seq), device=DEV)
        if case.startswith("dfo"):  # one generation a layer: warm up over every layer (each captures its graph)
            warm, reps = max(warm, model.config.num_hidden_layers), min(model.config.num_hidden_layers, 16)
        timer = _Timer(warm, timing)
        method = CASES[case]()
        trainer = pl.Trainer(
            accelerator="cuda" if DEV == "cuda" else "cpu", devices=1, max_steps=warm + reps,
            precision="bf16-true", callbacks=[c for c in (method, timer, *callbacks) if c is not None], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        module = (_LabelModule if case.startswith("dfo") or "_label" in case else
                  _PopModule if case.startswith("mezo_pop") else _Module)
        trainer.fit(module(model, x))
        t = statistics.median(timer.times)
        res.update(step_s=round(t, 4), peak_gib=round(timer.peak, 2), tok_per_s=round(batch * seq / t, 1),
                   peak_reserved_gib=round(timer.peak_reserved, 2), timing=timing)
    except torch.OutOfMemoryError:
        res.update(step_s=None, peak_gib="OOM")
    report(res)
    return res


def main(argv: list[str]) -> None:
    case, size, batch, seq = parse_case_args("lightning", CASES, argv)
    run(case, size, batch, seq)


if __name__ == "__main__":
    main(sys.argv[1:])
