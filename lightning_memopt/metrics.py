"""Answer metrics for generation: exact match and token F1 with the official SQuAD normalisation.

``torchmetrics.text.SQuAD`` takes id-tagged dicts and returns a dict of percentages, so it cannot be a scalar
objective. :class:`AnswerF1` and :class:`AnswerEM` take plain strings and return one fraction in [0, 1]; they work as
``MeZO(metric="lightning_memopt.metrics.AnswerF1")`` on what ``HFCausalLM(objective="generation",
train_generate=True)`` returns from ``training_step`` (``preds``: generated answers, ``target``: reference answers).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Union

import torch
from torchmetrics import Metric

Refs = Union[str, Sequence[str]]
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (the official SQuAD evaluation script)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(pred: str, refs: Refs) -> float:
    """1.0 when the normalised prediction equals a normalised reference (the best over references)."""
    refs = [refs] if isinstance(refs, str) else list(refs)
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(r) for r in refs))


def _f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:  # SQuAD 2.0: an empty answer matches only an empty answer
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def answer_f1(pred: str, refs: Refs) -> float:
    """Token F1 between the prediction and the best-matching reference (SQuAD)."""
    refs = [refs] if isinstance(refs, str) else list(refs)
    return max(_f1(pred, r) for r in refs) if refs else 0.0


class _AnswerMetric(Metric):
    higher_is_better = True
    is_differentiable = False
    full_state_update = False
    _score = staticmethod(answer_f1)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Union[str, Sequence[str]], target: Union[Refs, Sequence[Refs]]) -> None:
        """``preds``: generated answers; ``target``: per prediction a reference string or a list of references."""
        if isinstance(preds, str):
            preds, target = [preds], [target]
        if len(preds) != len(target):
            raise ValueError(f"{type(self).__name__}: {len(preds)} predictions but {len(target)} targets.")
        self.total += sum(self._score(p, t) for p, t in zip(preds, target))
        self.count += len(preds)

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class AnswerF1(_AnswerMetric):
    """Mean SQuAD token F1 (a fraction in [0, 1]) of generated answers against their references.

    Example::

        MeZO(metric="lightning_memopt.metrics.AnswerF1")  # with HFCausalLM(objective="generation", train_generate=True)
    """

    _score = staticmethod(answer_f1)


class AnswerEM(_AnswerMetric):
    """Mean SQuAD exact match (a fraction in [0, 1]) of generated answers against their references."""

    _score = staticmethod(exact_match)
