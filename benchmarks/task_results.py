"""Fine-tune SmolLM2-135M-Instruct on a task with each method and record what a user needs to choose one.

Tasks: ``sst2`` and ``mrpc`` (classification, dev accuracy and F1) and ``squad`` (generation, dev EM and F1), each
from its configs ``configs/<task>_smollm2_<method>.yaml`` (the same configs a user runs with ``memopt fit``), with
the model path and data given here. Each (method, seed) runs in its own process. For each run it records the dev
metrics, optimizer steps, training forward passes, wall time (training only, validation excluded, beside the whole
fit), peak memory, and the validation curve against steps, training wall time and forward passes: time to accuracy.
``zero_shot`` evaluates the untouched model. Every record names the commit, the GPU and the command. A ``.gguf``
model is dequantized once into a folder beside it, which every run loads (``--keep_gguf``: the file in every run).

    python -m benchmarks.task_results --task sst2 --model ~/smol/SmolLM2-135M-Instruct.Q4_1.gguf \
        --methods zero_shot,adamw,mezo --seeds 0,1,2 --max_minutes 8 --out benchmarks/results/sst2_smollm2

A run spec is a method, or ``LABEL=METHOD`` followed by ``@``-separated CLI overrides for that run alone, e.g.
``clora_k16=clora@--data.k=16@--data.batch_size=32``; a comma inside brackets or quotes stays in its override
(``lower=mezo_pop@--model.init_args.frozen=["model.embed_tokens.*","model.layers.[0-9].*"]``). ``--max_minutes`` caps every run's fit alike (Lightning's
``max_time``). ``--jobs N`` runs N processes at once: their wall times then include the sharing (the record says so);
rerun timed curves alone.

``--best_val`` also tests the weights that had the best validation metric (validation is on held-out training
examples, never on dev), as the MeZO paper's runs select their final model; both dev results are recorded.
``--dev_curve`` (classification) adds dev accuracy to every validation point, timed as validation: the time a run
takes to reach a dev accuracy, where otherwise only the end of a run is tested on dev.

Writes ``<out>.json`` (one record per run) and ``<out>.md`` (with ``--seeds`` of more than one, a second table of
each run's dev metrics as mean ± sample std over its seeds); ``--plot`` makes PNGs from existing JSONs; ``--merge
A.json,B.json --out X`` joins the JSONs of one task's separate calls (seeds run apart) into one, with its table.
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
METHODS = ["zero_shot", "adamw", "mezo", "mezo_lora", "mezo_pop", "mezo_f1", "lomo", "adalomo", "galore", "clora", "flora"]
DATA = ROOT.parent / "shared" / "data"
# task: (default data path, CLI key the path goes to, the validation metric the curve follows, the test metrics)
TASKS = {
    "sst2": (DATA / "sst2", "data_dir", "val_acc", ("test_acc", "test_f1")),
    "mrpc": (DATA / "mrpc", "data_dir", "val_acc", ("test_acc", "test_f1")),
    "squad": (DATA / "squad" / "dev-subset.json", "data_file", "val_f1", ("test_em", "test_f1")),
}
TASK_NAMES = {"sst2": "SST-2", "mrpc": "MRPC", "squad": "SQuAD"}  # as figures and tables spell them


def config_path(task: str, method: str) -> Path:
    """``configs/<task>_smollm2_<method>.yaml`` (``zero_shot`` evaluates with the AdamW config, untrained)."""
    path = ROOT / "configs" / f"{task}_smollm2_{'adamw' if method == 'zero_shot' else method}.yaml"
    if not path.is_file():
        have = sorted(p.stem.split("_smollm2_")[1] for p in (ROOT / "configs").glob(f"{task}_smollm2_*.yaml"))
        raise SystemExit(f"no config {path.name} for method {method!r} on {task}; configs exist for {have}")
    return path


def environment(argv: list[str]) -> dict[str, Any]:
    """The commit (``MEMOPT_COMMIT`` where a device copy's git HEAD may be stale), the GPU and the command."""
    env: dict[str, Any] = {"command": " ".join(argv), "commit": os.environ.get("MEMOPT_COMMIT"), "gpu": None}
    if env["commit"] is None:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=False)
        env["commit"] = out.stdout.strip() or None
    try:
        import torch

        env["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - the record says what it knows
        pass
    return env


def dev_accuracy(trainer: Any, module: Any, datamodule: Any) -> float:
    """Accuracy of the current weights on the test split (a classification task's dev set), for a dev curve.

    A curve to read time to accuracy from, never a model selection: ``--best_val`` selects on validation only.
    """
    import torch

    from lightning_memopt.core.modes import eval_mode

    right = total = 0
    with torch.no_grad(), eval_mode(module), trainer.precision_plugin.forward_context():
        for batch in datamodule.test_dataloader():
            out = module._step(trainer.strategy.batch_to_device(batch))
            right += int((out["logits"].argmax(-1) == out["labels"]).sum())
            total += out["labels"].numel()
    return right / max(total, 1)


def run_args(task: str, method: str, seed: int, model: str, data: str) -> list[str]:
    """The CLI arguments of one run of a task config: its data and model, ``seed`` as both the global and the data
    seed, no logger, checkpoints or progress bar (``_one``, ``attention_widths`` and ``nan_grad_probe`` start here)."""
    return [
        "--config", str(config_path(task, method)), "--seed_everything", str(seed),
        "--model.model_name_or_path", model, f"--data.{TASKS[task][1]}", data, "--data.seed", str(seed),
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar",
        "false",
    ]


def _one(task: str, method: str, seed: int, model: str, data: str, extra: list[str],
         best_val: bool = False, dev_curve: bool = False) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch

    from lightning_memopt.callbacks.best_weights import BestWeights
    from lightning_memopt.cli import run_cli

    _, _, val_key, test_keys = TASKS[task]
    cli = run_cli([*run_args(task, method, seed, model, data), *extra], run=False)
    trainer, module = cli.trainer, cli.model

    class Curve(pl.Callback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.val_s = 0.0  # validation time, excluded from the curve's training wall time
            self._v0 = 0.0
            self.points: list[dict[str, float]] = []
            self.forwards = 0

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            def count(*_: Any) -> None:
                if trainer.training:
                    self.forwards += 1

            pl_module.model.register_forward_pre_hook(count)
            self.t0 = time.perf_counter()

        def count(self, trainer: Any) -> int:
            # forward-only methods count their own (graph replays and batched members pass no forward hook)
            own = [cb.evaluations for cb in trainer.callbacks if isinstance(getattr(cb, "evaluations", None), int)]
            return sum(own) if own else self.forwards

        def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
            # a run killed before its first validation still tells how far it got (every 100 steps; no sync)
            step = trainer.global_step
            if step and step % 100 == 0 and step != getattr(self, "_told", None):
                self._told = step
                wall = time.perf_counter() - self.t0
                print("TASKSTEP " + json.dumps(dict(step=step, train_s=round(wall - self.val_s, 2))), flush=True)

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            self._v0 = time.perf_counter()
            self._dev: float | None = None

        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            # here, first of the callbacks, the weights are still those validated (a weight-averaging callback
            # swaps its average back out after this)
            if dev_curve and not trainer.sanity_checking:
                self._dev = dev_accuracy(trainer, pl_module, cli.datamodule)

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            value = trainer.callback_metrics.get(val_key)  # final only after the epoch-end hooks
            point = value is not None and not trainer.sanity_checking
            extra = {"dev": self._dev} if point and self._dev is not None else {}
            self.val_s += time.perf_counter() - self._v0  # the dev curve's time counts as validation
            if point:
                wall = time.perf_counter() - self.t0
                self.points.append(dict(step=trainer.global_step, wall_s=round(wall, 2),
                                        train_s=round(wall - self.val_s, 2), val=float(value),
                                        forwards=self.count(trainer), **extra))
                # the parent keeps these if the run is killed before it reports
                print("TASKPOINT " + json.dumps(self.points[-1]), flush=True)

    curve = Curve()
    trainer.callbacks.insert(0, curve)
    # the weights of the best validation, in host memory (MeZO's official runs keep the best-validation model)
    best = BestWeights(monitor=val_key, restore=False) if best_val and method != "zero_shot" else None
    if best is not None:
        trainer.callbacks.append(best)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    if method != "zero_shot":
        trainer.fit(module, datamodule=cli.datamodule)
    fit_s = time.perf_counter() - t
    forwards = curve.count(trainer)
    # whether --max_minutes (Lightning's Timer) ended the fit: a run that shared the GPU counts in the grid only if not
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, pl.callbacks.Timer)), None)
    left = timer.time_remaining() if timer is not None and method != "zero_shot" else None
    time_capped = left is not None and left <= 0
    test = trainer.test(module, datamodule=cli.datamodule, verbose=False)[0]
    # Over fit and test (zero-shot has only the test); test forwards are no larger than training's.
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    rec = dict(task=task, method=method, seed=seed, steps=trainer.global_step, forwards=forwards,
               wall_s=round(fit_s, 1), train_s=round(fit_s - curve.val_s, 1),
               peak_gib=None if peak is None else round(peak, 3), val_metric=val_key, curve=curve.points,
               time_capped=time_capped)
    # steps a method skipped for a non-finite loss (or LOMO's clipped gradient norm): only warnings tell otherwise
    skipped = [cb.skipped_steps for cb in trainer.callbacks if isinstance(getattr(cb, "skipped_steps", None), int)]
    if skipped:
        rec["skipped_steps"] = sum(skipped)
    partial = [cb.guard.partial_steps for cb in trainer.callbacks if hasattr(getattr(cb, "guard", None), "partial_steps")]
    if any(partial):  # steps that left out tensors whose gradient was not finite (LOMO, AdaLomo, layer-wise GaLore)
        rec["partial_steps"] = sum(partial)
    rec.update({f"dev_{k[5:]}": round(100 * test.get(k, float("nan")), 2) for k in test_keys})
    if best is not None and best.best_weights is not None:
        best.restore(module)
        best_test = trainer.test(module, datamodule=cli.datamodule, verbose=False)[0]
        rec.update({f"dev_{k[5:]}_best_val": round(100 * best_test.get(k, float("nan")), 2) for k in test_keys})
        rec.update(best_val_step=best.best_step, best_val=round(100 * best.best_score, 2))
    return rec


