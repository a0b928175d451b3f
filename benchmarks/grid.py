"""Issue 17's quality grid (timed on one :data:`CARD`): which (task, method, seed) cells are measured, which are
left, and the device calls that would run the rest.

A cell is done when a committed ``benchmarks/results/<task>_grid_*.json`` (``task_results``' output, one file
per device call, or their ``--merge``) holds a record of that method and seed without error or overrides that ran
either alone on the grid's card (:data:`CARD`) or, for seeds 1 and 2, on an H100 or H200 (:data:`GPUS`), alone or
beside other runs (``task_results --jobs``) without the time cap ending its fit (``time_capped: false``). Seed 0
gives the timed curves, so it runs on the card alone. Seeds 1 and 2 give dev figures only, and the two cards gave the
same ones where checked: :data:`EQUIVALENCE` holds seed-0 runs on an H100 that match the H200's every validation, dev
figure and peak. :data:`ADOPTED` names the few other files whose runs count, as a config's runs (under its earlier
name, or run outside a grid call), and :data:`SUPERSEDED` the methods whose earlier records no longer
count because their code has changed since. A shared run that finished its steps trains as a solo run
would (a solo run is faster, so the cap would not have ended it either); only its wall times include the sharing,
so the timed curves, and every training time the summary reports, come from runs alone on the card.

The estimate of a missing cell is the median ``process_s`` of the method's earlier records on that task in any
committed task JSON, the card's solo runs first (see :func:`estimates`), else ``--default_s``. The calls group one
task, seed 0 of every task first (its curves are the timed ones) and one seed to a call, within ``--budget`` seconds
each; with ``--jobs J`` the calls of seeds 1 and 2 run J cells at a time, a method missing on both seeds in one
call, and a run the grid has seen shared takes that run's time (see :func:`plan_calls`, :func:`shared_estimates`). A
cell shares only where J of its largest recorded peak fit ``--gpu_gib`` (:func:`peaks`); one never finished runs
alone first:

    python -m benchmarks.grid                  # the grid: dev per cell, or its estimate if missing
    python -m benchmarks.grid --calls          # the next device calls (benchmarks/device_run.sh task ...)
    python -m benchmarks.grid --write          # docs/results.md's grid summary from the committed JSON
    python -m benchmarks.grid --check          # exit 1 if docs/results.md's grid summary differs from the JSON
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.results_tables import mean_std
from benchmarks.task_results import TASK_NAMES

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("sst2", "mrpc", "squad")
METHODS = ("zero_shot", "adamw", "lomo", "adalomo", "galore", "mezo", "mezo_pop", "clora", "flora")
SEEDS = (0, 1, 2)
SETUP_S = 20  # a call's wheel install and the join of the model halves
RUN_TIMEOUT_S = 580  # task_results --timeout: one run's process, within a 600 s device call
# Every fit's cap (task_results --max_minutes), the same for every method. A run the cap ends must still load, test
# and write its record within one 600 s device call: at 10 minutes it could not (SQuAD's population and MRPC's run to
# the cap). No cell measured under the earlier 10-minute cap trained for more than 395 s, so this cap would have ended
# none of them (see within_cap).
CAP_MIN = 8
CAPPED_S = CAP_MIN * 60 + 40  # what a capped run takes as a process: the fit, model load and test
GPU_GIB = 79.2  # an H100's memory as torch reports it: --jobs runs must fit it
# task: (the dev metric a cell reports, its name in tables)
METRIC = {"sst2": ("dev_acc", "SST-2 dev acc"), "mrpc": ("dev_acc", "MRPC dev acc"),
          "squad": ("dev_f1", "SQuAD dev F1")}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "results.md"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # configs/<task>_smollm2_<method>.yaml: the grid's runs
# The card that times the grid: seed 0 (the plotted curves) and any run the cap ends (there the card sets the steps)
# run alone on it, so each task's figure compares like with like. The issue named the H200, but the device lent only
# H100s in the five sessions to 2026-12-06 (and naming the H200 to match an issue is not what it is lent for); the
# H100 reproduced the H200's seed-0 cells where checked (EQUIVALENCE), training 2% (AdamW) and 11% (GaLore) faster.
CARD = "H100"
KIND = "nvidia-h100-x1"  # the device kind that lends only that card
# The GPUs whose records count, by seed. An H100 (the same sm_90 kernels on as many SMs) reproduced the H200's
# seed-0 SST-2 zero-shot, AdamW and GaLore cells exactly (every validation and dev point, and the peak) at 7344dfd:
CARDS = ("H100", "H200")
GPUS = {0: (CARD,), 1: CARDS, 2: CARDS}
EQUIVALENCE = "sst2_gpu_equivalence_h100_s0.json"
# Committed runs outside the grid's files that ran a grid config as it is today: file -> {method as recorded: the
# grid's name}. sst2_pop_best_h200.json's mezo_pop32 runs (seeds 0 and 2, alone, 3f91527) ran
# configs/sst2_smollm2_mezo_pop32.yaml, which became sst2_smollm2_mezo_pop.yaml at e35ac55 with the same settings
# (only its logger's and trajectory's names changed); its seed-1 run had overrides: not a cell. EQUIVALENCE's runs
# (7344dfd, alone, with dev curves) are the grid's configs on the grid's card.
ADOPTED = {"sst2_pop_best_h200.json": {"mezo_pop32": "mezo_pop"},
           EQUIVALENCE: {m: m for m in ("zero_shot", "adamw", "galore")}}
# Methods whose code changed since some cells ran, in a way that changes their time: method -> (the first commit of
# the code as it is, why). A record of an earlier commit no longer counts, so the grid runs it again.
SUPERSEDED = {"adalomo": ("2f63a56", "AdaLomo's update runs as Triton kernels on CUDA (its torch version before)")}
START, END = "<!-- grid-summary:start (python -m benchmarks.grid --write) -->", "<!-- grid-summary:end -->"


def _records(pattern: str, results: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(results.glob(pattern)):
        data = json.loads(path.read_text())
        for rec in data if isinstance(data, list) else []:
            if isinstance(rec, dict) and "method" in rec:
                out.append(dict(rec, file=path.name))  # where it came from, for the README's provenance
    return out


def _env(rec: dict[str, Any], key: str) -> str:
    """What the record's environment says of ``key`` (``gpu``, ``commit``, ``command``); empty where it is silent."""
    return str((rec.get("env") or {}).get(key, ""))


