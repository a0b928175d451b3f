"""Train/eval mode switching that gives every submodule its own mode back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_TRAIN, _SETATTR = torch.nn.Module.train, torch.nn.Module.__setattr__


def _set_flag(m: torch.nn.Module, mode: bool) -> None:
    # what Module.__setattr__ does for ``training`` (about 1 µs a module, every step of a forward-only method)
    if type(m).__setattr__ is _SETATTR:
        m.__dict__["training"] = mode
    else:
        m.training = mode


@contextmanager
def eval_mode(module: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run the block in eval mode (no dropout), then restore each submodule's own ``training`` flag.

    ``module.train(was)`` would reset every submodule to the root's mode and lose a deliberately frozen
    submodule's eval mode. A submodule's own ``train`` (Hugging Face models have one) runs through
    ``module.eval()``; where there is none, the flags are set directly.
    """
    if not enabled:
        yield
        return
    mods = list(module.modules())
    modes = [m.training for m in mods]
    if all(type(m).train is _TRAIN for m in mods):
        for m in mods:
            _set_flag(m, False)
    else:
        module.eval()
    try:
        yield
    finally:
        for m, mode in zip(mods, modes):
            _set_flag(m, mode)
