"""FSDP2Strategy: 2-process CPU (gloo) AdamW equals 1 process; test after fit; MemoryReport counts local shards."""

from __future__ import annotations

import pytest
import torch

from lightning_memopt.testing import run_distributed
from lightning_memopt.testing.workers import fit_with_memory_report

STEPS = 4


def test_adamw_two_processes_match_one():
    one = fit_with_memory_report(world_size=1, steps=STEPS)
    two = run_distributed("lightning_memopt.testing.workers:fit_with_memory_report", world_size=2, steps=STEPS)

    for rank in two:
        assert rank["global_step"] == STEPS
        assert set(rank["state"]) == set(one["state"])
        diff = max((rank["state"][n] - one["state"][n]).abs().max().item() for n in one["state"])
        assert diff < 1e-4, diff  # measured 3.5e-6: float reduction order only
    # each rank logs its local-batch loss; their mean is the global-batch loss
    mean_loss = [sum(r["losses"][i] for r in two) / 2 for i in range(STEPS)]
    torch.testing.assert_close(torch.tensor(mean_loss), torch.tensor(one["losses"]), atol=1e-4, rtol=1e-4)
    # weights moved at all (the comparison is not trivially equal)
    assert one["losses"][0] != one["losses"][-1]
    # trainer.test after fit reuses the sharded module (no second fully_shard) and agrees with one process
    for rank in two:
        assert abs(rank["test_acc"] - one["test_acc"]) <= 1 / 64

    # MemoryReport counts local shards: the ranks' parameters, gradients and AdamW state add up to one process's
    mem1, mems = one["memory"], [r["memory"] for r in two]
    assert sum(m["params"] for m in mems) == mem1["params"]
    assert all(m["params"] < 0.75 * mem1["params"] for m in mems)
    assert sum(m["grads"] for m in mems) == mem1["grads"]
    n_tensors = len(one["state"])
    assert abs(sum(m["optimizer_state"] for m in mems) - mem1["optimizer_state"]) <= 8 * n_tensors


def test_memory_report_counts_shards_after_a_forward_without_backward():
    """FSDP2's root keeps its gathered full tensors after a forward with no backward after it (DFOLoRA's every step,
    a final validation): they were counted as the rank's parameters (279,296 B against its 213,632 B shard)."""
    dfo = {"class_path": "lightning_memopt.DFOLoRA", "init_args": {"d": 40, "population": 6, "budget": None,
                                                                    "stat_batches": 1}}
    kw = {"steps": 2, "callbacks": [dfo]}
    one = fit_with_memory_report(world_size=1, **kw)
    two = run_distributed("lightning_memopt.testing.workers:fit_with_memory_report", world_size=2, **kw)
    mems = [r["memory"] for r in two]
    assert sum(m["params"] for m in mems) == one["memory"]["params"]
    # the search state is replicated: every rank holds all of it
    assert all(m["optimizer_state"] == one["memory"]["optimizer_state"] > 0 for m in mems)


def test_memory_report_counts_parameters_outside_every_fsdp2_module():
    """A configure_model may shard the decoder blocks only: the embedding and head stay plain tensors, which are no
    gathered FSDP2 group (the parameters were reported as 0 B)."""
    from lightning_memopt import MemoryReport
    from lightning_memopt.core.memory import param_bytes
    from lightning_memopt.strategies import FSDP2Strategy
    from lightning_memopt.testing import tiny_datamodule, tiny_model, tiny_trainer

    model = tiny_model()

    def configure_model(self):
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if not any(isinstance(m, FSDPModule) for m in self.modules()):
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=self.trainer.strategy.device_mesh["data_parallel"])

    model.configure_model = configure_model.__get__(model)
    report = MemoryReport(print_table=False)
    try:
        tiny_trainer(max_steps=2, callbacks=[report], strategy=FSDP2Strategy(), devices=1).fit(model, tiny_datamodule())
    finally:  # the strategy leaves the process group to the process; later tests start their own
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert report.breakdown.params == param_bytes(model) > 0


@pytest.mark.parametrize("eval_batch_size", [4, 1])
def test_test_metrics_over_two_processes_count_every_example_once(eval_batch_size):
    """7 test rows over 2 ranks: the short share ends in a padding row that no metric counts (Lightning's sampler
    repeated an example instead). With batches of 1 that row is a batch of its own, which weighs nothing."""
    from lightning_memopt.testing.workers import class_test_metrics

    one = class_test_metrics(1, test_limit=7, eval_batch_size=eval_batch_size)
    two = run_distributed("lightning_memopt.testing.workers:class_test_metrics", world_size=2, test_limit=7,
                          eval_batch_size=eval_batch_size)
    for rank in two:
        assert rank["acc"] == one["acc"] and rank["f1"] == pytest.approx(one["f1"], abs=1e-6)
        assert rank["loss"] == pytest.approx(one["loss"], rel=1e-5)


@pytest.mark.parametrize("method", ["adamw", "adalomo"])
def test_resume_under_fsdp2_from_a_checkpoint_written_without_it(tmp_path, method):
    """A ``.ckpt`` of Lightning's default strategy numbers the optimizer state by its place in the groups; the tiny
    model's groups (decay, then no decay) are not in parameter order, and Lightning's loader mapped the numbers to the
    module's parameter order: a size mismatch inside torch.distributed."""
    from lightning_memopt.testing.workers import fit_resumable

    cb = None if method == "adamw" else {"class_path": "lightning_memopt.AdaLomo", "init_args": {"lr": 0.01}}
    kw = {"callback": cb, "steps": 4, "dm_kwargs": {"padding": "max_length"}}
    straight = fit_resumable(world_size=1, strategy_name="auto", save_dir=str(tmp_path), save_at=2, **kw)
    ckpt = str(tmp_path / "full.ckpt")
    resumed = run_distributed("lightning_memopt.testing.workers:fit_resumable", world_size=2, ckpt_path=ckpt, **kw)

    saved = straight["saved"]
    assert saved["opt"]  # there is optimizer state to map
    for rank in resumed:
        loaded = rank["loaded"]
        assert loaded["global_step"] == 2 and set(loaded["opt"]) == set(saved["opt"])
        for name, value in saved["opt"].items():
            torch.testing.assert_close(loaded["opt"][name], value, atol=0, rtol=0, msg=name)
        assert rank["global_step"] == 4
        diff = max((rank["state"][n] - straight["state"][n]).abs().max().item() for n in straight["state"])
        assert diff < 1e-4, diff
