"""MeZO options: n-SPSA, momentum and Adam (no parameter-sized buffer), one-sided, a non-differentiable objective."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_memopt.mezo.callback import MeZO
from lightning_memopt.testing import tiny_datamodule, tiny_model, tiny_trainer


def mean_loss(model, dm) -> float:
    model.eval()
    with torch.no_grad():
        losses = [float(model._step(b)["loss"]) for b in dm.train_dataloader()]
    return sum(losses) / len(losses)


@pytest.mark.parametrize(
    "kwargs,steps",
    [
        ({"n_spsa": 2, "lr": 2e-3}, 60),
        ({"variant": "momentum", "lr": 2e-3}, 100),
        ({"variant": "adam", "lr": 3e-3, "window": 10}, 100),
        ({"one_sided": True, "lr": 2e-3}, 100),
        ({"distribution": "rademacher", "lr": 2e-3}, 100),
    ],
)
def test_variants_lower_loss(kwargs, steps):
    pl.seed_everything(0)
    model, dm = tiny_model(objective="lm"), tiny_datamodule(batch_size=16)
    cb = MeZO(eps=1e-3, **kwargs)
    tiny_trainer(max_steps=steps, callbacks=[cb]).fit(model, dm)
    before, after = mean_loss(tiny_model(objective="lm"), dm), mean_loss(model, dm)
    assert after < before - 0.15, (kwargs, before, after)
    hist = cb.zo.history
    assert len(hist) == (1 if kwargs.get("variant", "sgd") == "sgd" else min(steps, cb.config.window))
    assert all(len(seeds) == cb.config.n_spsa and g.numel() == cb.config.n_spsa for seeds, g in hist)
    # no optimizer state and no parameter-sized buffer anywhere: the history holds only seeds and scalars
    assert all(not s for s in cb.holder.state.values())


class Blobs(pl.LightningModule):
    """A linear classifier on two Gaussian blobs whose training_step returns loss, logits and labels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(8, 2)
        w = torch.randn(8)
        x = torch.randn(512, 8)
        self.data = torch.utils.data.TensorDataset(x, (x @ w > 0).long())

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.layer(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits.detach(), "labels": y}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=128)

    def accuracy(self) -> float:
        x, y = self.data.tensors
        with torch.no_grad():
            return float((self.layer(x).argmax(-1) == y).float().mean())


def test_metric_objective_raises_accuracy():
    model = Blobs()
    before = model.accuracy()
    cb = MeZO(
        eps=0.05,
        lr=0.5,
        metric="torchmetrics.classification.MulticlassAccuracy",
        metric_kwargs={"num_classes": 2},
        n_spsa=2,
    )
    tiny_trainer(max_steps=150, callbacks=[cb]).fit(model)
    after = model.accuracy()
    assert after > before + 0.15 and after > 0.85, (before, after)
