"""MeZO's population estimator: n_spsa low-rank directions per step, batched forwards, any LightningModule."""

from __future__ import annotations

import contextlib
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_memopt.dfo.callback import DFOLoRA
from lightning_memopt.mezo import load_trajectory, replay_trajectory
from lightning_memopt.mezo.callback import MeZO
from lightning_memopt.mezo.core import ZeroOrder, ZOConfig
from lightning_memopt.mezo.population import members_of
from lightning_memopt.models.configs import llama_config
from lightning_memopt.models.hf import HFCausalLM
from lightning_memopt.testing import run_distributed, tiny_datamodule, tiny_model, tiny_trainer
from lightning_memopt.testing.multiproc import assert_ranks_equal_one_and_all_moved
from lightning_memopt.testing.tiny import TinyLM, TinyLMPerSample, full_state
from lightning_memopt.testing.workers import fit_tiny

POP = {"n_spsa": 4, "batched": True, "perturbation": "lowrank", "perturbation_rank": 2, "population_chunk": 3}


def mean_loss(model, dm) -> float:
    model.eval()
    with torch.no_grad():
        losses = [float(model._step(b)["loss"]) for b in dm.train_dataloader()]
    return sum(losses) / len(losses)


def test_estimate_aligns_with_the_gradient_as_n_spsa_grows():
    # ĝ = (1/n) Σ (zᵀg) z has E[ĝ] = g and E|ĝ|² = |g|²(1 + (d+1)/n) for unit-variance directions, so
    # cos(ĝ, g) ≈ 1/sqrt(1 + (d+1)/n): with d = 400, 0.05 at n = 1, 0.20 at n = 16, 0.37 at n = 64.
    torch.manual_seed(0)
    lin = torch.nn.Linear(20, 20, bias=False)
    x, y = torch.randn(32, 20), torch.randn(32, 20)

    def per_sample(batch):
        xb, yb = batch
        return 0.5 * (lin(xb) - yb).square().sum(1)

    per_sample((x, y)).mean().backward()
    grad = lin.weight.grad.flatten().clone()
    lin.weight.grad = None
    cos = {}
    for n in (1, 16, 64):
        cfg = ZOConfig(eps=1e-3, n_spsa=n, perturbation="lowrank", perturbation_rank=2, batched=True,
                       population_chunk=None)
        zo = ZeroOrder(lin, cfg)
        vals = []
        for t in range(12):
            seeds = zo.seeds(t)
            g, _ = zo.estimate(None, seeds, per_sample=per_sample, batch=(x, y))
            w0 = lin.weight.detach().clone()
            zo.update(seeds, g, [1.0], [0.0])  # θ ← θ − ĝ: the estimate is the change
            est = (w0 - lin.weight.detach()).flatten()
            with torch.no_grad():
                lin.weight.copy_(w0)
            vals.append(float(torch.nn.functional.cosine_similarity(est, grad, dim=0)))
        zo.close()
        cos[n] = sum(vals) / len(vals)
    assert cos[1] < 0.12 and cos[16] > 0.13 and cos[64] >= 0.3, cos
    assert cos[1] < cos[16] < cos[64]


def _materialised_losses(zo, members, loss):
    """Each member's loss with every trained W replaced by W + sign·ε·S·Δ, formed densely."""
    d = zo.directions
    out = []
    for seed, sign in members:
        saved = []
        with torch.no_grad():
            for zp in zo.params:
                w = zp.param
                saved.append((w, w.detach().clone()))
                c = sign * zo.config.eps * d.scale(zp.index)
                if d.lowrank(zp.index):
                    u, v = d.uv(seed, zp.index)
                    w.add_(c * (u @ v.T) / zo.config.perturbation_rank**0.5)
                else:
                    w.add_(c * d.z(seed, zp.index).view(w.shape))
            out.append(loss())
            for w, w0 in saved:
                w.copy_(w0)
    return torch.stack(out).float()


