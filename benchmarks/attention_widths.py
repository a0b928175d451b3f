"""Which training batches of a task config are as wide as cuDNN attention's backward gets wrong (CPU only).

On Hopper, torch >= 2.11 gives NaN query gradients for a masked attention of length 64 mod 128
(lightning_memopt/models/attention.py; HFCausalLM has avoided it since 123e234). A padded batch of such a width made
AdamW, GaLore and AdaLomo fail on SST-2 seed 1. This lists, per seed, the training steps whose batch has that width
and padding, from the data alone: a run of the config that met none ran the same before the fix as after. The batch
order depends on the data seed and the epoch only, so every method of a config with the same data settings sees it.

    python -m benchmarks.attention_widths --task sst2 --model SmolLM2-135M-Instruct.Q4_1.gguf --seeds 0,1,2 \\
        --out benchmarks/results/attention_widths_sst2
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.task_results import TASKS, environment, run_args
from lightning_memopt.models.attention import cudnn_sdpa_unsafe


def unsafe_steps(task: str, method: str, seed: int, model: str, data: str, extra: tuple[str, ...] = ()
                 ) -> dict[str, Any]:
    """The training steps (from 0) of one seed whose batch cuDNN's backward gets wrong, and the widths seen
    (``extra``: more CLI arguments, as in ``task_results``)."""
    from lightning_memopt.cli import run_cli

    cli = run_cli([*run_args(task, method, seed, model, data), "--trainer.accelerator", "cpu", *extra], run=False)
    dm, trainer = cli.datamodule, cli.trainer
    dm.tokenizer = cli.model.tokenizer
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    cap = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    bad, widths, step = [], Counter(), 0
    for epoch in range(epochs):
        if cap is not None and step >= cap:
            break
        for obj in (loader.sampler, loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None)):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        for batch in loader:
            if cap is not None and step >= cap:
                break
            width = batch["input_ids"].shape[-1]
            widths[width] += 1
            if cudnn_sdpa_unsafe(width, masked=True) and bool((batch["attention_mask"] == 0).any()):
                bad.append({"step": step, "width": width})
            step += 1
    return {"task": task, "method": method, "seed": seed, "steps": step, "unsafe": bad,
            "widths": dict(sorted(widths.items()))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=list(TASKS), required=True)
    ap.add_argument("--method", default="adamw", help="a config's method (its data settings are what matter)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--model", required=True, help="the model path the configs name (its tokenizer pads)")
    ap.add_argument("--data", default=None, help="the task's data (default: ../shared/data)")
    ap.add_argument("--out", default=None, help="write <out>.json")
    args = ap.parse_args(argv)
    data = args.data or str(TASKS[args.task][0])
    recs = [unsafe_steps(args.task, args.method, int(s), args.model, data) for s in args.seeds.split(",")]
    for r in recs:
        steps = ", ".join(f"{b['step']} ({b['width']})" for b in r["unsafe"]) or "none"
        print(f"{r['task']} {r['method']} seed {r['seed']}: {r['steps']} steps; unsafe steps (width): {steps}")
    if args.out:
        env = environment(sys.argv)
        env["gpu"] = None  # the data alone: no GPU ran
        Path(args.out + ".json").write_text(json.dumps({"records": recs, "env": env}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
