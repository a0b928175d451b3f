"""LOMO/AdaLomo cases: our fused step (``FusedStep``) where the peers' anchors_gpu.py runs lomo-optim.

``lomo`` (SGD, no activation checkpointing), ``lomo_ckpt`` and ``adalomo_ckpt`` (HF activation checkpointing), all with
``model(input_ids=x, labels=x).loss``, lr 1e-3, no clipping, bf16 weights: the anchors' cases of the same names. Also
``lomo_clip_ckpt`` (exact two-pass global-norm clipping) to price the second backward, and ``backward_floor_ckpt``:
the checkpointed forward and backward with each gradient dropped in its hook and no update, the floor of any
fused-backward step. ``adalomo_torch`` and ``adalomo_torch_ckpt`` run AdaLomo's torch version
(``MEMOPT_ADALOMO=torch``) where the others run its Triton kernels on CUDA: the two side by side.
Usage: ``python -m benchmarks.cases.lomo CASE SIZE [BATCH] [SEQ]`` with any size of
``lightning_memopt.models.configs.LLAMA_SIZES``; ``DEV=cpu`` smoke-tests it on the tiny model.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import run_case, parse_case_args
from lightning_memopt.lomo.core import FusedStep, LomoSettings


def fused(
    model: torch.nn.Module, x: torch.Tensor, rule: str, checkpointing: bool, clip: float | None = None,
    check: bool = True, torch_version: bool = False,
) -> Callable[[], Any]:
    if torch_version:  # one process per case: this run only
        os.environ["MEMOPT_ADALOMO"] = "torch"
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": 1e-3, "weight_decay": 0.0}]
    fs = FusedStep(groups, {}, LomoSettings(rule=rule, clip_grad_norm=clip), check_nonfinite=check)

    def step() -> torch.Tensor:
        loss = model(input_ids=x, labels=x).loss
        fs.step(loss)
        return loss.detach()

    return step


def backward_floor(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))

    def step() -> None:
        model(input_ids=x, labels=x).loss.backward()

    return step


CASES: dict[str, Callable[[torch.nn.Module, torch.Tensor], Callable[[], Any]]] = {
    "lomo": lambda m, x: fused(m, x, "sgd", False),
    "lomo_nocheck": lambda m, x: fused(m, x, "sgd", False, check=False),  # the non-finite guard off
    "lomo_ckpt": lambda m, x: fused(m, x, "sgd", True),
    "adalomo_ckpt": lambda m, x: fused(m, x, "adalomo", True),
    "adalomo": lambda m, x: fused(m, x, "adalomo", False),
    "adalomo_torch_ckpt": lambda m, x: fused(m, x, "adalomo", True, torch_version=True),
    "adalomo_torch": lambda m, x: fused(m, x, "adalomo", False, torch_version=True),
    "lomo_clip_ckpt": lambda m, x: fused(m, x, "sgd", True, clip=1.0),
    "backward_floor_ckpt": backward_floor,
}


def main(argv: list[str]) -> None:
    case, size, batch, seq = parse_case_args("lomo", CASES, argv)
    run_case(case, size, batch, seq, CASES[case])


if __name__ == "__main__":
    main(sys.argv[1:])
