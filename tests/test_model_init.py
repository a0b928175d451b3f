"""The meta-device build (construct on meta, materialise on the device, initialise there) gives the same model as
building on the device directly: same parameters, buffers (rotary frequencies) and logits, bit for bit."""

from __future__ import annotations

import pytest
import torch

from lightning_memopt.models.configs import llama_config
from lightning_memopt.models.init import build_causal_lm, tensor_bytes


@pytest.mark.parametrize("size", ["tiny", "smol_tied"])
def test_meta_build_equals_direct_build(size):
    cfg = llama_config("tiny", vocab_size=256) if size == "tiny" else llama_config(
        "tiny", vocab_size=256, tie_word_embeddings=True)
    direct = build_causal_lm(cfg, dtype=torch.bfloat16, meta=False, seed=3)
    meta = build_causal_lm(cfg, dtype=torch.bfloat16, meta=True, seed=3)
    a, b = direct.state_dict(), meta.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16 and a[k].device.type == "cpu", k
        assert torch.equal(a[k], b[k]), k
    bufs_a, bufs_b = dict(direct.named_buffers()), dict(meta.named_buffers())
    assert bufs_a.keys() == bufs_b.keys() and any("inv_freq" in k for k in bufs_a)
    for k, v in bufs_a.items():  # non-persistent buffers are recomputed, not left as to_empty's garbage
        assert torch.equal(v, bufs_b[k]), k
    if size == "smol_tied":
        assert meta.lm_head.weight is meta.model.embed_tokens.weight
    assert tensor_bytes(meta) == tensor_bytes(direct)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, meta(ids).logits)
    # the initialisation is the model's own (normal weights of std initializer_range, norms at one)
    w = meta.model.layers[0].self_attn.q_proj.weight.float()
    assert 0.015 < w.std().item() < 0.025 and torch.all(meta.model.norm.weight == 1)
