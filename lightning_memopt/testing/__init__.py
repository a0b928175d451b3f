"""Helpers for tests of this library and of code built on it: tiny models, tiny data, multi-process FSDP2 runs."""

from lightning_memopt.testing.multiproc import run_distributed, run_torchrun
from lightning_memopt.testing.tiny import assert_same, tiny_datamodule, tiny_model, tiny_trainer

__all__ = ["assert_same", "run_distributed", "run_torchrun", "tiny_datamodule", "tiny_model", "tiny_trainer"]
