"""MemoryReport and core/memory: tensor accounting, the table, logged metrics, gradients freed inside backward."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_memopt.callbacks.memory_report import MemoryReport
from lightning_memopt.core.holder import HolderOptimizer
from lightning_memopt.core.memory import MemoryBreakdown, optimizer_state_bytes, param_bytes, tensor_bytes
from lightning_memopt.testing import tiny_datamodule, tiny_model, tiny_trainer
from lightning_memopt.testing.tiny import ListLogger

PARTS = ("peak", "params", "grads", "optimizer_state", "activations_other")


class FreeGradsInBackward(pl.Callback):
    """What a fused-backward method (LOMO) does to memory: each gradient is consumed and freed in its hook."""

    def on_train_start(self, trainer, pl_module) -> None:
        def free(p):
            p.grad = None

        self.handles = [p.register_post_accumulate_grad_hook(free) for p in pl_module.parameters()]


def n_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_tensor_bytes_counts_each_storage_once():
    a = torch.zeros(10, 4)
    assert tensor_bytes([a, a, a[2:], a.view(40)]) == 160
    emb = torch.nn.Embedding(8, 4)
    tied = torch.nn.Sequential(emb, torch.nn.Linear(4, 8, bias=False))
    tied[1].weight = emb.weight
    assert param_bytes(tied) == 8 * 4 * 4


def test_optimizer_state_bytes_covers_holder_state_and_wrapped():
    w = torch.nn.Parameter(torch.randn(16, 16))
    adam = torch.optim.AdamW([w])
    w.grad = torch.randn_like(w)
    adam.step()
    adam_bytes = optimizer_state_bytes([adam])
    assert 2 * w.numel() * 4 <= adam_bytes <= 2 * w.numel() * 4 + 64  # exp_avg, exp_avg_sq (+ scalar step)
    holder = HolderOptimizer(adam)
    holder.state[w]["seed_history"] = torch.zeros(100, dtype=torch.int64)
    holder.state[w]["alias"] = adam.state[w]["exp_avg"]  # shared tensors count once
    assert optimizer_state_bytes([holder]) == adam_bytes + 800


def test_breakdown_parts():
    b = MemoryBreakdown.from_parts(100, 10, 20, 30, "x")
    assert b.activations_other == 40
    assert MemoryBreakdown.from_parts(50, 10, 20, 30, "x").activations_other == 0
    assert set(b.as_metrics()) == {f"mem/{k}_gib" for k in PARTS}


def test_memory_report_fit_logs_metrics_and_prints_table(capsys, no_unexpected_warnings):
    model, logger = tiny_model(), ListLogger()
    report = MemoryReport(log_every_n_steps=2)
    tiny_trainer(max_steps=5, callbacks=[report], logger=logger).fit(model, tiny_datamodule())
    b = report.breakdown
    p = n_bytes(model)
    assert b.params == p
    assert b.grads == p  # AdamW: every gradient alive at once before the step
    n_tensors = len(list(model.parameters()))
    assert 2 * p <= b.optimizer_state <= 2 * p + 8 * n_tensors
    assert all(getattr(b, k) >= 0 for k in PARTS)
    assert b.peak >= b.params
    assert b.activations_other == max(0, b.peak - b.params - b.grads - b.optimizer_state)
    assert "CPU RSS" in b.source
    # periodic rows at steps 2 and 4, then the final one; every row has all parts
    steps = [s for s, m in logger.rows if "mem/peak_gib" in m]
    assert steps == [2, 4, 5]
    final = [m for s, m in logger.rows if "mem/peak_gib" in m][-1]
    assert final == pytest.approx(b.as_metrics())
    out = capsys.readouterr().out
    assert "Peak memory during fit" in out and "Source: CPU RSS" in out
    for row in ("Parameters", "Gradients", "Optimizer state", "Activations / other", "Peak"):
        assert row in out


def test_print_table_false_prints_nothing(capsys):
    report = MemoryReport(log_every_n_steps=0, print_table=False)
    tiny_trainer(max_steps=2, callbacks=[report]).fit(tiny_model(), tiny_datamodule())
    assert report.breakdown is not None
    assert "Peak memory" not in capsys.readouterr().out


@pytest.mark.parametrize("report_first", [True, False])
def test_gradients_freed_inside_backward_are_not_counted_as_all_alive(report_first):
    # Whichever hook runs first, the report sees at most about one gradient alive, not the sum of all.
    model = tiny_model()
    report = MemoryReport(print_table=False)
    cbs = [report, FreeGradsInBackward()] if report_first else [FreeGradsInBackward(), report]
    tiny_trainer(max_steps=2, callbacks=cbs).fit(model, tiny_datamodule())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    assert 0 < report.breakdown.grads <= 2 * largest < n_bytes(model)


def test_without_backward_tracking_grads_come_from_samples():
    model = tiny_model()
    report = MemoryReport(print_table=False, track_grads_in_backward=False)
    tiny_trainer(max_steps=2, callbacks=[FreeGradsInBackward(), report]).fit(model, tiny_datamodule())
    assert report.breakdown.grads == 0  # nothing survives backward, and no hook looked inside it
    assert not report._handles


def test_log_every_n_steps_validated():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        MemoryReport(log_every_n_steps=-1)


def test_dfo_search_state_counts_as_optimizer_state():
    """DFOLoRA keeps its CMA-ES state outside the holder's ``state``: it was reported as 0 B and landed in
    activations/other."""
    from lightning_memopt import DFOLoRA

    d = 40
    dfo = DFOLoRA(d=d, population=6, budget=None, stat_batches=1)
    report = MemoryReport(print_table=False)
    tiny_trainer(max_steps=2, callbacks=[dfo, report]).fit(tiny_model(), tiny_datamodule())
    cov = 2 * d * d * 8  # C and its eigenvectors B, float64, per layer
    assert report.breakdown.optimizer_state >= dfo.lora.n_blocks * cov
    assert report.breakdown.optimizer_state == tensor_bytes(dfo.state_tensors())


def test_state_on_another_device_is_left_out_when_asked():
    # on a GPU the peak is the device allocator's; DFOLoRA parks idle layers' CMA-ES state on the host
    t = torch.zeros(10)
    assert tensor_bytes([t]) == 40 and tensor_bytes([t], device=torch.device("cpu")) == 40
    assert tensor_bytes([t], device=torch.device("cuda", 0)) == 0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    opt.state[opt.param_groups[0]["params"][0]]["m"] = t
    assert optimizer_state_bytes([opt]) == 40 and optimizer_state_bytes([opt], torch.device("cuda", 0)) == 0
