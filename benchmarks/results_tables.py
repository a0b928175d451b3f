"""The README's "Which method should I use?" table, and docs/results.md's speed tables (:data:`DOC_TABLES`), rendered
from the committed JSON under ``benchmarks/results/``.

    python -m benchmarks.results_tables            # print the table the JSON gives, and the provenance report
    python -m benchmarks.results_tables --check    # exit 1 and print the differences if README.md or the docs disagree
    python -m benchmarks.results_tables --write    # rewrite README.md and docs/results.md between their markers
    python -m benchmarks.results_tables --check --strict   # also fail on a figure without JSON or a record
                                                           # without its commit, GPU and command

The table is data (``INTRO``, ``HEADER``, ``ROWS`` below): each cell is a template whose ``{name}`` placeholders are
figures, and each figure names its JSON file, the record(s) in it (a ``where`` of field values), the field and a
format. A figure that no committed JSON holds yet is a ``Missing``: its text is kept as the README has it and the
report lists it as "no JSON source". A figure changes only by changing its JSON (or its spec here), then ``--write``.
The quality figures (``GridCell``, and a ``Ratio`` of two) read every ``<task>_grid_*.json`` through
``benchmarks.grid``'s rules, so a grid run lands in the README with ``--write`` alone.

The provenance report lists, for every JSON file the table reads, the records that lack a commit, a GPU or a command
(``env`` per record as ``benchmarks/task_results.py`` writes it; the harness's file-level ``environment`` and each
record's ``cmd``; ``env`` at the top of a file from ``zo_fastpath.py`` / ``guard_interleaved.py``). Each docs block
opens with the same facts in a line (:func:`sources_line`): the files it reads, their cards, dates and commits.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
DOCS = ROOT / "docs" / "results.md"
START = "<!-- results-table:start"
END = "<!-- results-table:end -->"
DASH = "–"  # en dash between the ends of a range


# --------------------------------------------------------------------------------------------------- the selectors

@dataclass(frozen=True)
class Sel:
    """Records of one JSON file whose fields equal ``where`` (a tuple value: any of these), and one of their fields.

    ``field`` is a key of the record; ``"ratios.step / forward"`` reads ``record["ratios"]["step / forward"]``.
    """

    file: str
    where: tuple[tuple[str, Any], ...]
    field: str

    def describe(self) -> str:
        cond = ", ".join(f"{k}={v!r}" for k, v in self.where)
        return f"{self.file}[{cond}].{self.field}"


def sel(file: str, field: str, **where: Any) -> Sel:
    return Sel(file, tuple(sorted(where.items())), field)


def records(data: Any) -> list[dict[str, Any]]:
    """The records of a results JSON, whatever its shape: a list (task_results), ``records`` (harness), ``rows``."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and isinstance(data.get("records"), list):
        return data["records"]
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        return data["rows"]
    return [data]


def _get(rec: dict[str, Any], path: str) -> Any:
    if path in rec:
        return rec[path]
    head, _, rest = path.partition(".")
    if rest and isinstance(rec.get(head), dict):
        return _get(rec[head], rest)
    raise KeyError(path)


def _matches(rec: dict[str, Any], where: tuple[tuple[str, Any], ...]) -> bool:
    for k, v in where:
        have = rec.get(k)
        if not (have in v if isinstance(v, tuple) else have == v):
            return False
    return True


class Loader:
    """Reads each JSON once; ``select`` returns the matching records, ``values`` their field as numbers."""

    def __init__(self, root: Path = RESULTS) -> None:
        self.root = Path(root)
        self.cache: dict[str, Any] = {}

    def data(self, file: str) -> Any:
        if file not in self.cache:
            self.cache[file] = json.loads((self.root / file).read_text())
        return self.cache[file]

    def select(self, s: Sel) -> list[dict[str, Any]]:
        return [r for r in records(self.data(s.file)) if _matches(r, s.where)]

    def values(self, s: Sel) -> list[float]:
        recs = self.select(s)
        if not recs:
            raise LookupError(f"no record matches {s.describe()}")
        out = []
        for r in recs:
            v = _get(r, s.field)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise LookupError(f"{s.describe()} is {v!r}, not a number")  # noqa: TRY004 - a spec error
            out.append(float(v))
        return out

    def grid_cells(self) -> dict[tuple[str, str, int], dict[str, Any]]:
        """The quality grid's cells under this root, as ``benchmarks.grid`` counts them (read once)."""
        if "grid cells" not in self.cache:
            from benchmarks import grid  # grid imports this module

            self.cache["grid cells"] = grid.done_cells(self.root)
        return self.cache["grid cells"]

    def one(self, s: Sel) -> float:
        vals = self.values(s)
        if len(vals) != 1:
            raise LookupError(f"{s.describe()} matches {len(vals)} records, expected one")
        return vals[0]


# ---------------------------------------------------------------------------------------------------- the figures

@dataclass(frozen=True)
class Value:
    """One record's field, through ``scale`` then ``fmt`` (a ``str.format`` spec such as ``"{:.1f}"``)."""

    src: Sel
    fmt: str = "{:.1f}"
    scale: float = 1.0

    def sources(self) -> list[Sel]:
        return [self.src]

    def number(self, ld: Loader) -> float:
        return ld.one(self.src) * self.scale

    def render(self, ld: Loader) -> str:
        return self.fmt.format(self.number(ld))


@dataclass(frozen=True)
class Ratio:
    """One figure over another, each a record's field (a ``Sel`` of exactly one record) or a ``GridCell`` (its mean
    over the seeds, e.g. a method's peak memory over AdamW's on one task)."""

    num: Sel | GridCell
    den: Sel | GridCell
    fmt: str = "{:.2f}"

    def sources(self) -> list[Sel]:
        return [s for s in (self.num, self.den) if isinstance(s, Sel)]

    def cells(self) -> list[GridCell]:
        return [c for c in (self.num, self.den) if isinstance(c, GridCell)]

    def number(self, ld: Loader) -> float:
        part = lambda x: ld.one(x) if isinstance(x, Sel) else x.number(ld)
        return part(self.num) / part(self.den)

    def render(self, ld: Loader) -> str:
        return self.fmt.format(self.number(ld))


@dataclass(frozen=True)
class Range:
    """The smallest and largest value over every record the selectors match (and of each ``Ratio``, e.g. one per
    run), as ``lo–hi``; one figure when the two format alike."""

    srcs: tuple[Sel | Ratio, ...]
    fmt: str = "{:.2f}"

    def sources(self) -> list[Sel]:
        return [x for s in self.srcs for x in (s.sources() if isinstance(s, Ratio) else [s])]

    def render(self, ld: Loader) -> str:
        vals = [v for s in self.srcs for v in ([s.number(ld)] if isinstance(s, Ratio) else ld.values(s))]
        lo, hi = self.fmt.format(min(vals)), self.fmt.format(max(vals))
        return lo if lo == hi else f"{lo}{DASH}{hi}"