@pytest.mark.parametrize("build", ["classification", "classification_dense", "tied_lm", "peft_lora", "linear_bias"])
def test_batched_member_equals_materialised_weights(build):
    torch.manual_seed(0)
    if build == "linear_bias":
        module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 1))
        batch = torch.randn(4, 6)

        def per_sample(b):
            return module(b).squeeze(1).square()
    else:
        if build.startswith("classification"):
            module = tiny_model()
        elif build == "tied_lm":
            module = HFCausalLM(model_config=llama_config("tiny", vocab_size=256, tie_word_embeddings=True),
                                tokenizer="builtin", objective="lm")
        else:
            module = tiny_model(objective="lm", lora_rank=2, lora_targets=("q_proj", "v_proj"))
        dm = tiny_datamodule(batch_size=4)
        dm.tokenizer = module.tokenizer
        dm.setup("fit")
        if build.startswith("classification"):
            module.set_label_token_ids(dm.label_token_ids)
        batch = next(iter(dm.train_dataloader()))
        per_sample = module.per_sample_loss
    module.eval()
    pert = "dense" if build.endswith("dense") else "lowrank"  # dense: every module runs per member
    cfg = ZOConfig(eps=1e-2, n_spsa=3, perturbation=pert, perturbation_rank=3, batched=True,
                   population_chunk=4, precondition="layer")
    zo = ZeroOrder(module, cfg)
    if build == "peft_lora":
        assert {zp.name.rsplit(".", 2)[-2] for zp in zo.params} == {"lora_A", "lora_B"} or all(
            "lora_" in zp.name for zp in zo.params)
    if build == "tied_lm":
        assert not any(zp.name.startswith("model.lm_head") for zp in zo.params)  # one tensor, one direction
    seeds = zo.seeds(0)
    zo.directions.retain(seeds)
    members = members_of(seeds, False)
    with torch.no_grad():
        from lightning_memopt.core.population import member_losses

        batched = member_losses(members, zo.engine.active, cfg.population_chunk, per_sample=per_sample,
                                batch=batch).mean(1)
        one_by_one = member_losses(members, zo.engine.active, None, lambda: per_sample(batch).mean()).mean(1)
    eager = _materialised_losses(zo, members, lambda: per_sample(batch).mean())
    torch.testing.assert_close(batched, eager, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(one_by_one, eager, rtol=1e-5, atol=2e-5)
    assert float(eager.std()) > 1e-5  # the members really differ
    zo.close()


@pytest.mark.parametrize("precondition", ["none", "layer"])  # "layer": each tensor its own coefficient
@pytest.mark.parametrize("pert", ["lowrank", "dense"])
def test_update_equals_the_materialised_sum_of_directions(pert, precondition, monkeypatch):
    # θ ← decay·θ − lr·S·Σ_j a_j D_j, written densely per tensor, against the grouped update (tensors of one shape
    # together; the chunk made small so the embedding and the grouped tensors are split as large ones are)
    import lightning_memopt.mezo.population as pop
    from lightning_memopt.mezo.core import window_terms

    monkeypatch.setattr(pop, "_UPDATE_ELEMS", 700)
    torch.manual_seed(0)
    module = tiny_model()
    cfg = ZOConfig(eps=1e-2, n_spsa=3, perturbation=pert, perturbation_rank=2, batched=True, variant="momentum",
                   window=2, precondition=precondition)
    zo = ZeroOrder(module, cfg)
    d = zo.directions
    lr, wd = 0.3, 0.1
    for step in range(2):
        seeds = zo.seeds(step)
        d.retain(seeds)
        g = torch.randn(cfg.n_spsa)
        before = {zp.index: zp.param.detach().float().clone() for zp in zo.params}
        history = zo.history[-1:] + [(seeds, g)]
        _, a, _ = window_terms(history, cfg)
        ints = [x for sd, _ in history for x in sd]
        zo.update(seeds, g, [lr], [wd])
        for zp in zo.params:
            w0 = before[zp.index]
            if d.lowrank(zp.index):
                delta = sum(float(a[j]) * d.uv(s, zp.index)[0] @ d.uv(s, zp.index)[1].T for j, s in enumerate(ints))
                delta = delta / cfg.perturbation_rank**0.5
            else:
                delta = sum(float(a[j]) * d.z(s, zp.index).view(w0.shape) for j, s in enumerate(ints))
            decay = 1 - lr * wd if zp.decay else 1.0
            want = w0 * decay - lr * d.scale(zp.index) * delta
            torch.testing.assert_close(zp.param.detach().float(), want, rtol=1e-5, atol=1e-6, msg=zp.name)
    zo.close()


def _fit_lm(steps, lr_override=2e-3, **kw):
    pl.seed_everything(0)
    model, dm = tiny_model(objective="lm"), tiny_datamodule(batch_size=8)
    cb = MeZO(eps=1e-3, lr=lr_override, **kw)
    tiny_trainer(max_steps=steps, callbacks=[cb]).fit(model, dm)
    return mean_loss(tiny_model(objective="lm"), dm), mean_loss(model, dm), cb


def _counted(fn, calls: dict, name: str):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("variant", ["momentum", "adam"])
def test_window_update_draws_earlier_directions_a_seed_at_a_time(variant, device, monkeypatch):
    # a window's earlier directions are drawn one vectorised pass per seed for a part of the tensors (not one
    # stream per seed and tensor: about 30,000 a step on SmolLM2), dropped after the update, same weights
    import lightning_memopt.mezo.population as pop

    monkeypatch.setattr(pop, "_UPDATE_ELEMS", 2000)  # a budget below the window's directions: several parts
    cfg = ZOConfig(eps=1e-2, n_spsa=4, perturbation="lowrank", perturbation_rank=2, batched=True, variant=variant,
                   window=3)
    weights = []
    for drawn in (True, False):
        torch.manual_seed(0)
        module = tiny_model().to(device)  # on CUDA the draws are the Triton kernels' one launch per seed
        zo = ZeroOrder(module, cfg)
        d = zo.directions
        if not drawn:  # the reference: every earlier direction streamed per (seed, tensor) as the update asks
            monkeypatch.setattr(d, "drawn", lambda seeds, indices: contextlib.nullcontext())
        calls = {"stream": 0, "draw": 0}
        for name in calls:
            monkeypatch.setattr(d, f"_{name}", _counted(getattr(d, f"_{name}"), calls, name))
        for step in range(3):
            seeds = zo.seeds(step)
            d.retain(seeds)
            calls.update(stream=0, draw=0)
            g = torch.randn(cfg.n_spsa, generator=torch.Generator().manual_seed(step)).to(device)
            zo.update(seeds, g, [0.1], [0.0])
        assert {s for s, _ in d._cache} == set(seeds)  # the earlier directions are gone again
        if drawn:
            parts = math.ceil(8 * sum(d.drawn_numel(i) for i in d.shapes) / 2000)
            assert calls["stream"] == 0 and 8 <= calls["draw"] <= 8 * (parts + 1)
        else:
            assert calls["stream"] >= 8 * sum(map(d.lowrank, d.shapes))
        weights.append(full_state(module))
        zo.close()
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-6, atol=1e-7, msg=k)


