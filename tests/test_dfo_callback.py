"""DFOLoRA on the tiny model: batched = sequential fitness (the core), forward-only learning, exact resume, refusals."""

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_memopt.dfo.callback import DFOLoRA
from lightning_memopt.dfo.core import population_fitness
from lightning_memopt.testing import assert_same, tiny_datamodule, tiny_model, tiny_trainer
from lightning_memopt.testing.tiny import TinyLM, TinyLMPerSample, full_state


def _fit(cb, steps, k=64, batch_size=16, **trainer_kw):
    torch.manual_seed(0)
    model, dm = tiny_model(), tiny_datamodule(k=k, batch_size=batch_size)
    trainer = tiny_trainer(max_steps=steps, callbacks=[cb], **trainer_kw)
    trainer.fit(model, dm)
    return model, dm, trainer


def _mean_loss(model, dm):
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for b in dm.train_dataloader():
            tot += float(F.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"], reduction="sum"))
            n += len(b["labels"])
    model.train()
    return tot / n


def test_batched_split_full_and_sequential_give_the_same_fitness():
    # init_scale 1: candidates far enough apart that equal fitness is not trivially true
    cb = DFOLoRA(d=40, population=6, budget=None, stat_batches=2, init_scale=1.0)
    model, dm, _ = _fit(cb, steps=3)  # layers 0 and 1 now hold non-zero z's
    assert all(bool(z.any()) for z in cb.lora.z)
    batch = next(iter(dm.train_dataloader()))
    assert (batch["attention_mask"] == 0).any()  # left padding is exercised
    model.eval()
    gen = torch.Generator().manual_seed(0)
    for k in range(cb.lora.n_blocks):
        z = torch.randn(6, 40, generator=gen, dtype=torch.float64)
        z[0] = cb.lora.z[k]  # candidate 0 is the current point: its fitness is the module's own loss
        with torch.no_grad():
            split = cb.dfo.eval_batched(batch, k, z, split=True)
            full = cb.dfo.eval_batched(batch, k, z, split=False)
            seq = cb.dfo.eval_sequential(batch, k, z)
            cb.config.population_chunk = 4  # 4 + 2 candidates: the layers below run once per chunk
            chunked = cb.dfo.eval_batched(batch, k, z, split=True)
            cb.config.population_chunk = None
            own = F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        torch.testing.assert_close(split, seq, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full, seq, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(chunked, seq, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(seq[0], own, atol=1e-5, rtol=1e-5)
        assert float(seq.std()) > 1e-4  # the candidates really differ
        for a, b in cb.lora.factors(k, torch.zeros(2, 40)):  # LoRA starts at zero
            assert not a.any() and not b.any()


# The least each lowers the mean loss by over map seeds 0-3: CMA-ES 0.032, fireworks 0.007 (fireworks moves less in
# 60 generations of 10 here; with the maps drawn by torch's own generator before, it ranged from -0.002 to 0.017).
DROP = {"cmaes": 0.015, "fireworks": 0.005}


@pytest.mark.parametrize("optimizer", ["cmaes", "fireworks"])
def test_tiny_run_lowers_the_loss_forward_only(optimizer):
    # A random-init tiny model has no pretrained behaviour to protect: larger adapters learn faster here.
    cb = DFOLoRA(optimizer=optimizer, d=100, population=10, budget=600, stat_batches=2, init_scale=1.0)
    torch.manual_seed(0)
    model, dm = tiny_model(), tiny_datamodule(k=32, batch_size=32)
    dm.tokenizer = model.tokenizer
    dm.setup("fit")
    model.set_label_token_ids(dm.label_token_ids)
    before, weights = _mean_loss(model, dm), full_state(model)
    trainer = tiny_trainer(max_steps=100, callbacks=[cb])
    trainer.fit(model, dm)
    assert trainer.global_step == 60 and cb.evaluations == 600  # the budget (forwards) ended the run
    after = _mean_loss(model, dm)
    assert after < before - DROP[optimizer], (before, after)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # no gradient; the flags are back
    for n, w in full_state(model).items():
        assert torch.equal(w, weights[n])  # the base model is untouched: everything is in the hooks
    assert "train_loss" in trainer.callback_metrics and "dfo_best_fitness" in trainer.callback_metrics


@pytest.mark.parametrize("optimizer", ["cmaes", "fireworks"])
def test_resume_is_exact(tmp_path, optimizer):
    kw = {"optimizer": optimizer, "d": 20, "population": 8, "budget": None, "stat_batches": 2}
    # k=8: one batch per epoch, so the data order after resume is trivially the same (Lightning replays a
    # non-resumable loader from its start)
    straight = DFOLoRA(**kw)
    _fit(straight, steps=7, k=8)
    first = DFOLoRA(**kw)
    _, _, trainer = _fit(first, steps=4, k=8)
    ckpt = str(tmp_path / "dfo.ckpt")
    trainer.save_checkpoint(ckpt)
    resumed = DFOLoRA(**kw)
    torch.manual_seed(0)
    model, dm = tiny_model(), tiny_datamodule(k=8, batch_size=16)
    trainer = tiny_trainer(max_steps=7, callbacks=[resumed])
    trainer.fit(model, dm, ckpt_path=ckpt)
    assert trainer.global_step == 7 and resumed.generation == straight.generation == 7
    assert resumed.dfo.layer == straight.dfo.layer
    for a, b in zip(straight.lora.z, resumed.lora.z):
        assert torch.equal(a, b)
    for a, b in zip(straight.dfo.opts, resumed.dfo.opts):
        assert torch.equal(a.mean, b.mean) and a.best_f == b.best_f
    assert straight.lora.stats() == resumed.lora.stats()


def test_hinge_and_ce_fitness():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.5]], [[0.0, 0.0], [3.0, 0.0]]])  # [P=2, B=2, n=2]
    labels = torch.tensor([0, 1])
    hinge = population_fitness(logits, labels, "hinge", margin=1.0)
    torch.testing.assert_close(hinge, torch.tensor([(0.0 + 0.5) / 2, (1.0 + 4.0) / 2]))
    ce = population_fitness(logits, labels, "ce")
    torch.testing.assert_close(ce[1], F.cross_entropy(logits[1], labels))


