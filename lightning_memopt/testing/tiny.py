"""A tiny random-init Llama on the embedded synthetic sentiment task: the standard fixture for fast CPU tests."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_memopt.core.fsdp import full
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


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A full (unsharded) CPU copy of the module's parameters, under FSDP2 or not."""
    out = {}
    for n, p in module.named_parameters():
        t = full(p)
        out[n] = t.detach().to("cpu", copy=True)
    return out
