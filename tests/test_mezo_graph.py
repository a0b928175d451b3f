"""MeZO's CUDA-graph option, as far as a CPU sees it: the device-seed path draws the same z as the integer seed,
`cuda_graph=True` on a CPU warns with its reason and trains exactly as the eager step, and GraphReplay's rules.
(tests/test_gpu.py checks the replay itself against the eager step on a GPU.)"""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_memopt import MeZO
from lightning_memopt.core import perturb
from lightning_memopt.core.graphs import GraphReplay, signature
from lightning_memopt.mezo.core import ZeroOrder, ZOConfig
from lightning_memopt.testing import tiny_datamodule, tiny_model, tiny_trainer


@pytest.mark.parametrize("dist", ["normal", "rademacher"])
def test_device_seed_draws_the_integer_seeds_z(dist):
    seed, seed_t = 123456789, torch.tensor(123456789, dtype=torch.int64)
    for i, start, n in [(0, 0, 37), (5, 13, 64), (70000, 1 << 20, 9)]:
        a = perturb.normal(perturb.key(seed, i), start, n, dist=dist)
        b = perturb.normal(perturb.key(seed_t, i), start, n, dist=dist)
        assert torch.equal(a, b)
    ws = [torch.randn(7, 5), torch.randn(11)]
    want = perturb.perturbed_many(ws, [3, 4], seed, 1e-2, dist)
    got = perturb.perturbed_many(ws, [3, 4], seed, 1e-2, dist, seed_t=seed_t)
    assert all(torch.equal(x, y) for x, y in zip(want, got))
    ts1, ts2 = [w.clone() for w in ws], [w.clone() for w in ws]
    g = torch.tensor([0.7])
    perturb.update1_many(ts1, [3, 4], [0, 0], seed, g, 1e-2, 0.999, dist)
    perturb.update1_many(ts2, [3, 4], [0, 0], seed, g, 1e-2, 0.999, dist, seed_t=seed_t)
    assert all(torch.equal(x, y) for x, y in zip(ts1, ts2)) and not torch.equal(ts1[0], ws[0])


def test_estimate_with_device_seeds_equals_integer_seeds():
    torch.manual_seed(0)
    model = tiny_model().model.eval()
    x = torch.randint(0, 256, (4, 12))
    zo = ZeroOrder(model, ZOConfig(eps=1e-2, n_spsa=3), seed=5, cache_z=False)
    seeds = zo.seeds(7)
    with torch.no_grad():
        g1, l1 = zo.estimate(lambda: model(input_ids=x, labels=x).loss, seeds)
        g2, l2 = zo.estimate(lambda: model(input_ids=x, labels=x).loss, seeds, torch.tensor(seeds, dtype=torch.int64))
    assert torch.equal(g1, g2) and torch.equal(l1, l2)