def alone(rec: dict[str, Any]) -> bool:
    """The run had the GPU to itself (``task_results`` notes a run that shared it)."""
    return "note" not in rec


def on_card(rec: dict[str, Any]) -> bool:
    """The run ran on the grid's card (:data:`CARD`)."""
    return CARD in _env(rec, "gpu")


def timed(rec: dict[str, Any]) -> bool:
    """The run's times are the grid's: it had the grid's card to itself (seeds 1 and 2 may run on the other)."""
    return alone(rec) and on_card(rec)


@functools.lru_cache(maxsize=None)
def _descends(commit: str, since: str) -> bool:
    """``commit`` is ``since`` or comes after it in this repository's history."""
    r = subprocess.run(["git", "-C", str(RESULTS), "merge-base", "--is-ancestor", since, commit],
                       capture_output=True, check=False)
    return r.returncode == 0


def current(rec: dict[str, Any]) -> bool:
    """The record ran its method's code as it is now (see :data:`SUPERSEDED`)."""
    if rec["method"] not in SUPERSEDED:
        return True
    return _descends(_env(rec, "commit"), SUPERSEDED[rec["method"]][0])


def run_cap(rec: dict[str, Any]) -> int | None:
    """The ``--max_minutes`` the run's command gave, if any."""
    m = re.search(r"--max_minutes[ =](\d+)", _env(rec, "command"))
    return int(m.group(1)) if m else None


