"""Random-init models without a second copy: build on the meta device, then materialise on the target device.

``build_causal_lm(config, device, dtype, meta=True)`` constructs the module graph on the meta device (no memory, no
random draws), allocates every parameter and buffer once, directly on ``device`` in ``dtype`` (``to_empty``), and
then runs the model's own initialisation there (``initialize_weights``: the weights, and the non-persistent buffers
such as the rotary frequencies). Peak memory is one copy of the weights in their final dtype: no fp32 CPU copy, no
copy to move. ``meta=False`` constructs directly on the device instead; both end with the same seeded
initialisation, so both give the same model bit for bit (tests/test_model_init.py).

Example::

    model = build_causal_lm(llama_config("65b"), device="cuda", dtype=torch.bfloat16)
"""

from __future__ import annotations

from typing import Any, Union

import torch


def _hf_config(config: Union[dict[str, Any], Any], attn_implementation: str | None) -> Any:
    from transformers import AutoConfig

    if isinstance(config, dict):
        cfg = dict(config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    return config


def initialize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Run ``model``'s own Hugging Face initialisation again, seeded, wherever its tensors live (after ``to_empty``
    their memory is uninitialised), and tie its weights."""
    for m in model.modules():
        m.__dict__.pop("_is_hf_initialized", None)
    for t in [*model.parameters(), *model.buffers()]:
        t.__dict__.pop("_is_hf_initialized", None)
    model.tie_weights()  # to_empty unties shared parameters: tie them before drawing, as a direct build is
    torch.manual_seed(seed)
    model.initialize_weights()
    model.tie_weights()
    return model


def build_causal_lm(
    config: Union[dict[str, Any], Any],
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    meta: bool = True,
    seed: int = 0,
    attn_implementation: str | None = "sdpa",
) -> torch.nn.Module:
    """A random-init ``AutoModelForCausalLM`` of ``config`` (a dict with ``model_type``, or a ``PretrainedConfig``)
    on ``device`` in ``dtype``; with ``meta=True`` its weights exist once, where they end up (see the module doc)."""
    from transformers import AutoModelForCausalLM

    config = _hf_config(config, attn_implementation)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # modules that build tensors without a dtype argument get the final one
    try:
        with torch.device("meta" if meta else device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if meta:
            model.to_empty(device=device)
    finally:
        torch.set_default_dtype(old)
    return initialize(model, seed)


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied tensors once)."""
    seen, n = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        n += t.numel() * t.element_size()
    return n
