"""Reference cases through our timing code: ``forward``, ``adamw`` and ``adamw_ckpt``.

They do what the peers' anchors_gpu.py cases of the same names do, so the two rows of each pair should agree; any gap
is the timing code's, not a method's. Usage: ``python -m benchmarks.cases.adamw CASE SIZE [BATCH] [SEQ]``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import run_case, parse_case_args


def forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    model.eval()

    def step() -> torch.Tensor:
        with torch.inference_mode():
            loss = model(input_ids=x, labels=x).loss
        loss.item()  # one host sync per step, as a loop that logs it
        return loss

    return step


def adamw(model: torch.nn.Module, x: torch.Tensor, checkpointing: bool = False) -> Callable[[], Any]:
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

    def step() -> None:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


CASES: dict[str, Callable[[torch.nn.Module, torch.Tensor], Callable[[], Any]]] = {
    "forward": forward,
    "adamw": adamw,
    "adamw_ckpt": lambda model, x: adamw(model, x, checkpointing=True),
}


def main(argv: list[str]) -> None:
    case, size, batch, seq = parse_case_args("adamw", CASES, argv)
    run_case(case, size, batch, seq, CASES[case])


if __name__ == "__main__":
    main(sys.argv[1:])
