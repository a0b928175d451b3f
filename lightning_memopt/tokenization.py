"""Tokenizers shared by the model and the data: a hub name, a local folder, a GGUF file, or the builtin one.

Both ``models`` and ``data`` import this module, so neither imports the other.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Optional

# The builtin tokenizer's vocabulary: the embedded synthetic task's words (lightning_memopt.data.synthetic uses them).
POSITIVE = (
    "good great excellent wonderful superb lovely brilliant charming delightful moving "
    "funny clever fresh touching beautiful gripping solid warm smart enjoyable"
).split()
NEGATIVE = (
    "bad awful terrible boring dull weak tedious clumsy bland stale "
    "lazy messy silly flat poor painful shallow grim ugly annoying"
).split()
NEUTRAL = (
    "the a film movie story plot actor cast scene script director music camera it is was "
    "and of to with this that its in on as for one some about by from an at very quite rather"
).split()
TEMPLATE_WORDS = "review sentiment label text input answer positive negative neutral yes no".split()
SPECIALS = ("[PAD]", "[UNK]", "[EOS]")


def require_gguf() -> None:
    """transformers reads GGUF files with the gguf package; without it, say which extra installs it."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError("Loading a GGUF checkpoint needs the gguf package: pip install 'lightning_memopt[gguf]'.")


def split_gguf(path: str, gguf_file: Optional[str] = None) -> tuple[str, Optional[str]]:
    """``("dir", "file.gguf")`` for a path to a ``.gguf`` file (transformers wants the folder and the file name)."""
    if gguf_file is None and path.endswith(".gguf"):
        return os.path.dirname(path) or ".", os.path.basename(path)
    return path, gguf_file


@lru_cache(maxsize=1)
def _vocab() -> dict[str, int]:
    words = list(SPECIALS) + list(dict.fromkeys(TEMPLATE_WORDS + POSITIVE + NEGATIVE + NEUTRAL))
    words += [":", ".", ",", "!", "?", "'", "-"]
    return {w: i for i, w in enumerate(words)}


def builtin_tokenizer():
    """A lower-casing word-level ``PreTrainedTokenizerFast`` over the synthetic task's words (~150 tokens)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(vocab=dict(_vocab()), unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", padding_side="left"
    )


def load_tokenizer(name_or_path: str, gguf_file: Optional[str] = None, trust_remote_code: bool = False):
    """A tokenizer by hub name, local path or GGUF file; ``"builtin"`` gives the offline synthetic-task tokenizer."""
    if name_or_path == "builtin":
        return builtin_tokenizer()
    from transformers import AutoTokenizer

    path, gguf_file = split_gguf(name_or_path, gguf_file)
    kwargs: dict[str, Any] = dict(trust_remote_code=trust_remote_code)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ValueError(
            f"Could not load a tokenizer for {name_or_path!r} ({str(err).splitlines()[0]}). Check the name or path."
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def encode_prompt(tokenizer: Any, text: str) -> tuple[list[int], int]:
    """``text``'s token ids with the tokenizer's own specials, and how many of them lead (a BOS), which a prompt cut
    from the left keeps (:func:`cut_left`)."""
    enc = tokenizer(text, add_special_tokens=True, return_special_tokens_mask=True)
    mask = enc.get("special_tokens_mask") or []
    return list(enc["input_ids"]), next((i for i, m in enumerate(mask) if not m), len(mask))


def cut_left(ids: list[Any], max_length: int, head: int = 0) -> list[Any]:
    """The last ``max_length`` items, the first ``head`` kept in front (a BOS the model was trained to see first)."""
    if len(ids) <= max_length:
        return ids
    head = min(head, max_length)
    return ids[:head] + ids[len(ids) - (max_length - head):]
