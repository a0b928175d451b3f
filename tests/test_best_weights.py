"""BestWeights: the module ends fit at the weights of its best validation, through resume and with MeZO."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_memopt import BestWeights
from lightning_memopt.mezo.callback import MeZO
from lightning_memopt.testing import run_distributed, tiny_datamodule, tiny_model, tiny_trainer
from lightning_memopt.testing.tiny import full_state
from lightning_memopt.testing.workers import ScriptedScore as Scripted


def _fit(callbacks: list, max_steps: int = 12, model=None, **kw):
    pl.seed_everything(0)
    model = model or tiny_model()
    trainer = tiny_trainer(max_steps=max_steps, val_check_interval=3, limit_val_batches=1, callbacks=callbacks, **kw)
    trainer.fit(model, tiny_datamodule(batch_size=8))
    return model, trainer


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode, best_step", [("max", 6), ("min", 3)])
def test_fit_ends_at_the_best_validation(mode, best_step):
    probe = Scripted([0.5, 0.9, 0.7, 0.6])
    cb = BestWeights(monitor="score", mode=mode)
    model, _ = _fit([probe, cb])
    assert (cb.best_step, cb.best_score) == (best_step, pytest.approx(0.9 if mode == "max" else 0.5))
    assert _equal(probe.seen[best_step], full_state(model))
    assert not _equal(probe.seen[12], full_state(model))  # training moved on after the best


def test_restore_false_keeps_the_last_weights_until_asked():
    probe = Scripted([0.5, 0.9, 0.7, 0.6])
    cb = BestWeights(monitor="score", restore=False)
    model, _ = _fit([probe, cb])
    assert _equal(probe.seen[12], full_state(model))
    cb.restore(model)
    assert _equal(probe.seen[6], full_state(model))


def test_with_mezo_only_trained_weights_are_kept():
    model = tiny_model()
    model.model.model.embed_tokens.weight.requires_grad_(False)
    probe = Scripted([0.2, 0.8, 0.1, 0.3])
    cb = BestWeights(monitor="score")
    model, _ = _fit([MeZO(eps=1e-3, lr=5e-3, seed=1), probe, cb], model=model)
    assert "model.model.embed_tokens.weight" not in cb.best_weights
    assert _equal(probe.seen[6], full_state(model))


def test_resume_keeps_the_best_from_before_the_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=9)
    probe = Scripted([0.5, 0.9, 0.7, 0.6])
    _fit([probe, BestWeights(monitor="score"), ckpt_cb], enable_checkpointing=True)
    ckpt = str(next(tmp_path.glob("*step=9.ckpt")))

    pl.seed_everything(0)
    model = tiny_model()  # fresh weights: the checkpoint brings the best weights of step 6 with it
    cb = BestWeights(monitor="score")
    trainer = tiny_trainer(max_steps=12, val_check_interval=3, limit_val_batches=1,
                           callbacks=[Scripted([0.6]), cb])
    trainer.fit(model, tiny_datamodule(batch_size=8), ckpt_path=ckpt)
    assert (cb.best_step, cb.best_score) == (6, pytest.approx(0.9))
    assert _equal(probe.seen[6], full_state(model))


def test_a_metric_validation_does_not_log_is_named():
    with pytest.raises(MisconfigurationException, match="'val_loss_typo'.*logged: .*score"):
        _fit([Scripted([0.5] * 4), BestWeights(monitor="val_loss_typo")])


def test_the_sanity_check_warns_of_a_missing_metric_before_training():
    with pytest.warns(UserWarning, match="'val_loss_typo'.*Seen in the sanity check"):
        with pytest.raises(MisconfigurationException, match="'val_loss_typo'"):
            _fit([Scripted([0.5] * 5), BestWeights(monitor="val_loss_typo")], num_sanity_val_steps=1)


def test_validation_turned_off_is_refused_at_setup():
    pl.seed_everything(0)
    trainer = tiny_trainer(max_steps=2, callbacks=[BestWeights()])  # limit_val_batches=0
    with pytest.raises(MisconfigurationException, match="limit_val_batches=0"):
        trainer.fit(tiny_model(), tiny_datamodule(batch_size=8))


def test_weight_averaging_beside_it_is_refused_at_setup():
    # validation scores the averaged weights; BestWeights would copy the training weights
    from lightning.pytorch.callbacks import EMAWeightAveraging

    with pytest.raises(MisconfigurationException, match="cannot run beside EMAWeightAveraging.*Keep one of them"):
        _fit([MeZO(lr=1e-3), BestWeights(), EMAWeightAveraging()], max_steps=3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="'max' or 'min'"):
        BestWeights(mode="maximum")
    with pytest.raises(ValueError, match="monitor"):
        BestWeights(monitor="")


def _spec(path: str, **kw) -> dict:
    return {"class_path": path, "init_args": kw}


def test_fsdp2_two_processes_end_at_the_best_shards():
    callbacks = [_spec("lightning_memopt.mezo.callback.MeZO", eps=1e-3, lr=5e-3, seed=1),
                 _spec("lightning_memopt.testing.workers.ScriptedScore", scores=[0.2, 0.8, 0.1, 0.3]),
                 _spec("lightning_memopt.BestWeights", monitor="score")]
    ranks = run_distributed("lightning_memopt.testing.workers:fit_tiny", world_size=2, steps=12, global_batch=16,
                            callbacks=callbacks, inspect="lightning_memopt.testing.workers:best_weights_result",
                            trainer_kwargs={"val_check_interval": 3, "limit_val_batches": 1})
    for r in ranks:
        assert r["best_step"] == 6 and r["mesh"] is not None  # sharded: each rank kept and restored its shards
        last = max(r["seen"])
        assert _equal(r["seen"][6], r["state"]) and not _equal(r["seen"][last], r["state"])


def test_a_one_process_checkpoint_resumed_on_two_processes_ends_at_its_best(tmp_path):
    """A one-process checkpoint holds the whole best weights; resumed under FSDP2 on 2 processes, each rank restores
    its shard of them (it copied the whole tensor into its shard: a size mismatch at the end of the fit)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    probe = Scripted([0.5, 0.9, 0.7])
    _fit([probe, BestWeights(monitor="score"), ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=9)],
         max_steps=9, enable_checkpointing=True)
    callbacks = [_spec("lightning_memopt.testing.workers.ScriptedScore", scores=[0.1]),
                 _spec("lightning_memopt.BestWeights", monitor="score")]
    ranks = run_distributed("lightning_memopt.testing.workers:fit_tiny", world_size=2, steps=12, global_batch=8,
                            callbacks=callbacks, ckpt_path=str(next(tmp_path.glob("*step=9.ckpt"))),
                            inspect="lightning_memopt.testing.workers:best_weights_result",
                            trainer_kwargs={"val_check_interval": 3, "limit_val_batches": 1})
    for r in ranks:
        assert r["best_step"] == 6 and r["mesh"] is not None and r["global_step"] == 12
        assert _equal(probe.seen[6], r["state"])


