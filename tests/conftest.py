"""Shared test settings: one torch thread (CI has 2 cores), and the central list of expected warnings."""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SST2 = DATA / "sst2"
MRPC = DATA / "mrpc"
SQUAD = DATA / "squad" / "dev-subset.json"

# Every warning a tiny CPU run is allowed to raise. Anything else fails tests that use `no_unexpected_warnings`.
EXPECTED_WARNINGS = (
    r"does not have many workers",  # num_workers=0 on purpose: tiny in-memory datasets
    r"smaller than the logging interval",  # tiny epochs
    r"isinstance\(treespec, LeafSpec\)",  # torch 2.13 deprecation inside Lightning 2.6
    r"tensorboardX",  # logger=True without tensorboard installed
    r"Total length of `DataLoader` across ranks is zero",
    r"You called `self.log\(.*\)` but have no logger configured",
    r"The `srun` command is available",
    r"Checkpoint directory .* exists and is not empty",
    r"Experiment logs directory .* exists and is not empty",
    r"`trainer.test\(\)` .* no checkpoint",
    # a CPU test on a machine with a GPU (accelerator="cpu" on purpose: the CPU suite runs the same everywhere)
    r"GPU available but not used",
)


def unexpected(records: list[warnings.WarningMessage]) -> list[str]:
    return [
        f"{w.category.__name__}: {w.message}"
        for w in records
        if not issubclass(w.category, DeprecationWarning)
        and not any(re.search(p, str(w.message)) for p in EXPECTED_WARNINGS)
    ]


@pytest.fixture
def no_unexpected_warnings():
    """Fail the test if it warns anything not in EXPECTED_WARNINGS."""
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        yield
    bad = unexpected(records)
    assert not bad, "unexpected warnings:\n" + "\n".join(bad)


@pytest.fixture
def in_repo(monkeypatch):
    """Run from the repository root, where configs' relative paths (``../shared/data/sst2``) point."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["memopt"])  # LightningCLI(args=...) warns when pytest's argv is there too
    return REPO


def sst2_available() -> bool:
    return (SST2 / "train.tsv").is_file() and (SST2 / "dev.tsv").is_file()


needs_sst2 = pytest.mark.skipif(not sst2_available(), reason=f"SST-2 TSVs not found at {SST2}")
needs_mrpc = pytest.mark.skipif(
    not ((MRPC / "train.tsv").is_file() and (MRPC / "dev.tsv").is_file()), reason=f"MRPC TSVs not found at {MRPC}"
)
needs_squad = pytest.mark.skipif(not SQUAD.is_file(), reason=f"SQuAD subset not found at {SQUAD}")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
