"""GaLore cases: our GaLore-AdamW where the peers' anchors_gpu.py runs galore-torch.

All cases: bf16 weights, ``model(input_ids=x, labels=x).loss``, lr 1e-3, rank 128, scale 0.25, proj_type std, targets
the 2-D weights of attention and MLP (the anchors' selection: every nn.Linear but lm_head), randomized refresh.

* ``galore``: one step at the optimizer boundary, gap 200 (the timed steps are steady state, no refresh).
* ``galore_layerwise`` / ``galore_layerwise_ckpt``: updates inside backward (post-accumulate-grad hooks), without /
  with HF activation checkpointing.
* ``galore_layerwise_ckpt_all2d`` / ``galore_layerwise_ckpt_8bit_all2d``: not the anchors' setting: the embeddings
  and lm_head are projected too (their full AdamW moments are ~1 GiB at 7b), optionally with 8-bit moments.
* ``galore_refresh``: gap 1, a full step with a refresh of every matrix (the anchor's case: 1 warm-up, 2 timed).
* ``refresh_only``: only the full-model randomized refresh (gradients computed once, outside the timing).
* ``galore_refresh_p0`` / ``refresh_only_p0``: the same with ``power_iters=0`` (one QR per matrix instead of two).
* ``svd4``: exact fp32 ``torch.linalg.svd`` of the first 4 target gradients (galore-torch's refresh of 4 matrices).
* ``adamw_fused``: the reference: plain fused AdamW through the same code path (``GaLoreOptimizer`` with no targets).

Usage: ``python -m benchmarks.cases.galore CASE SIZE [BATCH] [SEQ]``; ``DEV=cpu`` smoke-tests it on the tiny model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import run_case, parse_case_args
from lightning_memopt.core.fused_backward import FusedBackward
from lightning_memopt.core.holder import HolderOptimizer
from lightning_memopt.core.nonfinite import SkipGuard
from lightning_memopt.galore.optim import GaLoreOptimizer, GaLoreSettings, select_targets


def setup(
    model: torch.nn.Module,
    gap: int,
    with_targets: bool = True,
    checkpointing: bool = False,
    power_iters: int = 1,
    optimizer: str = "adamw",
    all_2d: bool = False,
    guard: SkipGuard | None = None,
):
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rank = 128 if model.config.hidden_size >= 512 else 8
    holder = HolderOptimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3))
    if not with_targets:
        targets = []
    elif all_2d:  # embeddings and lm_head too
        targets = select_targets(model, target_modules=".", exclude_modules=None)
    else:
        targets = select_targets(model)
    moments = "reproject" if optimizer == "adamw" else "keep"
    settings = GaLoreSettings(
        rank=rank, update_proj_gap=gap, scale=0.25, power_iters=power_iters, optimizer=optimizer, moments=moments
    )
    galore = GaLoreOptimizer(holder, targets, settings, guard=guard)
    return holder, galore, targets


def normal(
    model: torch.nn.Module, x: torch.Tensor, gap: int = 200, with_targets: bool = True, power_iters: int = 1
) -> Callable[[], Any]:
    holder, galore, _ = setup(model, gap, with_targets, power_iters=power_iters)

    def step() -> None:
        model(input_ids=x, labels=x).loss.backward()
        galore.step()
        holder.zero_grad(set_to_none=True)

    return step


def layerwise(
    model: torch.nn.Module, x: torch.Tensor, checkpointing: bool, optimizer: str = "adamw", all_2d: bool = False
) -> Callable[[], Any]:
    holder, galore, _ = setup(model, 200, checkpointing=checkpointing, optimizer=optimizer, all_2d=all_2d)
    group = holder.param_groups[0]
    FusedBackward(group["params"], update=lambda p: galore.step_param(p, group))

    def step() -> None:
        model(input_ids=x, labels=x).loss.backward()

    return step


def refresh_only(model: torch.nn.Module, x: torch.Tensor, power_iters: int = 1) -> Callable[[], Any]:
    _, galore, targets = setup(model, 1, power_iters=power_iters)
    model(input_ids=x, labels=x).loss.backward()

    def step() -> None:
        for p in targets:  # make every matrix due
            galore.opt.state[p].pop("proj", None)
        galore._refresh(targets)

    return step


def svd4(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    targets = select_targets(model)
    model(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for p in targets[-4:]]  # the last layer's MLP and attention output: the largest shapes

    def step() -> None:
        for g in grads:
            torch.linalg.svd(g.float(), full_matrices=False)

    return step


CASES: dict[str, Callable[[torch.nn.Module, torch.Tensor], Callable[[], Any]]] = {
    "galore": lambda m, x: normal(m, x),
    "galore_layerwise": lambda m, x: layerwise(m, x, False),
    "galore_layerwise_ckpt": lambda m, x: layerwise(m, x, True),
    "galore_layerwise_ckpt_all2d": lambda m, x: layerwise(m, x, True, all_2d=True),
    "galore_layerwise_ckpt_8bit_all2d": lambda m, x: layerwise(m, x, True, optimizer="adamw8bit", all_2d=True),
    "galore_refresh": lambda m, x: normal(m, x, gap=1),
    "galore_refresh_p0": lambda m, x: normal(m, x, gap=1, power_iters=0),
    "refresh_only": refresh_only,
    "refresh_only_p0": lambda m, x: refresh_only(m, x, power_iters=0),
    "svd4": svd4,
    "adamw_fused": lambda m, x: normal(m, x, with_targets=False),
}


def main(argv: list[str]) -> None:
    case, size, batch, seq = parse_case_args("galore", CASES, argv)
    warm, reps = (1, 2) if case in ("galore_refresh", "galore_refresh_p0", "svd4") else (2, 5)
    run_case(case, size, batch, seq, CASES[case], warm=warm, reps=reps)


if __name__ == "__main__":
    main(sys.argv[1:])