def test_refusals_name_the_fix():
    with pytest.raises(MisconfigurationException, match=r"target_pattern='nothing_here\$'.*q_proj"):
        _fit(DFOLoRA(d=20, population=4, target_pattern="nothing_here$"), steps=1)
    with pytest.raises(MisconfigurationException, match="accumulate_grad_batches"):
        _fit(DFOLoRA(d=20, population=4), steps=1, accumulate_grad_batches=2)
    with pytest.raises(MisconfigurationException, match="gradient_clip_val"):
        _fit(DFOLoRA(d=20, population=4), steps=1, gradient_clip_val=1.0)
    with pytest.raises(ValueError, match="budget"):
        DFOLoRA(population=20, budget=10)
    with pytest.raises(ValueError, match="explosion spark"):
        DFOLoRA(optimizer="fireworks", population=6)
    with pytest.raises(ValueError, match="optimizer"):
        DFOLoRA(optimizer="adam")
    # hinge reads label-word logits; a module with only its own loss would have run CE under that name
    for cls, source in ((TinyLM, "training_step"), (TinyLMPerSample, "per_sample_loss")):
        with pytest.raises(MisconfigurationException, match=rf"loss='hinge'.*{source} loss; use loss='ce'"):
            tiny_trainer(max_steps=1, callbacks=[DFOLoRA(d=20, population=4, loss="hinge")]).fit(cls())


