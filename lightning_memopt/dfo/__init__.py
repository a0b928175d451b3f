"""Derivative-free LoRA: C-LoRA (CMA-ES) and F-LoRA (fireworks) with batched population evaluation."""

from lightning_memopt.dfo.callback import DFOLoRA, population_fitness
from lightning_memopt.dfo.cmaes import CMAES
from lightning_memopt.dfo.fireworks import Fireworks
from lightning_memopt.dfo.lora import DEFAULT_PATTERN, ZLoRA, find_targets

__all__ = ["CMAES", "DEFAULT_PATTERN", "DFOLoRA", "Fireworks", "ZLoRA", "find_targets", "population_fitness"]
