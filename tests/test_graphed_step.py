"""The module's training_step replayed from graphs: its self.log calls are recorded while it runs and re-issued with
each call's values; where capture cannot work (here: a CPU) it warns once and gives the eager step's results. The
replay itself is tested on a GPU (tests/test_gpu.py: DFOLoRA's train_loss equals the eager run's)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_memopt.callbacks.graphed import GraphedTrainingStep, recording_logs, replay_logs
from lightning_memopt.testing import tiny_model


class _Logs:
    def __init__(self, module):
        self.calls = []
        module.log = lambda name, value, *a, **kw: self.calls.append((name, value, a, kw))


@pytest.mark.parametrize("own_log", [False, True])
def test_recording_logs_records_and_puts_log_back_even_after_an_error(own_log):
    module = tiny_model()
    if own_log:
        own = _Logs(module)
    with recording_logs(module) as logs:
        module.log("a", torch.tensor(1.0), prog_bar=True)
    assert [(n, float(v), kw) for n, v, _, kw in logs] == [("a", 1.0, {"prog_bar": True})]
    with pytest.raises(ValueError, match="boom"), recording_logs(module):
        raise ValueError("boom")
    if own_log:
        module.log("b", 2.0)
        assert [c[0] for c in own.calls] == ["b"]
    else:
        assert "log" not in module.__dict__  # the class's log again


def test_replay_logs_clones_tensors():
    module = tiny_model()
    seen = _Logs(module)
    value = torch.tensor(3.0)
    replay_logs(module, [("x", value, (), {"batch_size": 4}), ("n", 5, (), {})])
    value.fill_(0.0)  # a later replay rewrites the graph's tensor
    assert [(n, float(v), kw) for n, v, _, kw in seen.calls] == [("x", 3.0, {"batch_size": 4}), ("n", 5.0, {})]


def test_graphed_training_step_on_cpu_warns_once_and_equals_the_step():
    module = tiny_model()
    seen = _Logs(module)
    calls = []

    def step(batch, batch_idx, scale=1.0):
        calls.append(batch_idx)
        loss = (batch["x"] * scale).sum()
        module.log("train_loss", loss, prog_bar=True)
        return {"loss": loss, "n": 2}

    graphed = GraphedTrainingStep("test", max_graphs=2)
    batch = {"x": torch.arange(4.0)}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        outs = [graphed(step, module, batch, (i,), {"scale": 2.0}) for i in range(3)]
    msgs = [str(x.message) for x in w]
    assert msgs == ["test: CUDA graphs need CUDA tensors (this run's inputs are on the CPU); running the eager step."]
    assert calls == [0, 1, 2]  # eagerly, once per call, with each call's other arguments
    assert all(float(o["loss"]) == 12.0 and o["n"] == 2 for o in outs)
    assert [(n, float(v), kw) for n, v, _, kw in seen.calls] == [("train_loss", 12.0, {"prog_bar": True})] * 3


def test_a_step_that_returned_none_at_capture_is_not_replayed():
    # a graph of a step that skipped its batch would give None for every later batch of its shape: run eagerly then
    # (the capture is stood in for on the CPU by calling the step, as a capture does)
    module = tiny_model()
    graphed = GraphedTrainingStep("test")
    reasons = []

    class Capturing:
        disabled = None

        def __call__(self, batch):
            return graphed._run(batch)

        def disable(self, reason):
            self.disabled = reason
            reasons.append(reason)

    graphed.graph = Capturing()
    assert graphed(lambda batch, i: None, module, {"x": torch.ones(2)}, (0,), {}) is None
    assert reasons == ["training_step returned None (skip this batch) at capture"]
    out = graphed(lambda batch, i: {"loss": batch["x"].sum()}, module, {"x": torch.ones(2)}, (1,), {})
    assert float(out["loss"]) == 2.0 and len(reasons) == 1