def test_encoder_split_and_full_match_sequential():
    from transformers import BertConfig, BertForSequenceClassification

    from lightning_memopt.dfo.lora import ZLoRA

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, num_labels=2)
    model = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 100, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0

    def f(i, a):
        return model(input_ids=i, attention_mask=a).logits

    lora = ZLoRA(model, rank=2, d=24)
    assert [t.name.rsplit(".", 1)[-1] for t in lora.blocks[0].targets] == ["query", "key"]
    lora.install()
    lora.collect_stats(lambda b: f(b["input_ids"], b["attention_mask"]), [{"input_ids": ids, "attention_mask": mask}])
    lora.set_z(0, torch.randn(24))
    z = torch.randn(4, 24, dtype=torch.float64)
    with torch.no_grad():
        for k in range(3):
            lora.begin_population(k, z, 3, expand=True)
            split = f(ids, mask)
            lora.begin_population(k, z, 3, expand=False)
            full = f(ids.repeat(4, 1), mask.repeat(4, 1))
            seq = []
            for p in range(4):
                lora.begin_population(k, z[p : p + 1], 3, expand=False)
                seq.append(f(ids, mask))
            lora.end_population()
            torch.testing.assert_close(split, torch.cat(seq), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(full, torch.cat(seq), atol=1e-6, rtol=1e-5)


def test_merge_folds_the_lora_into_the_weights():
    cb = DFOLoRA(d=20, population=4, budget=None, stat_batches=1)
    model, dm, _ = _fit(cb, steps=2)
    batch = next(iter(dm.train_dataloader()))
    model.eval()
    with torch.no_grad():
        hooked = model(batch["input_ids"], batch["attention_mask"])
        cb.merge()
        merged = model(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(merged, hooked, atol=1e-5, rtol=1e-5)
    assert not cb.lora._handles  # the hooks are gone: the module alone carries the adaptation


def test_split_falls_back_to_full_expansion_when_it_cannot_match(monkeypatch):
    from lightning_memopt.dfo.lora import ZLoRA

    original = ZLoRA._expand

    def no_mask(self, x, p):  # pretend the expansion misses the 4-D attention mask
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            return x
        return original(self, x, p)

    monkeypatch.setattr(ZLoRA, "_expand", no_mask)
    cb = DFOLoRA(d=20, population=4, budget=None, stat_batches=1)
    with pytest.warns(UserWarning, match="falling back"):
        _fit(cb, steps=2)
    assert cb.dfo.split is False and cb.generation == 2


@pytest.mark.parametrize("static", [False, True])
def test_a_skipped_generation_is_masked_on_the_device_and_the_turns_go_on(static):
    """CMA-ES decides a skip (every candidate's fitness non-finite) on the device, with no host read: the tell is
    masked, so the layer's optimizer and point stay bit for bit as they were (in the graph path's static buffers
    too, written in place: captured graphs read them), the module's step runs once at that point, the next layer
    takes its turn, and the host counters and generator are put back once the skip is learnt."""
    cb = DFOLoRA(d=20, population=6, budget=None, stat_batches=1, init_scale=1.0)
    model, dm, _ = _fit(cb, steps=3, k=16, batch_size=8)
    batch, dfo = next(iter(dm.train_dataloader())), cb.dfo
    poison = {"on": False}
    dfo.logits_fn = lambda ids, mask: model(ids, mask) * (math.nan if poison["on"] else 1.0)
    if static:  # what cuda_graph=True sets up on a GPU
        dfo.lora.static_fixed = True
        for k in range(dfo.lora.n_blocks):
            dfo.lora.set_z(k, dfo.lora.z[k])
    dfo.generation_step(batch)
    k, n = dfo.layer, dfo.lora.n_blocks
    tensors = [dfo.lora.z[k], *(t for pair in dfo.lora._fixed[k] for t in pair)]
    before = ([t.clone() for t in tensors], dfo.state_dict())
    poison["on"] = True
    seen = []  # the layer's point when the after-update work ran
    fit = dfo.generation_step(batch, after_update=lambda: seen.append(dfo.lora.z[k].clone()))
    assert not fit.isfinite().any() and dfo.layer == (k + 1) % n
    assert len(seen) == 1 and torch.equal(seen[0], before[0][0])
    after = [dfo.lora.z[k], *(t for pair in dfo.lora._fixed[k] for t in pair)]
    assert all(torch.equal(a, b) for a, b in zip(before[0], after))
    if static:
        assert all(a is b for a, b in zip(tensors, after))
    state = dfo.state_dict()  # learns of the skip: counters and generator put back
    assert dfo.guard.skipped_steps == 1 and state.pop("layer") == (k + 1) % n
    assert_same({**before[1], "layer": None}, {**state, "layer": None})
    poison["on"] = False

    def fail() -> None:
        raise RuntimeError("the module's step failed")

    k2, before2 = dfo.layer, dfo.state_dict()
    with pytest.raises(RuntimeError, match="step failed"):  # an exception there takes the generation back
        dfo.generation_step(batch, after_update=fail)
    assert dfo.layer == k2 and dfo.guard.skipped_steps == 1
    assert_same(before2, dfo.state_dict())
    z2 = dfo.lora.z[k2].clone()
    dfo.generation_step(batch)  # and it goes on from there
    assert dfo.layer == (k2 + 1) % n and not torch.equal(dfo.lora.z[k2], z2)


def test_a_layer_s_next_ask_waits_for_its_skip_to_be_known():
    """The host may run generations ahead of the GPU; a layer's next ask first settles that layer's previous
    generation, so a skip's generator is put back before it draws again (one layer: every generation)."""
    from lightning_memopt.dfo.core import DFOSettings, LayerwiseDFO

    model = tiny_model()
    dm = tiny_datamodule(k=16, batch_size=8)
    dm.tokenizer = model.tokenizer
    dm.setup("fit")
    model.set_label_token_ids(dm.label_token_ids)
    batch = next(iter(dm.train_dataloader()))
    one_layer = r"layers\.0\.self_attn\.(q_proj|k_proj)$"
    dfo = LayerwiseDFO(model, DFOSettings(population=4, d=12, budget=None, target_pattern=one_layer))
    dfo.collect_stats([batch])
    dfo.logits_fn = lambda ids, mask: model(ids, mask) * math.nan
    assert dfo.lora.n_blocks == 1
    rng = dfo.opts[0].gen.get_state()
    dfo.generation_step(batch, step=0)
    with pytest.warns(UserWarning, match="non-finite loss at step 0"):
        dfo.generation_step(batch, step=1)  # resolves step 0's check first: the generator is put back, then drawn
    assert dfo.guard.skipped_steps == 1 and len(dfo.guard._pending) == 1  # step 1's check: not yet needed
    with pytest.warns(UserWarning, match="non-finite loss at step 1"):
        dfo.state_dict()
    assert dfo.guard.skipped_steps == 2 and dfo.generation == 0 and dfo.evaluations == 0
    assert torch.equal(dfo.opts[0].gen.get_state(), rng)


@pytest.mark.parametrize("optimizer", ["cmaes", "fireworks"])
def test_train_loss_is_the_modules_loss_at_the_new_point(optimizer):
    """The module's own training_step (train_loss) runs once a generation, after the layer's new point is in place
    (CMA-ES: queued before the generation's host check)."""
    calls = []
    cb = DFOLoRA(optimizer=optimizer, n_fireworks=3, d=20, population=6, budget=None, stat_batches=1, init_scale=1.0)
    torch.manual_seed(0)
    model, dm = tiny_model(), tiny_datamodule(k=16, batch_size=8)
    step = model.training_step
    model.training_step = lambda *a, **kw: calls.append(1) or step(*a, **kw)
    trainer = tiny_trainer(max_steps=1, callbacks=[cb], limit_val_batches=0)
    trainer.fit(model, dm)
    assert len(calls) == 1 and cb.generation == 1 and bool(cb.lora.z[0].any())  # layer 0 moved in generation 1
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        own = F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    torch.testing.assert_close(trainer.callback_metrics["train_loss"], own)


def test_testing_a_checkpoint_evaluates_its_adapters(tmp_path):
    """trainer.test(ckpt_path=...) on a fresh trainer, module and callback tests the checkpoint's adapters (they
    live in callback state, not in the weights): the fit's own test metrics, not the base model's."""
    kw = {"d": 40, "population": 6, "budget": None, "stat_batches": 2, "init_scale": 1.0}
    model, dm, trainer = _fit(DFOLoRA(**kw), steps=3)
    trainer.save_checkpoint(tmp_path / "dfo.ckpt")
    fitted = trainer.test(model, dm, verbose=False)[0]

    def fresh_test(ckpt):
        torch.manual_seed(0)
        return tiny_trainer(callbacks=[DFOLoRA(**kw)]).test(tiny_model(), dm, ckpt_path=ckpt, verbose=False)[0]

    assert fresh_test(str(tmp_path / "dfo.ckpt")) == fitted
    assert fresh_test(None)["test_loss"] != fitted["test_loss"]  # the base model: the adapters mattered
    # without DFOLoRA the base model would be tested under the checkpoint's name
    with pytest.raises(MisconfigurationException, match=r"written by DFOLoRA.*memopt consolidate"):
        tiny_trainer().test(tiny_model(), dm, ckpt_path=str(tmp_path / "dfo.ckpt"), verbose=False)


@pytest.mark.parametrize("optimizer", ["cmaes", "fireworks"])
def test_consolidate_merges_the_adapters_of_a_checkpoint(optimizer, tmp_path):
    """memopt consolidate of a DFOLoRA fit: the adapters (callback state, not weights) rebuilt and folded into the
    q/k weights, so the saved Hugging Face model gives the adapted module's logits."""
    from transformers import AutoModelForCausalLM

    from lightning_memopt.cli import main

    cb = DFOLoRA(optimizer=optimizer, d=40, population=6, budget=None, stat_batches=2, init_scale=1.0,
                 **({"n_fireworks": 3} if optimizer == "fireworks" else {}))
    model, _, trainer = _fit(cb, steps=3)
    assert all(bool(z.any()) for z in cb.lora.z)
    trainer.save_checkpoint(tmp_path / "dfo.ckpt")
    main(["consolidate", str(tmp_path / "dfo.ckpt"), str(tmp_path / "hf"), "--no-tokenizer"])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model.model.eval()(ids).logits  # the hooks still add each layer's B A x
        cb.lora.remove()
        base = model.model(ids).logits
    torch.testing.assert_close(hf(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-3  # the adapters change the logits: merging them is not a no-op
    # a folder that holds a model is written over only when asked; a stale shard index there goes
    (tmp_path / "hf" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["consolidate", str(tmp_path / "dfo.ckpt"), str(tmp_path / "hf"), "--no-tokenizer"])
    main(["consolidate", str(tmp_path / "dfo.ckpt"), str(tmp_path / "hf"), "--no-tokenizer", "--overwrite"])
    assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(ids).logits, adapted,
                               rtol=1e-5, atol=1e-5)


def test_a_checkpoint_from_before_keyed_maps_resumes_with_the_device_generator():
    """States without "maps" drew their random maps from the device's generator; loading one keeps that, so an
    old checkpoint resumes on the maps it was trained with."""
    cb = DFOLoRA(d=40, population=6, budget=None, stat_batches=2, init_scale=1.0)
    _fit(cb, steps=2)
    state = cb.dfo.state_dict()
    assert state["maps"] == "philox"
    keyed = [a.clone() for a, _ in cb.lora.factors(0, cb.lora.z[0][None])]
    del state["maps"]
    cb.dfo.load_state_dict(state)
    assert cb.lora.maps == "device"
    gen = torch.Generator().manual_seed(cb.lora.seed * 1_000_003)  # block 0, target 0: ma is the first draw
    t = cb.lora.blocks[0].targets[0]
    ma = torch.randn(cb.lora.rank * t.in_features, 10, generator=gen)  # d=40 over 2 targets: chunks of 10
    legacy = cb.lora._maps(0)[0][0]
    torch.testing.assert_close(legacy / legacy.std(), ma / ma.std())
    assert not torch.allclose(cb.lora.factors(0, cb.lora.z[0][None])[0][0], keyed[0])


def test_the_modules_requires_grad_flags_come_back_after_the_fit():
    # forward-only during the fit; a later backprop fit of the same module must find its parameters trainable
    cb = DFOLoRA(d=20, population=4)
    model, _, _ = _fit(cb, steps=1)
    assert all(p.requires_grad for p in model.parameters())
    frozen = next(iter(model.parameters()))
    frozen.requires_grad_(False)  # a user's frozen parameter stays frozen
    tiny_trainer(max_steps=2, callbacks=[cb]).fit(model, tiny_datamodule(k=64))
    assert not frozen.requires_grad and sum(not p.requires_grad for p in model.parameters()) == 1


def test_a_second_dfolora_on_an_adapted_module_is_refused_until_the_first_is_merged():
    """Another DFOLoRA's fit stacked its adapters on the first one's, which no checkpoint of it holds."""
    kw = {"d": 40, "population": 6, "budget": None, "stat_batches": 2}
    first = DFOLoRA(**kw)
    model, dm, _ = _fit(first, steps=1)
    with pytest.raises(MisconfigurationException, match=r"already carries the adapters of an earlier DFOLoRA fit"):
        tiny_trainer(max_steps=1, callbacks=[DFOLoRA(**kw)]).fit(model, dm)
    tiny_trainer(max_steps=2, callbacks=[first]).fit(model, dm)  # the same callback goes on training its own
    first.merge()
    second = DFOLoRA(**kw)
    tiny_trainer(max_steps=1, callbacks=[second]).fit(model, dm)
    assert second.generation == 1


MERGE_KW = {"d": 40, "population": 6, "budget": None, "stat_batches": 2, "init_scale": 1.0}


def test_after_merge_the_callback_cannot_fit_again_and_its_checkpoint_holds_the_adapters_once(tmp_path):
    """merge() folds B A into the weights: a later fit with the same callback ran with no hooks (every candidate the
    same fitness) or crashed; a checkpoint saved after it applied the adapters a second time on evaluation and in
    consolidate (logits 0.018 away from the merged model's)."""
    from lightning_memopt.cli import main

    cb = DFOLoRA(**MERGE_KW)
    model, dm, trainer = _fit(cb, 3)
    cb.merge()
    with pytest.raises(MisconfigurationException, match=r"merge\(\) folded .* Fit with a fresh DFOLoRA"):
        tiny_trainer(max_steps=5, callbacks=[cb]).fit(model, dm)
    ckpt = str(tmp_path / "merged.ckpt")
    trainer.save_checkpoint(ckpt)
    (merged,) = trainer.test(model, dm, verbose=False)
    for callbacks in ([DFOLoRA(**MERGE_KW)], []):  # with DFOLoRA or without: the weights hold the adapters
        torch.manual_seed(0)
        (again,) = tiny_trainer(callbacks=callbacks).test(tiny_model(), dm, ckpt_path=ckpt, verbose=False)
        assert again["test_loss"] == pytest.approx(merged["test_loss"], abs=1e-7)
    main(["consolidate", ckpt, str(tmp_path / "hf"), "--no-tokenizer"])
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.model.eval()(ids).logits
        consolidated = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()(ids).logits
    torch.testing.assert_close(consolidated, ours, atol=1e-5, rtol=0)
    with pytest.raises(MisconfigurationException, match="saved after DFOLoRA.merge"):  # nothing left to resume
        tiny_trainer(max_steps=5, callbacks=[DFOLoRA(**MERGE_KW)]).fit(tiny_model(), dm, ckpt_path=ckpt)


def test_a_checkpoint_evaluated_before_a_fit_gives_it_adapters_not_its_search(tmp_path):
    """validate(ckpt_path=X) installed X's whole search state: a fresh fit after it went on from X's generation and
    spent X's budget (10 generations to a budget of 60 forwards became 6)."""
    kw = {**MERGE_KW, "budget": 60}
    first = DFOLoRA(**kw)
    _, dm, trainer = _fit(first, 4)
    ckpt = str(tmp_path / "x.ckpt")
    trainer.save_checkpoint(ckpt)
    cb = DFOLoRA(**kw)
    torch.manual_seed(0)
    model = tiny_model()
    tiny_trainer(callbacks=[cb], limit_val_batches=1.0).validate(model, dm, ckpt_path=ckpt, verbose=False)
    assert all(torch.equal(a, b) for a, b in zip(cb.lora.z, first.lora.z))  # X's adapters were evaluated
    trainer = tiny_trainer(max_steps=100, callbacks=[cb])
    trainer.fit(model, dm)
    assert (trainer.global_step, cb.generation, cb.evaluations) == (10, 10, 60)


def test_the_start_log_says_lr_and_schedulers_do_not_drive_it(caplog):
    # lr=1e-3, lr=0 and a warmup schedule gave the same z's with no word; LearningRateMonitor logs the lr all the same
    import logging

    with caplog.at_level(logging.INFO):
        _fit(DFOLoRA(**MERGE_KW), 1)
    assert "It has no learning rate: the optimizer's lr and any LR scheduler leave it as it is" in caplog.text


def test_optimizer_device_is_checked_when_given_and_at_setup():
    # a bad or absent device failed with torch's own error at on_fit_start
    with pytest.raises(ValueError, match="optimizer_device='cpux' is not a device"):
        DFOLoRA(optimizer_device="cpux")
    if not torch.cuda.is_available():
        with pytest.raises(MisconfigurationException, match="optimizer_device='cuda'.* needs a GPU"):
            _fit(DFOLoRA(optimizer_device="cuda", **MERGE_KW), 1)
