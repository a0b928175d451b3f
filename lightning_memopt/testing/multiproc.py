"""Run a function in N CPU processes (gloo) as a Lightning multi-process job, e.g. a 2-process FSDP2 fit.

Lightning would relaunch ``sys.argv`` (pytest itself) to make processes; instead we start one fresh interpreter per
rank with the torchelastic-style environment Lightning detects (``LOCAL_RANK`` set: processes made externally).
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(target: str, world_size: int = 2, timeout: float = 600, **kwargs: Any) -> list[Any]:
    """Run ``target`` ("package.module:function") on ``world_size`` ranks; return each rank's return value.

    The function receives ``world_size`` and the JSON-able ``kwargs``; it builds its own Trainer with
    ``devices=world_size`` and returns something ``torch.save`` can store. A launch in which a rank died from a
    signal (a native crash, e.g. glibc's heap check aborting inside gloo; never a Python error or a failed
    assertion), or whose rendezvous port was taken before rank 0 listened on it, is run once more, with a warning
    that carries the output. Once a rank failed, the others are stopped after :data:`_GRACE_S` seconds.
    """
    return _once_more_after_a_crash(target, lambda: _launch(target, world_size, timeout, kwargs))


def _once_more_after_a_crash(target: str, launch: Callable[[], list[Any]]) -> list[Any]:
    try:
        return launch()
    except Relaunchable as e:
        warnings.warn(f"a rank of {target} {e.reason}; running the launch once more:\n{e}", stacklevel=3)
        return launch()


def _launch(target: str, world_size: int, timeout: float, kwargs: dict[str, Any]) -> list[Any]:
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world_size):
            env = dict(os.environ)
            env.update(
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                LOCAL_RANK=str(rank), NODE_RANK="0", LOCAL_WORLD_SIZE=str(world_size), **_WORKER_ENV,
            )
            cmd = [sys.executable, "-m", "lightning_memopt.testing.multiproc", target, json.dumps(kwargs), tmp,
                   str(world_size)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        _collect(procs, timeout)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def run_torchrun(
    target: str, nnodes: int = 2, nproc_per_node: int = 1, timeout: float = 600, **kwargs: Any
) -> list[Any]:
    """Run ``target`` as users launch multi-node jobs: ``nnodes`` torchrun agents on this host (one per "node",
    c10d rendezvous on 127.0.0.1), each starting ``nproc_per_node`` workers. Returns every rank's return value.

    The function receives ``world_size`` (all processes) and the JSON-able ``kwargs``; it builds its Trainer with
    ``num_nodes=nnodes, devices=nproc_per_node`` (Lightning reads torchrun's variables: TorchElasticEnvironment).
    A native crash of a worker, a taken port and a failed rank are handled as in :func:`run_distributed`.
    """
    return _once_more_after_a_crash(target, lambda: _torchrun(target, nnodes, nproc_per_node, timeout, kwargs))


def _torchrun(target: str, nnodes: int, nproc_per_node: int, timeout: float, kwargs: dict[str, Any]) -> list[Any]:
    port = _free_port()
    world = nnodes * nproc_per_node
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, **_WORKER_ENV)
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
            env.pop(k, None)
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=memopt{port}",
            "--max-restarts=0", "-m", "lightning_memopt.testing.multiproc", target, json.dumps(kwargs), tmp,
            str(world),
        ]
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for _ in range(nnodes)]
        _collect(procs, timeout)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]


# faulthandler: a native crash prints every thread's Python stack
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONFAULTHANDLER": "1"}


class Relaunchable(RuntimeError):
    """A launch failed for a reason outside the code under test; the same launch is run once more."""

    reason = "failed"


class RankCrashed(Relaunchable):
    """A launched process died from a signal: a native crash, not a Python error. Its return code is negative, or
    it was a torchrun agent whose worker was (the agent exits with 1 and reports the signal)."""

    reason = "crashed natively"


class PortTaken(Relaunchable):
    """The rendezvous port :func:`_free_port` chose was taken before rank 0 could listen on it (another process's
    connection can get it as its local port in between)."""

    reason = "could not listen on its rendezvous port (EADDRINUSE)"


_TORCHRUN_SIGNAL = "traceback : Signal "  # torchrun's summary of a worker killed by a signal
_GRACE_S = 30.0  # how long the other ranks get to exit once one rank failed


def _collect(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait for every process; raise with each one's output when one failed.

    Once a process has failed, the others get :data:`_GRACE_S` seconds and are then stopped: a rank left waiting
    in a collective, or connecting to a store whose host is gone, would otherwise hold the launch for ``timeout``.
    """
    outs = [b""] * len(procs)

    def read(i: int) -> None:  # a thread per pipe, so no process blocks on a full one
        stdout = procs[i].stdout
        outs[i] = stdout.read() if stdout is not None else b""

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(procs))]
    for t in readers:
        t.start()
    deadline, failed_at, stopped, first = time.monotonic() + timeout, None, set(), []
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        first = first or [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
        if failed_at is None and first:
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + _GRACE_S):
            stopped = {i for i, p in enumerate(procs) if p.poll() is None}
            for i in stopped:
                procs[i].kill()
            break
        time.sleep(0.05)
    for p in procs:
        p.wait()
    for t in readers:
        t.join()
    text = [o.decode(errors="replace") for o in outs]
    if failed_at is None and stopped:
        raise subprocess.TimeoutExpired(procs[0].args, timeout, output="\n----\n".join(map(_excerpt, text)))
    if all(p.returncode == 0 for p in procs):
        return
    # the cause is whoever failed first: a peer's own error after a crash ("Connection reset by peer") is an effect
    first = first or [i for i, p in enumerate(procs) if p.returncode != 0]
    msg = "distributed run failed:\n" + "\n----\n".join(
        ("[stopped: another process had failed]\n" if i in stopped else "") + _excerpt(o) for i, o in enumerate(text))
    if any(procs[i].returncode < 0 or _TORCHRUN_SIGNAL in text[i] for i in first):
        raise RankCrashed(msg)
    if any("EADDRINUSE" in text[i] for i in first):
        raise PortTaken(msg)
    raise RuntimeError(msg)


def _excerpt(out: str, n: int = 6000) -> str:
    """The output's tail, and faulthandler's stack where the tail misses it: after the stack a crashed process
    lists its extension modules, which on a machine with scipy, pandas and sklearn loaded is longer than the tail."""
    tail = out[-n:]
    i = out.find("Fatal Python error")
    if not 0 <= i < len(out) - n:
        return tail
    j = out.find("\nExtension modules:", i)
    return out[i:j if j > i else i + n][:n] + "\n[...]\n" + tail


def _main() -> None:
    target, kwargs, out_dir, world_size = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    mod, fn = target.split(":")
    torch.set_num_threads(1)
    result = getattr(importlib.import_module(mod), fn)(world_size=world_size, **kwargs)
    torch.save(result, os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    finally:
        # Skip interpreter teardown: gloo's threads have aborted it ("terminate called without an active
        # exception") after a finished run, failing a test whose result was already saved.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    _main()


def assert_ranks_equal_one_and_all_moved(one: dict, ranks: list[dict], init: dict) -> None:
    """Every rank's gathered ``state`` equals the 1-process run's (FSDP2's tolerances), and every parameter moved
    away from ``init`` (the root group's too: embeddings, norm, head)."""
    import torch

    moved = 0
    for k, v in one["state"].items():
        for rank in ranks:
            torch.testing.assert_close(rank["state"][k], v, rtol=1e-4, atol=1e-5)
        moved += int(not torch.equal(v, init[k]))
    assert moved == len(init), (moved, len(init))
