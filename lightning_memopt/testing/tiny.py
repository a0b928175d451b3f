"""A tiny random-init Llama on the embedded synthetic sentiment task: the standard fixture for fast CPU tests."""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger

from lightning_memopt.core.fsdp import full
from lightning_memopt.core.population import token_losses
from lightning_memopt.data.prompt import PromptClassificationDataModule
from lightning_memopt.models.configs import llama_config
from lightning_memopt.models.hf import HFCausalLM


def tiny_model(size: str = "tiny", objective: str = "classification", **kwargs: Any) -> HFCausalLM:
    """HFCausalLM with a random-init Llama of ``size`` ("tiny": 2 layers, hidden 64) and the builtin tokenizer."""
    kwargs.setdefault("lr", 1e-3)
    return HFCausalLM(model_config=llama_config(size, vocab_size=256), tokenizer="builtin", objective=objective,
                      **kwargs)


def tiny_datamodule(k: int = 64, batch_size: int = 8, shuffle: bool = False, **kwargs: Any):
    """The synthetic task, k per class, deterministic order by default (so multi-process runs can match)."""
    kwargs.setdefault("template", "Review: {sentence} Sentiment:")
    kwargs.setdefault("label_words", ["negative", "positive"])
    kwargs.setdefault("test_limit", 64)
    kwargs.setdefault("eval_batch_size", 32)
    kwargs.setdefault("max_length", 32)
    return PromptClassificationDataModule(k=k, batch_size=batch_size, shuffle=shuffle, **kwargs)


def tiny_trainer(**kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer: no logger or checkpoints unless asked, no sanity check, no progress bar.

    ``accelerator="cuda"`` (with e.g. ``precision="bf16-true"``) runs the same on one GPU.
    """
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=10, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        deterministic=False,
    )
    defaults.update(kwargs)
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        # on a machine with a GPU, CPU on purpose: the tests run the same with and without one
        warnings.filterwarnings("ignore", message="GPU available but not used")
        return pl.Trainer(**defaults)


class ListLogger(Logger):
    """A logger that keeps what is logged: ``rows`` of (step, metrics) in order; :meth:`latest` merges them."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, Any]]] = []

    @property
    def name(self) -> str:
        return "list"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def latest(self) -> dict[str, Any]:
        """Each metric's last logged value."""
        return {k: v for _, m in self.rows for k, v in m.items()}


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A full (unsharded) CPU copy of the module's parameters, under FSDP2 or not."""
    out = {}
    for n, p in module.named_parameters():
        t = full(p)
        out[n] = t.detach().to("cpu", copy=True)
    return out


class TinyLM(pl.LightningModule):
    """An ordinary LightningModule (not :class:`HFCausalLM`): a tiny random-init Llama whose ``training_step`` takes a
    plain tensor batch of token ids and returns the scalar causal-LM loss. The data are counting sequences
    (``t, t+1, ...`` modulo 32), so any method lowers the loss quickly."""

    def __init__(self, lr: float = 1e-3, n: int = 64, length: int = 12, seed: int = 0) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = dict(llama_config("tiny", vocab_size=64))
        cfg.pop("model_type")
        torch.manual_seed(seed)
        self.model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **cfg))
        self.lr = lr
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, 32, (n, 1), generator=gen)
        self.data = (starts + torch.arange(length)) % 32

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=batch.shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(self.data, batch_size=16, shuffle=False)

    @torch.no_grad()
    def mean_loss(self) -> float:
        was = self.training
        self.eval()
        loss = float(self.model(input_ids=self.data, labels=self.data).loss)
        self.train(was)
        return loss


class TinyLMPerSample(TinyLM):
    """:class:`TinyLM` with the ``per_sample_loss`` hook, so population methods batch their members."""

    def per_sample_loss(self, batch: torch.Tensor) -> torch.Tensor:
        tok = token_losses(self.model(input_ids=batch).logits[:, :-1], batch[:, 1:])
        return tok.mean(1)  # every row has the same length: the mean of row means is the token mean


def assert_same(a: Any, b: Any, where: str = "", nan_equal: bool = False) -> None:
    """Nested state (dicts, lists, tuples of tensors and plain values) equal exactly: tensors by ``torch.equal``,
    the same keys and lengths; ``where`` names the first difference. ``nan_equal``: NaN equals NaN (state that a
    non-finite step may hold)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) or (
            nan_equal and a.is_floating_point() and torch.equal(a.nan_to_num(), b.nan_to_num())), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}", nan_equal)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]", nan_equal)
    elif nan_equal and isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, (where, a, b)