def test_eight_batched_lowrank_directions_beat_one_in_150_steps():
    _, one, _ = _fit_lm(150)
    before, eight, cb = _fit_lm(150, n_spsa=8, batched=True, perturbation="lowrank")
    assert eight < one - 0.05 and eight < before - 0.5, (before, one, eight)
    assert cb.zo.engine is not None and cb.zo.perturber is None
    assert all(not s for s in cb.holder.state.values())  # still no optimizer state


def test_layer_preconditioner_scales_each_tensor_by_its_rms():
    # It trains, though more slowly than plain MeZO on this random-init model (docs/mezo.md)
    before, loss, cb = _fit_lm(60, n_spsa=4, batched=True, perturbation="lowrank", precondition="layer")
    assert loss < before - 0.04, (before, loss)
    scales = cb.zo.scales
    names = {zp.index: zp.name for zp in cb.zo.params}
    norm = [s for i, s in scales.items() if "norm" in names[i]]
    mat = [s for i, s in scales.items() if "proj" in names[i]]
    assert min(norm) > 10 * max(mat)  # norm weights (1.0) against matrices (std 0.02)


def test_curvature_preconditioner_makes_lr_a_fraction_of_the_stable_step():
    # h ≈ tr(H) along unit-variance directions; lr 0.5 of the stable step trains like plain MeZO's best lr here
    before, loss, cb = _fit_lm(100, n_spsa=4, batched=True, perturbation="lowrank", precondition="curvature",
                               lr_override=0.5)
    assert loss < before - 0.7, (before, loss)
    h_sum, h_w = cb.zo.curvature_state()
    assert 50 < h_sum / h_w < 5000  # a trace of the Hessian of a 0.1M-parameter model
    assert len(cb.zo.history[-1][1]) == 4  # curvatures feed h; the window keeps the scaled projected gradients


