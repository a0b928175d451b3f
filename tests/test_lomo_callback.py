"""LOMO/AdaLomo callbacks on an unchanged HFCausalLM: trajectories, Lightning clipping, resume, fp16, refusals."""

from __future__ import annotations

import csv
import types
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_memopt import _shim
from lightning_memopt.core.holder import HolderOptimizer
from lightning_memopt.lomo.callback import LOMO, AdaLomo
from lightning_memopt.models.configs import llama_config
from lightning_memopt.models.hf import HFCausalLM
from lightning_memopt.testing import tiny_datamodule, tiny_model, tiny_trainer
from lightning_memopt.testing.tiny import full_state


class SGDModel(HFCausalLM):
    """The reference: the same module with torch SGD (same groups, lr, weight decay, schedule)."""

    def configure_optimizers(self):
        out = super().configure_optimizers()
        opt = out["optimizer"] if isinstance(out, dict) else out
        sgd = torch.optim.SGD(
            [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups], lr=self.hparams.lr
        )
        if isinstance(out, dict):
            sched = torch.optim.lr_scheduler.LambdaLR(sgd, out["lr_scheduler"]["scheduler"].lr_lambdas[0])
            return {"optimizer": sgd, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return sgd


def make_model(cls=HFCausalLM, **kw) -> HFCausalLM:
    pl.seed_everything(0, verbose=False)
    kw = {"lr": 0.05, "weight_decay": 0.1, **kw}
    return cls(model_config=llama_config("tiny", vocab_size=256), tokenizer="builtin", **kw)


def fit(callbacks, steps=6, cls=HFCausalLM, model_kw=None, ckpt_path=None, **trainer_kw):
    model = make_model(cls, **(model_kw or {}))
    trainer = tiny_trainer(max_steps=steps, callbacks=callbacks, **trainer_kw)
    trainer.fit(model, tiny_datamodule(batch_size=16), ckpt_path=ckpt_path)
    return full_state(model), model, trainer


def rel(a: dict, b: dict) -> float:
    num = sum((a[k].double() - b[k].double()).pow(2).sum() for k in a).sqrt()
    return float(num / sum(b[k].double().pow(2).sum() for k in b).sqrt())


SCHED = {"lr_schedule": "linear", "warmup_steps": 2}


def test_lomo_follows_sgd_trajectory_with_scheduler_and_weight_decay():
    lomo, _, trainer = fit([LOMO()], model_kw=SCHED)
    ref, _, _ = fit([], cls=SGDModel, model_kw=SCHED)
    init = full_state(make_model())
    assert rel(lomo, init) > 1e-3
    assert rel(lomo, ref) <= 1e-6
    assert trainer.global_step == 6
    assert isinstance(trainer.strategy.optimizers[0], HolderOptimizer)
    assert _shim.get_skip_backward(trainer) is False  # restored at teardown


def test_lightning_gradient_clip_val_becomes_exact_two_pass_clipping():
    clipped, _, trainer = fit([LOMO()], gradient_clip_val=0.05)
    assert trainer.gradient_clip_val == 0.05  # switched off for the fit only, then put back
    ref, _, _ = fit([], cls=SGDModel, gradient_clip_val=0.05)  # torch SGD + Lightning's clip_grad_norm_
    plain, _, _ = fit([LOMO()])
    assert rel(clipped, ref) <= 1e-6
    assert rel(clipped, plain) > 1e-4  # the clipping was active


def test_lightning_gradient_clip_by_value_is_translated():
    cb, seen = LOMO(), []

    class Clip(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((cb.config.clip_grad_value, cb.config.clip_grad_norm))

    lomo, _, _ = fit([cb, Clip()], steps=3, gradient_clip_val=1e-3, gradient_clip_algorithm="value")
    assert seen == [(1e-3, None)] * 3
    assert cb.config.clip_grad_value is None  # for that fit only
    ref, _, _ = fit([], steps=3, cls=SGDModel, gradient_clip_val=1e-3, gradient_clip_algorithm="value")
    assert rel(lomo, ref) <= 1e-6


def test_activation_checkpointing_and_live_grads():
    cb = AdaLomo(lr=0.01, clip_grad_norm=0.5)
    ckpt, model, _ = fit([cb], steps=3, model_kw={"gradient_checkpointing": True})
    plain, _, _ = fit([AdaLomo(lr=0.01, clip_grad_norm=0.5)], steps=3)
    assert rel(ckpt, plain) <= 1e-6
    assert all(p.grad is None for p in model.parameters())
    # Hooks are gone after fit: a plain backward leaves gradients and changes nothing.
    before = full_state(model)
    x = torch.randint(0, 256, (2, 8))
    model.model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(v, full_state(model)[k]) for k, v in before.items())


def _resume_run(tmp_path, cls):
    kw = {"model_kw": {"lr_schedule": "constant", "warmup_steps": 12}}  # a schedule that ignores max_steps
    ckpt = ModelCheckpoint(tmp_path, every_n_train_steps=8, save_top_k=-1)
    full, _, t_full = fit([cls(lr=0.01), ckpt], steps=16, enable_checkpointing=True, **kw)
    half = next(tmp_path.glob("*step=8.ckpt"))
    resumed, _, t_res = fit([cls(lr=0.01)], steps=16, ckpt_path=str(half), **kw)
    return full, t_full, resumed, t_res


@pytest.mark.parametrize("cls", [LOMO, AdaLomo])
def test_resume_is_exact(tmp_path, cls):
    full, t_full, resumed, t_res = _resume_run(tmp_path, cls)
    assert t_res.global_step == 16
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    h_full, h_res = t_full.strategy.optimizers[0], t_res.strategy.optimizers[0]
    assert h_res.param_groups is h_res.wrapped.param_groups  # the scheduler still drives the holder
    assert h_res.param_groups[0]["lr"] == h_full.param_groups[0]["lr"]
    if cls is AdaLomo:
        pf = [p for g in h_full.param_groups for p in g["params"]]
        pr = [p for g in h_res.param_groups for p in g["params"]]
        assert len(h_full.state) == len(pf)
        for a, b in zip(pf, pr):
            sa, sb = h_full.state[a], h_res.state[b]
            assert sa.keys() == sb.keys() and sa["step"] == sb["step"] == 16
            for key in sa:
                if key != "step":
                    assert sb[key].dtype == torch.float32 and torch.equal(sa[key], sb[key])


def test_fp16_overflow_skips_step_via_callback(recwarn):
    cb = LOMO(init_loss_scale=2.0**40)
    init = full_state(make_model(torch_dtype="float16"))
    state, _, trainer = fit([cb], steps=1, precision="16-true", model_kw={"torch_dtype": "float16"})
    # an overflow the scaler answers by lowering its scale is expected, not a warning about a non-finite loss
    assert not [w for w in recwarn if "non-finite" in str(w.message)]
    assert trainer.global_step == 1
    assert cb.skipped_steps == 1 and cb.scaler.scale == 2.0**39
    assert all(torch.equal(state[k], init[k]) for k in init)
    assert cb.state_dict()["state"]["scaler"]["scale"] == 2.0**39


def _setup_trainer(**kw):
    return tiny_trainer(max_steps=1, **kw)


@pytest.mark.parametrize(
    "trainer_kw,match",
    [
        ({"accumulate_grad_batches": 2}, "accumulate_grad_batches=1"),
        ({"strategy": "ddp"}, "FSDP2"),
    ],
)
def test_refusals_name_the_fix(trainer_kw, match):
    trainer = _setup_trainer(**trainer_kw)
    for cls in (LOMO, AdaLomo):
        with pytest.raises(MisconfigurationException, match=match):
            cls().setup(trainer, make_model(), "fit")


def test_refuses_16_mixed_naming_16_true():
    trainer = types.SimpleNamespace(
        strategy=tiny_trainer().strategy,
        precision="16-mixed",
        precision_plugin=types.SimpleNamespace(scaler=object()),
        accumulate_grad_batches=1,
        gradient_clip_val=None,
    )
    with pytest.raises(MisconfigurationException, match="16-true"):
        LOMO().setup(trainer, make_model(), "fit")


@pytest.mark.parametrize("cls", [LOMO, AdaLomo])
def test_float64_weights_are_refused(cls):
    # LOMO rounded every weight to float32 at each step; AdaLomo failed inside backward, after some updates
    trainer = tiny_trainer(max_steps=1, precision="64-true", callbacks=[cls()])
    with pytest.raises(MisconfigurationException, match=rf"{cls.__name__} updates in float32, so float64.*32-true"):
        trainer.fit(make_model(), tiny_datamodule(k=8))


def test_refuses_fsdp1_pointing_to_fsdp2():
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = types.SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))
    with pytest.raises(MisconfigurationException, match="fsdp2"):
        AdaLomo().setup(trainer, make_model(), "fit")