def within_cap(rec: dict[str, Any]) -> bool:
    """The grid's cap (:data:`CAP_MIN`) would have ended the fit where it ended: a cap of ``CAP_MIN`` ended it on the
    grid's card (on another the same minutes train other steps), or its steps did within ``CAP_MIN`` minutes (a run
    under a longer cap that it never reached). A record without its fit time (``wall_s``) tells nothing against it."""
    if rec.get("time_capped"):
        return run_cap(rec) == CAP_MIN and on_card(rec)
    wall = rec.get("wall_s")
    return not isinstance(wall, (int, float)) or wall <= CAP_MIN * 60


def _cell(rec: dict[str, Any]) -> bool:
    gpu = _env(rec, "gpu")
    if not any(g in gpu for g in GPUS.get(int(rec["seed"]), ())) or "error" in rec or rec.get("overrides"):
        return False
    if not current(rec) or not within_cap(rec):
        return False
    if rec.get("label", rec["method"]) != rec["method"]:
        return False
    return alone(rec) or (int(rec["seed"]) != 0 and rec.get("time_capped") is False)


def _adopted(results: Path) -> list[dict[str, Any]]:
    """The :data:`ADOPTED` records under the grid's method names (``adopted_from`` says where they come from)."""
    out = []
    for name, renamed in ADOPTED.items():
        for rec in _records(name, results):
            if rec["method"] in renamed and rec.get("label", rec["method"]) == rec["method"]:
                new = renamed[rec["method"]]
                out.append(dict(rec, method=new, label=new, adopted_from=f"{name}: {rec['method']}"))
    return out


def done_cells(results: Path = RESULTS) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(task, method, seed) -> its record, from the grid's JSON and :data:`ADOPTED` (a solo run before a shared
    one)."""
    cells: dict[tuple[str, str, int], dict[str, Any]] = {}
    adopted = _adopted(results)
    for task in TASKS:
        recs = _records(f"{task}_grid_*.json", results) + [r for r in adopted if r.get("task") == task]
        for rec in sorted(recs, key=lambda r: not alone(r)):
            if _cell(rec):
                cells.setdefault((task, rec["method"], int(rec["seed"])), rec)
    return cells


# A method never run on a task is estimated from a like one, scaled up: LOMO's configs clip exactly, with a second
# backward, beside AdamW's one (and its hooks cost as much again at SmolLM2's size, where steps are host-bound);
# F-LoRA runs C-LoRA's population, batch and budget, with a fireworks tell that reads the host each generation.
PROXY = {"lomo": ("adamw", 2.0), "flora": ("clora", 1.5)}


def estimates(results: Path = RESULTS, default_s: float = 600.0, configs: Path = CONFIGS
              ) -> dict[tuple[str, str], float]:
    """(task, method) -> seconds a run takes as a process, from earlier records: the median of the best kind there
    is, in this order: the same task alone on the grid's card (:data:`CARD`) without overrides, alone on the other
    card without overrides (within 11% where checked), alone with overrides, beside other runs (an upper bound: the
    sharing is in it), then a probe of the config (:func:`probe_estimates`). Without any of these, the larger of the
    method's best kind on the other tasks and its :data:`PROXY`'s estimate on this task times the factor there; else
    ``default_s``. No estimate exceeds :data:`CAPPED_S`: the cap ends every fit. A run that stopped short of its
    config's steps (a cap ended it, maybe a shorter one) would run to this cap: it takes ``CAPPED_S``."""
    recs = _records("*.json", results)
    steps_of = functools.cache(lambda task, method: config_steps(task, method, configs))  # each config read once
    kinds: dict[tuple[str, str], dict[int, list[float]]] = {}
    for rec in recs:
        task, gpu = rec.get("task"), _env(rec, "gpu")
        if task not in TASKS or "error" in rec or not rec.get("process_s"):
            continue
        if any("max_steps" in o for o in rec.get("overrides") or []):
            continue  # another step budget: a probe (probe_estimates) or a longer run
        if not any(g in gpu for g in CARDS):
            continue
        rank = 3 if not alone(rec) else 2 if rec.get("overrides") else 0 if on_card(rec) else 1
        key = (task, rec["method"])
        budget, steps = steps_of(*key), rec.get("steps")
        short = rec.get("time_capped") or (budget and isinstance(steps, int) and 0 < steps < budget)
        kinds.setdefault(key, {}).setdefault(rank, []).append(float(CAPPED_S if short else rec["process_s"]))
    probes = probe_estimates(recs, configs, steps_of)

    def best(by_rank: dict[int, list[float]]) -> float:
        return round(statistics.median(by_rank[min(by_rank)]), 1)

    own = {k: best(v) for k, v in kinds.items()}
    own.update({k: v for k, v in probes.items() if k not in own})

    def elsewhere(task: str, m: str) -> float | None:  # the method's best kind of record on the other tasks
        other: dict[int, list[float]] = {}
        for (t, mm), by_rank in kinds.items():
            if mm == m and t != task:
                for r, v in by_rank.items():
                    other.setdefault(r, []).extend(v)
        return best(other) if other else None

    est = {}
    for task in TASKS:
        for m in METHODS:
            if (task, m) in own:
                est[(task, m)] = own[(task, m)]
                continue
            proxy, factor = PROXY.get(m, (m, 1.0))
            base = None
            if proxy != m:
                base = own.get((task, proxy))
                base = elsewhere(task, proxy) if base is None else base
            # the larger: a method's time on a shorter task understates it here (F-LoRA on SST-2 beside MRPC)
            found = [x for x in (elsewhere(task, m), None if base is None else round(base * factor, 1)) if x is not None]
            est[(task, m)] = max(found) if found else default_s  # a default never stands in for a proxy
    return {k: min(v, CAPPED_S) for k, v in est.items()}


