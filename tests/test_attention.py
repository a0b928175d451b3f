"""cuDNN attention is kept out of training forwards whose backward it gets wrong (models/attention.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_memopt.models import attention
from lightning_memopt.models.attention import (
    _flags,
    cudnn_sdpa_unsafe,
    sdpa_without_cudnn_where_unsafe,
    without_cudnn_sdpa,
)
from lightning_memopt.testing import tiny_model


@pytest.mark.parametrize("n", [64, 192, 320, 704])
def test_lengths_64_past_a_multiple_of_128_are_unsafe_with_a_mask(n):
    assert cudnn_sdpa_unsafe(n, masked=True)
    assert not cudnn_sdpa_unsafe(n, masked=False)  # is_causal without a mask tensor is clean


@pytest.mark.parametrize("n", [1, 32, 63, 65, 128, 256, 299])
def test_other_lengths_are_safe(n):
    assert not cudnn_sdpa_unsafe(n, masked=True)


def test_without_cudnn_turns_only_cudnn_off_and_restores_it():
    before = _flags()
    assert before[0], "cuDNN attention is on by default"
    torch.backends.cuda.enable_flash_sdp(False)  # a user's own choice stays
    try:
        with without_cudnn_sdpa():
            assert _flags() == (False, False, before[2], before[3])
        assert _flags() == (True, False, before[2], before[3])
    finally:
        torch.backends.cuda.enable_flash_sdp(before[1])
    assert _flags() == before


def test_without_cudnn_leaves_cudnn_on_where_it_is_the_only_backend():
    b = torch.backends.cuda
    saved = _flags()
    b.enable_flash_sdp(False), b.enable_mem_efficient_sdp(False), b.enable_math_sdp(False)
    try:
        with without_cudnn_sdpa():
            assert _flags() == (True, False, False, False)
    finally:
        b.enable_flash_sdp(saved[1]), b.enable_mem_efficient_sdp(saved[2]), b.enable_math_sdp(saved[3])


@pytest.mark.parametrize(
    "is_cuda,n,mask,grad,cudnn_on",
    [(True, 64, True, True, False),  # the unsafe case: a CUDA training forward of length 64 with a mask
     (True, 64, True, False, True),  # no backward follows
     (True, 64, False, True, True),  # no mask tensor
     (True, 65, True, True, True),  # a safe length
     (False, 64, True, True, True)],  # not on CUDA
)
def test_the_guard_acts_on_unsafe_cuda_training_forwards_only(is_cuda, n, mask, grad, cudnn_on):
    ids = SimpleNamespace(is_cuda=is_cuda, shape=(2, n))
    with torch.set_grad_enabled(grad), sdpa_without_cudnn_where_unsafe(ids, object() if mask else None):
        assert torch.backends.cuda.cudnn_sdp_enabled() is cudnn_on
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_hf_module_forwards_go_through_the_guard(monkeypatch):
    seen = []
    real = attention.sdpa_without_cudnn_where_unsafe

    def spy(input_ids, attention_mask):
        seen.append((tuple(input_ids.shape), attention_mask is not None, torch.is_grad_enabled()))
        return real(input_ids, attention_mask)

    monkeypatch.setattr("lightning_memopt.models.hf.sdpa_without_cudnn_where_unsafe", spy)
    model = tiny_model()
    model.set_label_token_ids([5, 6])
    ids = torch.randint(8, 200, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    model(ids, mask).sum().backward()
    lm = tiny_model(objective="lm")
    lm.lm_loss({"input_ids": ids, "attention_mask": mask}).backward()
    lm.per_sample_loss({"input_ids": ids, "attention_mask": mask})
    assert seen == [((3, 10), True, True)] * 3


def test_checkpointed_forwards_recompute_with_the_forwards_backends(monkeypatch):
    """Activation checkpointing recomputes attention during backward, after the guard has ended: HFCausalLM's
    ``context_fn`` gives the recomputation the backends the forward had, so cuDNN stays off there too."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    # the guard as it acts on an unsafe CUDA forward (this test runs on any device)
    monkeypatch.setattr("lightning_memopt.models.hf.sdpa_without_cudnn_where_unsafe", lambda *_: without_cudnn_sdpa())
    for checkpointing in (False, True):
        seen.clear()
        model = tiny_model(gradient_checkpointing=checkpointing)
        model.set_label_token_ids([5, 6])
        ids = torch.randint(8, 200, (3, 10))
        loss = model(ids, torch.ones_like(ids)).sum()
        loss.backward(retain_graph=True)  # twice over one graph, as LOMO's clipping pass does: two recomputations
        loss.backward()
        assert torch.backends.cuda.cudnn_sdp_enabled()  # as it was, once the forward ended
        layers = model.model.config.num_hidden_layers
        assert seen == [False] * (layers * (3 if checkpointing else 1)), seen
