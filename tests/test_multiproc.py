"""The multi-process launcher: a native crash is relaunched once, a Python error is not."""

from __future__ import annotations

import pytest

from lightning_memopt.testing import run_distributed
from lightning_memopt.testing.multiproc import RankCrashed


def test_a_native_crash_is_relaunched_once_with_a_warning(tmp_path):
    marker = str(tmp_path / "launches")
    with pytest.warns(UserWarning, match="(?s)crashed natively.*Fatal Python error: Aborted"):  # faulthandler's stack
        assert run_distributed("lightning_memopt.testing.workers:abort_once", world_size=1, marker=marker) == [2]


def test_a_python_error_fails_at_once(tmp_path):
    marker = tmp_path / "launches"
    with pytest.raises(RuntimeError, match="a Python error in the worker") as e:
        run_distributed("lightning_memopt.testing.workers:raise_error", world_size=1, marker=str(marker))
    assert not isinstance(e.value, RankCrashed) and marker.read_text() == "x"