def config_steps(task: str, method: str, configs: Path = CONFIGS) -> int | None:
    """The step budget (``trainer.max_steps``) of the grid config ``configs/<task>_smollm2_<method>.yaml``."""
    path = configs / f"{task}_smollm2_{method}.yaml"
    m = re.search(r"^\s*max_steps:\s*(\d+)", path.read_text(), re.MULTILINE) if path.is_file() else None
    return int(m.group(1)) if m else None


def probe_estimates(recs: list[dict[str, Any]], configs: Path = CONFIGS,
                    steps_of: Callable[[str, str], int | None] | None = None) -> dict[tuple[str, str], float]:
    """(task, method) -> seconds a run would take, from the records (:func:`_records` of the results) of short runs
    of the config alone on any GPU whose only override is ``--trainer.max_steps=N`` (probes): a probe's load and test
    as they were, its training scaled to the config's steps (validation not included). The slowest probe of a
    config. ``steps_of`` reads a config's steps (:func:`config_steps` by default; :func:`estimates` shares its own)."""
    steps_of = steps_of or (lambda task, method: config_steps(task, method, configs))
    out: dict[tuple[str, str], float] = {}
    for rec in recs:
        over = rec.get("overrides") or []
        m = re.fullmatch(r"--trainer\.max_steps=(\d+)", over[0]) if len(over) == 1 else None
        if not m or "error" in rec or not alone(rec) or rec.get("task") not in TASKS:
            continue
        steps = steps_of(rec["task"], rec["method"])
        if not steps or not rec.get("process_s") or not isinstance(rec.get("train_s"), (int, float)):
            continue
        s = float(rec["process_s"]) - float(rec["train_s"]) + float(rec["train_s"]) * steps / int(m.group(1))
        key = (rec["task"], rec["method"])
        out[key] = max(out.get(key, 0.0), round(s, 1))
    return out


def shared_estimates(cells: dict[tuple[str, str, int], dict[str, Any]]) -> dict[tuple[str, str], float]:
    """(task, method) -> seconds a run took as a process beside other grid runs (the median over its shared cells of
    :func:`done_cells`, any GPU the grid counts): what it takes in a ``--jobs`` call, sharing included."""
    runs: dict[tuple[str, str], list[float]] = {}
    for (task, m, _), rec in cells.items():
        if not alone(rec) and rec.get("process_s"):
            runs.setdefault((task, m), []).append(float(rec["process_s"]))
    return {k: round(statistics.median(v), 1) for k, v in runs.items()}


