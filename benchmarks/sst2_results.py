"""Fine-tune SmolLM2-135M-Instruct on SST-2 with every method and record what a user needs to choose one.

Each (method, seed) runs in its own process from ``configs/sst2_smollm2_<method>.yaml`` (the same configs a user
runs with ``memopt fit``), with the model path and data folder given here. For each run it records dev accuracy,
optimizer steps, training forward passes, wall time, peak memory, and the validation curve (accuracy against step
and wall time). ``zero_shot`` evaluates the untouched model.

    python -m benchmarks.sst2_results --model ~/smol/SmolLM2-135M-Instruct.Q4_1.gguf --data_dir ../shared/data/sst2 \
        --methods zero_shot,adamw,mezo --seeds 0 --out benchmarks/results/sst2_smollm2

A run spec is a method, or ``LABEL=METHOD`` followed by ``@``-separated CLI overrides for that run alone, e.g.
``clora_k16=clora@--data.k=16@--data.batch_size=32``. ``--jobs N`` runs N processes at once: a 135M model leaves
most of an H100 idle, so runs share it (wall times then include the sharing; note it when comparing speed).

``--best_val`` also tests the weights that had the best validation accuracy (validation is on held-out training
examples, never on dev), as the MeZO paper's runs select their final model; both dev accuracies are recorded.

Writes ``<out>.json`` (one record per run) and ``<out>.md``; ``--plot`` makes PNGs from an existing JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["zero_shot", "adamw", "mezo", "mezo_lora", "lomo", "adalomo", "galore", "clora", "flora"]


def _one(method: str, seed: int, model: str, data_dir: str, extra: list[str], best_val: bool = False) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch

    from lightning_memopt.cli import run_cli

    cfg = ROOT / "configs" / f"sst2_smollm2_{'adamw' if method == 'zero_shot' else method}.yaml"
    args = [
        "--config", str(cfg), "--seed_everything", str(seed), "--model.model_name_or_path", model,
        "--data.data_dir", data_dir, "--data.seed", str(seed), "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false", *extra,
    ]
    cli = run_cli(args, run=False)
    trainer, module = cli.trainer, cli.model

    class Curve(pl.Callback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.points: list[dict[str, float]] = []
            self.forwards = 0
            self.best: tuple[float, int, dict[str, Any]] | None = None

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            def count(*_: Any) -> None:
                if trainer.training:
                    self.forwards += 1

            pl_module.model.register_forward_pre_hook(count)
            self.t0 = time.perf_counter()

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            acc = trainer.callback_metrics.get("val_acc")
            if acc is not None and not trainer.sanity_checking:
                self.points.append(dict(step=trainer.global_step, wall_s=time.perf_counter() - self.t0,
                                        val_acc=float(acc), forwards=self.forwards))
                if best_val and (self.best is None or float(acc) > self.best[0]):
                    # the trained weights in host memory (MeZO's official runs keep the best-validation model)
                    weights = {n: p.detach().to("cpu", copy=True) for n, p in pl_module.named_parameters()
                               if p.requires_grad}
                    self.best = (float(acc), trainer.global_step, weights)

    curve = Curve()
    trainer.callbacks.append(curve)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    if method != "zero_shot":
        trainer.fit(module, datamodule=cli.datamodule)
    fit_s = time.perf_counter() - t
    test = trainer.test(module, datamodule=cli.datamodule, verbose=False)[0]
    # Over fit and test (zero-shot has only the test); test forwards are no larger than training's.
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    rec = dict(method=method, seed=seed, dev_acc=round(100 * test["test_acc"], 2),
               dev_f1=round(100 * test.get("test_f1", float("nan")), 2), steps=trainer.global_step,
               forwards=curve.forwards, wall_s=round(fit_s, 1), peak_gib=None if peak is None else round(peak, 3),
               curve=curve.points)
    if curve.best is not None:
        params = dict(module.named_parameters())
        with torch.no_grad():
            for n, w in curve.best[2].items():
                params[n].copy_(w)
        best = trainer.test(module, datamodule=cli.datamodule, verbose=False)[0]
        rec.update(dev_acc_best_val=round(100 * best["test_acc"], 2), best_val_step=curve.best[1],
                   best_val_acc=round(100 * curve.best[0], 2))
    return rec


def parse_spec(spec: str) -> tuple[str, str, list[str]]:
    """``LABEL=METHOD@OVERRIDE@...`` (or a bare method) -> (label, method, overrides)."""
    head, *overrides = spec.split("@")
    label, _, method = head.partition("=")
    method = method or label
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r} in run spec {spec!r}; methods: {', '.join(METHODS)}")
    return label, method, overrides


Run = tuple[str, str, list[str], int]  # (label, method, overrides, seed)


def _launch(run: Run, args: argparse.Namespace) -> tuple[subprocess.Popen, float]:
    label, method, overrides, seed = run
    cmd = [sys.executable, "-u", "-m", "benchmarks.sst2_results", "--one", method, "--label", label,
           "--seed", str(seed), "--model", args.model, "--data_dir", args.data_dir,
           *(["--best_val"] if args.best_val else []), "--", *args.extra, *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), time.perf_counter()


def _collect(run: Run, proc: subprocess.Popen, t0: float, timeout: float) -> dict[str, Any]:
    label, method, overrides, seed = run
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        lines = [ln for ln in out.splitlines() if ln.startswith("SST2RESULT ")]
        rec = json.loads(lines[-1][11:]) if lines else dict(method=method, seed=seed, error=(err or out)[-1500:])
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        rec = dict(method=method, seed=seed, error=f"timeout after {timeout}s")
    rec.update(label=label, overrides=overrides, process_s=round(time.perf_counter() - t0, 1))
    return rec


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (spec, seed) in its own process, ``args.jobs`` at a time; results in the order given."""
    # every spec parsed before anything is launched, so a typo fails at once
    todo: list[Run] = [(*parse_spec(spec), int(s)) for spec in args.methods.split(",") for s in args.seeds.split(",")]
    records: list[dict[str, Any]] = []
    running: list[tuple[Run, subprocess.Popen, float]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            run = todo.pop(0)
            running.append((run, *_launch(run, args)))
        run, proc, t0 = running.pop(0)  # the oldest: a fair wait, since all share one deadline per run
        rec = _collect(run, proc, t0, args.timeout)
        records.append(rec)
        print("RUN " + json.dumps({k: v for k, v in rec.items() if k != "curve"}), flush=True)
        write(records, args.out)
    return records


def table(records: list[dict[str, Any]]) -> str:
    rows = ["| run | method | seed | dev acc | dev F1 | steps | train forwards | wall s | peak GiB | dev acc of the "
            "best-val weights (step) | overrides |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        label, over = r.get("label", r["method"]), " ".join(r.get("overrides", [])).replace("|", "/")
        if "error" in r:
            err = (r["error"].splitlines() or [""])[-1][:80].replace("|", "/")
            rows.append(f"| {label} | {r['method']} | {r['seed']} | error: {err} | | | | | | | {over} |")
            continue
        best = f"{r['dev_acc_best_val']:.1f} ({r['best_val_step']})" if "dev_acc_best_val" in r else "—"
        rows.append(f"| {label} | {r['method']} | {r['seed']} | {r['dev_acc']:.1f} | {r['dev_f1']:.1f} | "
                    f"{r['steps']} | {r['forwards']} | {r['wall_s']} | {r['peak_gib']} | {best} | {over} |")
    return "\n".join(rows) + "\n"


def write(records: list[dict[str, Any]], out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(records, indent=1))
    Path(out + ".md").write_text(table(records))


def plot(json_path: str, out_dir: str) -> list[str]:
    """Accuracy against steps and against wall time, and peak-memory bars, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in json.loads(Path(json_path).read_text()) if "error" not in r]
    os.makedirs(out_dir, exist_ok=True)
    files = []
    for x, label in (("step", "optimizer steps"), ("wall_s", "wall time (s)")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in records:
            if r["curve"]:
                run = r.get("label", r["method"])
                ax.plot([p[x] for p in r["curve"]], [100 * p["val_acc"] for p in r["curve"]], marker=".",
                        ls="--" if "k16" in run else "-", label=f"{run} (seed {r['seed']})")
        zs = [r["dev_acc"] for r in records if r["method"] == "zero_shot"]
        if zs:
            ax.axhline(zs[0], color="gray", ls="--", label="zero-shot (dev)")
        ax.set_xscale("log")  # 320-step backprop runs beside 7k-step MeZO runs
        ax.set_xlabel(f"{label} (log scale)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"SmolLM2-135M on SST-2 (k=512; k=16 dashed): accuracy vs {label}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        f = os.path.join(out_dir, f"sst2_acc_vs_{x}.png")
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    mem = {}
    for r in records:
        if r.get("peak_gib") is not None:
            mem.setdefault(r.get("label", r["method"]), r["peak_gib"])
    ax.bar(list(mem), list(mem.values()), color="tab:blue")
    ax.set_ylabel("peak GPU memory (GiB)")
    ax.set_title("SmolLM2-135M on SST-2: peak memory during fit")
    fig.tight_layout()
    f = os.path.join(out_dir, "sst2_peak_memory.png")
    fig.savefig(f, dpi=110)
    plt.close(fig)
    files.append(f)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated run specs (see the module doc)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once on the one GPU")
    ap.add_argument("--label", help=argparse.SUPPRESS)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--model", default=os.path.expanduser("~/smol/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sst2_smollm2"))
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--best_val", action="store_true",
                    help="also test the weights of the best validation accuracy (kept in host memory), as MeZO's "
                         "official runs do; the record then holds dev_acc_best_val and best_val_step")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--plot", metavar="JSON", help="make PNG plots from a results JSON into --plot_dir")
    ap.add_argument("--plot_dir", default=str(ROOT / "docs" / "img"))
    ap.add_argument("extra", nargs="*", help="extra CLI overrides after --, e.g. --trainer.max_steps=100")
    args = ap.parse_args()
    if args.plot:
        print("\n".join(plot(args.plot, args.plot_dir)))
    elif args.one:
        rec = _one(args.one, args.seed, args.model, args.data_dir, args.extra, args.best_val)
        rec["label"] = args.label or args.one
        print("SST2RESULT " + json.dumps(rec), flush=True)
    else:
        records = run_all(args)
        print(table(records))


if __name__ == "__main__":
    main()
