"""Multi-node launches on one CPU host: two torchrun agents (``--nnodes 2 --nproc-per-node 1``, c10d rendezvous)
run every method, and HSDP (replicate across nodes, shard within), and each equals one process at the same global
batch, within the tolerances of the 2-process FSDP2 tests. One launch runs all of them, one fit after another."""

from __future__ import annotations

import pytest
import torch

from lightning_memopt.testing import run_torchrun
from lightning_memopt.testing.workers import fit_dfo, fit_tiny

FIT, DFO = "lightning_memopt.testing.workers:fit_tiny", "lightning_memopt.testing.workers:fit_dfo"
MEZO = {"class_path": "lightning_memopt.MeZO",
        "init_args": {"eps": 1e-3, "lr": 2e-3, "variant": "momentum", "window": 3, "weight_decay": 0.1}}
ADALOMO = {"class_path": "lightning_memopt.AdaLomo", "init_args": {"lr": 0.01, "weight_decay": 0.1}}
GALORE = {"class_path": "lightning_memopt.GaLore", "init_args": {"rank": 8, "update_proj_gap": 2, "proj_type": "right"}}
# name: (worker, its kwargs, tolerance on the weights (or DFO's z), in the spirit of each method's 2-process test)
CASES = {
    "adamw": (FIT, {}, 1e-4),
    "mezo": (FIT, {"callback": MEZO}, 1e-5),
    "lomo": (FIT, {"callback": {"class_path": "lightning_memopt.LOMO",
                                "init_args": {"lr": 0.5, "clip_grad_norm": 0.05}}}, 1e-5),
    "adalomo": (FIT, {"callback": ADALOMO}, 1e-5),
    "galore": (FIT, {"callback": GALORE, "model_kwargs": {"weight_decay": 0.01}}, 1e-5),
    "clora": (DFO, {"dfo": {"d": 40, "population": 6, "budget": None, "stat_batches": 2}, "steps": 2}, 1e-5),
    "flora": (DFO, {"dfo": {"optimizer": "fireworks", "d": 40, "population": 8, "n_fireworks": 3, "budget": None,
                            "stat_batches": 2, "init_scale": 1.0}, "dm_kwargs": {"padding": "max_length"},
                    "steps": 4}, 0.0),
}
HSDP = ("adamw", "mezo")
# the methods whose statistics are all-reduced over the shard group only (LOMO's clipping norm, AdaLomo's column
# moments and update RMS, GaLore's sketches), besides the all-process reductions (MeZO's projected gradient)
HSDP_2X2 = ("lomo", "adalomo", "galore", "mezo", "clora", "flora")  # DFO: fitness sums over all processes
STEPS = 3


def _kwargs(name: str) -> dict:
    _, kw, _ = CASES[name]
    return {"steps": STEPS, "global_batch": 16, **kw}


@pytest.fixture(scope="module")
def launched():
    jobs = [{"target": CASES[n][0], "kwargs": {**_kwargs(n), "num_nodes": 2}} for n in CASES]
    jobs += [{"target": CASES[n][0], "kwargs": {**_kwargs(n), "num_nodes": 2, "strategy_kwargs": {"hsdp": True}}}
             for n in HSDP]
    ranks = run_torchrun("lightning_memopt.testing.workers:run_jobs", nnodes=2, nproc_per_node=1, jobs=jobs)
    names = [*CASES, *(f"hsdp_{n}" for n in HSDP)]
    return {name: [r[i] for r in ranks] for i, name in enumerate(names)}


def _one(name: str) -> dict:
    target, _, _ = CASES[name]
    return (fit_dfo if target == DFO else fit_tiny)(world_size=1, **_kwargs(name))


def _compare(runs: list[dict], one: dict, tol: float, dfo: bool) -> None:
    for r in runs:
        assert r["global_step"] == one["global_step"]
        if dfo:
            for a, b in zip(one["z"], r["z"]):
                torch.testing.assert_close(b, a, atol=tol, rtol=tol)
            assert all(bool(z.any()) for z in one["z"])
        else:
            for k, v in one["state"].items():
                torch.testing.assert_close(r["state"][k], v, rtol=tol * 10, atol=tol, msg=k)


@pytest.mark.parametrize("name", list(CASES))
def test_two_node_torchrun_equals_one_process(launched, name):
    runs = launched[name]
    assert all(r["mesh"] == {"names": ("data_parallel",), "shape": (2,), "placements": ["S(0)"],
                             "shard_group_size": 2} for r in runs)
    _compare(runs, _one(name), CASES[name][2], CASES[name][0] == DFO)


@pytest.mark.parametrize("name", HSDP)
def test_hsdp_two_by_one_mesh_equals_one_process(launched, name):
    runs = launched[f"hsdp_{name}"]
    for r in runs:  # replicated across the two nodes, "sharded" within each (one process per node)
        assert r["mesh"] == {"names": ("replicate", "shard"), "shape": (2, 1),
                             "placements": ["R", "S(0)"], "shard_group_size": 1}
    _compare(runs, _one(name), CASES[name][2], False)


