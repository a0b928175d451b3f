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
HSDP = ("adamw", "mezo", "adalomo", "galore")
STEPS = 3


def _kwargs(name: str) -> dict:
    target, kw, _ = CASES[name]
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
    assert all(r["mesh"] == {"names": ("data_parallel",), "shape": (2,), "placements": ["S(0)"]}
               for r in runs)
    _compare(runs, _one(name), CASES[name][2], CASES[name][0] == DFO)


@pytest.mark.parametrize("name", HSDP)
def test_hsdp_two_by_one_mesh_equals_one_process(launched, name):
    runs = launched[f"hsdp_{name}"]
    for r in runs:  # replicated across the two nodes, "sharded" within each (one process per node)
        assert r["mesh"] == {"names": ("replicate", "shard"), "shape": (2, 1),
                             "placements": ["R", "S(0)"]}
    _compare(runs, _one(name), CASES[name][2], False)