@pytest.mark.parametrize("kw", [{}, {"n_spsa": 3, "one_sided": True}, {"n_spsa": 2, "perturbation": "lowrank"},
                                {"n_spsa": 2, "perturbation": "lowrank", "precondition": "curvature"}])
def test_evaluations_count_the_forwards_of_the_batch(kw):
    """``MeZO.evaluations`` (the x axis of accuracy against forward passes) equals the forwards run, counted by a
    hook on the model where each member is its own forward, and stays the same when members are batched."""
    counts = {}
    for batched in (False, True):
        if batched and kw.get("perturbation") != "lowrank":
            continue
        model, calls = TinyLMPerSample() if batched else TinyLM(), []
        model.model.register_forward_pre_hook(lambda *_: calls.append(1))
        cb = MeZO(lr=1e-3, batched=batched, **kw)
        tiny_trainer(max_steps=3, callbacks=[cb]).fit(model)
        counts[batched] = cb.evaluations
        if not batched:
            assert cb.evaluations == len(calls) > 0
    assert len(set(counts.values())) == 1


@pytest.mark.parametrize("precondition", ["layer", "curvature"])
def test_resume_mid_run_ends_at_identical_weights(tmp_path, precondition):
    lr = 0.3 if precondition == "curvature" else 2e-3
    kw = {"eps": 1e-3, "lr": lr, "variant": "momentum", "window": 3, "seed": 3, "precondition": precondition, **POP}
    pl.seed_everything(0)
    model = tiny_model(objective="lm")
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=5)
    first = MeZO(**kw)
    trainer = tiny_trainer(max_steps=12, enable_checkpointing=True, callbacks=[first, ckpt_cb])
    trainer.fit(model, tiny_datamodule(k=4, batch_size=8))
    straight = full_state(model)
    ckpt = str(next(tmp_path.glob("*step=5.ckpt")))
    state = next(v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items() if "MeZO" in k)["state"]
    assert len(state["history"]) == 3
    assert state["scales"] if precondition == "layer" else state["curvature"]

    pl.seed_everything(0)
    second = tiny_model(objective="lm", init_seed=1)  # other weights (and other layer scales): all from the ckpt
    again = MeZO(**kw)
    trainer = tiny_trainer(max_steps=12, callbacks=[again])
    trainer.fit(second, tiny_datamodule(k=4, batch_size=8), ckpt_path=ckpt)
    resumed = full_state(second)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert again.evaluations == first.evaluations > 0  # the forward count comes back with the checkpoint


@pytest.mark.parametrize("variant,precondition", [("sgd", "layer"), ("adam", "none"), ("momentum", "curvature")])
def test_trajectory_replay_reproduces_trained_weights(tmp_path, variant, precondition):
    path = str(tmp_path / "run.mezo.json")
    pl.seed_everything(0)
    model = tiny_model(objective="lm", weight_decay=0.1)
    lr = 0.3 if precondition == "curvature" else 2e-3
    cb = MeZO(eps=1e-3, lr=lr, variant=variant, trajectory_path=path, precondition=precondition, **POP)
    tiny_trainer(max_steps=6, callbacks=[cb]).fit(model, tiny_datamodule(batch_size=8))
    trained = full_state(model)
    traj = load_trajectory(path)
    assert traj["config"]["perturbation"] == "lowrank" and bool(traj["scales"]) == (precondition == "layer")
    base = tiny_model(objective="lm")
    replay_trajectory(base, traj)
    replayed = full_state(base)
    assert all(torch.equal(trained[k], replayed[k]) for k in trained)


