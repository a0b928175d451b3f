"""MeZO cases: ``mezo`` (our full step: 2 perturbed forwards + the update), ``mezo_perturb`` (one perturbation
pass alone, as a read of the kernel's cost), ``mezo_nocheck`` (the step without the non-finite guard) and
``mezo_pop16`` / ``mezo_pop1`` (the population estimator with 16 / 1 low-rank directions, batched).

The loss is the anchors' ``forward`` case exactly (``model(input_ids=x, labels=x).loss``, eval mode, no autograd),
so ``step / forward`` is the MeZO overhead. Usage: ``python -m benchmarks.cases.mezo CASE SIZE [BATCH] [SEQ]``
with any size of ``lightning_memopt.models.configs.LLAMA_SIZES``; ``DEV=cpu`` smoke-tests it on the tiny model.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import parse_case_args, run_case
from lightning_memopt.core import perturb
from lightning_memopt.core.population import token_losses
from lightning_memopt.mezo.core import ZeroOrder, ZOConfig


def mezo(model: torch.nn.Module, x: torch.Tensor, dist: str | None = None, check: bool = True) -> Callable[[], Any]:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    dist = dist or os.environ.get("MEZO_DIST", "normal")
    zo = ZeroOrder(model, ZOConfig(eps=1e-3, distribution=dist), seed=0, check_nonfinite=check)  # type: ignore[arg-type]
    state = {"t": 0}

    def loss() -> torch.Tensor:
        return model(input_ids=x, labels=x).loss

    def step() -> torch.Tensor:
        with torch.no_grad():
            g, value = zo.step(loss, state["t"], lr=1e-6)
        g.item()  # one host sync per step, as the official loop's .item() on the losses
        state["t"] += 1
        return value

    return step


def mezo_pop(model: torch.nn.Module, x: torch.Tensor, n: int = 16) -> Callable[[], Any]:
    """The population estimator: ``n`` rank-4 directions as 2n antithetic members, batched ``MEZO_POP_CHUNK``
    (default 8) members per forward of the repeated batch, then the chunked low-rank update."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    chunk = int(os.environ.get("MEZO_POP_CHUNK", "8")) or None
    cfg = ZOConfig(eps=1e-3, n_spsa=n, perturbation="lowrank", perturbation_rank=int(os.environ.get("MEZO_RANK", "4")),
                   batched=True, population_chunk=chunk)
    zo = ZeroOrder(model, cfg, seed=0)
    state = {"t": 0}

    def per_sample(ids: torch.Tensor) -> torch.Tensor:  # the forward case's loss, one value per row
        return token_losses(model(input_ids=ids).logits[:, :-1], ids[:, 1:]).mean(1)

    def step() -> None:
        with torch.no_grad():
            seeds = zo.seeds(state["t"])
            g, _ = zo.estimate(None, seeds, per_sample=per_sample, batch=x)
            zo.update(seeds, g, [1e-6], [0.0])
        g.sum().item()
        state["t"] += 1

    return step


def mezo_perturb(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with torch.no_grad():
            for i, p in enumerate(params):
                perturb.perturbed(p, perturb.key(7, i), 1e-3)

    return step


def mezo_fastmath(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    os.environ["MEMOPT_FAST_MATH"] = "1"  # Gaussian z with approximate log/cos/sin (same numbers up to rounding)
    return mezo(model, x, "normal")


CASES: dict[str, Callable[[torch.nn.Module, torch.Tensor], Callable[[], Any]]] = {
    "mezo": mezo,
    "mezo_fastmath": mezo_fastmath,
    "mezo_rademacher": lambda m, x: mezo(m, x, "rademacher"),
    "mezo_perturb": mezo_perturb,
    "mezo_nocheck": lambda m, x: mezo(m, x, check=False),  # the non-finite guard off: what the guard costs
    "mezo_pop16": mezo_pop,  # 16 directions per step: compare step_s with "mezo" (1 direction)
    "mezo_pop1": lambda m, x: mezo_pop(m, x, 1),
}


def main(argv: list[str]) -> None:
    case, size, batch, seq = parse_case_args("mezo", CASES, argv)
    res_extra = {
        "backend": "triton"
        if torch.cuda.is_available() and perturb.use_triton(torch.empty(1, device="cuda"))
        else "torch"
    }
    dist, fast = os.environ.get("MEZO_DIST", "normal"), os.environ.get("MEMOPT_FAST_MATH", "0")
    print(f"MEZO backend {res_extra['backend']} dist {dist} fast_math {fast}", flush=True)
    run_case(case, size, batch, seq, CASES[case])


if __name__ == "__main__":
    main(sys.argv[1:])
