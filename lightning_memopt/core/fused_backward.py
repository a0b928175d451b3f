"""Fused-backward machinery: apply each gradient inside backward and free it at once.

Shared by LOMO/AdaLomo and GaLore's layer-wise mode. Uses ``Tensor.register_post_accumulate_grad_hook`` (one hook
per parameter, O(1) work per gradient), not LOMO's walk over all parameters. Under FSDP2 the hook fires on the
DTensor parameter after reduce-scatter, with the averaged, sharded gradient.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

UpdateFn = Callable[[Tensor], None]


class FusedBackward:
    """Registers ``update(param)`` as a post-accumulate-grad hook on each param; the hook frees ``param.grad``.

    ``mode`` is ``"update"`` (call ``update(param)``), ``"measure"`` (call ``measure(param)`` instead, e.g. the first
    pass of exact global-norm clipping) or ``"off"`` (leave the gradient alone); in the first two the grad is freed.

    Example::

        fb = FusedBackward(model.parameters(), update=lambda p: p.data.add_(p.grad, alpha=-lr))
        loss.backward()   # weights updated, no .grad left
        fb.remove()
    """

    def __init__(self, params: Iterable[Tensor], update: UpdateFn, measure: UpdateFn | None = None) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.update = update
        self.measure = measure
        self.mode = "update"  # or "measure" or "off" (leave grads alone)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        if self.mode == "off":
            return
        if p.grad is None:
            return
        if self.mode == "measure":
            if self.measure is not None:
                self.measure(p)
        else:
            self.update(p)
        p.grad = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
