"""Training forwards kept clear of a cuDNN attention bug that makes gradients NaN.

On Hopper GPUs, torch 2.11 and later pick cuDNN for ``scaled_dot_product_attention`` with a mask, and its backward
returns NaN in the query gradient when the sequence length is 64 more than a multiple of 128 and a query row's
logsumexp is very negative, as a fully masked row (a left-padded position) makes it
(pytorch/pytorch#196678). One such batch turns every weight NaN. We measured it on an H100 (torch 2.11, cuDNN 9.19):
NaN gradients at lengths 64 and 192 with any left padding, none at the other lengths from 1 to 299. The
memory-efficient kernel that runs instead was no slower there: 350 against 625 us for forward and backward at 16 x 9
heads x 64 (benchmarks/results/nan_grad_probe_h100.txt). :func:`sdpa_without_cudnn_where_unsafe` turns cuDNN off for
exactly those forwards.

Activation checkpointing recomputes the forward during backward, after that context has ended:
:func:`recompute_with_forward_sdpa_backends` is the ``context_fn`` that gives the recomputation the forward's backends.

Example::

    with sdpa_without_cudnn_where_unsafe(input_ids, attention_mask):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor


def cudnn_sdpa_unsafe(seq_len: int, masked: bool) -> bool:
    """Whether cuDNN attention's backward can return NaN for this query length (see the module docstring)."""
    return masked and seq_len % 128 == 64


def _flags() -> tuple[bool, bool, bool, bool]:
    b = torch.backends.cuda
    return b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled()


def _set_flags(flags: tuple[bool, bool, bool, bool]) -> None:
    b = torch.backends.cuda
    for enable, on in zip((b.enable_cudnn_sdp, b.enable_flash_sdp, b.enable_mem_efficient_sdp, b.enable_math_sdp),
                          flags):
        enable(on)


class _Backends(AbstractContextManager):
    """The attention backends set to ``flags`` while entered; enterable again, as a second backward over the same
    graph (LOMO's clipping pass) recomputes the forward again."""

    def __init__(self, flags: tuple[bool, bool, bool, bool]) -> None:
        self.flags = flags
        self._saved: list[tuple[bool, bool, bool, bool]] = []

    def __enter__(self) -> None:
        self._saved.append(_flags())
        _set_flags(self.flags)

    def __exit__(self, *exc: object) -> None:
        _set_flags(self._saved.pop())


def recompute_with_forward_sdpa_backends() -> tuple[AbstractContextManager, AbstractContextManager]:
    """``context_fn`` for non-reentrant ``torch.utils.checkpoint``: the recomputed forward runs with the attention
    backends that were on when the forward ran, not those on during backward."""
    return nullcontext(), _Backends(_flags())


def _backends_but_cudnn() -> list:
    from torch.nn.attention import SDPBackend

    _, flash, efficient, math = _flags()
    on = [(SDPBackend.FLASH_ATTENTION, flash), (SDPBackend.EFFICIENT_ATTENTION, efficient), (SDPBackend.MATH, math)]
    return [b for b, enabled in on if enabled]


@contextmanager
def without_cudnn_sdpa() -> Iterator[None]:
    """Attention backends as they are, cuDNN's off; unchanged where cuDNN is the only one left on."""
    from torch.nn.attention import sdpa_kernel

    backends = _backends_but_cudnn()
    if not backends or not torch.backends.cuda.cudnn_sdp_enabled():
        yield
        return
    with sdpa_kernel(backends):
        yield


@contextmanager
def sdpa_without_cudnn_where_unsafe(input_ids: Tensor, attention_mask: Tensor | None) -> Iterator[None]:
    """:func:`without_cudnn_sdpa` for a CUDA forward that records a backward on a length cuDNN gets wrong."""
    unsafe = (torch.is_grad_enabled() and input_ids.is_cuda
              and cudnn_sdpa_unsafe(input_ids.shape[-1], attention_mask is not None))
    if not unsafe:
        yield
        return
    with without_cudnn_sdpa():
        yield