def mean_std(vals: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
    return mean, var**0.5


@dataclass(frozen=True)
class GridCell:
    """A quality-grid cell over its seeds: the records ``benchmarks.grid`` counts for ``task`` and ``method`` (from
    every ``<task>_grid_*.json``), their ``field`` (the task's dev metric when empty) as ``mean ± std``, naming the
    seeds when fewer than all. ``solo`` keeps the runs alone on the grid's card (``grid.timed``), for times. Fewer
    than ``min_n`` seeds is an error, so a cell never claims seeds it lacks. ``spread=False`` renders the mean alone
    (``—`` without a value), for a figure whose text says what it is over."""

    task: str
    method: str
    field: str = ""
    fmt: str = "{:.1f}"
    solo: bool = False
    min_n: int = 3
    spread: bool = True

    def sources(self) -> list[Sel]:
        return []  # no one file: records() names each record's own

    def records(self, ld: Loader) -> list[dict[str, Any]]:
        from benchmarks import grid

        cells = ld.grid_cells()
        recs = [cells[(self.task, self.method, s)] for s in grid.SEEDS if (self.task, self.method, s) in cells]
        return [r for r in recs if grid.timed(r)] if self.solo else recs

    def _checked(self, ld: Loader) -> tuple[list[dict[str, Any]], str, list[float]]:
        """The records (at least ``min_n``), the field and its values."""
        from benchmarks import grid

        recs = self.records(ld)
        if len(recs) < self.min_n:
            raise LookupError(f"grid cell {self.task}/{self.method}{' (solo)' if self.solo else ''} has "
                              f"{len(recs)} seeds, expected at least {self.min_n}")
        fld = self.field or grid.METRIC[self.task][0]
        return recs, fld, [float(r[fld]) for r in recs if isinstance(r.get(fld), (int, float))]

    def number(self, ld: Loader) -> float:
        """The mean over the seeds (at least one, whatever ``min_n`` allows)."""
        _, fld, vals = self._checked(ld)
        if not vals:
            raise LookupError(f"grid cell {self.task}/{self.method} has no {fld}")
        return mean_std(vals)[0]

    def render(self, ld: Loader) -> str:
        from benchmarks import grid

        recs, fld, vals = self._checked(ld)
        if self.spread:
            return grid.over_seeds(recs, fld, self.fmt)
        return self.fmt.format(mean_std(vals)[0]) if vals else "—"


@dataclass(frozen=True)
class Goal:
    """A figure against its goal: ``text`` (the goal as the table shows it, e.g. ``"≤ 0.67"``), then ✓ where the
    figure's unrounded value is ``op`` (``"<="`` or ``">="``) ``bound``, else ✗."""

    of: Value | Ratio
    op: str
    bound: float
    text: str

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ValueError(f"Goal op must be '<=' or '>=', got {self.op!r}")

    def sources(self) -> list[Sel]:
        return self.of.sources()

    def render(self, ld: Loader) -> str:
        x = self.of.number(ld)
        ok = x <= self.bound if self.op == "<=" else x >= self.bound
        return f"{self.text} {'✓' if ok else '✗'}"


@dataclass(frozen=True)
class Missing:
    """A figure that no committed JSON holds: rendered as the README has it, reported as "no JSON source"."""

    text: str
    why: str

    def sources(self) -> list[Sel]:
        return []

    def render(self, ld: Loader) -> str:
        return self.text


Figure = Union[Value, Ratio, Range, GridCell, Goal, Missing]  # noqa: UP007 - a runtime alias, Python 3.10 too


@dataclass(frozen=True)
class Row:
    """One table row: cell templates (``{name}`` placeholders) and the figures they name."""

    cells: tuple[str, ...]
    figures: dict[str, Figure] = field(default_factory=dict)


@dataclass(frozen=True)
class Table:
    intro: str  # the paragraph above the table, a template like a cell
    intro_figures: dict[str, Figure]
    header: tuple[str, ...]
    rows: tuple[Row, ...]


# ------------------------------------------------------------------------------------------------------ the spec

ours = lambda file, key, size, fld: sel(file, fld, key=key, size=size)
LARGEST = "largest_h200.json"
# Quality is the grid's (benchmarks.grid): a method's cell on each task over seeds 0-2, then its training seconds
# there (the mean over the runs alone on the grid's card). Every cell has seeds 0-2: one short of them is an error
# (0 lets a cell name the seeds it has, or show — without any, as while a grid fills).
GRID_MIN_SEEDS = 3
SCORES = "{sst2} / {mrpc} / {squad}"
QUALITY = SCORES + " after {t_sst2} / {t_mrpc} / {t_squad} s"


def quality(method: str, prefix: str = "", times: bool = True) -> dict[str, Figure]:
    """The figures :data:`QUALITY` names (:data:`SCORES` without ``times``), each with ``prefix``: ``method``'s dev
    metric on each task, and its training seconds."""
    figs: dict[str, Figure] = {}
    for t in ("sst2", "mrpc", "squad"):
        figs[f"{prefix}{t}"] = GridCell(t, method, min_n=GRID_MIN_SEEDS)
        if times:
            figs[f"{prefix}t_{t}"] = GridCell(t, method, "train_s", "{:.0f}", solo=True, min_n=0, spread=False)
    return figs


def peak_vs_adamw(method: str) -> Ratio:
    """``method``'s peak memory over AdamW's on SST-2, each the mean over the grid's seeds."""
    return Ratio(*(GridCell("sst2", m, "peak_gib", min_n=1) for m in (method, "adamw")))


# The suites' files, read by the README's table, docs/results.md's tables and the bars (plot_results): swap a name
# here to re-measure everywhere at once. The second edition's runs, d6f8e7a on one H100 (`harness --tabled`).
MEZO_LATEST = "mezo_h100_d6f8e7a.json"
FOUNDATION = "foundation_h100_d6f8e7a.json"
DFO = "dfo_h100_d6f8e7a.json"
# LOMO and AdaLomo against lomo-optim's step in the same run (the first edition read plain LOMO from another run).
LOMO_PLAIN = LOMO = "lomo_h100_d6f8e7a.json"
# GaLore against galore-torch: the steps and AdamW from one run; each layer-wise peak row from the run that holds its
# cases, (case, size) -> file (the first edition's galore_layerwise_peaks.json keys its records by method). The
# checkpointed 1.1B pair ran on an H200, the only card lent that session.
GALORE = GALORE_STEADY = "galore_1b_steps_h100_d6f8e7a.json"
GALORE_LAYERWISE = {("galore_layerwise", "1b"): "galore_1b_lw_h100_d6f8e7a.json",
                    ("galore_layerwise_ckpt", "1b"): "galore_1b_lwckpt_h200_59475af.json",
                    ("galore_layerwise_ckpt", "7b"): "galore_7b_h100_d6f8e7a.json"}
# Each method through a LightningModule under a Trainer beside its bare step (suites.THROUGH_TRAINER pairs the cases).
LIGHTNING = "lightning_h100_d6f8e7a.json"
# Under DeepSpeed ZeRO-3 on one GPU: each of our cases against lomo-optim's own ZeRO-3 path, same partitioning config.
ZERO3 = "zero3_h200.json"

WHICH_METHOD = Table(
    intro=(
        "Measured on one H100 where a cell does not name the H200 ([docs/results.md](docs/results.md) has the "
        "tables,\nthe goals missed and the plots). Quality is SmolLM2-135M-Instruct's (k=512): SST-2 and MRPC dev "
        "accuracy and\nSQuAD-subset dev F1, the mean ± std over seeds 0–2 of the grid in docs/results.md, naming the "
        "seeds\nwhere fewer have run (— where none has), then the seconds of training to it (without validation; the "
        "mean over the\nruns alone on the grid's H100). Zero-shot: {zs_sst2} / {zs_mrpc} / {zs_squad};\nAdamW: "
        + QUALITY.replace("{", "{adamw_") + "."
    ),
    intro_figures={**quality("zero_shot", "zs_", times=False), **quality("adamw", "adamw_")},
    header=("you need", "use", "memory (measured)", "speed (measured)",
            "quality (SST-2 / MRPC / SQuAD F1) after training s"),
    rows=(
        Row(
            ("the best accuracy at about half of AdamW's memory", "`AdaLomo`",
             "{peak_sst2}× AdamW's peak on SST-2; a 1.1B model trains in {peak_1b_ckpt} GiB with checkpointing",
             "{step}× lomo-optim's step", QUALITY),
            {
                "peak_sst2": peak_vs_adamw("adalomo"),
                "peak_1b_ckpt": Value(ours(LOMO, "ours:adalomo_ckpt", "1b", "peak_gib")),
                "step": Range((sel(LOMO, "ratios.step / lomo-optim", key="ours:adalomo_ckpt"),)),
                **quality("adalomo"),
            },
        ),
        Row(
            ("the largest model per GPU with backprop", "`LOMO` (+ activation checkpointing)",
             "a {params}B model (Llama-65B's shape) in {peak} GiB on one H200",
             "{step}× lomo-optim's step; under DeepSpeed ZeRO-3 {zero3}× its ZeRO-3 path (H200)", QUALITY),
            {
                "params": Value(ours(LARGEST, "ours:lomo_ckpt", "65b", "params_b")),
                "peak": Value(ours(LARGEST, "ours:lomo_ckpt", "65b", "peak_gib")),
                "zero3": Range((sel(ZERO3, "ratios.step / lomo-optim", key="ours:lomo_zero3"),
                                sel(ZERO3, "ratios.step / lomo-optim ", key="ours:lomo_zero3_ckpt"))),
                # the first LOMO run: plain and checkpointed at 1.1B, checkpointed at 7B
                "step": Range((sel(LOMO_PLAIN, "ratios.step / lomo-optim", key=("ours:lomo", "ours:lomo_ckpt")),)),
                **quality("lomo"),
            },
        ),
        Row(
            ("Adam's behaviour with less optimizer state", "`GaLore`",
             "optimizer state in rank-r; {peak_sst2}× AdamW's peak on SST-2",
             ("steady step {steady}× galore-torch's (two runs) and {vs_adamw}× AdamW's; subspace refresh {refresh}× "
              "faster"),
             QUALITY),
            {
                "peak_sst2": peak_vs_adamw("galore"),
                # galore-torch's step varied most between runs on one card: each run that holds both steps
                "steady": Range((Ratio(ours(GALORE, "ours:galore", "1b", "step_s"),
                                       ours(GALORE, "peer:galore", "1b", "step_s")),
                                 ours(LIGHTNING, "ours:galore", "1b", "ratios.step / galore-torch"))),
                "vs_adamw": Value(ours(GALORE_STEADY, "ours:galore", "1b", "ratios.step / AdamW"), "{:.2f}"),
                "refresh": Value(ours(GALORE, "ours:galore_refresh", "1b",
                                      "ratios.speed-up vs galore-torch"), "{:.0f}"),
                **quality("galore"),
            },
        ),
        Row(
            ("inference memory only, no backward; the largest models", "`MeZO`",
             ("peak = one forward ({peak_fwd}×); a {params}B model (Llama-2-70B's shape) in {peak_70b} GiB on one "
              "H200, {peak_70b_fwd}× its forward"),
             ("{step_fwd}× one forward per step in the latest run (±1 directions at 7B: {step_fwd_pm1}×); "
              "{vs_official}× the official code's step in the same run; `cuda_graph=True` (H200, through Lightning): "
              "{graph_smol}× faster than the eager step on SmolLM2's shape, {graph_1b}× at 1.1B"),
             (QUALITY + "; with 32 directions a step and the embedding and decoder layers 0–9 frozen (`n_spsa=32`, "
              "configs/*_mezo_pop.yaml): " + QUALITY.replace("{", "{pop_"))),
            {
                "peak_fwd": Range((sel(MEZO_LATEST, "ratios.peak / forward", key="ours:mezo"),)),
                "params": Value(ours(LARGEST, "ours:mezo", "70b", "params_b")),
                "peak_70b": Value(ours(LARGEST, "ours:mezo", "70b", "peak_gib")),
                "peak_70b_fwd": Value(ours(LARGEST, "ours:mezo", "70b", "ratios.peak / forward"), "{:.3f}"),
                "step_fwd": Range((sel(MEZO_LATEST, "ratios.step / forward", key="ours:mezo"),), "{:.1f}"),
                "step_fwd_pm1": Value(ours(MEZO_LATEST, "ours:mezo_rademacher", "7b", "ratios.step / forward")),
                "vs_official": Range((sel(MEZO_LATEST, "ratios.step / MeZO official", key="ours:mezo"),)),
                "graph_smol": Value(sel("zo_fastpath_h200.json", "eager_over_graph", size="smol")),
                "graph_1b": Value(sel("zo_fastpath_h200.json", "eager_over_graph", size="1b")),
                **quality("mezo"),
                **quality("mezo_pop", "pop_"),
            },
        ),
        Row(
            ("a forward-only black-box method on tiny adapters", "`DFOLoRA` (C-LoRA / F-LoRA)",
             "{peak_1b}× inference peak at 1.1B, {peak_smol}× on SmolLM2 (default `population_chunk=10`)",
             ("batched population {chunk10}× faster than one candidate at a time ({whole}× with the whole "
              "population in one forward)"),
             "C-LoRA " + QUALITY.replace("{", "{clora_") + "; F-LoRA " + QUALITY.replace("{", "{flora_")),
            {
                "peak_1b": Value(ours(DFO, "ours:dfo_batched_chunk10", "1b", "ratios.peak / inference"),
                                 "{:.2f}"),
                "peak_smol": Value(ours(DFO, "ours:dfo_batched_chunk10", "smol", "ratios.peak / inference"),
                                   "{:.2f}"),
                "chunk10": Range((sel(DFO, "ratios.sequential / row", key="ours:dfo_batched_chunk10"),),
                                 "{:.1f}"),
                "whole": Range((sel(DFO, "ratios.sequential / row", key="ours:dfo_batched"),), "{:.1f}"),
                **quality("clora", "clora_"),
                **quality("flora", "flora_"),
            },
        ),
    ),
)


# docs/results.md's speed tables, each between ``<!-- table:NAME ... -->`` and ``<!-- table:NAME:end -->``: a
# suite's JSON as its table, with the goals beside the figures. Swap a file name to re-measure a table.
ms = lambda file, key, size: Value(ours(file, key, size, "step_s"), scale=1000.0)
gib = lambda file, key, size: Value(ours(file, key, size, "peak_gib"), "{:.2f}")


def _dfo_rows(size: str, model: str) -> tuple[Row, ...]:
    k = lambda case: f"ours:{case}"
    seq_row = lambda case: Value(ours(DFO, k(case), size, "ratios.sequential / row"), "{:.1f}")
    peak_inf = lambda case: Value(ours(DFO, k(case), size, "ratios.peak / inference"), "{:.2f}")
    goals = lambda case: {"g_speed": Goal(seq_row(case), ">=", 5.0, "≥ 5×"),
                          "g_peak": Goal(peak_inf(case), "<=", 1.3, "≤ 1.3")}
    def row(label: str, case: str, speed: str, peak: str, goal: str = "") -> Row:
        figs = {"ms": ms(DFO, k(case), size), "peak": gib(DFO, k(case), size), "pinf": peak_inf(case),
                **({"row": seq_row(case)} if "{row}" in speed else {}), **(goals(case) if goal else {})}
        return Row((model, label, "{ms}", "{peak}", speed, peak, goal), figs)

    return (
        row("inference (one candidate)" if size == "1b" else "inference", "inference", "—", "{pinf}"),
        row("batched, whole population" + (" (`population_chunk=None`)" if size == "1b" else ""), "dfo_batched",
            "{row}×", "{pinf}", "{g_speed}, {g_peak}"),
        row("**batched, `population_chunk=10` (default)**", "dfo_batched_chunk10", "**{row}×**", "**{pinf}**",
            "{g_speed}, {g_peak}"),
        row("batched, `population_chunk=5`", "dfo_batched_chunk5",
            "{row}×", "{pinf}"),
        row("sequential", "dfo_sequential", "1.0×", "{pinf}"),
    )


# docs/results.md's Trainer table: each method through a LightningModule under a Trainer, as users run it, beside its
# bare step in the same run (LIGHTNING, above).
TRAINER_ROWS = (  # (Trainer case, bare case, label, size): every pair of suites.THROUGH_TRAINER
    ("ours:galore_lightning", "ours:galore", "GaLore, gradients freed after the step (default)", "1b"),
    ("ours:galore_lightning_keepgrads", "ours:galore", "GaLore, gradients left to Lightning", "1b"),
    ("ours:adamw_lightning", "peer:adamw", "AdamW (torch, fused), for scale", "1b"),
    ("ours:lomo_lightning_ckpt", "ours:lomo_ckpt", "LOMO, checkpointed", "1b"),
    ("ours:adalomo_lightning_ckpt", "ours:adalomo_ckpt", "AdaLomo, checkpointed", "1b"),
    ("ours:mezo_lightning", "ours:mezo", "MeZO", "1b"),
    ("ours:mezo_lightning_graph", "ours:mezo", "MeZO, `cuda_graph=True` (against the eager bare step)", "1b"),
    ("ours:dfo_lightning", "ours:dfo_batched_chunk10", "C-LoRA, a generation (population 20, chunk 10)", "1b"),
    ("ours:dfo_lightning_graph", "ours:dfo_batched_chunk10_graph", "C-LoRA, a generation, graphed", "1b"),
    ("ours:dfo_lightning", "ours:dfo_batched_chunk10", "C-LoRA, a generation, SmolLM2's shape", "smol"),
    ("ours:dfo_lightning_graph", "ours:dfo_batched_chunk10_graph", "C-LoRA, a generation, graphed, SmolLM2's shape",
     "smol"),
)


def _trainer_row(trainer: str, bare: str, label: str, size: str) -> Row:
    field = lambda key, f: ours(LIGHTNING, key, size, f)
    return Row((label, "{b_ms}", "{t_ms}", "{r_ms}×", "{b_gib}", "{t_gib}", "{r_gib}×"), {
        "b_ms": ms(LIGHTNING, bare, size), "t_ms": ms(LIGHTNING, trainer, size),
        "r_ms": Ratio(field(trainer, "step_s"), field(bare, "step_s")),
        "b_gib": gib(LIGHTNING, bare, size), "t_gib": gib(LIGHTNING, trainer, size),
        "r_gib": Ratio(field(trainer, "peak_gib"), field(bare, "peak_gib")),
    })


def _mezo_row(size: str, label: str) -> Row:
    """The MeZO suite at one size: each step over the forward, and ours over the official step, with the goals."""
    fwd = lambda key: Value(ours(MEZO_LATEST, key, size, "ratios.step / forward"), "{:.2f}")
    vs = lambda key: Value(ours(MEZO_LATEST, key, size, "ratios.step / MeZO official"), "{:.2f}")
    peak = Value(ours(MEZO_LATEST, "ours:mezo", size, "ratios.peak / forward"), "{:.2f}")
    return Row((label, "{f}", "{o} ({o_x}×)", "{g} (**{g_x}×**)", "{r} (**{r_x}×**)", "{g_goal}", "{g_vs}× / {r_vs}×",
                "{peak}", "{peak_goal}"), {
        "f": ms(MEZO_LATEST, "peer:forward", size),
        "o": ms(MEZO_LATEST, "peer:mezo_official", size), "o_x": fwd("peer:mezo_official"),
        "g": ms(MEZO_LATEST, "ours:mezo", size), "g_x": fwd("ours:mezo"),
        "r": ms(MEZO_LATEST, "ours:mezo_rademacher", size), "r_x": fwd("ours:mezo_rademacher"),
        "g_goal": Goal(fwd("ours:mezo"), "<=", 2.2, "≤ 2.2×"),
        "g_vs": vs("ours:mezo"), "r_vs": vs("ours:mezo_rademacher"),
        "peak": peak, "peak_goal": Goal(peak, "<=", 1.02, "≤ 1.02"),
    })


def _lomo_row(label: str, file: str, case: str, size: str, model: str) -> Row:
    step = Value(ours(file, f"ours:{case}", size, "ratios.step / lomo-optim"), "{:.2f}")
    peak = Value(ours(file, f"ours:{case}", size, "ratios.peak / lomo-optim"), "{:.2f}")
    return Row((label, model, "{peer}", "{ours}", "**{step}**", "{step_goal}", "{peak}", "{peak_goal}"), {
        "peer": ms(file, f"peer:{case}", size), "ours": ms(file, f"ours:{case}", size),
        "step": step, "step_goal": Goal(step, "<=", 0.67, "≤ 0.67"),
        "peak": peak, "peak_goal": Goal(peak, "<=", 1.0, "≤ 1"),
    })


def _largest_row(label: str, key: str, size: str, shape: str, goal: tuple[float, str]) -> Row:
    params = Value(ours(LARGEST, key, size, "params_b"), "{:.2f}")
    mezo = key == "ours:mezo"
    peak_fwd = Value(ours(LARGEST, key, size, "ratios.peak / forward"), "{:.3f}")
    figs: dict[str, Figure] = {
        "params": params, "step": Value(ours(LARGEST, key, size, "step_s"), "{:.2f}"),
        "peak": gib(LARGEST, key, size), "goal": Goal(params, ">=", goal[0], goal[1]),
        **({"pf": peak_fwd, "pf_goal": Goal(peak_fwd, "<=", 1.02, "≤ 1.02×")} if mezo else {}),
    }
    return Row((label, shape, "{params}B", "{step}", "{peak}", "**{pf}**" if mezo else "—",
                "{goal}, {pf_goal}" if mezo else "{goal}"), figs)


def _galore_rows() -> tuple[Row, ...]:
    step = lambda file, key: Value(ours(file, key, "1b", "step_s"), "{:,.1f}", 1000.0)
    def lw(impl: str, case: str, size: str) -> Sel:  # the 8-bit case is read from its plain case's file
        file = GALORE_LAYERWISE[case.removesuffix("_8bit_all2d"), size]
        # the first edition's layer-wise peaks were a list keyed by method; a harness run keys its records by case
        by = "method" if file == "galore_layerwise_peaks.json" else "case"
        return sel(file, "peak_gib", impl=impl, size=size, **{by: case})

    lw_gib = lambda impl, method, size: Value(lw(impl, method, size), "{:.2f}")
    refresh = Value(ours(GALORE, "ours:galore_refresh", "1b", "ratios.speed-up vs galore-torch"))
    vs_adamw = Value(ours(GALORE_STEADY, "ours:galore", "1b", "ratios.step / AdamW"), "{:.2f}")

    def peak_row(label: str, method: str, size: str, eight_bit: bool) -> Row:
        r = Ratio(lw("ours", method, size), lw("peer", method, size))
        r8 = Ratio(lw("ours", f"{method}_8bit_all2d", size), lw("peer", method, size))
        return Row((label, "{peer} GiB", "{ours} GiB" + (" (8-bit, all 2-D weights: {o8})" if eight_bit else ""),
                    "**{r}**" + (" ({r8})" if eight_bit else ""), "{goal}"), {
            "peer": lw_gib("peer", method, size), "ours": lw_gib("ours", method, size), "r": r,
            "goal": Goal(r, "<=", 0.85, "≤ 0.85"),
            **({"o8": lw_gib("ours", f"{method}_8bit_all2d", size), "r8": r8} if eight_bit else {})})

    return (
        Row(("step with a full-model subspace refresh, 1.1B", "{peer} ms", "{ours} ms", "**{x}× faster**", "{goal}"),
            {"peer": Value(ours(GALORE, "peer:galore_refresh", "1b", "step_s"), "{:,.0f}", 1000.0),
             "ours": Value(ours(GALORE, "ours:galore_refresh", "1b", "step_s"), "{:,.0f}", 1000.0),
             "x": refresh, "goal": Goal(refresh, ">=", 20.0, "≥ 20×")}),
        Row(("steady-state step, 1.1B", "{peer} ms", "{ours} ms", "{r}× galore-torch", ""),
            {"peer": step(GALORE, "peer:galore"), "ours": step(GALORE, "ours:galore"),
             "r": Ratio(ours(GALORE, "ours:galore", "1b", "step_s"), ours(GALORE, "peer:galore", "1b", "step_s"))}),
        Row(("steady-state step beside AdamW, 1.1B" + (
                "" if GALORE_STEADY == GALORE else
                f" ([another run](../benchmarks/results/{GALORE_STEADY.removesuffix('.json')}.md))"),
             "AdamW {adamw} ms", "{ours} ms",
             "**{r}× AdamW** (same run)", "{goal}"),
            {"adamw": step(GALORE_STEADY, "peer:adamw"), "ours": step(GALORE_STEADY, "ours:galore"), "r": vs_adamw,
             "goal": Goal(vs_adamw, "<=", 1.05, "≤ 1.05×")}),
        peak_row("layer-wise peak, 1.1B", "galore_layerwise", "1b", False),
        peak_row("layer-wise peak, checkpointed, 1.1B", "galore_layerwise_ckpt", "1b", True),
        Row(("layer-wise peak, checkpointed, 7B", "not run", "{ours} GiB (8-bit, all 2-D weights: {o8})", "—",
             "≤ 0.85 (no galore-torch run)"),
            {"ours": lw_gib("ours", "galore_layerwise_ckpt", "7b"),
             "o8": lw_gib("ours", "galore_layerwise_ckpt_8bit_all2d", "7b")}),
    )


def _zero3_row(label: str, case: str, peer: str, size: str, model: str) -> Row:
    f = lambda key, fld: ours(ZERO3, f"ours:{key}", size, fld)
    return Row((label, model, "{peer}", "{ours}", "**{step}**", "{peak} ({gib} GiB)"), {
        "peer": ms(ZERO3, f"ours:{peer}", size), "ours": ms(ZERO3, f"ours:{case}", size),
        "step": Ratio(f(case, "step_s"), f(peer, "step_s")), "peak": Ratio(f(case, "peak_gib"), f(peer, "peak_gib")),
        "gib": gib(ZERO3, f"ours:{case}", size),
    })


DOC_TABLES: dict[str, Table] = {
    "foundation": Table("", {}, ("case", "step ms", "peak GiB"), tuple(
        Row((label, "{ms}", "{peak}"), {"ms": ms(FOUNDATION, key, "1b"), "peak": gib(FOUNDATION, key, "1b")})
        for label, key in (("HF forward (inference)", "peer:forward"), ("AdamW (torch, fused)", "peer:adamw"),
                           ("AdamW + activation checkpointing", "peer:adamw_ckpt"),
                           ("MeZO official-style step", "peer:mezo_official"), ("lomo-optim LOMO", "peer:lomo"),
                           ("galore-torch GaLoreAdamW", "peer:galore")))),
    "dfo": Table("", {}, ("model", "case", "ms per generation", "peak GiB", "sequential / row", "peak / inference",
                          "goals"),
                 _dfo_rows("1b", "1.1B") + _dfo_rows("smol", "SmolLM2 shape")),
    "mezo": Table("", {}, ("size", "forward ms", "official ms (× fwd)", "ours, Gaussian z (× fwd)",
                           "ours, ±1 z (× fwd)", "goal (Gaussian)", "ours / official (Gaussian / ±1)",
                           "ours peak / forward",
                           "goal"),
                  (_mezo_row("1b", "1.1B"), _mezo_row("7b", "7B"))),
    "lomo": Table("", {}, ("case", "size", "lomo-optim ms", "ours ms", "ours / lomo-optim", "goal",
                           "peak / lomo-optim", "goal"), (
        _lomo_row("LOMO", LOMO_PLAIN, "lomo", "1b", "1.1B"),
        _lomo_row("LOMO, checkpointed", LOMO, "lomo_ckpt", "1b", "1.1B"),
        _lomo_row("AdaLomo, checkpointed", LOMO, "adalomo_ckpt", "1b", "1.1B"),
        _lomo_row("LOMO, checkpointed", LOMO, "lomo_ckpt", "7b", "7B"),
        _lomo_row("AdaLomo, checkpointed", LOMO, "adalomo_ckpt", "7b", "7B"),
    )),
    "zero3": Table("", {}, ("case", "size", "lomo-optim ms", "ours ms", "ours / lomo-optim", "peak / lomo-optim"), (
        _zero3_row("LOMO", "lomo_zero3", "lomo_optim_zero3", "1b", "1.1B"),
        _zero3_row("LOMO, checkpointed", "lomo_zero3_ckpt", "lomo_optim_zero3_ckpt", "1b", "1.1B"),
        _zero3_row("AdaLomo, checkpointed", "adalomo_zero3_ckpt", "adalomo_optim_zero3_ckpt", "1b", "1.1B"),
        _zero3_row("LOMO, checkpointed", "lomo_zero3_ckpt", "lomo_optim_zero3_ckpt", "7b", "7B"),
        _zero3_row("AdaLomo, checkpointed", "adalomo_zero3_ckpt", "adalomo_optim_zero3_ckpt", "7b", "7B"),
    )),
    "galore": Table("", {}, ("measure", "galore-torch", "ours", "ratio", "goal"), _galore_rows()),
    "largest": Table("", {}, ("method", "shape", "params", "step s", "peak GiB", "peak / forward", "goal"), (
        _largest_row("MeZO", "ours:mezo", "70b", "Llama-2-70B", (65.0, "≥ 65B")),
        _largest_row("MeZO", "ours:mezo", "65b", "Llama-65B", (65.0, "≥ 65B")),
        _largest_row("LOMO + checkpointing", "ours:lomo_ckpt", "65b", "Llama-65B", (60.0, "≥ 60B")),
        _largest_row("LOMO + checkpointing", "ours:lomo_ckpt", "60b", "60B (Llama-65B's width, 74 layers)",
                     (60.0, "≥ 60B")),
    )),
    "lightning": Table("", {}, ("method (1.1B unless named)", "bare step ms", "Trainer step ms", "Trainer / bare",
                                "bare peak GiB", "Trainer peak GiB", "Trainer / bare peak"),
                       tuple(_trainer_row(*r) for r in TRAINER_ROWS)),
}


# ------------------------------------------------------------------------------------------------------ rendering

def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_figures(figs: dict[str, Figure], ld: Loader) -> dict[str, str]:
    return {name: fig.render(ld) for name, fig in figs.items()}


def render(table: Table = WHICH_METHOD, root: Path = RESULTS) -> str:
    """The intro paragraph, a blank line and the Markdown table, as the README holds them between the markers."""
    ld = Loader(root)
    lines = [table.intro.format(**render_figures(table.intro_figures, ld)), ""] if table.intro else []
    lines.append("| " + " | ".join(table.header) + " |")
    lines.append("|" + "---|" * len(table.header))
    for row in table.rows:
        vals = render_figures(row.figures, ld)
        lines.append("| " + " | ".join(_cell(c.format(**vals)) for c in row.cells) + " |")
    return "\n".join(lines)


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    rx = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.+?)" for i, p in enumerate(parts))
    return re.compile(rx + r"\Z", re.DOTALL)