def test_gradient_accumulation_matches_big_batch():
    def run(batch, accum):
        pl.seed_everything(0)
        model, dm = tiny_model(), tiny_datamodule(batch_size=batch)
        trainer = tiny_trainer(max_steps=4, accumulate_grad_batches=accum, callbacks=[MeZO(lr=2e-3, **POP)])
        trainer.fit(model, dm)
        return full_state(model)

    a, b = run(16, 1), run(8, 2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_sequential_and_batched_population_take_the_same_steps():
    def run(**kw):
        pl.seed_everything(0)
        model = tiny_model()
        tiny_trainer(max_steps=3, callbacks=[MeZO(lr=2e-3, **{**POP, **kw})]).fit(model, tiny_datamodule(batch_size=8))
        return full_state(model)

    a, b = run(batched=True), run(batched=False)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_ordinary_module_scalar_loss_both_paths():
    """A plain LightningModule with a tensor batch and a scalar-loss training_step: per-member training_step
    calls (TinyLM), or batched per_sample_loss (TinyLMPerSample). Both learn, and both paths compute the same
    losses: the same candidates get the same fitness (to float rounding), and MeZO's runs agree.

    DFO's 30-generation runs are not compared: CMA-ES ranks its candidates, so a rounding-level difference between
    the two paths (one forward of the repeated batch against one per candidate) flips a near-tie and the runs part."""
    results = {}
    for cls in (TinyLM, TinyLMPerSample):
        for name, make in {
            "dfo": lambda: DFOLoRA(d=40, population=8, budget=None, stat_batches=2, init_scale=1.0),
            "mezo": lambda: MeZO(lr=2e-3, n_spsa=4, batched=True, perturbation="lowrank"),
        }.items():
            model = cls()
            before = model.mean_loss()
            cb = make()
            tiny_trainer(max_steps=30, callbacks=[cb]).fit(model)
            results[cls, name] = model.mean_loss()
            # DFO's drop over map seeds 0-3: 0.029-0.059 (both paths); MeZO's run is the one seeded run
            drop = 0.02 if name == "dfo" else 0.03
            assert results[cls, name] < before - drop, (cls.__name__, name, before, results[cls, name])
            if name == "dfo":
                assert cb.dfo.path == ("per_sample" if cls is TinyLMPerSample else "step")
            else:
                assert (cb._per_sample is not None) == (cls is TinyLMPerSample)
    assert results[TinyLM, "mezo"] == pytest.approx(results[TinyLMPerSample, "mezo"], abs=1e-4)

    # DFO: one population of candidates scored by each path on the same weights and batch
    from lightning_memopt.dfo.core import DFOSettings, LayerwiseDFO

    settings = DFOSettings(d=40, population=8, budget=None, init_scale=1.0)
    fitness = {}
    for path in ("per_sample", "step"):
        model = TinyLMPerSample()
        batch = next(iter(model.train_dataloader()))
        kw = ({"per_sample": model.per_sample_loss} if path == "per_sample" else
              {"step_loss": lambda b, m=model: m.training_step(b, 0)})
        dfo = LayerwiseDFO(model, settings, **kw)
        z = torch.randn(8, dfo.lora.z[0].numel(), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            fitness[path] = dfo.eval_members(batch, 0, z)
    assert fitness["per_sample"].shape == (8,) and fitness["per_sample"].std() > 1e-3  # candidates differ
    torch.testing.assert_close(fitness["per_sample"], fitness["step"], rtol=1e-6, atol=1e-6)


def test_metric_objective_runs_one_training_step_per_member():
    from test_mezo_variants import Blobs

    model = Blobs()
    before = model.accuracy()
    cb = MeZO(eps=0.05, lr=0.5, metric="torchmetrics.classification.MulticlassAccuracy",
              metric_kwargs={"num_classes": 2}, n_spsa=4, batched=True, perturbation="lowrank", perturbation_rank=1)
    tiny_trainer(max_steps=30, callbacks=[cb]).fit(model)
    assert model.accuracy() > before + 0.1


SPEC = {"class_path": "lightning_memopt.mezo.callback.MeZO",
        "init_args": {"eps": 1e-3, "lr": 2e-3, "variant": "momentum", "window": 3, "weight_decay": 0.1,
                      "precondition": "layer", **POP}}


def test_fsdp2_two_processes_equal_one():
    args = {"steps": 4, "global_batch": 16, "callback": SPEC}
    one = fit_tiny(world_size=1, **args)
    two = run_distributed("lightning_memopt.testing.workers:fit_tiny", world_size=2, **args)
    init = fit_tiny(world_size=1, steps=0, global_batch=16)["state"]
    assert_ranks_equal_one_and_all_moved(one, two, init)


def test_rmsnorm_runs_all_members_at_once_as_the_per_member_forward_does(monkeypatch):
    """LlamaRMSNorm (or a copy of its code) gets each member's weight in one batched call; the losses equal those of
    the generic fallback, which runs the module once per member with that member's weight."""
    from lightning_memopt.core import population as core_pop

    model = tiny_model(objective="lm")
    model.eval()
    norm = model.model.model.norm
    assert core_pop._is_llama_rmsnorm(norm) and not core_pop._is_llama_rmsnorm(torch.nn.LayerNorm(4))
    batch = {"input_ids": torch.randint(0, 256, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    calls = []
    fast = core_pop.PopulationEngine._rmsnorm
    monkeypatch.setattr(core_pop.PopulationEngine, "_rmsnorm", lambda *a: calls.append(1) or fast(*a))
    losses = {}
    for batched_norms in (True, False):
        monkeypatch.setattr(core_pop, "_is_llama_rmsnorm", lambda m, on=batched_norms: on)
        zo = ZeroOrder(model, ZOConfig(eps=1e-2, n_spsa=3, perturbation="lowrank", batched=True), seed=5)
        with torch.no_grad():
            g, loss = zo.estimate(None, zo.seeds(7), per_sample=model.per_sample_loss, batch=batch)
        losses[batched_norms] = (g, loss)
        zo.close()
        if batched_norms:
            assert len(calls) > 0
    torch.testing.assert_close(losses[True], losses[False], rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_spsa", [3, 16])
def test_stacked_left_factors_give_the_members_losses_of_the_batched_matmuls(monkeypatch, n_spsa):
    # x·V_j for all members as one matmul; with 16 directions (18 x rank 4 = 72 columns) the layers narrower than
    # that keep the batched matmuls
    from lightning_memopt.core import population as core_pop
    from lightning_memopt.mezo.population import Directions

    model, dm = tiny_model(), tiny_datamodule(batch_size=4)
    dm.tokenizer = model.tokenizer
    dm.setup("fit")
    model.set_label_token_ids(dm.label_token_ids)
    model.eval()
    batch = next(iter(dm.train_dataloader()))
    calls = []
    add = core_pop.add_lowrank_delta

    def counted(*a, stacked=None):
        if stacked is not None:
            calls.append(stacked.shape[1])
        return add(*a, stacked=stacked)

    monkeypatch.setattr(core_pop, "add_lowrank_delta", counted)
    linears = [m.weight.shape[0] for m in model.modules() if isinstance(m, torch.nn.Linear)]
    out = {}
    for mode in ("stacked", "batched"):
        if mode == "batched":
            monkeypatch.setattr(Directions, "stacked_v", lambda *a, **k: None)
        cfg = ZOConfig(eps=1e-2, n_spsa=n_spsa, perturbation="lowrank", batched=True, one_sided=True,
                       population_chunk=n_spsa + 1)  # all members in one forward
        zo = ZeroOrder(model, cfg, seed=5)
        with torch.no_grad():
            out[mode] = zo.estimate(None, zo.seeds(2), per_sample=model.per_sample_loss, batch=batch)
        zo.close()
    width = (n_spsa + 2) // 2 * 2 * 4
    assert calls and set(calls) == {width}
    assert len(calls) == sum(w >= width for w in linears)
    torch.testing.assert_close(out["stacked"], out["batched"], rtol=1e-5, atol=1e-6)


def test_the_batched_path_logs_the_modules_train_loss(tmp_path):
    """The batched population never calls training_step: a ModelCheckpoint monitoring train_loss saved nothing for
    the whole fit. The module's log_train_loss gets the step's loss instead."""
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(tmp_path, monitor="train_loss", every_n_train_steps=3, save_top_k=-1)
    trainer = tiny_trainer(max_steps=6, enable_checkpointing=True, callbacks=[MeZO(lr=1e-3, **POP), ckpt])
    trainer.fit(tiny_model(), tiny_datamodule(k=16, batch_size=8))
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt"]
    assert float(trainer.callback_metrics["train_loss"]) == pytest.approx(float(trainer.callback_metrics["mezo/loss"]))