def makespan(durations: list[float], lanes: int) -> float:
    """When the last of these runs ends, ``lanes`` at a time, each next run starting in the first lane free."""
    ends = [0.0] * max(1, lanes)
    for d in durations:  # in the order task_results starts them
        i = ends.index(min(ends))
        ends[i] += d
    return max(ends)


def peaks(results: Path = RESULTS) -> dict[tuple[str, str], float]:
    """(task, method) -> the largest peak GiB any finished run of that grid config recorded, on any GPU: what it needs
    beside other runs."""
    out: dict[tuple[str, str], float] = {}
    for rec in _records("*_grid_*.json", results):
        if "error" in rec or rec.get("overrides") or not isinstance(rec.get("peak_gib"), (int, float)):
            continue
        key = (rec.get("task"), rec.get("method"))
        out[key] = max(out.get(key, 0.0), float(rec["peak_gib"]))
    return out


def plan_calls(missing: list[tuple[str, str, int]], est: dict[tuple[str, str], float], budget: float,
               jobs: int = 1, speedup: float = 1.0, run_timeout: float = RUN_TIMEOUT_S,
               shared_est: dict[tuple[str, str], float] | None = None,
               peak: dict[tuple[str, str], float] | None = None, gpu_gib: float = GPU_GIB) -> list[dict[str, Any]]:
    """Missing cells packed into calls of one task, each within ``budget`` seconds (a cell longer than
    the budget gets a call of its own; longest first, each into the first call with room), seed 0 of every task
    first.

    Seeds 1 and 2 run without dev curves, and with ``jobs`` > 1 ``jobs`` cells at a time. A shared run takes its
    :func:`shared_estimates` figure where the grid has one, else its solo estimate slowed ``jobs / speedup`` times
    (``speedup``: what sharing gains in throughput, 1.0 by default; five SST-2 runs at once on an H100 gave about
    4), and a shared call's estimate is when its last run ends, ``jobs`` at a time. A method shared on seeds 1 and 2
    both runs both in one call (``seeds``). A cell whose shared run would near its timeout (or the cap, which
    would leave it uncounted) keeps a solo call, and so does one whose peak is unknown (``peak``: no finished
    run yet) or too large for ``jobs`` of it in 90% of ``gpu_gib`` (SQuAD's forward-only runs, five at once, ran out
    of an H100's memory). Without ``peak`` memory is not checked."""
    shared_est = shared_est or {}
    fits = lambda task, m: peak is None or peak.get((task, m), float("inf")) * jobs <= 0.9 * gpu_gib
    calls: list[dict[str, Any]] = []
    limit = 0.8 * min(run_timeout, 600)
    for phase in ((0,), tuple(s for s in SEEDS if s != 0)):  # seed 0 of every task first
        for task in TASKS:
            todo = {s: [m for t, m, ss in missing if (t, ss) == (task, s)] for s in phase}
            beside = {m: shared_est.get((task, m), est[(task, m)] * jobs / speedup) for ms in todo.values() for m in ms}
            sharable = {s: [m for m in ms if s != 0 and jobs > 1 and beside[m] <= limit and fits(task, m)]
                        for s, ms in todo.items()}
            # a method shared on every seed of the phase: one call runs them all (task_results --seeds 1,2)
            every = [m for m in METHODS if len(phase) > 1 and all(m in sharable[s] for s in phase)]
            groups = [(phase, every, jobs)] if every else []
            for s in phase:
                groups.append(((s,), [m for m in sharable[s] if m not in every], jobs))
                groups.append(((s,), [m for m in todo[s] if m not in sharable[s]], 1))
            for seeds, group, j in groups:
                dur = beside if j > 1 else {m: est[(task, m)] for m in group}
                def took(ms: list[str], dur: dict[str, float] = dur, seeds: tuple[int, ...] = seeds,
                         j: int = j) -> float:  # task_results starts the grid's order, each spec over its seeds
                    return SETUP_S + makespan([dur[x] for x in sorted(ms, key=METHODS.index) for _ in seeds], j)
                # first fit, longest first: fewer calls than filling them in the grid's order
                bins: list[dict[str, Any]] = []
                for m in sorted(group, key=lambda m: -dur[m]):
                    cur = next((b for b in bins if took(b["methods"] + [m]) <= budget), None)
                    if cur is None:
                        cur = {"task": task, "seed": seeds[0], "seeds": seeds, "methods": [], "jobs": j}
                        bins.append(cur)
                    cur["methods"].append(m)
                for b in bins:
                    b["methods"].sort(key=METHODS.index)
                    b["est_s"] = took(b["methods"])
                calls += bins
    for c in calls:
        # dev curves are seed 0's (the plotted, timed ones): other seeds save the dev passes
        opts = " --dev_curve" if c["task"] != "squad" and c["seed"] == 0 else ""
        opts += f" --max_minutes {CAP_MIN} --timeout {run_timeout:.0f}"
        opts += f" --jobs {c['jobs']}" if c["jobs"] > 1 else ""
        # unique by content, not by order; seeds 1 and 2 may run on either card, and the record says which, unless
        # the cap may end a run: where it does, the card sets the steps. The cards ran SST-2's AdamW and GaLore about
        # as fast (EQUIVALENCE), so a run estimated below the cap is planned for either
        c["on_card"] = c["seed"] == 0 or any(est[(c["task"], m)] >= CAPPED_S for m in c["methods"])
        gpu = f"{CARD.lower()}_" if c["on_card"] else ""
        name = f"{c['task']}_grid_{gpu}s{'-'.join(map(str, c['seeds']))}_{'-'.join(c['methods'])}"
        seeds = ",".join(map(str, c["seeds"]))
        c["command"] = f"bash benchmarks/device_run.sh task {c['task']} {seeds} {','.join(c['methods'])} {name}{opts}"
        c["est_s"] = round(c["est_s"])
    return calls