def test_hsdp_two_by_two_mesh_equals_one_process():
    """2 nodes x 2 processes: every parameter sharded over 2 and replicated over 2. Reductions over the shard group
    (statistics of whole rows) and over all processes (losses) must each count every sample and every row once."""
    jobs = [{"target": CASES[n][0], "kwargs": {**_kwargs(n), "num_nodes": 2, "strategy_kwargs": {"hsdp": True}}}
            for n in HSDP_2X2]
    ranks = run_torchrun("lightning_memopt.testing.workers:run_jobs", nnodes=2, nproc_per_node=2, jobs=jobs)
    assert len(ranks) == 4
    for i, name in enumerate(HSDP_2X2):
        runs = [r[i] for r in ranks]
        assert all(r["mesh"] == {"names": ("replicate", "shard"), "shape": (2, 2), "placements": ["R", "S(0)"],
                                 "shard_group_size": 2} for r in runs)
        _compare(runs, _one(name), CASES[name][2], CASES[name][0] == DFO)


def _cli_args(root, batch_size: int, **extra: str) -> list[str]:
    args = {
        "trainer.max_steps": "3", "data.init_args.batch_size": str(batch_size), "data.init_args.k": "16",
        "data.init_args.shuffle": "false", "model.init_args.objective": "classification", "trainer.logger": "false",
        "trainer.enable_checkpointing": "true", "trainer.enable_progress_bar": "false",
        "trainer.default_root_dir": str(root), **extra,
    }
    return ["fit", "--config", "configs/mezo.yaml", *(f"--{k}={v}" for k, v in args.items())]


def _start(cmd: list[str], envs: list[dict[str, str]], cwd) -> list:
    import os
    import subprocess

    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    return [subprocess.Popen(cmd, env={**base, "OMP_NUM_THREADS": "1", **e}, cwd=cwd, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT) for e in envs]


def _consolidated(root, tmp_path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from lightning_memopt.consolidate import consolidate

    (ckpt,) = (root / "checkpoints").iterdir()
    assert ckpt.is_dir()  # fsdp2's default: a sharded checkpoint, one file per rank
    consolidate(ckpt, tmp_path / f"hf_{root.name}", tokenizer=False)
    return AutoModelForCausalLM.from_pretrained(tmp_path / f"hf_{root.name}").state_dict()


def test_memopt_fit_on_two_nodes_with_torchrun_and_with_lightning_variables(tmp_path, in_repo):
    """``memopt fit --trainer.num_nodes=2`` as users launch it: two torchrun agents, and two processes with
    MASTER_ADDR/MASTER_PORT/NODE_RANK/WORLD_SIZE (Lightning's own environment). Both equal one process."""
    import shutil
    import sys

    from lightning_memopt.cli import run_cli
    from lightning_memopt.testing.multiproc import _collect, _free_port, _once_more_after_a_crash

    # Lightning's DistributedSampler shuffles any training set; the data module's own rank-strided shards
    # (use_distributed_sampler=false, shuffle=false) make the global batch the 1-process batch
    multi = ["--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.strategy=fsdp2",
             "--trainer.use_distributed_sampler=false"]

    def launch() -> None:
        for d in ("torchrun", "env"):  # a launch run again starts clean: one checkpoint each
            shutil.rmtree(tmp_path / d, ignore_errors=True)
        port = _free_port()
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                    "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=memopt{port}",
                    "-m", "lightning_memopt.cli", *_cli_args(tmp_path / "torchrun", 8), *multi]
        procs = _start(torchrun, [{}, {}], in_repo)
        port = _free_port()
        plain = [sys.executable, "-m", "lightning_memopt.cli", *_cli_args(tmp_path / "env", 8), *multi]
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
        procs += _start(plain, [{**env, "NODE_RANK": "0"}, {**env, "NODE_RANK": "1"}], in_repo)  # at the same time
        _collect(procs, timeout=600)

    # a native crash at a worker's exit (gloo's threads: "terminate called without an active exception", seen once
    # in CI on 2 busy cores) is outside the code under test: run_distributed's rule, the launch runs once more
    _once_more_after_a_crash("memopt fit on two nodes", launch)

    one = run_cli([*_cli_args(tmp_path / "one", 16), "--trainer.enable_checkpointing=false"])
    assert one.trainer.global_step == 3
    ref = {k: v.detach() for k, v in one.model.model.state_dict().items()}
    a, b = _consolidated(tmp_path / "torchrun", tmp_path), _consolidated(tmp_path / "env", tmp_path)
    for k, v in ref.items():
        assert torch.equal(a[k], b[k]), k  # the same job, launched two ways
        torch.testing.assert_close(a[k], v, rtol=1e-4, atol=1e-5, msg=k)