def test_refuses_manual_optimization_and_conflicting_clip():
    model = make_model()
    model.automatic_optimization = False
    with pytest.raises(MisconfigurationException, match="automatic_optimization"):
        LOMO().setup(_setup_trainer(), model, "fit")
    with pytest.raises(MisconfigurationException, match="conflicts"):
        LOMO(clip_grad_norm=1.0).setup(_setup_trainer(gradient_clip_val=0.5), make_model(), "fit")


def test_shim_closure_loss_pins_lightning_closure():
    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            opt = trainer.strategy.optimizers[0]
            inner = opt.step

            def step(closure=None, **kw):
                out = inner(closure, **kw)
                seen["loss"] = _shim.closure_loss(closure)
                seen["detached"] = out
                return out

            opt.step = step

    fit([Probe()], steps=1)
    assert seen["loss"].requires_grad and torch.equal(seen["loss"].detach(), seen["detached"])


def test_backward_hooks_and_learning_rate_monitor(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    class Count(pl.Callback):
        def __init__(self):
            self.before = self.after = 0
            self.lrs = []

        def on_before_backward(self, trainer, pl_module, loss):
            self.before += 1

        def on_after_backward(self, trainer, pl_module):
            self.after += 1

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.lrs.append(trainer.strategy.optimizers[0].param_groups[0]["lr"])

    count = Count()
    logger = CSVLogger(tmp_path, name="lomo")
    fit(
        [LOMO(lr=0.1, clip_grad_norm=0.5), count, LearningRateMonitor("step")],
        steps=4,
        model_kw=SCHED,
        logger=logger,
        log_every_n_steps=1,
    )
    assert count.before == count.after == 4  # the updating pass only (the measure pass is not a backward to hooks)
    assert count.lrs[0] == pytest.approx(0.05) and count.lrs[1] == pytest.approx(0.1)  # warmup 2 steps, then decay
    logger.save()
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert not any(k.startswith("lr-HolderOptimizer") for k in rows[0])  # one column per group, named as before
    logged = [float(r["lr-AdamW/pg1"]) for r in rows if r.get("lr-AdamW/pg1")]
    assert logged[:2] == pytest.approx(count.lrs[:2])
    assert any(r.get("lomo/grad_norm") for r in rows)


def test_adalomo_warns_that_zero_initialized_lora_weights_barely_move():
    # its step is lr * max(eps_scale, RMS(p)): peft's lora_B starts at zero and moved by lr * 1e-3 a step
    pytest.importorskip("peft")
    with pytest.warns(UserWarning, match=r"LoRA weights start at zero .*eps_scale=1\.0"):
        tiny_trainer(max_steps=1, callbacks=[AdaLomo(lr=1e-2)]).fit(tiny_model(lora_rank=2), tiny_datamodule(k=8))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*LoRA weights start at zero.*")
        tiny_trainer(max_steps=1, callbacks=[AdaLomo(lr=1e-2, eps_scale=1.0)]).fit(
            tiny_model(lora_rank=2), tiny_datamodule(k=8))
