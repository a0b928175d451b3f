"""DeepSpeed ZeRO-3 cases on one process: ours (``lightning_memopt``'s LOMO/AdaLomo fused step and MeZO on ZeRO-3
partitions, as under ``strategy="zero3"``) against lomo-optim's own ZeRO-3 path (its ``fuse_update_zero3``).

Both initialise DeepSpeed ZeRO stage 3 without an optimizer (parameter partitioning only; every parameter
partitioned, released after use) around the same random-init Llama, loss ``model(input_ids=x, labels=x).loss``, lr
1e-3, bf16 weights, no clipping. ``*_ckpt``: HF activation checkpointing. On one GPU the partition is the whole
weight, so the figures price DeepSpeed's gather/release machinery and each implementation's hook, not communication.
Usage: ``python -m benchmarks.cases.zero3 CASE SIZE [BATCH] [SEQ]``; ``DEV=cpu`` smoke-tests it (gloo).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import DEV, build, parse_case_args, report, timed

CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0},
    "bf16": {"enabled": False},
}


def _init_dist() -> None:
    import deepspeed

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29581", "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    deepspeed.init_distributed("nccl" if DEV == "cuda" else "gloo")


def _partition(model: torch.nn.Module) -> Any:
    import deepspeed

    from lightning_memopt.core.zero3 import RELEASE_ATTR

    engine, *_ = deepspeed.initialize(model=model, config=CONFIG, dist_init_required=False)
    model.__dict__[RELEASE_ATTR] = engine.optimizer.partition_all_parameters
    return engine


def ours(model: torch.nn.Module, x: torch.Tensor, rule: str, checkpointing: bool) -> Callable[[], Any]:
    from lightning_memopt.core.fsdp import reshard_all
    from lightning_memopt.lomo.core import FusedStep, LomoSettings

    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = _partition(model)
    params = [p for p in model.parameters() if p.requires_grad]
    fs = FusedStep([{"params": params, "lr": 1e-3, "weight_decay": 0.0}], {}, LomoSettings(rule=rule))

    def step() -> None:
        fs.step(model(input_ids=x, labels=x).loss)
        reshard_all(model)  # DeepSpeed leaves the embedding gathered after backward

    step.engine = engine  # type: ignore[attr-defined]
    return step


def mezo(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    from lightning_memopt.mezo.core import ZeroOrder, ZOConfig

    model.eval()
    engine = _partition(model)
    zo = ZeroOrder(model, ZOConfig(eps=1e-3), seed=0)
    state = {"t": 0}

    def step() -> None:
        with torch.no_grad():
            g, _ = zo.step(lambda: model(input_ids=x, labels=x).loss, state["t"], lr=1e-6)
        g.item()
        state["t"] += 1

    step.engine = engine  # type: ignore[attr-defined]
    return step


def lomo_optim(model: torch.nn.Module, x: torch.Tensor, rule: str, checkpointing: bool) -> Callable[[], Any]:
    from lomo_optim import AdaLomo, Lomo
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(CONFIG)  # lomo-optim asks transformers whether ZeRO-3 is on
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = _partition(model)
    opt = AdaLomo(model, lr=1e-3) if rule == "adalomo" else Lomo(model, lr=1e-3)
    if not hasattr(opt, "dp_rank"):  # lomo-optim 0.1.1's AdaLomo ZeRO-3 path reads it but never sets it (Lomo uses get_rank())
        opt.dp_rank = torch.distributed.get_rank()
    assert opt.zero3_enabled

    def step() -> None:
        opt.fused_backward(model(input_ids=x, labels=x).loss, 1e-3)
        engine.optimizer.partition_all_parameters()  # as ours: nothing left gathered between steps

    step.engine, step.keep = engine, keep  # type: ignore[attr-defined]
    return step


CASES: dict[str, Callable[[torch.nn.Module, torch.Tensor], Callable[[], Any]]] = {
    "lomo_zero3": lambda m, x: ours(m, x, "sgd", False),
    "lomo_zero3_ckpt": lambda m, x: ours(m, x, "sgd", True),
    "adalomo_zero3_ckpt": lambda m, x: ours(m, x, "adalomo", True),
    "mezo_zero3": mezo,
    "lomo_optim_zero3": lambda m, x: lomo_optim(m, x, "sgd", False),
    "lomo_optim_zero3_ckpt": lambda m, x: lomo_optim(m, x, "sgd", True),
    "adalomo_optim_zero3_ckpt": lambda m, x: lomo_optim(m, x, "adalomo", True),
}


def main(argv: list[str]) -> None:
    case, size, batch, seq = parse_case_args("zero3", CASES, argv)
    impl = "lomo-optim" if "optim" in case else "lightning_memopt"
    res: dict[str, Any] = dict(method=case, size=size, batch=batch, seq=seq, impl=impl)
    try:
        _init_dist()
        model = build(size)
        res["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
        x = torch.randint(0, model.config.vocab_size, (batch, seq), device=DEV)
        t, mem = timed(CASES[case](model, x))
        res.update(step_s=round(t, 4), peak_gib=round(mem, 2), tok_per_s=round(batch * seq / t, 1))
    except torch.OutOfMemoryError:
        res.update(step_s=None, peak_gib="OOM")
    report(res)


if __name__ == "__main__":
    main(sys.argv[1:])
