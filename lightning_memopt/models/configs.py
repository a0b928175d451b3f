"""Random-init Llama configurations used by tests and benchmarks.

The shapes match ``../shared/tools/anchors_gpu.py`` so that our figures and the peers' are comparable.
"""

from __future__ import annotations

from typing import Any

LLAMA_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    ),
    # SmolLM2-135M's shape (the real model of the SST-2 results), for speed and memory figures on random weights
    "smol": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, tie_word_embeddings=True,
    ),
    "1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8
    ),
    "7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32
    ),
    "13b": dict(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40
    ),
    "30b": dict(
        hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52, num_key_value_heads=52
    ),
    "34b": dict(
        hidden_size=8192, intermediate_size=22016, num_hidden_layers=48, num_attention_heads=64, num_key_value_heads=8
    ),
    # toward the largest model on one 141 GB GPU (the `largest` benchmark suite): Llama-65B's width, fewer layers
    "48b": dict(
        hidden_size=8192, intermediate_size=22016, num_hidden_layers=58, num_attention_heads=64, num_key_value_heads=64
    ),
    "60b": dict(
        hidden_size=8192, intermediate_size=22016, num_hidden_layers=74, num_attention_heads=64, num_key_value_heads=64
    ),
    # Llama-65B (LLaMA-1): 65.3B parameters, 121.6 GiB in bf16
    "65b": dict(
        hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=64
    ),
    # Llama-2-70B (grouped-query attention, 8 KV heads): 69.0B parameters, 128.5 GiB in bf16
    "70b": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8
    ),
}


def llama_config(size: str = "tiny", vocab_size: int | None = None, **overrides: Any) -> dict[str, Any]:
    """A config dict for :class:`~lightning_memopt.models.HFCausalLM` (``model_type: llama``)."""
    if size not in LLAMA_SIZES:
        raise ValueError(f"Unknown Llama size {size!r}; choose one of {sorted(LLAMA_SIZES)}.")
    shape = dict(LLAMA_SIZES[size])
    own_vocab = shape.pop("vocab_size", None)
    if vocab_size is None:
        vocab_size = own_vocab or (32000 if size not in ("tiny", "small") else 512)
    cfg = dict(model_type="llama", vocab_size=vocab_size, max_position_embeddings=4096, **shape)
    cfg.update(overrides)
    return cfg
