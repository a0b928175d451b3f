"""Batches for generation tasks: prompt + answer with a loss on the answer tokens only, plus the bare prompt and the
reference answers for greedy-generation evaluation.

A batch has ``input_ids``/``attention_mask`` (prompt and answer, left-padded), ``lm_labels`` (``-100`` except on
answer tokens: ``HFCausalLM.lm_loss`` uses them), ``prompt_ids``/``prompt_mask`` (the prompt alone, left-padded) and
``answers`` (a list of reference strings per example). Where the DataModule bounds the answer's length (SQuAD's
``max_answer_tokens``), ``loss_window`` is that bound: every target lies in the last ``loss_window`` positions, so
``HFCausalLM.per_sample_loss`` projects only those to the vocabulary. It is None in a batch that breaks the bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lightning_memopt.data.prompt import Items, padded_length, pin_memory
from lightning_memopt.data.sampling import eval_loader, train_loader
from lightning_memopt.tokenization import cut_left, load_tokenizer

IGNORE = -100


def make_item(
    segments: list[tuple[list[int], bool]], answers: list[str], max_length: int, head: int = 0
) -> dict[str, Any]:
    """An example from token segments ``(ids, is_answer)``: the loss covers answer segments; the generation prompt
    is everything before the last answer segment. Too long: the oldest prompt tokens go first, after the ``head``
    first tokens (the tokenizer's leading specials, a BOS), which stay."""
    ids, labels = [], []
    prompt_end = 0
    for seg, is_answer in segments:
        if is_answer:
            prompt_end = len(ids)
        ids += seg
        labels += seg if is_answer else [IGNORE] * len(seg)
    prompt = cut_left(ids[:prompt_end], max_length, head)
    ids, labels = cut_left(ids, max_length, head), cut_left(labels, max_length, head)
    return {"input_ids": ids, "lm_labels": labels, "prompt_ids": prompt, "answers": answers}


def _left_pad(
    seqs: list[list[int]], value: int, pad_to: Callable[[int], int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(1, max(len(s) for s in seqs))
    n = n if pad_to is None else pad_to(n)
    out = torch.full((len(seqs), n), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for j, s in enumerate(seqs):
        if s:
            out[j, n - len(s) :] = torch.tensor(s)
            mask[j, n - len(s) :] = 1
    return out, mask


def generation_collate(pad_id: int, pad_to: Callable[[int], int] | None = None, loss_window: int | None = None):
    """Left-padded batches, each padded to ``pad_to(longest)`` (the longest by default); with ``loss_window``, each
    batch also says whether its targets all lie in that many last positions (``"loss_window"``: the bound or None)."""

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        ids, mask = _left_pad([it["input_ids"] for it in items], pad_id, pad_to)
        labels, _ = _left_pad([it["lm_labels"] for it in items], IGNORE, pad_to)
        prompt, prompt_mask = _left_pad([it["prompt_ids"] for it in items], pad_id, pad_to)
        out = {"input_ids": ids, "attention_mask": mask, "lm_labels": labels, "prompt_ids": prompt,
               "prompt_mask": prompt_mask, "answers": [list(it["answers"]) for it in items]}
        if loss_window is not None:
            # checked here on the host, so the model can slice without a device sync (CUDA graphs allow none)
            fits = 0 < loss_window < labels.shape[1] and not (labels[:, : -loss_window] != IGNORE).any()
            out["loss_window"] = loss_window if fits else None
        return out

    return collate


class GenerationDataModuleBase(LightningDataModule):
    """Tokenizer resolution and loaders shared by the generation DataModules; subclasses build the splits."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = None
        self._splits: dict[str, Items] = {}

    def _resolve_tokenizer(self, name: Optional[str]):
        if self.tokenizer is None:
            if name is not None:
                self.tokenizer = load_tokenizer(name)
            else:
                module = self.trainer.lightning_module if self.trainer is not None else None
                self.tokenizer = getattr(module, "tokenizer", None)
                if self.tokenizer is None:
                    raise ValueError("No tokenizer: pass tokenizer=... or use a LightningModule with a .tokenizer.")
        return self.tokenizer

    def _build(self, tokenizer) -> dict[str, list[dict[str, Any]]]:
        raise NotImplementedError

    def setup(self, stage: Optional[str] = None) -> None:
        if not self._splits:
            tok = self._resolve_tokenizer(self.tokenizer_name)
            self._splits = {k: Items(v) for k, v in self._build(tok).items()}

    def _loss_window(self) -> int | None:
        """An upper bound on the trailing positions that hold an example's targets, where the DataModule has one."""
        return None

    def _collate(self) -> Any:
        hp = self.hparams
        pad_to = None if hp.padding == "longest" else (
            lambda n: padded_length(n, hp.padding, hp.max_length, hp.pad_buckets))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return generation_collate(pad_id, pad_to, self._loss_window())

    def train_dataloader(self) -> DataLoader:
        if not len(self._splits.get("train", ())):
            return []  # Lightning skips an empty list quietly
        return train_loader(self, self._splits["train"], self._collate(), pin_memory(self))

    def val_dataloader(self) -> Any:
        return self._eval_loader("val")

    def test_dataloader(self) -> Any:
        if not len(self._splits.get("test", ())):  # Lightning would test nothing and return [] without a word
            raise ValueError(f"{type(self).__name__} has no test examples: {self._no_test_hint()}")
        return self._eval_loader("test")

    def _no_test_hint(self) -> str:
        return "give it test data."

    def _eval_loader(self, split: str) -> Any:
        if not len(self._splits.get(split, ())):
            return []  # Lightning skips an empty list quietly
        return eval_loader(self, self._splits[split], self._collate(), pin_memory(self))
