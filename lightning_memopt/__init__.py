"""lightning_memopt: memory-efficient LLM fine-tuning as drop-in PyTorch Lightning callbacks."""

from __future__ import annotations

import importlib
from typing import Any

from lightning_memopt.strategies import FSDP2Strategy, register_strategies  # registers "fsdp2"

__version__ = "0.1.0"

_LAZY = {
    "MeZO": "lightning_memopt.mezo.callback",
    "LOMO": "lightning_memopt.lomo.callback",
    "AdaLomo": "lightning_memopt.lomo.callback",
    "GaLore": "lightning_memopt.galore.callback",
    "DFOLoRA": "lightning_memopt.dfo.callback",
    "BestWeights": "lightning_memopt.callbacks.best_weights",
    "MemoryReport": "lightning_memopt.callbacks.memory_report",
    "MemoptProgressBar": "lightning_memopt.callbacks.progress",
    "MemoptRichProgressBar": "lightning_memopt.callbacks.progress",
    "HFCausalLM": "lightning_memopt.models.hf",
    "PromptClassificationDataModule": "lightning_memopt.data.prompt",
    "SQuADDataModule": "lightning_memopt.data.qa",
    "InstructionDataModule": "lightning_memopt.data.instruct",
    "AnswerF1": "lightning_memopt.metrics",
    "AnswerEM": "lightning_memopt.metrics",
    "llama_config": "lightning_memopt.models.configs",
}

__all__ = ["FSDP2Strategy", "register_strategies", *_LAZY]


def __getattr__(name: str) -> Any:  # lazy: importing the package stays cheap and optional parts stay optional
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_memopt' has no attribute {name!r}")
