"""Every private torch API this library touches, in one place (pinned by tests/test_torch_shim.py).

A torch upgrade that moves one of these breaks one test here instead of a method.
"""

from __future__ import annotations

from typing import Any


def mark_stepped(optimizer: Any) -> None:
    """Tell LR schedulers bound to ``optimizer`` that it stepped (they warn about the call order otherwise).

    ``LRScheduler`` wraps its optimizer's ``step`` to set ``_opt_called``; a holder steps in its place.
    """
    optimizer._opt_called = True


def local_shape_and_offset(shape: tuple[int, ...], mesh: Any, placements: Any) -> tuple[tuple[int, ...], tuple]:
    """(local shape, global offset) of this rank's shard of a DTensor with ``shape`` on ``mesh``/``placements``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(shape, mesh, placements)
