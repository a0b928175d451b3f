"""MeZO resume from a mid-run checkpoint, and seed-trajectory replay."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from lightning_memopt.mezo import load_trajectory, replay_trajectory
from lightning_memopt.mezo.callback import MeZO
from lightning_memopt.testing import tiny_datamodule, tiny_model, tiny_trainer
from lightning_memopt.testing.tiny import full_state

KW = {"eps": 1e-3, "lr": 2e-3, "variant": "momentum", "window": 4, "seed": 3}


def test_resume_mid_run_ends_at_identical_weights(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    # One batch per epoch (8 examples, batch 8), so the data a step sees does not depend on how Lightning restarts
    # a dataloader: the test isolates MeZO's own state (step seeds, momentum window). Checkpoint at step 10 of 24.
    pl.seed_everything(0)
    model = tiny_model(objective="lm")
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=10)
    trainer = tiny_trainer(max_steps=24, enable_checkpointing=True, callbacks=[MeZO(**KW), ckpt_cb])
    trainer.fit(model, tiny_datamodule(k=4, batch_size=8))
    straight = full_state(model)
    ckpt = str(next(tmp_path.glob("*step=10.ckpt")))
    saved = torch.load(ckpt, weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if "MeZO" in k)["state"]
    assert len(state["history"]) == 4 and all(len(h["g"]) == 1 for h in state["history"])

    pl.seed_everything(0)
    second = tiny_model(objective="lm")  # fresh weights: the checkpoint must restore everything
    trainer = tiny_trainer(max_steps=24, callbacks=[MeZO(**KW)])
    trainer.fit(second, tiny_datamodule(k=4, batch_size=8), ckpt_path=ckpt)
    assert trainer.global_step == 24
    resumed = full_state(second)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    mid = saved["state_dict"]
    assert any(not torch.equal(straight[k], mid[k]) for k in straight)


@pytest.mark.parametrize("variant", ["sgd", "adam"])
def test_trajectory_replay_reproduces_trained_weights(tmp_path, variant):
    path = str(tmp_path / "run.mezo.json")
    pl.seed_everything(0)
    model = tiny_model(objective="lm", lr_schedule="linear", weight_decay=0.1)
    cb = MeZO(eps=1e-3, lr=2e-3, variant=variant, n_spsa=2, trajectory_path=path)
    tiny_trainer(max_steps=12, callbacks=[cb]).fit(model, tiny_datamodule(batch_size=8))
    trained = full_state(model)

    traj = load_trajectory(path)
    assert len(traj["steps"]) == 12 and traj["base"]["model_config"]["hidden_size"] == 64
    assert len(json.dumps(traj)) < 20_000  # kilobytes, not a copy of the weights
    assert traj["steps"][0]["lr"][0] > traj["steps"][-1]["lr"][0]  # the scheduler's lr was recorded

    base = tiny_model(objective="lm")
    assert any(not torch.equal(trained[k], v) for k, v in full_state(base).items())
    replay_trajectory(base, traj)
    replayed = full_state(base)
    assert all(torch.equal(trained[k], replayed[k]) for k in trained)

    with pytest.raises(ValueError, match="base"):  # replaying onto the wrong weights is caught
        replay_trajectory(base, path)


def test_recording_from_a_checkpoint_without_a_trajectory_is_refused_where_a_window_carries(tmp_path):
    """The trajectory would start at the checkpoint's weights without the momentum window it restores: its replay
    ended 0.042 away from the trained weights, the base check passing. MeZO-SGD carries no window: allowed."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    def first_half(kw: dict, out) -> str:
        pl.seed_everything(0)
        ckpt_cb = ModelCheckpoint(dirpath=out, save_top_k=-1, every_n_train_steps=4)
        tiny_trainer(max_steps=4, enable_checkpointing=True, callbacks=[MeZO(**kw), ckpt_cb]).fit(
            tiny_model(objective="lm"), tiny_datamodule(k=4, batch_size=8))
        return str(next(out.glob("*step=4.ckpt")))

    ckpt = first_half(KW, tmp_path / "momentum")
    with pytest.raises(MisconfigurationException, match="would start recording mid-run.*momentum window"):
        tiny_trainer(max_steps=6, callbacks=[MeZO(record_trajectory=True, **KW)]).fit(
            tiny_model(objective="lm"), tiny_datamodule(k=4, batch_size=8), ckpt_path=ckpt)

    sgd = {**KW, "variant": "sgd"}
    ckpt = first_half(sgd, tmp_path / "sgd")
    model, cb = tiny_model(objective="lm"), MeZO(record_trajectory=True, **sgd)
    tiny_trainer(max_steps=6, callbacks=[cb]).fit(model, tiny_datamodule(k=4, batch_size=8), ckpt_path=ckpt)
    base = tiny_model(objective="lm")
    base.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    replay_trajectory(base, cb.trajectory)
    trained, replayed = full_state(model), full_state(base)
    assert [s["step"] for s in cb.trajectory["steps"]] == [4, 5]
    assert all(torch.equal(trained[k], replayed[k]) for k in trained)


def test_a_second_fit_with_the_same_callback_records_a_trajectory_of_its_own():
    # the first fit's steps were kept and the second's appended (steps 0-3 twice), which replayed to other weights
    pl.seed_everything(0)
    model, dm = tiny_model(objective="lm"), tiny_datamodule(k=4, batch_size=8)
    cb = MeZO(record_trajectory=True, **KW)
    tiny_trainer(max_steps=4, callbacks=[cb]).fit(model, dm)
    after_first = tiny_model(objective="lm")
    after_first.load_state_dict(model.state_dict())
    tiny_trainer(max_steps=3, callbacks=[cb]).fit(model, dm)
    assert [s["step"] for s in cb.trajectory["steps"]] == [0, 1, 2]
    replay_trajectory(after_first, cb.trajectory)
    trained, replayed = full_state(model), full_state(after_first)
    assert all(torch.equal(trained[k], replayed[k]) for k in trained)
