"""What every method callback shares (MethodCallback): non-finite steps skipped bit-identically, two methods refused,
hyperparameters checked at construction, foreign and mismatched checkpoints refused, precisions the refusals name."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_memopt import _shim
from lightning_memopt.core.nonfinite import NonFiniteLossError, nonfinite_weights_note
from lightning_memopt.dfo.callback import DFOLoRA
from lightning_memopt.galore.callback import GaLore
from lightning_memopt.lomo.callback import LOMO, AdaLomo
from lightning_memopt.mezo.callback import MeZO
from lightning_memopt.models.configs import llama_config
from lightning_memopt.models.hf import HFCausalLM
from lightning_memopt.testing import assert_same, tiny_datamodule, tiny_model, tiny_trainer
from lightning_memopt.testing.tiny import TinyLM, full_state

DFO_KW = {"d": 20, "population": 6, "budget": None, "stat_batches": 1, "init_scale": 1.0}
GAP = {"rank": 4, "update_proj_gap": 2}

METHODS = {
    "mezo_sgd": lambda: MeZO(lr=1e-3),
    "mezo_momentum": lambda: MeZO(lr=1e-3, variant="momentum", window=3, n_spsa=2),
    "mezo_adam": lambda: MeZO(lr=1e-3, variant="adam", window=3, weight_decay=0.1),
    "mezo_one_sided": lambda: MeZO(lr=1e-3, one_sided=True),
    "mezo_population": lambda: MeZO(lr=1e-3, n_spsa=2, perturbation="lowrank", variant="momentum", window=3),
    "mezo_curvature": lambda: MeZO(lr=0.3, n_spsa=2, perturbation="lowrank", precondition="curvature"),
    "lomo": lambda: LOMO(lr=0.05, weight_decay=0.1),
    "lomo_clip": lambda: LOMO(lr=0.05, clip_grad_norm=0.5),
    "adalomo": lambda: AdaLomo(lr=0.01, weight_decay=0.1),
    "galore": lambda: GaLore(**GAP),
    "galore_layerwise": lambda: GaLore(layerwise=True, **GAP),
    "clora": lambda: DFOLoRA(optimizer="cmaes", **DFO_KW),
    "flora": lambda: DFOLoRA(optimizer="fireworks", n_fireworks=3, **DFO_KW),
}


class _NaNGrad(torch.autograd.Function):
    """The value as it is; its gradient NaN (a backward kernel's bug, under a finite loss)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * math.nan


class Poisoned(HFCausalLM):
    """The tiny model with a non-finite loss (or, for DFO, non-finite logits; with ``where="grad"`` a finite loss
    whose gradient is NaN) at the steps in ``bad_steps``."""

    def __init__(self, value: float = math.nan, bad_steps: tuple[int, ...] = (), where: str = "loss", **kw):
        kw.setdefault("lr", 1e-3)
        super().__init__(model_config=llama_config("tiny", vocab_size=256), tokenizer="builtin", **kw)
        self.value, self.bad_steps, self.where = value, tuple(bad_steps), where

    def _bad(self) -> bool:
        trainer = _shim.attached_trainer(self)
        return trainer is not None and trainer.training and trainer.global_step in self.bad_steps

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        return out * self.value if self.where == "logits" and self._bad() else out

    def _step(self, batch):
        out = super()._step(batch)
        if self.where == "loss" and self._bad():
            out["loss"] = out["loss"] * self.value
        if self.where == "grad" and self._bad():
            out["loss"] = _NaNGrad.apply(out["loss"])
        return out


def _state(trainer: pl.Trainer, cb) -> dict:
    holder = trainer.strategy.optimizers[0]
    st = cb.state_dict()
    st.pop("skips")
    if isinstance(st.get("state"), dict):
        st["state"].pop("evaluations", None)  # MeZO counts the forwards a skipped step ran too
        st["layer"] = st["state"].pop("layer", None)  # DFO (CMA-ES): the layers' turns go on past a skip
    return {"callback": copy.deepcopy(st), "optimizer": copy.deepcopy(holder.state_dict()["state"])}


class Snapshot(pl.Callback):
    """Weights and method state before and after step ``k``."""

    def __init__(self, method, k: int) -> None:
        self.method, self.k = method, k
        self.before = self.after = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.k:
            self.before = (full_state(pl_module), _state(trainer, self.method))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.k + 1:
            self.after = (full_state(pl_module), _state(trainer, self.method))


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("name", list(METHODS))
def test_non_finite_loss_skips_the_step_bit_identically(name, value):
    k = 2
    cb = METHODS[name]()
    snap = Snapshot(cb, k)
    where = "logits" if isinstance(cb, DFOLoRA) else "loss"
    pl.seed_everything(0, verbose=False)
    model = Poisoned(value, (k,), where)
    trainer = tiny_trainer(max_steps=5, callbacks=[cb, snap])
    with pytest.warns(UserWarning, match=f"non-finite loss( or gradient)? at step {k}"):
        trainer.fit(model, tiny_datamodule(k=32, batch_size=8))
    (w0, s0), (w1, s1) = snap.before, snap.after
    for n in w0:
        assert torch.equal(w0[n], w1[n]), n
    l0, l1 = s0["callback"].pop("layer"), s1["callback"].pop("layer")
    if isinstance(cb, DFOLoRA) and cb.config.optimizer == "cmaes":  # skipped on the device: the turns go on
        assert l1 == (l0 + 1) % cb.dfo.lora.n_blocks
    else:  # known on the host at once (fireworks): the layer tries again
        assert l1 == l0
    assert_same(s0, s1, nan_equal=True)
    assert cb.skipped_steps == 1 and trainer.global_step == 5
    end = full_state(model) if not isinstance(cb, DFOLoRA) else None
    if end is not None:  # training continued after the skip
        assert any(not torch.equal(end[n], w1[n]) for n in end)
    else:
        assert cb.generation == 4
    assert trainer.callback_metrics["skipped_steps"] == 1


@pytest.mark.parametrize("name", ["mezo_sgd", "lomo", "clora"])
def test_a_fresh_fit_with_the_callback_reused_counts_its_own_skips(name):
    cb = METHODS[name]()
    pl.seed_everything(0, verbose=False)
    where = "logits" if isinstance(cb, DFOLoRA) else "loss"
    with pytest.warns(UserWarning, match="non-finite loss"):
        tiny_trainer(max_steps=3, callbacks=[cb]).fit(Poisoned(math.nan, (1,), where), tiny_datamodule(k=32))
    assert cb.skipped_steps == 1
    trainer = tiny_trainer(max_steps=3, callbacks=[cb])
    trainer.fit(Poisoned(math.nan, (), where), tiny_datamodule(k=32))
    assert cb.skipped_steps == 0 and cb.guard.consecutive == 0
    assert trainer.callback_metrics["skipped_steps"] == 0

    class Boom(pl.Callback):
        def on_train_batch_end(self, *args):
            raise RuntimeError("boom")

    # a fit that failed before the method learned its last check's outcome leaves it pending: not the next fit's
    with pytest.raises(RuntimeError, match="boom"):
        tiny_trainer(max_steps=3, callbacks=[Boom(), cb]).fit(Poisoned(math.nan, (0,), where), tiny_datamodule(k=32))
    trainer = tiny_trainer(max_steps=3, callbacks=[cb])
    trainer.fit(Poisoned(math.nan, (), where), tiny_datamodule(k=32))
    assert cb.skipped_steps == 0 and trainer.callback_metrics["skipped_steps"] == 0


@pytest.mark.parametrize("make", [lambda: MeZO(lr=1e-3), lambda: LOMO(lr=0.05), lambda: GaLore(**GAP)])
def test_eleven_consecutive_non_finite_steps_stop_the_fit(make):
    pl.seed_everything(0, verbose=False)
    model = Poisoned(math.nan, tuple(range(1, 30)))
    trainer = tiny_trainer(max_steps=20, callbacks=[make()])
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(NonFiniteLossError, match="learning rate"):
        trainer.fit(model, tiny_datamodule(k=32, batch_size=8))
    assert trainer.global_step <= 13  # stopped at the 11th skip (the host learns of a skip at most a step later)
    assert _shim.get_skip_backward(trainer) is False  # on_exception put the trainer back


def _fit_across_a_nan_gradient(cb, k: int, steps: int, warning: str) -> pl.Trainer:
    """Fit ``steps`` steps with ``cb`` where step ``k``'s gradient is NaN under a finite loss (warning ``warning``);
    assert that step left weights and method state bit-identical and that training went on to finite weights."""
    snap = Snapshot(cb, k)
    pl.seed_everything(0, verbose=False)
    model = Poisoned(bad_steps=(k,), where="grad")
    trainer = tiny_trainer(max_steps=steps, callbacks=[cb, snap])
    with pytest.warns(UserWarning, match=warning):
        trainer.fit(model, tiny_datamodule(k=32, batch_size=8))
    (w0, s0), (w1, s1) = snap.before, snap.after
    assert all(torch.equal(w0[m], w1[m]) for m in w0)
    s0["callback"].pop("layer"), s1["callback"].pop("layer")
    assert_same(s0, s1, nan_equal=True)
    assert trainer.global_step == steps
    end = full_state(model)
    assert all(torch.isfinite(v).all() for v in end.values()) and any(not torch.equal(end[m], w1[m]) for m in end)
    return trainer


IN_BACKWARD = {
    # LOMO leaves out the non-finite elements only (SGD is elementwise): the embedding rows of absent tokens, whose
    # gradient is 0, would take weight decay, so none here keeps the step bit-identical
    "lomo": lambda: LOMO(lr=0.05),
    "adalomo": lambda: AdaLomo(lr=0.01, weight_decay=0.1),
    "galore_layerwise": lambda: GaLore(**GAP, layerwise=True),
}


@pytest.mark.parametrize("name", list(IN_BACKWARD))
def test_in_backward_methods_leave_out_tensors_whose_gradient_is_not_finite(name):
    """LOMO, AdaLomo and layer-wise GaLore write inside backward, before the whole gradient exists. A NaN gradient
    under a finite loss (a backward kernel's bug; here it reaches every tensor) leaves each tensor out: weights and
    state bit-identical, the host counters put back, the step counted in partial_steps, and training goes on."""
    k = 3  # not a GaLore refresh step (gap 2): a refresh from a NaN gradient is retried, which changes its counters
    cb = IN_BACKWARD[name]()
    n = sum(1 for p in Poisoned().parameters() if p.requires_grad)
    trainer = _fit_across_a_nan_gradient(cb, k, 6, f"non-finite gradient at step {k} in {n} of {n} tensors")
    assert (cb.skipped_steps, cb.guard.partial_steps, cb.guard.skipped_tensors) == (0, 1, n)
    assert cb.state_dict()["skips"]["partial_steps"] == 1
    assert trainer.callback_metrics["partial_steps"] == 1  # logged once a step left tensors out


@pytest.mark.parametrize("name", list(IN_BACKWARD))
def test_eleven_steps_with_nan_gradients_in_a_row_stop_the_fit(name):
    pl.seed_everything(0, verbose=False)
    model = Poisoned(bad_steps=tuple(range(1, 30)), where="grad")
    trainer = tiny_trainer(max_steps=20, callbacks=[IN_BACKWARD[name]()])
    with pytest.warns(UserWarning, match="non-finite gradient"), pytest.raises(NonFiniteLossError) as err:
        trainer.fit(model, tiny_datamodule(k=32, batch_size=8))
    assert "some tensors' gradient was not finite for 11 steps in a row" in str(err.value)
    assert "no longer finite" not in str(err.value)  # every update from a NaN gradient was left out
    assert all(torch.isfinite(v).all() for v in full_state(model).values())
    assert trainer.global_step <= 13


def test_the_error_says_when_the_weights_are_no_longer_finite():
    """The note NonFiniteLossError adds names the first non-finite weight and a known cause (cuDNN attention)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    assert nonfinite_weights_note(model) == ""
    with torch.no_grad():
        model[1].weight[0, 0] = math.nan
    note = nonfinite_weights_note(model)
    assert "no longer finite (1 tensors, 1.weight first)" in note and "enable_cudnn_sdp(False)" in note


def test_galore_skips_a_step_whose_gradient_is_not_finite():
    """GaLore (not layer-wise) has the whole gradient before it writes: a NaN one under a finite loss is skipped
    like a NaN loss, weights and state bit-identical, and training goes on."""
    k = 2
    cb = GaLore(**GAP)
    _fit_across_a_nan_gradient(cb, k, 5, f"GaLore: non-finite loss or gradient at step {k}")
    assert cb.skipped_steps == 1


def test_a_skipped_first_adafactor_step_leaves_no_step_counter():
    """Adafactor creates its ``step`` in the first step: a skip left it at 1, its beta2 schedule one step ahead."""
    from lightning_memopt.testing.workers import NaNGradAt

    model = tiny_model()
    cb = GaLore(rank=4, optimizer="adafactor", moments="keep")
    trainer = tiny_trainer(max_steps=1, callbacks=[cb, NaNGradAt("model.model.layers.1.mlp.down_proj", step=0)])
    trainer.fit(model, tiny_datamodule(k=4))
    assert cb.skipped_steps == 1
    assert "step" not in trainer.strategy.optimizers[0].state[model.model.model.embed_tokens.weight]


def test_two_method_callbacks_are_refused():
    trainer = tiny_trainer(max_steps=1, callbacks=[MeZO(), LOMO()])
    with pytest.raises(MisconfigurationException, match="Two method callbacks.*MeZO and LOMO|LOMO and MeZO"):
        trainer.fit(Poisoned(), tiny_datamodule(k=8))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MeZO(lr=-1.0), "lr must be >= 0"),
        (lambda: MeZO(lr=math.nan), "lr must be finite"),
        (lambda: LOMO(lr=-1.0), "lr must be >= 0"),
        (lambda: LOMO(lr=math.nan), "lr must be finite"),
        (lambda: AdaLomo(lr=-1.0), "lr must be >= 0"),
        (lambda: AdaLomo(lr=math.inf), "lr must be finite"),
        (lambda: MeZO(eps=0.0), "eps must be > 0"),
        (lambda: MeZO(eps=math.nan), "eps must be finite"),
        (lambda: AdaLomo(eps_scale=0.0), "eps_scale must be > 0"),
        (lambda: AdaLomo(eps_sq=math.nan), "eps_sq must be finite"),
        (lambda: DFOLoRA(sigma=math.nan), "sigma must be finite"),
        (lambda: DFOLoRA(sigma=-1.0), "sigma must be > 0"),
        (lambda: DFOLoRA(target_pattern="(q_proj"), r"target_pattern='\(q_proj' is not a regular expression"),
        (lambda: DFOLoRA(population=3), r"optimizer='cmaes' needs population >= 4"),
        (lambda: GaLore(rank=0), "rank must be an integer >= 1"),
        (lambda: GaLore(target_modules="["), r"target_modules='\[' is not a regular expression"),
        (lambda: GaLore(exclude_modules="("), r"exclude_modules='\(' is not a regular expression"),
        (lambda: GaLore(scale=math.nan), "scale must be finite"),
        (lambda: MeZO(max_consecutive_skips=-1), "max_consecutive_skips"),
        (lambda: MeZO(n_spsa=1.5), "n_spsa must be an integer >= 1"),
        (lambda: MeZO(window=2.5), "window must be an integer >= 1"),
        # text, None and nan get the named message, not int()'s (it said "invalid literal for int()")
        (lambda: MeZO(n_spsa="four"), "n_spsa must be an integer >= 1, got 'four'"),
        (lambda: GaLore(update_proj_gap=None), "update_proj_gap must be an integer >= 1, got None"),
        (lambda: LOMO(loss_scale_window=math.nan), "loss_scale_window must be an integer >= 1, got nan"),
        (lambda: MeZO(eps="small"), "eps must be a number"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_galore_rank_larger_than_the_matrix_is_clamped_and_logged(caplog):
    cb = GaLore(rank=1000, update_proj_gap=2)
    with pytest.warns(UserWarning, match=r"rank=1000\) is larger than the smaller side .* clamped"):
        tiny_trainer(max_steps=1, callbacks=[cb]).fit(Poisoned(), tiny_datamodule(k=8))
    shapes = {id(p): tuple(p.shape) for p in cb.module.parameters()}
    assert cb.galore.ranks() == {i: min(shapes[i]) for i in cb.galore.ranks()}  # each clamped to its smaller side


# ---- checkpoints --------------------------------------------------------------------------------------------------
def _checkpoint(tmp_path, callbacks, steps: int = 2) -> str:
    pl.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(tmp_path, every_n_train_steps=steps, save_top_k=-1)
    trainer = tiny_trainer(max_steps=steps, callbacks=[*callbacks, ckpt], enable_checkpointing=True)
    trainer.fit(Poisoned(), tiny_datamodule(k=8))
    return str(next(tmp_path.glob(f"*step={steps}.ckpt")))


def _resume(path: str, callbacks, steps: int = 4):
    pl.seed_everything(0, verbose=False)
    trainer = tiny_trainer(max_steps=steps, callbacks=callbacks)
    trainer.fit(Poisoned(), tiny_datamodule(k=8), ckpt_path=path)
    return trainer


@pytest.mark.parametrize(
    ("written", "resumed", "match"),
    [
        (lambda: [GaLore(**GAP)], lambda: [AdaLomo(lr=0.01)], r"written by GaLore, and this run uses AdaLomo"),
        (lambda: [], lambda: [LOMO(lr=0.05)], r"plain optimizer's state .* LOMO"),
        (lambda: [MeZO(lr=1e-3)], lambda: [LOMO(lr=0.05)], r"written by MeZO, and this run uses LOMO"),
        (lambda: [AdaLomo(lr=0.01)], lambda: [], r"written by AdaLomo.*Resume with AdaLomo"),
        (lambda: [GaLore(**GAP)], lambda: [], r"written by GaLore.*Resume with GaLore"),
        (lambda: [DFOLoRA(**DFO_KW)], lambda: [MeZO()], r"written by DFOLoRA, and this run uses MeZO"),
    ],
)
def test_foreign_checkpoints_are_refused_naming_both(tmp_path, written, resumed, match):
    path = _checkpoint(tmp_path, written())
    with pytest.raises(MisconfigurationException, match=match) as err:
        _resume(path, resumed())
    assert "weights only" in str(err.value) and "load_from_checkpoint" in str(err.value)


@pytest.mark.parametrize(
    ("written", "resumed", "what"),
    [
        (lambda: GaLore(rank=4), lambda: GaLore(rank=8), "rank"),
        (lambda: MeZO(variant="momentum"), lambda: MeZO(variant="adam"), "variant"),
        (lambda: MeZO(eps=1e-3), lambda: MeZO(eps=1e-2), "eps"),
        (lambda: MeZO(variant="momentum", window=3), lambda: MeZO(variant="momentum", window=5), "window"),
        (lambda: DFOLoRA(**DFO_KW), lambda: DFOLoRA(**{**DFO_KW, "rank": 2}), "rank"),
        (lambda: DFOLoRA(**DFO_KW), lambda: DFOLoRA(**{**DFO_KW, "seed": 1}), "seed"),
        (lambda: DFOLoRA(**DFO_KW), lambda: DFOLoRA(**{**DFO_KW, "init_scale": 0.5}), "init_scale"),
        (lambda: DFOLoRA(**DFO_KW), lambda: DFOLoRA(**{**DFO_KW, "d": 30}), "d"),
        (lambda: DFOLoRA(**DFO_KW), lambda: DFOLoRA(**{**DFO_KW, "sigma": 0.5}), "sigma"),  # the maps scale by it
        (lambda: DFOLoRA(**DFO_KW), lambda: DFOLoRA(**{**DFO_KW, "optimizer": "fireworks", "n_fireworks": 3}),
         "optimizer"),
    ],
)
def test_changed_settings_that_change_the_state_are_refused(tmp_path, written, resumed, what):
    path = _checkpoint(tmp_path, [written()])
    with pytest.raises(MisconfigurationException, match=rf"other settings .*{what}: checkpoint"):
        _resume(path, [resumed()])


def test_a_changed_lr_is_allowed_logged_and_used(tmp_path, caplog):
    import logging

    path = _checkpoint(tmp_path, [LOMO(lr=0.05)])
    seen = []

    class Lr(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.strategy.optimizers[0].param_groups[0]["lr"])

    with caplog.at_level(logging.INFO):
        _resume(path, [LOMO(lr=0.01), Lr()])
    assert "lr 0.05 -> 0.01" in caplog.text
    assert seen and all(lr == pytest.approx(0.01) for lr in seen)


class _Scheduled(TinyLM):
    """TinyLM whose SGD(lr=0.1) follows the scheduler ``make(optimizer)`` builds, stepped every batch."""

    def __init__(self, make, lr=0.1):
        super().__init__(lr=lr)
        self.make = make

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.make(opt), "interval": "step"}}


class _Lrs(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(float(trainer.strategy.optimizers[0].param_groups[0]["lr"]))


L = torch.optim.lr_scheduler
SCHEDULES = {
    "linear_warmup": lambda o: L.LinearLR(o, start_factor=0.1, total_iters=3),
    "warmup_then_cosine": lambda o: L.SequentialLR(
        o, [L.LinearLR(o, start_factor=0.1, total_iters=2), L.CosineAnnealingLR(o, T_max=3)], milestones=[2]
    ),
    "one_cycle": lambda o: L.OneCycleLR(o, max_lr=o.param_groups[0]["lr"], total_steps=6),
    "cosine_with_floor": lambda o: L.CosineAnnealingLR(o, T_max=4, eta_min=o.param_groups[0]["lr"] / 10),
    "lambda": lambda o: L.LambdaLR(o, lambda s: min(1.0, (s + 1) / 3)),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("make", [lambda lr: MeZO(lr=lr), lambda lr: LOMO(lr=lr)], ids=["mezo", "lomo"])
def test_an_lr_override_keeps_the_schedules_shape(schedule, make):
    """MeZO(lr=0.1) on a module built with lr 1e-3 sees the lrs the same schedule gives a module built with 0.1."""
    ref, got = _Lrs(), _Lrs()
    tiny_trainer(max_steps=6, callbacks=[ref]).fit(_Scheduled(SCHEDULES[schedule], lr=0.1))
    tiny_trainer(max_steps=6, callbacks=[make(0.1), got]).fit(_Scheduled(SCHEDULES[schedule], lr=1e-3))
    assert len(set(ref.seen)) > 1
    assert got.seen == pytest.approx(ref.seen, rel=1e-6)


def test_an_lr_override_refuses_a_scheduler_it_cannot_rescale():
    class Custom(L.LRScheduler):
        def get_lr(self):
            return [1e-3 for _ in self.optimizer.param_groups]  # an lr of its own, where no override can reach

    match = r"MeZO\(lr=0.1\): .*cannot rescale Custom.*configure_optimizers"
    with pytest.raises(MisconfigurationException, match=match):
        tiny_trainer(max_steps=1, callbacks=[MeZO(lr=0.1)]).fit(_Scheduled(Custom))


@pytest.mark.parametrize("name", ["lomo", "adalomo", "galore_layerwise"])
def test_a_gradient_accumulation_scheduler_is_refused_where_accumulation_is(name):
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    trainer = tiny_trainer(max_steps=2, callbacks=[METHODS[name](), GradientAccumulationScheduler({0: 2})])
    match = r"cannot use GradientAccumulationScheduler\(scheduling=\{0: 2\}\)"
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(TinyLM())


class _OwnClipping(TinyLM):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val=1.0)


@pytest.mark.parametrize("name", ["mezo_sgd", "lomo", "adalomo", "galore_layerwise", "clora"])
def test_a_modules_own_clipping_is_refused_where_it_would_see_no_gradients(name):
    trainer = tiny_trainer(max_steps=1, callbacks=[METHODS[name]()])
    with pytest.raises(MisconfigurationException, match="_OwnClipping.configure_gradient_clipping would see no grad"):
        trainer.fit(_OwnClipping())


def test_galore_keeps_a_modules_own_clipping():
    seen = []

    class AdamWClipping(_OwnClipping):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.lr)

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            seen.append(sum(p.grad is not None for p in self.parameters()))
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    tiny_trainer(max_steps=2, callbacks=[METHODS["galore"]()]).fit(AdamWClipping())
    assert seen and all(n > 0 for n in seen)


@pytest.mark.parametrize("name", ["mezo_sgd", "lomo", "adalomo", "galore_layerwise", "clora"])
def test_a_finetuning_schedule_is_refused_where_the_trained_set_is_fixed(name):
    from lightning.pytorch.callbacks import BackboneFinetuning

    trainer = tiny_trainer(max_steps=1, callbacks=[METHODS[name](), BackboneFinetuning(unfreeze_backbone_at_epoch=1)])
    with pytest.raises(MisconfigurationException, match="so BackboneFinetuning, which unfreezes .* fit each stage"):
        trainer.fit(TinyLM())


def test_a_trainers_clip_value_lasts_one_fit():
    cb = LOMO(lr=0.05)
    tiny_trainer(max_steps=1, callbacks=[cb], gradient_clip_val=0.05).fit(TinyLM())
    assert cb.config.clip_grad_norm is None
    tiny_trainer(max_steps=1, callbacks=[cb], gradient_clip_val=1.0).fit(TinyLM())  # no conflict with 0.05
    assert cb.config.clip_grad_norm is None


# ---- trainer attributes and precisions ------------------------------------------------------------------------------
def test_dfo_resets_skip_backward_and_keeps_submodule_modes():
    model = Poisoned()
    model.model.model.layers[0].eval()  # a deliberately frozen submodule keeps its mode through DFO's forwards
    seen: list[bool] = []
    model.model.model.layers[1].register_forward_pre_hook(lambda m, a: seen.append(m.training))
    trainer = tiny_trainer(max_steps=2, callbacks=[DFOLoRA(**DFO_KW)], limit_val_batches=0)
    trainer.fit(model, tiny_datamodule(k=8))
    # eval mode (no dropout) in every statistics and fitness forward; the module's own training_step (once a step,
    # for train_loss) in its own mode
    assert len(seen) > 2 and seen.count(True) == 2
    assert _shim.get_skip_backward(trainer) is False
    assert model.model.model.layers[0].training is False and model.model.model.layers[1].training is True


@pytest.mark.parametrize(
    ("name", "precision"),
    [
        ("mezo_sgd", "bf16-mixed"), ("mezo_sgd", "bf16-true"), ("mezo_sgd", "32-true"),
        ("lomo", "bf16-true"), ("lomo", "bf16-mixed"), ("lomo", "16-true"),
        ("adalomo", "bf16-true"), ("adalomo", "16-true"),
        ("galore", "bf16-mixed"), ("galore", "bf16-true"), ("galore", "32-true"),
        ("clora", "bf16-true"), ("clora", "bf16-mixed"), ("flora", "bf16-true"),
    ],
)
def test_every_precision_the_refusals_recommend_trains(name, precision):
    cb = METHODS[name]()
    pl.seed_everything(0, verbose=False)
    model = Poisoned()
    trainer = tiny_trainer(max_steps=2, precision=precision, callbacks=[cb])
    trainer.fit(model, tiny_datamodule(k=8))
    assert trainer.global_step == 2 and cb.skipped_steps == 0
    assert all(torch.isfinite(v).all() for v in full_state(model).values())


def test_dfo_statistics_do_not_shift_a_seeded_shuffled_loader():
    class Seeded(pl.LightningDataModule):
        def __init__(self, dm):
            super().__init__()
            self.dm = dm

        def setup(self, stage=None):
            self.dm.trainer = self.trainer
            self.dm.setup(stage)
            self.label_token_ids = self.dm.label_token_ids

        def train_dataloader(self):
            loader = self.dm.train_dataloader()
            return torch.utils.data.DataLoader(
                loader.dataset, batch_size=8, shuffle=True, collate_fn=loader.collate_fn,
                generator=torch.Generator().manual_seed(7),
            )

    class Batches(pl.Callback):
        def __init__(self):
            self.first = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.first.append(batch["input_ids"].clone())

    runs = []
    for cbs in ([], [DFOLoRA(**{**DFO_KW, "stat_batches": 3})]):
        rec = Batches()
        pl.seed_everything(0, verbose=False)
        tiny_trainer(max_steps=3, callbacks=[*cbs, rec]).fit(Poisoned(), Seeded(tiny_datamodule(k=32)))
        runs.append(rec.first)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_weight_decay_means_the_same_in_every_method():
    from lightning_memopt.core.holder import weight_decays

    model = Poisoned(weight_decay=0.3)
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    names = {id(p): n for n, p in model.named_parameters()}
    over = weight_decays(model, opt, 0.1)
    assert all(v == (0.1 if p.ndim >= 2 and "norm" not in names[id(p)] else 0.0)
               for g in opt.param_groups for p in g["params"] for v in [over[id(p)]])
    own = weight_decays(model, opt, None)
    assert {own[id(p)] for p in opt.param_groups[0]["params"]} == {0.3}
    # MeZO's update and LOMO's hooks decay exactly the same parameters
    mezo, lomo = MeZO(lr=0.0, weight_decay=0.5), LOMO(lr=0.0, weight_decay=0.5)
    for cb in (mezo, lomo):
        tiny_trainer(max_steps=1, callbacks=[cb]).fit(Poisoned(), tiny_datamodule(k=8))
    decayed_mezo = {zp.name for zp in mezo.zo.params if zp.decay}
    decayed_lomo = {names[i] for i, v in weight_decays(model, opt, 0.5).items() if v}
    assert decayed_mezo == decayed_lomo


@pytest.mark.parametrize(("cls", "config"), [(MeZO, "sst2_smollm2_mezo"), (LOMO, "sst2_smollm2_lomo"),
                                             (AdaLomo, "sst2_smollm2_adalomo")])
def test_documented_lr_ranges_hold_the_tested_configs_and_inherited_lr_is_logged(cls, config, caplog):
    import logging
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / f"{config}.yaml").read_text())
    spec = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith(cls.__name__))
    lr = spec.get("init_args", {}).get("lr") or cfg["model"]["init_args"]["lr"]
    lo, hi = cls.lr_range
    assert lo <= float(lr) <= hi
    with caplog.at_level(logging.INFO):
        tiny_trainer(max_steps=1, callbacks=[cls()]).fit(Poisoned(lr=3e-4), tiny_datamodule(k=8))
    assert f"optimizer lr 0.0003 is used; {cls.name} usually needs {lo:g} to {hi:g}" in caplog.text


def test_shipped_galore_config_passes_the_fsdp2_checks():
    from pathlib import Path
    from types import SimpleNamespace

    import yaml
    from lightning.pytorch.strategies import ModelParallelStrategy

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "galore.yaml").read_text())
    spec = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("GaLore"))
    model = Poisoned()
    strategy = ModelParallelStrategy()
    strategy.optimizers = [torch.optim.AdamW(model.parameters())]
    trainer = SimpleNamespace(strategy=strategy, precision="32-true", precision_plugin=SimpleNamespace(),
                              accumulate_grad_batches=1, gradient_clip_val=None, callbacks=[])
    GaLore(**spec["init_args"]).setup(trainer, model, "fit")  # refused before: proj_type='std' under FSDP2


def test_mezo_trajectory_leaves_out_a_skipped_step_and_still_replays():
    """The trajectory's g is read to the host in batches; a step skipped for a NaN loss is dropped from it, so a
    replay onto the starting weights still gives the trained ones."""
    from lightning_memopt.mezo import replay_trajectory

    pl.seed_everything(0, verbose=False)
    model = Poisoned(math.nan, (2,))
    start = copy.deepcopy(model)
    cb = MeZO(lr=1e-3, record_trajectory=True)
    with pytest.warns(UserWarning, match="non-finite loss at step 2"):
        tiny_trainer(max_steps=5, callbacks=[cb]).fit(model, tiny_datamodule(k=32, batch_size=8))
    steps = cb.trajectory["steps"]
    assert [s["step"] for s in steps] == [0, 1, 3, 4]
    assert all(math.isfinite(x) for s in steps for x in s["g"])
    replay_trajectory(start, cb.trajectory)
    trained, replayed = full_state(model), full_state(start)
    assert all(torch.equal(trained[n], replayed[n]) for n in trained)


@pytest.mark.parametrize("name", ["mezo_sgd", "mezo_population", "lomo", "adalomo", "galore"])
def test_lightnings_weight_averaging_averages_what_the_method_trains(name):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    def fit(*extra):
        pl.seed_everything(0, verbose=False)
        model = Poisoned()
        trainer = tiny_trainer(max_steps=3, callbacks=[METHODS[name](), *extra])
        trainer.fit(model, tiny_datamodule(k=8))
        assert trainer.global_step == 3
        return model

    last = full_state(fit())
    ema = EMAWeightAveraging(decay=0.5)
    averaged = fit(ema)
    # the fit ends on the average (copied in at train end), which is not the last iterate
    assert_same(full_state(averaged), full_state(ema._average_model.module))
    assert any(not torch.equal(v, last[k]) for k, v in full_state(averaged).items())


@pytest.mark.parametrize("name", ["mezo_sgd", "mezo_population", "lomo", "adalomo"])
def test_stochastic_weight_averaging_is_refused_where_lightnings_backward_is_skipped(name):
    # it turns the backward back on after every epoch; GaLore keeps Lightning's backward and trains with it
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    trainer = tiny_trainer(max_steps=2, callbacks=[METHODS[name](), StochasticWeightAveraging(swa_lrs=1e-3)])
    with pytest.raises(MisconfigurationException, match=r"cannot run with StochasticWeightAveraging.*EMAWeightAveraging"):
        trainer.fit(Poisoned(), tiny_datamodule(k=8))


def test_galore_trains_under_stochastic_weight_averaging():
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    trainer = tiny_trainer(max_steps=4, callbacks=[METHODS["galore"](), StochasticWeightAveraging(swa_lrs=1e-3,
                                                                                                  swa_epoch_start=1)])
    trainer.fit(Poisoned(), tiny_datamodule(k=8))
    assert trainer.global_step == 4 and trainer.current_epoch >= 1


@pytest.mark.parametrize("averaging", ["EMAWeightAveraging", "WeightAveraging", "StochasticWeightAveraging"])
def test_weight_averaging_is_refused_with_dfo_whose_adapters_are_not_parameters(averaging):
    from lightning.pytorch import callbacks

    cb = getattr(callbacks, averaging)(**({"swa_lrs": 1e-3} if averaging == "StochasticWeightAveraging" else {}))
    trainer = tiny_trainer(max_steps=2, callbacks=[METHODS["clora"](), cb])
    with pytest.raises(MisconfigurationException, match=rf"outside the module's parameters, so {averaging} .*Remove it"):
        trainer.fit(Poisoned(), tiny_datamodule(k=8))


@pytest.mark.parametrize("name", ["mezo_sgd", "lomo", "galore"])
def test_weight_averaging_of_a_sharded_model_is_refused_at_setup(name):
    # Lightning copies the module before FSDP2 shards it; its first update then failed on DTensors (2 processes).
    # setup alone, as the FSDP2 galore check above: a real FSDP2 fit would leave a process group behind
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import EMAWeightAveraging
    from lightning.pytorch.strategies import ModelParallelStrategy

    model, cb = Poisoned(), METHODS[name]()
    strategy = ModelParallelStrategy()
    strategy.optimizers = [torch.optim.AdamW(model.parameters())]
    trainer = SimpleNamespace(strategy=strategy, precision="32-true", precision_plugin=SimpleNamespace(),
                              accumulate_grad_batches=1, gradient_clip_val=None, callbacks=[cb, EMAWeightAveraging()])
    with pytest.raises(MisconfigurationException, match=r"cannot average a sharded model \(fsdp2\).*one device"):
        cb.setup(trainer, model, "fit")


class SkipsBatches(HFCausalLM):
    """The tiny model whose training_step returns None (Lightning's "skip this batch") at the steps in ``skip``."""

    def __init__(self, skip: tuple[int, ...] = (), **kw):
        kw.setdefault("lr", 1e-3)
        super().__init__(model_config=llama_config("tiny", vocab_size=256), tokenizer="builtin", **kw)
        self.skip = tuple(skip)

    def training_step(self, batch, batch_idx):
        trainer = _shim.attached_trainer(self)
        if trainer is not None and trainer.global_step in self.skip:
            return None
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("name", list(METHODS))
def test_training_step_returning_none_skips_the_step(name):
    # Lightning's contract: None skips the batch. Every method makes no update then, and training goes on.
    k = 2
    cb = METHODS[name]()
    snap = Snapshot(cb, k)
    pl.seed_everything(0, verbose=False)
    model = SkipsBatches((k,))
    trainer = tiny_trainer(max_steps=5, callbacks=[cb, snap])
    trainer.fit(model, tiny_datamodule(k=32, batch_size=8))
    (w0, s0), (w1, s1) = snap.before, snap.after
    for n in w0:
        assert torch.equal(w0[n], w1[n]), n
    assert_same(s0, s1)
    assert trainer.global_step == 5 and cb.skipped_steps == 0  # not a non-finite skip: nothing counts it
    if isinstance(cb, DFOLoRA):
        assert cb.generation == 4
    else:
        end = full_state(model)
        assert any(not torch.equal(end[n], w1[n]) for n in end)


class TinyLMSkips(TinyLM):
    def training_step(self, batch, batch_idx):
        return None if self.trainer.global_step == 1 else super().training_step(batch, batch_idx)


@pytest.mark.parametrize("make", [lambda: MeZO(lr=1e-3), METHODS["flora"]])
def test_an_ordinary_module_may_skip_a_batch_by_returning_none(make):
    # the paths that get each loss from training_step itself (DFO's fitness here too: TinyLM has no label words)
    cb = make()
    snap = Snapshot(cb, 1)
    torch.manual_seed(0)
    trainer = tiny_trainer(max_steps=3, callbacks=[cb, snap])
    trainer.fit(TinyLMSkips())
    assert_same(snap.before, snap.after)
    assert trainer.global_step == 3


def test_none_under_several_processes_is_refused_naming_the_fix():
    cb = MeZO()
    cb.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(MisconfigurationException, match="filter such batches out"):
        cb.loss_of(None)
    with pytest.raises(MisconfigurationException, match="or None to skip"):
        cb.loss_of("loss")


@pytest.mark.parametrize("first", ["validate", "test"])
@pytest.mark.parametrize("make", [lambda: [], lambda: [MeZO(lr=1e-3)]], ids=["adamw", "mezo"])
def test_a_fit_after_validate_or_test_of_the_same_module_trains_and_validates(first, make):
    """validate/test run under inference mode: the label-word ids cached there reached the fit's backward, and the
    metrics reset there could not be updated by the fit's validation (no_grad)."""
    model, dm = tiny_model(), tiny_datamodule(k=8)
    trainer = tiny_trainer(max_steps=2, callbacks=make(), limit_val_batches=1, val_check_interval=2)
    before = getattr(trainer, first)(model, dm, verbose=False)[0]
    trainer.fit(model, dm)
    assert trainer.global_step == 2
    assert trainer.callback_metrics["val_loss"] != before[{"validate": "val_loss", "test": "test_loss"}[first]]


def test_a_checkpoint_evaluated_before_a_fit_does_not_become_its_starting_state(tmp_path):
    """validate(ckpt_path=...) restores the method's state too; a later fit without ckpt_path starts fresh from the
    module's weights, as AdamW gets fresh moments (MeZO started with the checkpoint's history and step count)."""
    kw = {"lr": 1e-3, "variant": "momentum", "window": 3}
    trainer = tiny_trainer(max_steps=2, callbacks=[MeZO(**kw)])
    trainer.fit(tiny_model(), tiny_datamodule(k=8))
    trainer.save_checkpoint(tmp_path / "mezo.ckpt")
    ckpt = str(tmp_path / "mezo.ckpt")

    def fit(evaluate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        model, cb = tiny_model(), MeZO(**kw)
        model.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
        trainer = tiny_trainer(max_steps=1, callbacks=[cb], limit_val_batches=1)
        if evaluate_first:
            trainer.validate(model, tiny_datamodule(k=8), ckpt_path=ckpt, verbose=False)
        pl.seed_everything(1, verbose=False)
        trainer.fit(model, tiny_datamodule(k=8))
        return full_state(model)

    assert_same(fit(True), fit(False))


class _FreezesAtStep2(TinyLM):
    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer.global_step == 2:
            self.model.model.embed_tokens.weight.requires_grad_(False)


@pytest.mark.parametrize("name", ["mezo_sgd", "mezo_population", "lomo", "adalomo"])
def test_requires_grad_flipped_during_the_fit_is_refused(name):
    """The methods fix the trained parameters when training starts: a weight the module froze mid-fit kept moving
    under MeZO (and one unfrozen never moved), without a word."""
    with pytest.raises(MisconfigurationException, match=r"requires_grad changed during the fit for 1 parameters "
                                                        r"\(model.model.embed_tokens.weight\).*own trainer.fit"):
        tiny_trainer(max_steps=4, callbacks=[METHODS[name]()]).fit(_FreezesAtStep2())


def test_a_finetuning_schedule_is_refused_by_galore_in_either_mode():
    """GaLore picks its projected weights when the fit starts: a layer BaseFinetuning unfroze later got plain AdamW,
    and a resume lost the group it added."""
    from lightning.pytorch.callbacks import BaseFinetuning

    class Unfreeze(BaseFinetuning):
        def freeze_before_training(self, pl_module):
            self.freeze(pl_module.model.model.layers[1])

        def finetune_function(self, pl_module, epoch, optimizer):
            pass

    for layerwise in (False, True):
        with pytest.raises(MisconfigurationException, match="Unfreeze, which unfreezes .*fit each stage on its own"):
            tiny_trainer(max_steps=2, callbacks=[GaLore(layerwise=layerwise, **GAP), Unfreeze()]).fit(tiny_model())


@pytest.mark.parametrize("name", ["mezo_sgd", "lomo", "adalomo", "clora", "galore"])
def test_learning_rate_monitor_logs_only_what_the_method_uses(name):
    """LearningRateMonitor's momentum and weight-decay curves read the module's optimizer's groups: refused at setup
    where the method's update does not use them (they would plot AdamW's beta1 and decay); lr logs as before."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    from lightning_memopt.testing.tiny import ListLogger

    def fit(cb, **kw):
        pl.seed_everything(0, verbose=False)
        rec = ListLogger()
        trainer = tiny_trainer(max_steps=2, callbacks=[cb, LearningRateMonitor("step", **kw)], logger=rec,
                               log_every_n_steps=1)
        trainer.fit(Poisoned(), tiny_datamodule(k=32))
        return rec.latest()

    if name == "galore":  # GaLore-AdamW's update reads the groups' betas
        assert fit(METHODS[name](), log_momentum=True)["lr-AdamW/pg1-momentum"] == 0.9
        with pytest.raises(MisconfigurationException, match="log_momentum"):  # Adafactor keeps no momentum
            fit(GaLore(optimizer="adafactor", moments="keep", **GAP), log_momentum=True)
    else:
        with pytest.raises(MisconfigurationException, match=r"log_momentum=True\) would log the momentum"):
            fit(METHODS[name](), log_momentum=True)
    if name in ("lomo", "adalomo", "clora"):  # METHODS gives the first two their own weight_decay; DFO changes none
        with pytest.raises(MisconfigurationException, match=r"log_weight_decay=True\) would log the weight_decay"):
            fit(METHODS[name](), log_weight_decay=True)
    else:
        assert "lr-AdamW/pg1-weight_decay" in fit(METHODS[name](), log_weight_decay=True)
    assert fit(METHODS[name]())["lr-AdamW/pg1"] > 0