def _figure_diffs(template: str, figs: dict[str, str], have: str) -> list[str] | None:
    """Figure by figure, where the README's text still fits the template; None where the prose itself changed."""
    m = _template_regex(template).match(have)
    if not m:
        return None
    return [f"{{{k}}}: README has {m.group(k)!r}, the JSON gives {v!r}" for k, v in figs.items()
            if k in m.groupdict() and m.group(k) != v]


# ---------------------------------------------------------------------------------------------- README in and out

def split_readme(text: str) -> tuple[str, str, str]:
    """(before and including the start marker line, the block, the end marker line and after)."""
    i = text.find(START)
    j = text.find(END)
    if i < 0 or j < 0 or j < i:
        raise SystemExit(f"README.md has no {START} ... {END} markers around the table")
    head_end = text.index("\n", i) + 1
    return text[:head_end], text[head_end:j].rstrip("\n"), text[j:]


def _cell_diffs(where: str, template: str, figs: dict[str, str], have: str, want: str) -> list[str]:
    fd = _figure_diffs(template, figs, have)
    if fd:
        return [f"{where}: {d}" for d in fd]
    return [f"{where}: the text differs", f"  README: {have}", f"  JSON:   {want}"]


def differences(readme_text: str, table: Table = WHICH_METHOD, root: Path = RESULTS) -> list[str]:
    """Human-readable differences between the README's block and what the JSON gives; empty when they agree.

    Figure by figure where the README's prose still fits the spec's templates, else the differing text."""
    _, have, _ = split_readme(readme_text)
    want = render(table, root)
    if have == want:
        return []
    ld = Loader(root)
    (intro_h, _, rest_h), (intro_w, _, rest_w) = have.partition("\n\n"), want.partition("\n\n")
    have_lines, want_lines = rest_h.split("\n"), rest_w.split("\n")
    if len(have_lines) != len(want_lines):
        return list(difflib.unified_diff(have.split("\n"), want.split("\n"), "README.md", "rendered from JSON",
                                         lineterm=""))
    out: list[str] = []
    if intro_h != intro_w:
        out += _cell_diffs("intro", table.intro, render_figures(table.intro_figures, ld), intro_h, intro_w)
    for h, w in zip(have_lines, want_lines):
        if h == w:
            continue
        row = next((r for r in table.rows if w.startswith("| " + " | ".join(r.cells[:2]) + " |")), None)
        hc, wc = h.strip("|").split(" | "), w.strip("|").split(" | ")
        if row is None or len(hc) != len(wc):
            out += [f"- {h}", f"+ {w}"]
            continue
        figs = render_figures(row.figures, ld)
        for col, tmpl, hv, wv in zip(table.header, row.cells, hc, wc):
            if hv.strip() != wv.strip():
                out += _cell_diffs(f"row {row.cells[1]}, column {col!r}", tmpl, figs, hv.strip(), wv.strip())
    return out


