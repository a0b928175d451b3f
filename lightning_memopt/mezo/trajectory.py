"""Seed-trajectory checkpoints: a fine-tuned model as (base model reference, list of (seeds, g, lr, wd)).

MeZO's update is a pure function of the step's seeds, its projected gradients and the lr/weight decay, so a run of
N steps is reproduced from a few numbers per step (kilobytes) plus the base weights. :func:`replay_trajectory`
re-applies the recorded updates with the same kernels (and the same momentum/Adam window), so on the same device
and backend the replayed weights are bit-identical to the trained ones.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor

from lightning_memopt.core.fsdp import all_reduce_, local, piece_group
from lightning_memopt.mezo.core import ZeroOrder, ZOConfig, ZOParam

VERSION = 1


def fingerprint(params: list[ZOParam]) -> float:
    """A float64 checksum of the trained weights, to catch replay onto a wrong base. Sharded weights (FSDP2, ZeRO-3):
    each rank sums its pieces and the sums are all-reduced over the group whose pieces make them whole, so every rank,
    and a replay onto the unsharded model, gets the same number to rounding; every rank must call it then."""
    whole: Tensor | float = 0.0
    pieces: dict[Any, tuple[Any, Tensor]] = {}  # id(group) -> (group, this rank's sum), in the params' order
    for zp in params:
        t = local(zp.param).detach().double()
        term = t.sum() + 1e-3 * zp.index * t.abs().sum()
        is_piece, group = piece_group(zp.param)
        if is_piece:
            g, acc = pieces.get(id(group), (group, 0.0))
            pieces[id(group)] = (g, acc + term)
        else:
            whole = whole + term
    for group, acc in pieces.values():
        whole = whole + all_reduce_(acc, group)
    return float(whole)


def new_trajectory(
    base: Any, params: list[ZOParam], config: ZOConfig, seed: int, scales: dict[int, float] | None = None
) -> dict[str, Any]:
    from dataclasses import asdict

    return {
        "scales": None if scales is None else {str(k): float(v) for k, v in scales.items()},
        "version": VERSION,
        "base": base,
        "base_fingerprint": fingerprint(params),
        "params": [[zp.name, zp.group, zp.decay] for zp in params],
        "config": asdict(config),
        "seed": int(seed),
        "steps": [],
    }


def save_trajectory(trajectory: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(trajectory, f)


def load_trajectory(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


@torch.no_grad()
def replay_trajectory(model: torch.nn.Module, trajectory: dict[str, Any] | str, check_base: bool = True) -> None:
    """Apply a recorded MeZO run to ``model`` (the base weights, same module type and names) in place.

    Args:
        model: the module the run trained (e.g. the ``HFCausalLM``), loaded with the base weights.
        trajectory: the dict from ``MeZO(record_trajectory=True).trajectory`` or a path saved by
            :func:`save_trajectory`.
        check_base: raise if the model's weights do not match the fingerprint of the run's starting weights.

    Example::

        model = HFCausalLM(model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
        replay_trajectory(model, "run.mezo.json")
    """
    traj = load_trajectory(trajectory) if isinstance(trajectory, str) else trajectory
    if traj.get("version") != VERSION:
        raise ValueError(f"Unsupported trajectory version {traj.get('version')!r} (expected {VERSION}).")
    named = dict(model.named_parameters())
    missing = [n for n, _, _ in traj["params"] if n not in named]
    if missing:
        raise ValueError(
            f"The model lacks {len(missing)} parameters of the trajectory (e.g. {missing[:3]}); pass the same kind of "
            f"module the run trained (parameter names must match)."
        )
    params = [ZOParam(n, named[n], i, int(g), bool(d)) for i, (n, g, d) in enumerate(traj["params"])]
    fp = traj.get("base_fingerprint")
    if check_base and fp is not None:
        now = fingerprint(params)
        if abs(now - fp) > 1e-6 * max(1.0, abs(fp)):
            raise ValueError(
                f"The model's weights do not match the trajectory's base (fingerprint {now} vs {fp}); load the base "
                f"model the run started from, or pass check_base=False."
            )
    scales = traj.get("scales")
    scales = None if scales is None else {int(k): float(v) for k, v in scales.items()}
    zo = ZeroOrder(model, ZOConfig(**traj["config"]), traj["seed"], params, scales=scales)
    try:
        dev = params[0].param.device
        for st in traj["steps"]:
            zo.update(st["seeds"], torch.tensor(st["g"], dtype=torch.float32, device=dev), st["lr"], st["wd"])
    finally:
        zo.close()
