"""GaLore callback on an unchanged HFCausalLM: galore-torch parity through Lightning, refresh methods, layer-wise mode,
gradient accumulation, resume, and the refusals."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_memopt.galore.callback import GaLore, select_targets
from lightning_memopt.models.configs import llama_config
from lightning_memopt.core.holder import no_decay
from lightning_memopt.models.hf import HFCausalLM
from lightning_memopt.testing.tiny import full_state, tiny_datamodule, tiny_model, tiny_trainer
from lightning_memopt.testing.workers import fit_tiny

GALORE = "lightning_memopt.galore.callback.GaLore"


def _spec(**kw):
    kw.setdefault("rank", 8)
    kw.setdefault("update_proj_gap", 3)
    return {"class_path": GALORE, "init_args": kw}


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


class GaLoreTorchModule(HFCausalLM):
    """The same module, but configure_optimizers returns galore-torch's GaLoreAdamW (same groups and settings)."""

    def configure_optimizers(self):
        from galore_torch import GaLoreAdamW

        targets = {id(p) for p in select_targets(self)}
        groups = {"decay": [], "decay_galore": [], "plain": []}
        for name, p in self.named_parameters():
            if no_decay(name) or p.ndim < 2:
                groups["plain"].append(p)
            else:
                groups["decay_galore" if id(p) in targets else "decay"].append(p)
        wd = self.hparams.weight_decay
        kw = {"rank": 8, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return GaLoreAdamW(
                [
                    {"params": groups["decay"], "weight_decay": wd},
                    {"params": groups["decay_galore"], "weight_decay": wd, **kw},
                    {"params": groups["plain"], "weight_decay": 0.0},
                ],
                lr=self.hparams.lr,
                eps=1e-8,
                no_deprecation_warning=True,
            )


def test_trajectory_matches_galore_torch_through_lightning():
    """Exact SVD + std + galore-torch arithmetic: the callback on the unchanged module follows galore-torch's
    GaLoreAdamW (returned by configure_optimizers) to 1e-5 over 8 steps with 3 refreshes and weight decay."""
    states = []
    for use_reference in (True, False):
        pl.seed_everything(0, verbose=False)
        cls = GaLoreTorchModule if use_reference else HFCausalLM
        model = cls(model_config=llama_config("tiny", vocab_size=256), tokenizer="builtin", lr=1e-3, weight_decay=0.05)
        cbs = [] if use_reference else [GaLore(rank=8, update_proj_gap=3, refresh="svd", moments="keep", hf_adamw=True)]
        trainer = tiny_trainer(max_steps=8, callbacks=cbs)
        trainer.fit(model, tiny_datamodule(k=32, batch_size=8))
        states.append(full_state(model))
    assert _max_diff(*states) < 1e-5


def test_randomized_refresh_reaches_the_exact_svd_loss():
    """The default randomized refresh trains as well as galore-torch's exact SVD on the toy task."""
    losses = {}
    for refresh in ("svd", "randomized"):
        out = fit_tiny(
            steps=40,
            callback=_spec(refresh=refresh, rank=8, update_proj_gap=10),
            model_kwargs={"lr": 3e-3},
            dm_kwargs={"k": 64, "shuffle": True},
        )
        losses[refresh] = sum(out["losses"][-10:]) / 10
        first = sum(out["losses"][:5]) / 5
        assert losses[refresh] < first - 0.05, (refresh, first, out["losses"])
    assert abs(losses["randomized"] - losses["svd"]) < 0.05, losses


def test_layerwise_equals_normal_mode_under_a_schedule():
    """Updates inside backward (post-accumulate-grad hooks) give the same weights as the step-boundary update; the LR
    schedule is counted in optimizer steps in both (galore-torch #62/#78)."""
    kw = {"steps": 8, "model_kwargs": {"lr_schedule": "linear", "warmup_steps": 3}}
    normal = fit_tiny(callback=_spec(), **kw)
    layerwise = fit_tiny(callback=_spec(layerwise=True), **kw)
    assert normal["global_step"] == layerwise["global_step"] == 8
    assert _max_diff(normal["state"], layerwise["state"]) < 1e-6
    assert normal["losses"] == pytest.approx(layerwise["losses"], abs=1e-6)


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw8bit"])
def test_other_base_optimizers_train_in_both_modes(optimizer):
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    normal = fit_tiny(steps=4, callback=_spec(optimizer=optimizer, moments="reset", update_proj_gap=2))
    layerwise = fit_tiny(
        steps=4, callback=_spec(optimizer=optimizer, moments="reset", update_proj_gap=2, layerwise=True)
    )
    assert _max_diff(normal["state"], layerwise["state"]) < 1e-6
    assert _max_diff(normal["state"], fit_tiny(steps=0)["state"]) > 1e-4


def test_layerwise_frees_gradients_and_steps_the_schedule():
    pl.seed_everything(0, verbose=False)
    model = tiny_model(lr_schedule="linear", warmup_steps=4)
    trainer = tiny_trainer(max_steps=2, callbacks=[GaLore(rank=8, layerwise=True)])
    trainer.fit(model, tiny_datamodule())
    assert all(p.grad is None for p in model.parameters())
    opt = trainer.strategy.optimizers[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 3 / 4)  # 3rd warmup value after 2 optimizer steps
    assert all(len(s) for s in opt.state.values())


def test_accumulation_in_normal_mode_equals_the_larger_batch():
    """accumulate_grad_batches=2 of 4 == one batch of 8: refreshes and updates happen at optimizer-step boundaries."""
    big = fit_tiny(steps=6, global_batch=8, callback=_spec(update_proj_gap=2))
    acc = fit_tiny(
        steps=6, global_batch=4, callback=_spec(update_proj_gap=2), trainer_kwargs={"accumulate_grad_batches": 2}
    )
    assert big["global_step"] == acc["global_step"] == 6
    assert _max_diff(big["state"], acc["state"]) < 1e-5


def test_gradient_clipping_in_normal_mode_is_applied():
    clipped = fit_tiny(steps=4, callback=_spec(), trainer_kwargs={"gradient_clip_val": 1e-3})
    free = fit_tiny(steps=4, callback=_spec())
    assert _max_diff(clipped["state"], free["state"]) > 1e-5


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_is_exact(tmp_path, optimizer):
    """N steps == N/2 steps + checkpoint + resume: projectors, moments and refresh counters come back (8-bit state
    keeps its uint8 dtype)."""
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    moments = "reproject" if optimizer == "adamw" else "keep"

    def fit(steps, ckpt=None, save=None):
        pl.seed_everything(0, verbose=False)
        model = tiny_model(lr_schedule="constant", warmup_steps=2)
        cb = GaLore(rank=8, update_proj_gap=3, optimizer=optimizer, moments=moments)
        trainer = tiny_trainer(max_steps=steps, callbacks=[cb])
        # one batch per epoch: Lightning restarts a non-stateful loader on resume, so the batches then still match
        trainer.fit(model, tiny_datamodule(k=4, batch_size=8), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return full_state(model), trainer, cb

    straight, _, cb_straight = fit(6)
    path = str(tmp_path / "half.ckpt")
    fit(3, save=path)
    saved = torch.load(path, weights_only=False)["optimizer_states"][0]["state"]
    assert any("proj" in s and torch.is_tensor(s["proj"]) for s in saved.values())
    resumed, trainer, cb = fit(6, ckpt=path)
    assert trainer.global_step == 6
    assert cb.refreshes == cb_straight.refreshes == 14 * 2
    assert _max_diff(straight, resumed) == 0.0


def test_a_changed_refresh_gap_applies_on_resume(tmp_path):
    """Resuming a gap-100 run with update_proj_gap=1 refreshes every step from then on (its state held gap 100)."""

    def fit(steps, gap, ckpt=None, save=None):
        pl.seed_everything(0, verbose=False)
        cb = GaLore(rank=4, update_proj_gap=gap)
        trainer = tiny_trainer(max_steps=steps, callbacks=[cb])
        trainer.fit(tiny_model(), tiny_datamodule(k=4, batch_size=8), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return cb, trainer

    path = str(tmp_path / "gap100.ckpt")
    first, _ = fit(2, gap=100, save=path)
    targets = first.refreshes  # each weight's first basis, at step 1
    resumed, trainer = fit(6, gap=1, ckpt=path)
    assert resumed.refreshes == targets * (1 + 4)  # then one per weight at each of steps 3-6
    gaps = {s["gap"] for s in trainer.strategy.optimizers[0].state.values() if "proj" in s}
    assert gaps == {1}


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda ps: torch.optim.Adam(ps, weight_decay=0.1),  # L2 in the gradient, not AdamW's decay
        lambda ps: torch.optim.RAdam(ps),
        lambda ps: torch.optim.NAdam(ps),
        lambda ps: torch.optim.Adamax(ps),
    ],
    ids=["adam_l2", "radam", "nadam", "adamax"],
)
def test_an_optimizer_whose_update_is_not_adamws_is_refused(optimizer):
    class Module(HFCausalLM):
        def configure_optimizers(self):
            return optimizer(self.parameters())

    model = Module(model_config=llama_config("tiny", vocab_size=256), tokenizer="builtin")
    with pytest.raises(MisconfigurationException, match="takes AdamW, or Adam without weight decay.*got"):
        tiny_trainer(max_steps=1, callbacks=[GaLore(rank=4)]).fit(model, tiny_datamodule(k=4))


def test_adam_without_weight_decay_is_adamw():
    class Module(HFCausalLM):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    model = Module(model_config=llama_config("tiny", vocab_size=256), tokenizer="builtin")
    tiny_trainer(max_steps=1, callbacks=[GaLore(rank=4)]).fit(model, tiny_datamodule(k=4))


def test_refusals_name_the_fix():
    def fit(cb, **trainer_kw):
        trainer = tiny_trainer(max_steps=1, callbacks=[cb], **trainer_kw)
        trainer.fit(tiny_model(), tiny_datamodule())

    with pytest.raises(MisconfigurationException, match="accumulate_grad_batches=1.*layerwise=False"):
        fit(GaLore(layerwise=True), accumulate_grad_batches=2)
    with pytest.raises(MisconfigurationException, match="gradient_clip_val.*layerwise=False"):
        fit(GaLore(layerwise=True), gradient_clip_val=1.0)
    with pytest.raises(MisconfigurationException, match="no 2-D weights"):
        fit(GaLore(target_modules=r"no_such_module"))
    with pytest.raises(ValueError, match="proj_type"):
        GaLore(proj_type="full")
    with pytest.raises(ValueError, match="refresh"):
        GaLore(refresh="qr")
    with pytest.raises(ValueError, match="moments"):
        GaLore(moments="drop")
    with pytest.raises(ValueError, match="moments='keep'"):
        GaLore(optimizer="adafactor")
    with pytest.raises(ValueError, match="lazy_max_gap=4 is below update_proj_gap=8"):
        GaLore(update_proj_gap=8, lazy_refresh=True, lazy_max_gap=4)