def write_readme(path: Path = README, table: Table = WHICH_METHOD, root: Path = RESULTS) -> bool:
    """Rewrite the block between the markers; True if the file changed."""
    text = path.read_text()
    head, have, tail = split_readme(text)
    want = render(table, root)
    if have == want:
        return False
    path.write_text(head + want + "\n" + tail)
    return True


# ------------------------------------------------------------------------------------------------ docs in and out

def doc_block(text: str, name: str) -> tuple[str, str, str]:
    """(before and including the start marker line, the block, the end marker and after) of table ``name``."""
    start, end = f"<!-- table:{name} ", f"<!-- table:{name}:end -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"the docs have no {start}... --> ... {end} markers around the {name!r} table")
    head_end = text.index("\n", i) + 1
    return text[:head_end], text[head_end:j].rstrip("\n"), text[j:]


def card_name(gpu: str | None) -> str:
    """"NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04" -> "H100"; the whole name where no model number shows."""
    if not gpu:
        return "GPU not recorded"
    m = re.search(r"\b[A-Z]\d{2,4}\b", gpu)
    return m.group(0) if m else gpu.split(",")[0]


def sources_line(table: Table, root: Path = RESULTS) -> str:
    """The files a table reads, each linked (its Markdown report where there is one) with the cards, dates and
    commits its records name: a table's heading need not name them, and a re-measured file changes them."""
    ld = Loader(root)
    parts = []
    for file, recs in records_by_file(table, ld).items():
        data = ld.data(file)
        provs = [provenance(data, r) for r in recs]
        cards = ", ".join(dict.fromkeys(card_name(p["gpu"]) for p in provs))
        top = file_env(data)
        date = f", {str(top['date'])[:10]}" if top.get("date") else ""
        commits = list(dict.fromkeys(p["commit"] or "not recorded" for p in provs))
        commit = f", commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}"
        report = file.removesuffix(".json") + ".md"
        link = report if (Path(root) / report).is_file() else file
        parts.append(f"[{link}](../benchmarks/results/{link}): {cards}{date}{commit}")
    return "From " + "; ".join(parts) + "."


