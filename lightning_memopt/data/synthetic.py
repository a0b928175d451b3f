"""The embedded offline default: a synthetic sentiment task (its word-level tokenizer is in ``tokenization``).

It needs no network and no data files, so the quickstart runs anywhere. The task is honest but easy: a "review" is a
bag of neutral words with one or three sentiment words, and the label is the majority sentiment. A small random-init
model learns it in a few hundred steps, so the loss visibly falls.
"""

from __future__ import annotations

import random

from lightning_memopt.tokenization import NEGATIVE, NEUTRAL, POSITIVE


def synthetic_sentiment(n: int, seed: int) -> list[tuple[int, str]]:
    """``n`` labelled reviews; label 1 when positive words outnumber negative ones."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        n_sent = rng.choice((1, 3))
        n_major = n_sent if n_sent == 1 else rng.choice((2, 3))
        major, minor = (POSITIVE, NEGATIVE) if label else (NEGATIVE, POSITIVE)
        words = [rng.choice(major) for _ in range(n_major)] + [rng.choice(minor) for _ in range(n_sent - n_major)]
        words += [rng.choice(NEUTRAL) for _ in range(rng.randint(4, 10))]
        rng.shuffle(words)
        rows.append((label, " ".join(words)))
    rng.shuffle(rows)
    return rows
