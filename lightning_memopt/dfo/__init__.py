"""Derivative-free LoRA: C-LoRA (CMA-ES) and F-LoRA (fireworks) with batched population evaluation."""

from lightning_memopt.dfo.cmaes import CMAES
from lightning_memopt.dfo.core import DFOSettings, LayerwiseDFO, population_fitness
from lightning_memopt.dfo.fireworks import Fireworks
from lightning_memopt.dfo.lora import DEFAULT_PATTERN, ZLoRA, find_targets

__all__ = [
    "CMAES", "DEFAULT_PATTERN", "DFOLoRA", "DFOSettings", "Fireworks", "LayerwiseDFO", "ZLoRA", "find_targets",
    "population_fitness",
]


def __getattr__(name: str):
    if name == "DFOLoRA":  # lazy: the core stays importable without Lightning's callback machinery loaded
        from lightning_memopt.dfo.callback import DFOLoRA

        return DFOLoRA
    raise AttributeError(name)
