"""Where a fit's gradient first stops being finite, and which attention backend makes it so (GPU).

``fit`` runs a task config (AdamW's by default) and prints the gradient norm every 10 steps. At the first
non-finite one it prints the batch's lengths, the parameters hit, and the loss and gradient norm of the same batch and
weights under each attention backend and in fp32, then of each row alone, and stops. ``sweep`` runs bare
``scaled_dot_product_attention`` forward and backward, with left padding, at every length up to ``--max_len``, and
prints the lengths whose gradient is not finite under the default backend, and the time of each backend at three
lengths. Found this way: the cuDNN attention bug of lightning_memopt/models/attention.py
(benchmarks/results/nan_grad_probe_h100.txt).

    python -m benchmarks.nan_grad_probe fit --task sst2 --seed 1 --model SmolLM2-135M-Instruct.Q4_1.gguf
    python -m benchmarks.nan_grad_probe sweep --max_len 299
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import torch

from benchmarks.task_results import TASKS, environment, run_args


def _norm(params: Any) -> float:
    return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def fit(task: str, method: str, seed: int, model: str, data: str, max_steps: int, extra: tuple[str, ...] = ()
        ) -> bool:
    """True if the fit reached ``max_steps`` with finite gradients (``extra``: more CLI arguments)."""
    import lightning.pytorch as pl
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lightning_memopt.cli import run_cli

    cli = run_cli([*run_args(task, method, seed, model, data), "--trainer.limit_val_batches", "0",
                   "--trainer.max_steps", str(max_steps), "--test_after_fit", "false", *extra], run=False)

    class Probe(pl.Callback):
        found = False

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, i: int) -> None:
            self.batch = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}

        def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
            step, norm = trainer.global_step, _norm(module.parameters())
            if step % 10 == 0 or not math.isfinite(norm):
                print(f"step {step}: gradient norm {norm:.4g}", flush=True)
            if math.isfinite(norm):
                return
            b, mask = self.batch, self.batch["attention_mask"]
            print(f"batch {tuple(b['input_ids'].shape)}, lengths {mask.sum(1).tolist()}")
            hit = [n for n, p in module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            print(f"{len(hit)} parameters with a non-finite gradient, first {hit[:3]}")

            def one(rows: list[int], backend: Any = None, autocast: bool = True) -> tuple[float, float]:
                module.zero_grad(set_to_none=True)
                sub = {k: (v[rows] if torch.is_tensor(v) and v.dim() and v.shape[0] == mask.shape[0] else v)
                       for k, v in b.items()}
                ctx = sdpa_kernel([backend]) if backend is not None else torch.enable_grad()
                with ctx, torch.autocast(mask.device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = module._step(sub)["loss"]
                loss.backward()
                return round(loss.item(), 4), round(_norm(module.parameters()), 4)

            every = list(range(mask.shape[0]))
            for name, kw in [("default", {}), ("math", {"backend": SDPBackend.MATH}),
                             ("efficient", {"backend": SDPBackend.EFFICIENT_ATTENTION}),
                             ("fp32 default", {"autocast": False})]:
                try:
                    print(f"the batch, {name}: loss, gradient norm = {one(every, **kw)}", flush=True)
                except RuntimeError as e:  # a backend this device lacks (the CPU has no efficient kernel)
                    print(f"the batch, {name}: {str(e).splitlines()[0][:100]}", flush=True)
            bad = [r for r in every if not all(map(math.isfinite, one([r])))]
            print(f"rows whose gradient alone is not finite: {bad}", flush=True)
            self.found = True
            trainer.should_stop = True
            module.zero_grad(set_to_none=True)  # the step goes on with no gradient: nothing is written

    probe = Probe()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    print("stopped at the first non-finite gradient" if probe.found else f"{max_steps} steps, every gradient finite")
    return not probe.found


def sweep(max_len: int) -> list[int]:
    """Lengths whose SDPA gradient is not finite under the default backend (left padding of 1, half, all but 3)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.manual_seed(0)
    bad = []
    for n in range(1, max_len + 1):
        for pad in sorted({1, n // 2, max(n - 3, 0)} - {0}):
            q, k, v = (torch.randn(2, 9, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            m = torch.ones(n, n, dtype=torch.bool, device="cuda").tril()[None, None].repeat(2, 1, 1, 1)
            m[0, :, :, :pad] = False
            sdpa(q, k, v, attn_mask=m).sum().backward()
            if not all(torch.isfinite(t.grad).all() for t in (q, k, v)):
                bad.append(n)
                break
    print(f"default backend, non-finite gradients at lengths: {bad}", flush=True)
    for n in (40, 64, 128):
        q, k, v = (torch.randn(16, 9, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        m = torch.ones(n, n, dtype=torch.bool, device="cuda").tril()[None, None].repeat(16, 1, 1, 1)
        m[::2, :, :, : n // 3] = False
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
            with sdpa_kernel([backend]):
                for i in range(30):
                    if i == 10:
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                    sdpa(q, k, v, attn_mask=m).sum().backward()
                torch.cuda.synchronize()
            print(f"length {n}, {backend.name}: {(time.perf_counter() - t) / 20 * 1e6:.0f} us forward and backward "
                  f"(16 x 9 heads x 64)", flush=True)
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    f = sub.add_parser("fit")
    f.add_argument("--task", choices=list(TASKS), default="sst2")
    f.add_argument("--method", default="adamw")
    f.add_argument("--seed", type=int, default=1)
    f.add_argument("--model", required=True)
    f.add_argument("--data", default=None, help="the task's data (default: ../shared/data)")
    f.add_argument("--max_steps", type=int, default=120)
    s = sub.add_parser("sweep")
    s.add_argument("--max_len", type=int, default=299)
    args = ap.parse_args(argv)
    if args.mode == "sweep" and not torch.cuda.is_available():
        raise SystemExit("nan_grad_probe sweep needs a CUDA GPU: the bug it looks for is in a GPU kernel")
    env = environment(sys.argv)
    print(f"commit {env['commit']}, {env['gpu']}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    if args.mode == "sweep":
        sweep(args.max_len)
        return 0
    data = args.data or str(TASKS[args.task][0])
    return 0 if fit(args.task, args.method, args.seed, args.model, data, args.max_steps) else 1


if __name__ == "__main__":
    sys.exit(main())
