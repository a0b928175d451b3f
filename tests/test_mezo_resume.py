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