def render_doc(table: Table, root: Path = RESULTS) -> str:
    """A docs block: the table's sources (:func:`sources_line`), a blank line, the table."""
    return sources_line(table, root) + "\n\n" + render(table, root)


def doc_differences(text: str, tables: dict[str, Table] | None = None, root: Path = RESULTS) -> list[str]:
    """Per table: the unified diff of the docs' block against what the JSON gives; empty when all agree."""
    out: list[str] = []
    for name, table in (DOC_TABLES if tables is None else tables).items():
        _, have, _ = doc_block(text, name)
        want = render_doc(table, root)
        if have != want:
            out += list(difflib.unified_diff(have.split("\n"), want.split("\n"), f"docs table {name}",
                                             "rendered from JSON", lineterm=""))
    return out


def write_docs(path: Path = DOCS, tables: dict[str, Table] | None = None, root: Path = RESULTS) -> bool:
    """Rewrite every table's block; True if the file changed."""
    text = old = path.read_text()
    for name, table in (DOC_TABLES if tables is None else tables).items():
        head, _, tail = doc_block(text, name)
        text = head + render_doc(table, root) + "\n" + tail
    if text != old:
        path.write_text(text)
    return text != old


# ------------------------------------------------------------------------------------------------------ provenance

def all_figures(table: Table = WHICH_METHOD) -> Iterable[tuple[str, str, Figure]]:
    yield from (("intro", k, f) for k, f in table.intro_figures.items())
    for row in table.rows:
        yield from ((row.cells[1], k, f) for k, f in row.figures.items())


