"""MeZO: zeroth-order fine-tuning at inference memory (see ``docs/mezo.md``)."""

from lightning_memopt.mezo.core import ZeroOrder, ZOConfig, make_params, step_seeds
from lightning_memopt.mezo.trajectory import load_trajectory, replay_trajectory, save_trajectory

__all__ = [
    "MeZO",
    "ZOConfig",
    "ZeroOrder",
    "load_trajectory",
    "make_params",
    "replay_trajectory",
    "save_trajectory",
    "step_seeds",
]


def __getattr__(name: str):
    if name == "MeZO":  # lazy: the core stays importable without Lightning's callback machinery loaded
        from lightning_memopt.mezo.callback import MeZO

        return MeZO
    raise AttributeError(name)
