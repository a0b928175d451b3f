"""The multi-process launcher: a native crash or a taken rendezvous port is relaunched once, a Python error is not;
once a process failed, the others are stopped soon after."""

from __future__ import annotations

import socket
import time

import pytest

from lightning_memopt.testing import multiproc, run_distributed, run_torchrun
from lightning_memopt.testing.multiproc import RankCrashed
from lightning_memopt.testing.multiproc import _excerpt as excerpt


@pytest.mark.parametrize("launcher", ["plain", "torchrun"])
def test_a_native_crash_is_relaunched_once_with_a_warning(tmp_path, launcher):
    marker = str(tmp_path / "launches")
    target = "lightning_memopt.testing.workers:abort_once"
    # torchrun: the agent exits with 1 and names the worker's signal
    launch = (lambda: run_distributed(target, world_size=1, marker=marker)) if launcher == "plain" else (
        lambda: run_torchrun(target, nnodes=1, marker=marker))
    with pytest.warns(UserWarning, match="(?s)crashed natively.*Fatal Python error: Aborted"):  # faulthandler's stack
        out = launch()
    assert out == [2]


def test_a_python_error_fails_at_once(tmp_path):
    marker = tmp_path / "launches"
    with pytest.raises(RuntimeError, match="a Python error in the worker") as e:
        run_distributed("lightning_memopt.testing.workers:raise_error", world_size=1, marker=str(marker))
    assert not isinstance(e.value, RankCrashed) and marker.read_text() == "x"


def test_the_crash_excerpt_keeps_faulthandlers_stack_ahead_of_a_long_module_list():
    # a GPU image's crashed worker lists ~180 extension modules after its stack (scipy, pandas, sklearn loaded)
    stack = "Fatal Python error: Aborted\n\nCurrent thread 0x1 (most recent call first):\n  File \"w.py\", line 9 in f\n"
    modules = "\nExtension modules: " + ", ".join(f"scipy.mod{i}" for i in range(2000)) + " (total: 2000)\n"
    summary = "\ntraceback : Signal 6 (SIGABRT) received by PID 7\n"
    out = excerpt(stack + modules + summary)
    assert out.startswith(stack) and out.endswith(summary) and len(out) < 13000
    short = "log\n" + stack + summary
    assert excerpt(short) == short


def test_a_taken_port_is_relaunched_and_the_waiting_rank_is_stopped(monkeypatch):
    """Rank 0 cannot listen on a port taken since it was chosen (EADDRINUSE), while rank 1 connects to the port's
    owner and waits for a store that never answers: rank 1 is stopped soon after rank 0 failed (not after the
    launch's timeout), and the launch runs again on a new port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        chosen = iter([taken.getsockname()[1]])
        free = multiproc._free_port
        monkeypatch.setattr(multiproc, "_free_port", lambda: next(chosen, None) or free())
        monkeypatch.setattr(multiproc, "_GRACE_S", 2.0)
        start = time.monotonic()
        with pytest.warns(UserWarning, match=r"(?s)EADDRINUSE.*\[stopped: another process had failed\]"):
            out = run_distributed("lightning_memopt.testing.workers:gloo_sum", world_size=2, timeout=300)
    assert out == [3.0, 3.0]
    assert time.monotonic() - start < 120


def test_a_failed_rank_stops_the_waiting_ones_and_is_not_relaunched(tmp_path, monkeypatch):
    marker = tmp_path / "launches"
    monkeypatch.setattr(multiproc, "_GRACE_S", 2.0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)a Python error in the worker.*\[stopped: another process had failed\]"
                       ) as e:
        run_distributed("lightning_memopt.testing.workers:raise_on_rank0", world_size=2, marker=str(marker),
                        timeout=300)
    assert not isinstance(e.value, multiproc.Relaunchable) and marker.read_text() == "x"
    assert time.monotonic() - start < 120
