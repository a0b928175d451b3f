"""eval_mode: every submodule in eval inside, its own mode back after; a module's own train() still runs."""

from __future__ import annotations

import pytest
import torch

from lightning_memopt.core.modes import eval_mode


class OwnTrain(torch.nn.Linear):
    calls: list[bool] = []

    def train(self, mode: bool = True):
        OwnTrain.calls.append(mode)
        return super().train(mode)


@pytest.mark.parametrize("own_train", [False, True])
def test_eval_mode_sets_every_flag_and_restores_each_own(own_train):
    layer = OwnTrain(2, 2) if own_train else torch.nn.Linear(2, 2)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Sequential(layer))
    model.train()
    model[0].eval()  # deliberately frozen in eval mode
    OwnTrain.calls = []
    before = [m.training for m in model.modules()]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        x = torch.ones(4, 2)
        assert torch.equal(model(x), model(x))  # dropout is off
    assert [m.training for m in model.modules()] == before
    assert OwnTrain.calls == ([False] if own_train else [])  # the override ran (the fast path would skip it)
    with eval_mode(model, enabled=False):
        assert [m.training for m in model.modules()] == before