def suite_files() -> dict[str, str]:
    """The suites' files the tables read (the constants above), each to the suite (benchmarks/suites.py) it is a run
    of."""
    return {FOUNDATION: "foundation", MEZO_LATEST: "mezo", LOMO_PLAIN: "lomo", LOMO: "lomo", GALORE: "galore",
            GALORE_STEADY: "galore", **dict.fromkeys(GALORE_LAYERWISE.values(), "galore"), DFO: "dfo",
            LIGHTNING: "lightning", ZERO3: "zero3", LARGEST: "largest"}


def suite_reads() -> tuple[dict[str, set[tuple[str, str]]], list[str]]:
    """What the tables read from each suite's file: ``{suite: {(case key, size)}}`` (size ``"*"``: any), the
    references of the ratio columns they read included; and the selectors that name a case, size or ratio column
    its suite does not run (what a new run of the suite would leave empty)."""
    from benchmarks.suites import SUITES

    files, tup = suite_files(), lambda v: v if isinstance(v, tuple) else (v,)
    reads: dict[str, set[tuple[str, str]]] = {}
    problems: list[str] = []
    for table in (WHICH_METHOD, *DOC_TABLES.values()):
        for _, _, fig in all_figures(table):
            for s in getattr(fig, "sources", lambda: [])():
                if s.file not in files:
                    continue
                suite, where = SUITES[files[s.file]], dict(s.where)
                keys = where.get("key") or tuple(f"{where['impl']}:{m}" for m in tup(where.get("method",
                                                                                            where.get("case"))))
                sizes = tup(where.get("size", "*"))
                for key in tup(keys):
                    case = next((c for c in suite.cases if c.key == key), None)
                    if case is None:
                        problems.append(f"{s.describe()}: the {suite.name} suite has no case {key}")
                        continue
                    if "*" not in sizes and not set(sizes) & set(case.sizes):
                        problems.append(f"{s.describe()}: {key} runs at {case.sizes} only")
                    need = {key}
                    if s.field.startswith("ratios."):
                        title = s.field.removeprefix("ratios.")
                        ratio = next((r for r in suite.ratios if r.title == title), None)
                        pairs = dict(ratio.pairs) if ratio is not None else {}
                        rows = () if ratio is None else (ratio.rows or tuple(pairs))
                        if ratio is None or (rows and key not in rows):
                            problems.append(f"{s.describe()}: the {suite.name} suite gives {key} no {title!r}")
                        else:
                            own_peer = f"peer:{case.name}" if case.impl == "ours" else None
                            need.add(pairs.get(key) or ratio.ref or own_peer)
                    reads.setdefault(suite.name, set()).update((k, z) for k in need if k for z in sizes)
    return reads, problems


