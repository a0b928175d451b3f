"""Train/eval mode switching that gives every submodule its own mode back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(module: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run the block in eval mode (no dropout), then restore each submodule's own ``training`` flag.

    ``module.train(was)`` would reset every submodule to the root's mode and lose a deliberately frozen
    submodule's eval mode.
    """
    if not enabled:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
