"""`python -m benchmarks.plot_results` regenerates every plot under docs/img from the committed JSON, on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from benchmarks import plot_results


def test_plot_results_writes_every_docs_plot(tmp_path: Path) -> None:
    files = plot_results.main(str(tmp_path))
    made = sorted(Path(f).name for f in files)
    assert made == sorted(p.name for p in (tmp_path).glob("*.png"))
    # every plot committed under docs/img comes from this one command
    committed = sorted(p.name for p in (plot_results.ROOT / "docs" / "img").glob("*.png"))
    assert made == committed
    assert all(Path(f).stat().st_size > 10_000 for f in files)