def missing_sources(table: Table = WHICH_METHOD) -> list[str]:
    return [f"{where} {{{name}}} = {fig.text!r}: {fig.why}" for where, name, fig in all_figures(table)
            if isinstance(fig, Missing)]


def file_env(data: Any) -> dict[str, Any]:
    """A results file's own environment: ``env`` (zo_fastpath, guard_interleaved) or ``environment`` (the harness)."""
    return (data.get("env") or data.get("environment") or {}) if isinstance(data, dict) else {}


def provenance(data: Any, rec: dict[str, Any]) -> dict[str, Any]:
    """commit, gpu and command of one record, from the record's ``env``, else the file's ``env``/``environment``;
    the command also from a harness record's ``cmd``."""
    env = rec.get("env") if isinstance(rec.get("env"), dict) else {}
    top = file_env(data)
    return {
        "commit": env.get("commit") or top.get("commit"),
        "gpu": env.get("gpu") or top.get("gpu"),
        "command": env.get("command") or rec.get("cmd") or top.get("command"),
    }


def _rec_name(rec: dict[str, Any]) -> str:
    name = rec.get("label") or rec.get("key") or rec.get("method") or "?"
    return f"{name}@{rec['size']}" if rec.get("size") else str(name)


def grid_cells_of(fig: Figure) -> list[GridCell]:
    """The grid cells a figure reads (their files are the grid's, not named in the spec)."""
    return [fig] if isinstance(fig, GridCell) else fig.cells() if isinstance(fig, Ratio) else []


