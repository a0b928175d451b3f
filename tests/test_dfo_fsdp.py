"""DFOLoRA under FSDP2 data parallel (2 CPU processes, gloo) against one process at the same global batch."""

import torch

from lightning_memopt.testing.workers import fit_dfo
from lightning_memopt.testing import run_distributed


def test_fsdp2_two_processes_match_one():
    kw = {"steps": 2, "global_batch": 16, "dfo": {"d": 40, "population": 6, "budget": None, "stat_batches": 2}}
    one = fit_dfo(world_size=1, **kw)
    two = run_distributed("lightning_memopt.testing.workers:fit_dfo", world_size=2, **kw)
    for rank in two:  # every rank holds the same (replicated) LoRA state
        assert rank["global_step"] == 2 and rank["grads"] == 0
        assert len(rank["fitness"]) == len(one["fitness"]) == 2
        for a, b in zip(one["fitness"], rank["fitness"]):  # all-reduced mean over shards = the global batch
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
        for a, b in zip(one["z"], rank["z"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for a, b in zip(one["stats"], rank["stats"]):
            assert a == tuple(b) or torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-6)
    assert all(bool(z.any()) for z in one["z"])


def test_fsdp2_fireworks_two_processes_match_one():
    """F-LoRA's spark allocation and amplitudes turn any fitness difference into a different z (EFWA divides by the
    fireworks' fitness spread), so 2 processes must see exactly 1 process's fitness: per-sample losses summed in
    float64 and all-reduced as sums (the mean of per-rank means differs in the last bit), and every batch padded to one
    length (a rank's half batch then has the full batch's shapes). Then 2 processes equal 1, bit for bit."""
    dfo = {"optimizer": "fireworks", "d": 40, "population": 8, "n_fireworks": 3, "budget": None, "stat_batches": 2,
           "init_scale": 1.0}
    kw = {"steps": 12, "global_batch": 16, "dfo": dfo, "dm_kwargs": {"padding": "max_length"}}
    one = fit_dfo(world_size=1, **kw)
    two = run_distributed("lightning_memopt.testing.workers:fit_dfo", world_size=2, **kw)
    for rank in two:
        assert len(rank["fitness"]) == len(one["fitness"]) == 12
        for a, b in zip(one["fitness"], rank["fitness"]):
            assert torch.equal(a, b)
        for a, b in zip(one["z"], rank["z"]):
            assert torch.equal(a, b)
    assert all(bool(z.any()) for z in one["z"])


def test_group_by_length_deals_the_one_process_batches_over_two():
    """C-LoRA's SST-2 config groups batches by length: 2 processes (each its share of every global batch, the sampler
    dealing them, not Lightning's) see the one-process run's batches, so they end at its z. The statistics come from
    each rank's own share of the first rows (every rank reading the same rows counted them twice)."""
    dm = {"shuffle": True, "group_by_length": 2, "padding": "max_length", "k": 32}
    kw = {"steps": 3, "global_batch": 16, "dm_kwargs": dm, "dfo": {"d": 40, "population": 6, "budget": None, "stat_batches": 2}}
    one = fit_dfo(world_size=1, **kw)
    two = run_distributed("lightning_memopt.testing.workers:fit_dfo", world_size=2, **kw)
    for rank in two:
        assert rank["global_step"] == 3
        for a, b in zip(one["fitness"], rank["fitness"]):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
        for a, b in zip(one["z"], rank["z"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for a, b in zip(one["stats"], rank["stats"]):
            torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=0, rtol=1e-6)