def split_specs(methods: str) -> list[str]:
    """``--methods`` split at its top-level commas: a comma inside brackets or quotes belongs to an override's value
    (``x=mezo_pop@--model.init_args.frozen=["a.*","b.*"]``)."""
    specs, cur, depth, quote = [], [], 0, ""
    for ch in methods:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            specs.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if depth or quote:
        raise SystemExit(f"unbalanced brackets or quotes in --methods {methods!r}")
    return [*specs, "".join(cur)]


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
    cap = [f"--trainer.max_time=00:00:{args.max_minutes:02d}:00"] if args.max_minutes else []
    cmd = [sys.executable, "-u", "-m", "benchmarks.task_results", "--task", args.task, "--one", method, "--label",
           label, "--seed", str(seed), "--model", args.model, "--data", args.data,
           *(["--best_val"] if args.best_val else []), *(["--dev_curve"] if args.dev_curve else []), "--", *args.extra,
           *cap, *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), time.perf_counter()


def _collect(
    run: Run, proc: subprocess.Popen, t0: float, timeout: float, jobs: int = 1, task: str | None = None,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    label, method, overrides, seed = run
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        error = (err or out)[-1500:]
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()  # what it printed before the kill
        error = f"timeout after {timeout}s"
    lines = [ln for ln in out.splitlines() if ln.startswith("TASKRESULT ")]
    rec = json.loads(lines[-1][11:]) if lines else dict(task=task, method=method, seed=seed, error=error)
    if "error" in rec:  # a failed run keeps the validations it made, and the last step it told of
        rec["curve"] = [json.loads(ln[10:]) for ln in out.splitlines() if ln.startswith("TASKPOINT ")]
        steps = [json.loads(ln[9:]) for ln in out.splitlines() if ln.startswith("TASKSTEP ")]
        if steps:
            rec["last_step"] = steps[-1]
    # the overrides after -- are the run's too: a record that names none ran its config as it is
    rec.update(label=label, overrides=[*(extra or []), *overrides], process_s=round(time.perf_counter() - t0, 1))
    if jobs > 1:
        rec["note"] = f"ran beside up to {jobs - 1} other runs on the GPU: wall times include the sharing"
    rec["env"] = environment(sys.argv)
    return rec


def model_for_runs(model: str, keep_gguf: bool = False) -> str:
    """The model path every run loads: a ``.gguf`` file is dequantized once into a Hugging Face folder beside it
    (the same weights; ~20 s a run saved on SmolLM2), unless ``keep_gguf``."""
    if keep_gguf or not model.endswith(".gguf"):
        return model
    from lightning_memopt.fetch import dequantize_gguf

    folder = str(dequantize_gguf(model))
    print(f"runs load {folder} (dequantized once from {model}; --keep_gguf loads the file in every run)", flush=True)
    return folder


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (spec, seed) in its own process, ``args.jobs`` at a time; results in the order given."""
    # every spec parsed before anything is launched, so a typo fails at once
    todo: list[Run] = [(*parse_spec(spec), int(s)) for spec in split_specs(args.methods)
                       for s in args.seeds.split(",")]
    records: list[dict[str, Any]] = []
    running: list[tuple[Run, subprocess.Popen, float]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            run = todo.pop(0)
            running.append((run, *_launch(run, args)))
        run, proc, t0 = running.pop(0)  # the oldest: a fair wait, since all share one deadline per run
        rec = _collect(run, proc, t0, args.timeout, args.jobs, args.task, args.extra)
        records.append(rec)
        print("RUN " + json.dumps({k: v for k, v in rec.items() if k != "curve"}), flush=True)
        write(records, args.out)
    return records


def table(records: list[dict[str, Any]]) -> str:
    rows = ["| run | method | seed | dev | dev F1 (classes: macro) | steps | train forwards | train s | peak GiB | "
            "dev of the best-val weights (step) | overrides |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        label, over = r.get("label", r["method"]), " ".join(r.get("overrides", [])).replace("|", "/")
        if "error" in r:
            err = (r["error"].splitlines() or [""])[-1][:80].replace("|", "/")
            if r.get("curve"):
                last = r["curve"][-1]
                err += f"; kept its curve to step {last['step']}" + (
                    f" (dev {100 * last['dev']:.1f})" if "dev" in last else "")
            if r.get("last_step"):
                err += f"; reached step {r['last_step']['step']} in {r['last_step']['train_s']} s of training"
            rows.append(f"| {label} | {r['method']} | {r['seed']} | error: {err} | | | | | | | {over} |")
            continue
        main = r.get("dev_acc", r.get("dev_em"))
        best_key = "dev_acc_best_val" if "dev_acc" in r else "dev_em_best_val"
        best = f"{r[best_key]:.1f} ({r['best_val_step']})" if best_key in r else "—"
        notes = [f"{r[k]} steps {what}" for k, what in (("skipped_steps", "skipped"),
                                                           ("partial_steps", "left tensors out")) if r.get(k)]
        skips = f" ({', '.join(notes)})" if notes else ""
        rows.append(f"| {label} | {r['method']} | {r['seed']} | {main:.1f}{skips} | {r['dev_f1']:.1f} | "
                    f"{r['steps']} | {r['forwards']} | {r.get('train_s', r['wall_s'])} | {r['peak_gib']} | {best} | "
                    f"{over} |")
    return "\n".join(rows) + "\n"


def summary(records: list[dict[str, Any]]) -> str:
    """Per run label over its seeds: dev (and F1, and the best-validation weights' dev where recorded) as mean ± sample
    std, with the mean training time and forwards; empty when no label has two seeds. Failed runs are counted."""
    from benchmarks.results_tables import mean_std

    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault(r.get("label", r["method"]), []).append(r)
    if all(len(rs) < 2 for rs in by.values()):
        return ""

    def cell(rs: list[dict[str, Any]], key: str) -> str:
        vals = [r[key] for r in rs if key in r]
        return "—" if not vals else "{:.1f} ± {:.1f}".format(*mean_std(vals))

    rows = ["| run | seeds | failed | dev | dev F1 (classes: macro) | dev of the best-val weights | train s (mean) | "
            "train forwards (mean) |", "|---|---|---|---|---|---|---|---|"]
    for label, rs in by.items():
        ok = [r for r in rs if "error" not in r]
        main = "dev_acc" if any("dev_acc" in r for r in ok) else "dev_em"
        # records from before train_s was recorded have only the fit's wall time
        train_s, forwards = (f"{sum(r.get(k, r.get('wall_s', 0)) for r in ok) / len(ok):.1f}" if ok else "—"
                             for k in ("train_s", "forwards"))
        rows.append(f"| {label} | {len(ok)} | {len(rs) - len(ok)} | {cell(ok, main)} | {cell(ok, 'dev_f1')} | "
                    f"{cell(ok, main + '_best_val')} | {train_s} | {forwards} |")
    return "\n".join(rows) + "\n"


def report(records: list[dict[str, Any]]) -> str:
    """The per-run table, then the summary over seeds where a run has several."""
    seeds = summary(records)
    return table(records) + (f"\nOver seeds (mean ± sample std):\n\n{seeds}" if seeds else "")


def write(records: list[dict[str, Any]], out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(records, indent=1))
    Path(out + ".md").write_text(report(records))


def merge(json_paths: str, out: str) -> list[dict[str, Any]]:
    """The records of several results JSONs (a grid's device calls) in one ``<out>.json`` and ``<out>.md``, in the
    order given. Records of two tasks, or a (run, seed) in two files, are an error: nothing is silently replaced."""
    records: list[dict[str, Any]] = []
    seen: dict[tuple[str, int], str] = {}
    for f in json_paths.split(","):
        for r in json.loads(Path(f).read_text()):
            key = (r.get("label", r["method"]), r["seed"])
            if key in seen:
                raise SystemExit(f"--merge: run {key[0]!r} seed {key[1]} is in both {seen[key]} and {f}; "
                                 "drop one of the files or relabel a run")
            seen[key] = f
            records.append(r)
    tasks = {r.get("task") for r in records} - {None}
    if len(tasks) > 1:
        raise SystemExit(f"--merge: the files hold several tasks ({', '.join(sorted(tasks))}); merge one task at a time")
    write(records, out)
    return records


def plot(json_paths: str, out_dir: str, prefix: str | None = None) -> list[str]:
    """Validation metric against steps, training wall time and forward passes, and peak-memory bars, as PNGs named
    ``<prefix>_acc_vs_<x>.png`` (``prefix`` defaults to the task), from one results JSON or several, comma-separated.
    Each run's dev result is a star at its last point. Eager and k=16 runs are drawn dashed."""
    # a failed run's kept curve is drawn, without a dev star
    records = [r for f in json_paths.split(",") for r in json.loads(Path(f).read_text())
               if "error" not in r or r.get("curve")]
    return plot_records(records, out_dir, prefix)


def plot_records(records: list[dict[str, Any]], out_dir: str, prefix: str | None = None) -> list[str]:
    """:func:`plot` on records already read (one task's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    task = records[0].get("task", "sst2") if records else "sst2"
    from benchmarks.results_tables import card_name

    # the cards the runs name, as times differ between them
    gpus = {(r.get("env") or {}).get("gpu") for r in records} - {None, ""}
    cards = sorted({card_name(g) for g in gpus})
    subject = f"SmolLM2-135M on {TASK_NAMES.get(task, task)}" + (f" ({', '.join(cards)})" if cards else "")
    os.makedirs(out_dir, exist_ok=True)
    files = []
    axes = (("step", "optimizer steps"), ("wall_s", "training wall time (s)"), ("forwards", "training forward passes"))
    for x, label in axes:
        if x == "wall_s" and any("train_s" not in p for r in records for p in r.get("curve") or []):
            label = "fit wall time, incl. validation (s)"  # records from before train_s was recorded
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in records:
            pts = [p for p in r.get("curve") or [] if x in p or (x == "wall_s" and "wall_s" in p)]
            if pts:
                xs = [p.get("train_s", p["wall_s"]) if x == "wall_s" else p[x] for p in pts]
                run = r.get("label", r["method"])
                line, = ax.plot(xs, [100 * p.get("val", p.get("val_acc")) for p in pts], marker=".",
                                ls="--" if "k16" in run or "eager" in run else "-", label=f"{run} (seed {r['seed']})")
                devs = [p for p in pts if "dev" in p]  # --dev_curve
                if devs:
                    ax.plot([xs[pts.index(p)] for p in devs], [100 * p["dev"] for p in devs], ls=":",
                            color=line.get_color(), label=f"{run}: dev")
                dev = r.get("dev_acc", r.get("dev_f1"))
                if dev is not None and r["method"] != "zero_shot":
                    ax.plot(xs[-1], dev, marker="*", ms=11, color=line.get_color(), ls="")
        zs = [r.get("dev_acc", r.get("dev_f1")) for r in records if r["method"] == "zero_shot"]
        if zs:
            ax.axhline(zs[0], color="gray", ls="--", label="zero-shot (dev)")
        ax.set_xscale("log")  # short backprop runs beside long zeroth-order runs
        # plain numbers at 1, 2, 5 per decade: the default minor labels (3×10^1 ...) overlap
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(f"{label} (log scale)")
        metric = (records[0].get("val_metric", "val_acc")[4:] if records else "acc").replace("f1", "F1")
        ax.set_ylabel(f"validation {metric} (%; dotted: dev); ★ dev {metric} at the end")
        ax.set_title(f"{subject}: validation vs {label}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        f = os.path.join(out_dir, f"{prefix or task}_acc_vs_{x}.png")
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
    ax.set_title(f"{subject}: peak memory during fit")
    fig.tight_layout()
    f = os.path.join(out_dir, f"{prefix or task}_peak_memory.png")
    fig.savefig(f, dpi=110)
    plt.close(fig)
    files.append(f)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated run specs (see the module doc)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once on the one GPU (processes take turns on it: this helps host-bound runs, not "
                         "graph-replayed ones)")
    ap.add_argument("--label", help=argparse.SUPPRESS)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--model", default=os.path.expanduser("~/smol/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--keep_gguf", action="store_true",
                    help="load the .gguf file in every run instead of a folder dequantized once beside it")
    ap.add_argument("--task", choices=sorted(TASKS), default="sst2")
    ap.add_argument("--data", help="the task's data folder or file (default: ../shared/data/<task>)")
    ap.add_argument("--max_minutes", type=int, default=0, help="cap every run's fit at this many minutes")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/<task>_smollm2")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--best_val", action="store_true",
                    help="also test the weights of the best validation accuracy (kept in host memory), as MeZO's "
                         "official runs do; the record then holds dev_acc_best_val and best_val_step")
    ap.add_argument("--dev_curve", action="store_true",
                    help="classification tasks: also measure dev accuracy at every validation (timed as validation), "
                         "so the curves give time to a dev accuracy; nothing is selected on it")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--plot", metavar="JSON[,JSON...]", help="make PNG plots from results JSONs into --plot_dir")
    ap.add_argument("--merge", metavar="JSON[,JSON...]",
                    help="write the records of these JSONs (one task) as one JSON and table at --out (required)")
    ap.add_argument("--plot_dir", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--plot_prefix", help="the PNGs' name prefix (default: the task)")
    ap.add_argument("extra", nargs="*", help="extra CLI overrides after --, e.g. --trainer.max_steps=100")
    args = ap.parse_args()
    if args.dev_curve and args.task == "squad":
        ap.error("--dev_curve measures accuracy: sst2 and mrpc only")
    if args.merge and not args.out:
        ap.error("--merge needs --out (it would otherwise replace benchmarks/results/<task>_smollm2)")
    args.data = args.data or str(TASKS[args.task][0])
    args.out = args.out or str(ROOT / "benchmarks" / "results" / f"{args.task}_smollm2")
    if args.merge:
        print(report(merge(args.merge, args.out)))
    elif args.plot:
        print("\n".join(plot(args.plot, args.plot_dir, args.plot_prefix)))
    elif args.one:
        rec = _one(args.task, args.one, args.seed, args.model, args.data, args.extra, args.best_val, args.dev_curve)
        rec["label"] = args.label or args.one
        print("TASKRESULT " + json.dumps(rec), flush=True)
    else:
        args.model = model_for_runs(args.model, args.keep_gguf)
        records = run_all(args)
        print(report(records))


if __name__ == "__main__":
    main()