def used_records(fig: Figure, ld: Loader) -> list[tuple[str, dict[str, Any]]]:
    """(file, record) for each record a figure reads."""
    return ([(s.file, r) for s in fig.sources() for r in ld.select(s)]
            + [(r["file"], r) for c in grid_cells_of(fig) for r in c.records(ld)])


def records_by_file(table: Table, ld: Loader) -> dict[str, list[dict[str, Any]]]:
    """file -> the records the table's figures read from it, each once, in the order the table first reads them."""
    used: dict[str, list[dict[str, Any]]] = {}
    for _, _, fig in all_figures(table):
        for file, r in used_records(fig, ld):
            lst = used.setdefault(file, [])
            if all(r is not x for x in lst):
                lst.append(r)
    return used


def provenance_report(table: Table = WHICH_METHOD, root: Path = RESULTS) -> list[str]:
    """For each JSON file the table reads: the records it uses that lack commit, GPU or command."""
    ld = Loader(root)
    used = records_by_file(table, ld)
    out = []
    for file in sorted(used):
        by_gap: dict[tuple[str, ...], list[str]] = {}
        for r in used[file]:
            gap = tuple(k for k, v in provenance(ld.data(file), r).items() if not v)
            if gap:
                by_gap.setdefault(gap, []).append(_rec_name(r))
        for gap, names in by_gap.items():
            what = "all" if len(names) == len(used[file]) else f"{len(names)} of"
            out.append(f"{file}: {what} {len(used[file])} records used lack {', '.join(gap)}: {', '.join(names)}")
    return out


def other_files_report(table: Table = WHICH_METHOD, root: Path = RESULTS) -> list[str]:
    """The JSON files under results/ the table does not read, with the provenance they lack (for docs/results.md)."""
    ld = Loader(root)
    figs = [f for t in (table, *DOC_TABLES.values()) for _, _, f in all_figures(t)]
    used = {s.file for f in figs for s in f.sources()}  # by name: a file a table names need not be under root
    used |= {r["file"] for f in figs for c in grid_cells_of(f) for r in c.records(ld)}
    out = []
    for path in sorted(Path(root).glob("*.json")):
        if path.name in used:
            continue
        data = json.loads(path.read_text())
        recs = records(data)
        gaps = [k for k in ("commit", "gpu", "command") if any(not provenance(data, r)[k] for r in recs)]
        if gaps:
            n = sum(1 for r in recs if any(not v for v in provenance(data, r).values()))
            out.append(f"{path.name}: {n} of {len(recs)} records lack {', '.join(gaps)}")
    return out


# ------------------------------------------------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if README.md's table differs from the JSON")
    mode.add_argument("--write", action="store_true", help="rewrite README.md's table from the JSON")
    ap.add_argument("--strict", action="store_true",
                    help="also fail on figures without a JSON source and on records without commit/GPU/command")
    ap.add_argument("--readme", default=str(README))
    ap.add_argument("--docs", default=str(DOCS))
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    readme, docs, root = Path(args.readme), Path(args.docs), Path(args.results)
    rc = 0
    if args.write:
        out(f"{readme}: {'rewritten' if write_readme(readme, root=root) else 'already matches the JSON'}")
        out(f"{docs}: {'rewritten' if write_docs(docs, root=root) else 'already matches the JSON'}")
    elif args.check:
        for path, diffs in ((readme, differences(readme.read_text(), root=root)),
                            (docs, doc_differences(docs.read_text(), root=root))):
            if diffs:
                out(f"{path}'s tables differ from benchmarks/results/*.json "
                    "(fix the JSON or the spec, then `python -m benchmarks.results_tables --write`):")
                out("\n".join("  " + d for d in diffs))
                rc = 1
            else:
                out(f"{path}'s tables match the JSON.")
    else:
        out(render(root=root))
    miss = missing_sources()
    prov = list(dict.fromkeys(p for t in (WHICH_METHOD, *DOC_TABLES.values()) for p in provenance_report(t, root)))
    if miss:
        out(f"\nFigures with no JSON source ({len(miss)}; kept as the README has them, to be re-measured):")
        out("\n".join("  " + m for m in miss))
    if prov:
        out("\nJSON records behind the tables that lack commit, GPU or command (to be re-measured):")
        out("\n".join("  " + p for p in prov))
    other = other_files_report(root=root)
    if other:
        out("\nOther JSON under benchmarks/results/ (in no table) lacking commit, GPU or command:")
        out("\n".join("  " + p for p in other))
    if args.strict and (miss or prov):
        rc = rc or 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