def grid_table(cells: dict[tuple[str, str, int], dict[str, Any]], est: dict[tuple[str, str], float]) -> str:
    rows = ["| task | method | " + " | ".join(f"seed {s}" for s in SEEDS) + " |", "|---|---|" + "---|" * len(SEEDS)]
    for task in TASKS:
        for m in METHODS:
            vals = []
            for s in SEEDS:
                rec = cells.get((task, m, s))
                vals.append(f"{rec.get(METRIC[task][0])}" if rec else f"(~{est[(task, m)]:.0f} s)")
            rows.append(f"| {task} | {m} | " + " | ".join(vals) + " |")
    return "\n".join(rows)


def over_seeds(recs: list[dict[str, Any]], field: str, fmt: str = "{:.1f}") -> str:
    """``mean ± std`` over the seeds measured, naming them when fewer than all; ``—`` when none."""
    vals = [(int(r["seed"]), float(r[field])) for r in recs if isinstance(r.get(field), (int, float))]
    if not vals:
        return "—"
    xs = [v for _, v in vals]
    mean, std = mean_std(xs)
    text = fmt.format(mean) + (" ± " + fmt.format(std) if len(xs) > 1 else "")
    if len(xs) < len(SEEDS):
        text += f" (seed{'s' if len(xs) > 1 else ''} {', '.join(str(s) for s, _ in sorted(vals))})"
    return text