def _fit(cuda_graph: bool):
    torch.manual_seed(0)
    model = tiny_model()
    mezo = MeZO(lr=1e-3, eps=1e-2, cuda_graph=cuda_graph, seed=3)
    tiny_trainer(max_steps=4, callbacks=[mezo]).fit(model, tiny_datamodule(k=16, batch_size=8, padding="max_length"))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_cuda_graph_on_cpu_warns_once_and_trains_as_eager():
    eager = _fit(False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        graphed = _fit(True)
    msgs = [str(w.message) for w in seen if "cuda_graph" in str(w.message)]
    assert msgs == ["MeZO(cuda_graph=True): CUDA graphs need a CUDA device (this run is on cpu); running the eager "
                    "step."], msgs
    assert all(torch.equal(eager[n], graphed[n]) for n in eager)


def test_graph_replay_rules():
    calls = []
    replay = GraphReplay(lambda x: calls.append(1) or x * 2, "demo")
    with pytest.warns(UserWarning, match="demo: CUDA graphs need CUDA tensors .*; running the eager step"):
        assert torch.equal(replay(torch.ones(2)), torch.full((2,), 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls are eager and quiet
        replay(torch.ones(3))
    assert len(calls) == 2 and replay.disabled is not None
    with pytest.raises(ValueError, match="max_graphs must be an integer >= 1"):
        GraphReplay(lambda: None, "demo", max_graphs=0)
    with pytest.raises(ValueError, match="max_graphs must be an integer >= 1"):
        MeZO(cuda_graph=True, max_graphs=0)
    a = signature(({"ids": torch.zeros(2, 3)}, 1))
    assert a == signature(({"ids": torch.ones(2, 3)}, 1))  # values of tensors do not matter
    assert a != signature(({"ids": torch.zeros(2, 4)}, 1))  # shapes do
    assert a != signature(({"ids": torch.zeros(2, 3, dtype=torch.int64)}, 1))  # dtypes do
    assert a != signature(({"ids": torch.zeros(2, 3)}, 2))  # and other values


def test_a_host_copy_in_the_step_gets_a_capture_warning_that_names_the_fix():
    from lightning_memopt.core.graphs import _hint

    # torch 2.11's message on an H200, raised by logits[:, -1, [3, 5]] inside a captured forward
    err = RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture unless the CPU tensor is "
                       "pinned. Please use tensor.pin_memory() or allocate the tensor with pin_memory=True.")
    assert "indexing with a Python list" in _hint(err) and "once on the device" in _hint(err)
    assert _hint(RuntimeError("operation not permitted when stream is capturing")) == ""


def _fit_dfo(cuda_graph: bool, callbacks_extra=(), **trainer_kw):
    from lightning_memopt import DFOLoRA

    torch.manual_seed(0)
    model = tiny_model()
    cb = DFOLoRA(d=16, population=6, budget=None, stat_batches=1, cuda_graph=cuda_graph, seed=1)
    trainer = tiny_trainer(max_steps=6, callbacks=[cb, *callbacks_extra], **trainer_kw)
    trainer.fit(model, tiny_datamodule(k=16, batch_size=8, padding="max_length"))
    return [z.detach().cpu().clone() for z in cb.lora.z] if cb.lora is not None else cb, cb


def test_dfo_cuda_graph_on_cpu_warns_once_and_trains_as_eager():
    eager, _ = _fit_dfo(False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        graphed, _ = _fit_dfo(True)
    msgs = [str(w.message) for w in seen if "cuda_graph" in str(w.message)]
    assert len(msgs) == 1 and "DFOLoRA(cuda_graph=True): CUDA graphs need CUDA tensors" in msgs[0], msgs
    assert all(torch.equal(a, b) for a, b in zip(eager, graphed)) and any(a.abs().sum() > 0 for a in eager)
    with pytest.raises(ValueError, match="max_graphs must be an integer >= 1"):
        from lightning_memopt import DFOLoRA

        DFOLoRA(cuda_graph=True, max_graphs=0)


def test_dfo_training_step_through_the_graph_wrapper_equals_eager(monkeypatch):
    """Where the population forward replays (a GPU; forced here), the module's training_step after each generation
    goes through GraphedTrainingStep: on a CPU that warns once and runs eagerly, so train_loss each step and the
    adapters equal the unwrapped fit's; the wrapper is gone after fit."""
    import lightning.pytorch as pl

    from lightning_memopt.dfo import callback as dfo_callback

    def fit(cuda_graph: bool):
        losses = []

        class Losses(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses.append(float(trainer.callback_metrics["train_loss"]))

        return _fit_dfo(cuda_graph, callbacks_extra=[Losses()]), losses

    (eager, _), eager_losses = fit(False)
    monkeypatch.setattr(dfo_callback, "_on_cuda", lambda module: True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        (graphed, cb), graphed_losses = fit(True)
    msgs = [str(w.message) for w in seen if "cuda_graph" in str(w.message)]
    assert len(msgs) == 2 and "the module's training_step: CUDA graphs need CUDA tensors" in msgs[1], msgs
    assert len(eager_losses) == 6 and graphed_losses == eager_losses
    assert all(torch.equal(a, b) for a, b in zip(eager, graphed))
    assert "training_step" not in cb.module.__dict__ and cb._graphed_step is not None


def test_population_estimate_with_device_seeds_equals_integer_seeds():
    """The population estimator's factors drawn from device seeds (what a CUDA graph of the step replays) equal the
    integer-seed ones: same g, same loss; adopt() relabels a captured cache with a replay's seeds."""
    torch.manual_seed(0)
    model = tiny_model(objective="lm")
    model.eval()
    batch = {"input_ids": torch.randint(0, 256, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    cfg = ZOConfig(eps=1e-2, n_spsa=3, perturbation="lowrank", perturbation_rank=2, batched=True)
    zo = ZeroOrder(model, cfg, seed=5, cache_z=False)
    seeds = zo.seeds(7)
    with torch.no_grad():
        g1, l1 = zo.estimate(None, seeds, per_sample=model.per_sample_loss, batch=batch)
        g2, l2 = zo.estimate(None, seeds, torch.tensor(seeds, dtype=torch.int64), per_sample=model.per_sample_loss,
                             batch=batch)
    assert torch.equal(g1, g2) and torch.equal(l1, l2)
    cache = zo.directions.snapshot()
    zo.directions.adopt(cache, seeds, [1, 2, 3])
    assert {s for s, _ in zo.directions._cache} == {1, 2, 3} and len(zo.directions._cache) == len(cache)


def test_cuda_graph_warns_about_per_batch_padding():
    from types import SimpleNamespace

    cb = MeZO(cuda_graph=True)
    with pytest.warns(UserWarning, match=r"padding='longest'.*Set padding='bucket'"):
        cb.warn_dynamic_padding(SimpleNamespace(datamodule=tiny_datamodule(padding="longest")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb.warn_dynamic_padding(SimpleNamespace(datamodule=tiny_datamodule(padding="bucket")))
        cb.warn_dynamic_padding(SimpleNamespace(datamodule=None))


def test_population_capture_draws_its_own_directions_not_its_warmups():
    """A graph's capture follows an eager warm-up with the same seeds: with device seeds, retain() draws every
    direction again (into the capture), never reusing the warm-up's cached tensors, whose values a replay would
    never rewrite."""
    torch.manual_seed(0)
    model = tiny_model(objective="lm")
    zo = ZeroOrder(model, ZOConfig(eps=1e-2, n_spsa=2, perturbation="lowrank", batched=True), seed=5)
    seeds = zo.seeds(3)
    seed_t = torch.tensor(seeds, dtype=torch.int64)
    zo.directions.retain(seeds, seed_t)
    warm = zo.directions.snapshot()
    zo.directions.retain(seeds, seed_t)
    again = zo.directions.snapshot()
    assert warm.keys() == again.keys() and warm
    for k in warm:
        a, b = (warm[k], again[k]) if isinstance(warm[k], tuple) else ((warm[k],), (again[k],))
        assert all(x.data_ptr() != y.data_ptr() and torch.equal(x, y) for x, y in zip(a, b)), k


def test_dfo_points_stay_at_their_addresses_under_cuda_graph():
    """Under cuda_graph each layer's point and fixed factors are written in place (another layer's captured forward
    reads them at their addresses), zero points included, with the values the ordinary path computes."""
    from lightning_memopt.dfo.lora import ZLoRA

    torch.manual_seed(0)
    model = tiny_model().model
    plain, static = ZLoRA(model, d=16, rank=2), ZLoRA(model, d=16, rank=2)
    static.static_fixed = True
    for k in range(static.n_blocks):
        static.set_z(k, static.z[k])
    ptrs = [[(a.data_ptr(), b.data_ptr()) for a, b in f] for f in static._fixed]
    zp = static.z[0].data_ptr()
    for step in range(3):
        z = torch.randn(16, dtype=torch.float64) if step < 2 else torch.zeros(16, dtype=torch.float64)
        plain.set_z(0, z)
        static.set_z(0, z)
        assert [[(a.data_ptr(), b.data_ptr()) for a, b in f] for f in static._fixed] == ptrs
        assert static.z[0].data_ptr() == zp and torch.equal(static.z[0], plain.z[0])
        if plain._fixed[0] is None:  # a zero point: no delta on the ordinary path, zero factors here
            assert all(not a.any() and not b.any() for a, b in static._fixed[0])
        else:
            assert all(torch.equal(a, pa) and torch.equal(b, pb) for (a, b), (pa, pb) in zip(static._fixed[0],
                                                                                         plain._fixed[0]))