def test_a_checkpoint_without_the_weights_starts_the_best_again_and_says_so():
    cb = BestWeights(monitor="score")
    cb.load_state_dict({"best_score": 0.99, "best_step": 6})  # as a multi-process checkpoint holds it
    assert cb.best_score is None and cb.best_weights is None
    probe = Scripted([0.5, 0.9, 0.7, 0.6])
    with pytest.warns(UserWarning, match=r"does not hold the best weights from before the resume \(step 6\)"):
        model, _ = _fit([probe, cb])
    assert cb.best_step == 6 and _equal(probe.seen[6], full_state(model))  # 0.9 counts, though below 0.99


class _Adapters(pl.Callback):
    """Records DFOLoRA's z and the validation loss at each validation."""

    def __init__(self, dfo) -> None:
        self.dfo, self.z, self.val_loss = dfo, {}, {}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.z[trainer.global_step] = [z.clone() for z in self.dfo.lora.z]
            self.val_loss[trainer.global_step] = float(trainer.callback_metrics["val_loss"])


def test_dfo_lora_ends_at_the_adapters_of_the_best_validation(tmp_path):
    """DFOLoRA trains z vectors held by its callback, not module parameters: BestWeights keeps those (it refused
    DFOLoRA before), also through a checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_memopt import DFOLoRA

    def dfo():
        return DFOLoRA(d=40, population=6, budget=None, stat_batches=1)

    method = dfo()
    rec, cb = _Adapters(method), BestWeights(monitor="score")
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=9)
    model, trainer = _fit([method, Scripted([0.5, 0.9, 0.7, 0.6, 0.0]), rec, cb, ckpt_cb], enable_checkpointing=True)
    assert cb.best_step == 6 and not cb.best_weights and set(cb.best_method_tensors) == {"z.0", "z.1"}
    assert not all(torch.equal(a, b) for a, b in zip(rec.z[6], rec.z[12]))  # the search moved on after the best
    assert all(torch.equal(a, b) for a, b in zip(method.lora.z, rec.z[6]))
    best, last = rec.val_loss[6], rec.val_loss[12]
    (metrics,) = trainer.validate(model, tiny_datamodule(batch_size=8), verbose=False)
    assert abs(last - best) > 5e-6  # measured 1.5e-5
    assert metrics["val_loss"] == pytest.approx(best, abs=1e-7)  # the adapters, not only z

    # resumed from step 9 in a fresh process's objects: the best of step 6 comes with the checkpoint
    pl.seed_everything(0)
    method2, cb2 = dfo(), BestWeights(monitor="score")
    trainer = tiny_trainer(max_steps=12, val_check_interval=3, limit_val_batches=1,
                           callbacks=[method2, Scripted([0.6]), cb2])
    trainer.fit(tiny_model(), tiny_datamodule(batch_size=8), ckpt_path=str(next(tmp_path.glob("*step=9.ckpt"))))
    assert cb2.best_step == 6 and all(torch.equal(a, b) for a, b in zip(method2.lora.z, rec.z[6]))


def test_a_multi_process_checkpoint_keeps_a_best_made_only_of_method_tensors():
    # shards are per rank and stay out of the checkpoint; DFOLoRA's z is the same on every rank and whole
    cb = BestWeights(monitor="score")
    cb._world_size, cb.best_score, cb.best_step = 2, 0.9, 6
    cb.best_weights, cb.best_method_tensors = {}, {"z.0": torch.ones(3)}
    again = BestWeights(monitor="score")
    again.load_state_dict(cb.state_dict())
    assert (again.best_step, again.best_weights, again._dropped_step) == (6, {}, None)
    assert torch.equal(again.best_method_tensors["z.0"], torch.ones(3))
    cb.best_weights = {"w": torch.ones(2)}  # this rank's shard: dropped, and the best with it
    again.load_state_dict(cb.state_dict())
    assert (again.best_step, again.best_weights, again.best_method_tensors, again._dropped_step) == (None, None, {}, 6)


def test_a_best_of_other_method_tensors_is_refused_at_train_start():
    # a DFOLoRA best resumed beside another method (or another layer count) would only fail when fit ends
    cb = BestWeights(monitor="score")
    cb.load_state_dict({"best_score": 0.9, "best_step": 6, "weights": {}, "method_tensors": {"z.0": torch.ones(3)}})
    with pytest.raises(MisconfigurationException, match=r"holds a method's trained tensors \['z.0'\].*MeZO: \[\]"):
        _fit([MeZO(lr=1e-3), Scripted([0.5] * 4), cb], max_steps=3)