def summary_table(cells: dict[tuple[str, str, int], dict[str, Any]]) -> str:
    """Per method and task: the task's dev metric over the measured seeds and the training seconds over the runs
    alone on the grid's card (mean ± sample std), and the largest peak; what docs/results.md shows."""
    head = ["method"] + [METRIC[t][1] for t in TASKS] + [f"{TASK_NAMES[t]} train s" for t in TASKS] + ["peak GiB (max)"]
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for m in METHODS:
        by_task = {t: [cells[(t, m, s)] for s in SEEDS if (t, m, s) in cells] for t in TASKS}
        if not any(by_task.values()):
            continue
        peaks = [r["peak_gib"] for recs in by_task.values() for r in recs if isinstance(r.get("peak_gib"), (int, float))]
        row = [f"`{m}`"] + [over_seeds(by_task[t], METRIC[t][0]) for t in TASKS]
        row += ["—" if m == "zero_shot" else over_seeds([r for r in by_task[t] if timed(r)], "train_s", "{:.0f}")
                for t in TASKS]
        row.append(f"{max(peaks):.2f}" if peaks else "—")
        rows.append("| " + " | ".join(row) + " |")
    n = len(cells)
    rows.append(f"\n{n} of {len(TASKS) * len(METHODS) * len(SEEDS)} cells measured.")
    return "\n".join(rows)


def render_docs(text: str, table: str, path: Path = DOCS) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"{path} lacks the grid-summary markers ({START} ... {END})")
    before, rest = text.split(START, 1)
    return before + START + "\n" + table + "\n" + END + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", action="store_true", help="print the device calls that would run the missing cells")
    ap.add_argument("--budget", type=float, default=540, help="estimated seconds per device call")
    ap.add_argument("--default_s", type=float, default=600, help="the estimate of a method never run")
    ap.add_argument("--jobs", type=int, default=1, help="cells at a time in the calls of seeds 1 and 2")
    ap.add_argument("--speedup", type=float, default=1.0,
                    help="throughput of --jobs cells at once over one at a time (five at once gave about 4)")
    ap.add_argument("--gpu_gib", type=float, default=GPU_GIB,
                    help="memory of the card that runs --jobs calls (an H100's by default): they must fit")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--docs", type=Path, default=DOCS)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the docs' grid summary from the JSON")
    mode.add_argument("--check", action="store_true", help="exit 1 if the docs' grid summary differs from the JSON")
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.speedup <= 0:
        ap.error(f"--jobs must be >= 1 and --speedup > 0 (got {args.jobs} and {args.speedup})")
    cells, est = done_cells(args.results), estimates(args.results, args.default_s)
    if args.write or args.check:
        old = args.docs.read_text()
        new = render_docs(old, summary_table(cells), args.docs)
        if args.write and new != old:
            args.docs.write_text(new)
        if args.check and new != old:
            print(f"{args.docs}'s grid summary differs from the JSON; run `python -m benchmarks.grid --write`")
            return 1
        print(f"{args.docs}: {'rewritten' if args.write and new != old else 'matches the JSON'}")
        return 0
    missing = [(t, m, s) for s in SEEDS for t in TASKS for m in METHODS if (t, m, s) not in cells]
    left = sum(est[(t, m)] for t, m, _ in missing)
    print(grid_table(cells, est))
    print(f"\n{len(cells)} of {len(TASKS) * len(METHODS) * len(SEEDS)} cells measured; "
          f"{len(missing)} left, about {left / 60:.0f} minutes of runs.")
    if args.calls:
        print("\nEach call carries [\".whl2\", \".gpu/data\"] (the first on a machine also \".models/b\", after a "
              "`device_run.sh smol-a` call carrying \".models/a\"). MEMOPT_COMMIT names this side's HEAD, as the "
              f"device copy's git HEAD can lag it. Seed 0 needs an {CARD} (kind {KIND}), and so does a run the "
              f"cap may end (named {CARD.lower()}); the other seeds 1 and 2 run on an H100 or H200:")
        head = subprocess.run(["git", "-C", str(RESULTS), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False).stdout.strip() or "unknown"
        for c in plan_calls(missing, est, args.budget, args.jobs, args.speedup,
                            shared_est=shared_estimates(cells), peak=peaks(args.results), gpu_gib=args.gpu_gib):
            print(f"  ~{c['est_s']:>4} s  MEMOPT_COMMIT={head} {c['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
