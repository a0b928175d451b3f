"""Fixed-length and bucketed padding: the shapes a captured CUDA graph needs, with the predictions of dynamic padding."""

from __future__ import annotations

import pytest
import torch

from lightning_memopt.data.prompt import default_buckets, padded_length
from lightning_memopt.testing import tiny_datamodule, tiny_model


def _logits(padding: str) -> tuple[torch.Tensor, set[int]]:
    torch.manual_seed(0)
    model = tiny_model()
    dm = tiny_datamodule(k=16, padding=padding)
    dm.tokenizer = model.tokenizer
    dm.setup("fit")
    model.set_label_token_ids(dm.label_token_ids)
    model.eval()
    out, lengths = [], set()
    with torch.no_grad():
        for b in dm.test_dataloader():
            lengths.add(b["input_ids"].shape[1])
            out.append(model(b["input_ids"], b["attention_mask"]))
    return torch.cat(out), lengths


def test_fixed_and_bucketed_padding_give_the_predictions_of_dynamic_padding():
    dynamic, dyn_lengths = _logits("longest")
    fixed, fixed_lengths = _logits("max_length")
    bucket, bucket_lengths = _logits("bucket")
    assert fixed_lengths == {32}  # tiny_datamodule's max_length: one shape
    assert bucket_lengths <= set(default_buckets(32)) and len(dyn_lengths) >= len(bucket_lengths)
    torch.testing.assert_close(fixed, dynamic, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bucket, dynamic, atol=1e-5, rtol=1e-5)
    assert torch.equal(fixed.argmax(1), dynamic.argmax(1)) and torch.equal(bucket.argmax(1), dynamic.argmax(1))


def test_padded_length_and_bad_values():
    assert padded_length(7, "longest", 128) == 7
    assert padded_length(7, "max_length", 128) == 128
    assert padded_length(17, "bucket", 128) == 32 and default_buckets(128) == [16, 32, 64, 128]
    assert padded_length(40, "bucket", 128, [24, 48]) == 48
    with pytest.raises(ValueError, match="padding must be"):
        tiny_datamodule(padding="fixed")
