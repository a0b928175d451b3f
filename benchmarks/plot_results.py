"""Every plot under docs/img, regenerated from the committed JSON under benchmarks/results/ (CPU, no GPU needed).

    pip install matplotlib
    python -m benchmarks.plot_results            # writes docs/img/bench_{1b,7b}.png and docs/img/<task>_*.png
    python -m benchmarks.plot_results OUT_DIR    # the same files into OUT_DIR

``bench_1b.png`` / ``bench_7b.png``: step time and peak memory per method. Each bar is one row of a suite's JSON
(ours and the peers, measured side by side in that suite's run). Rows from different suites come from different
runs: compare within a method's group, not across groups.

``<prefix>_acc_vs_{step,wall_s,forwards}.png`` and ``<prefix>_peak_memory.png``: ``benchmarks.task_results.plot`` on
each task JSON in ``TASK_PLOTS`` (a second JSON of the same task takes its own prefix; JSONs joined by commas
share one set of axes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks import results_tables as rt

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# (suite file, group title, rows as (key, label)): the files docs/results.md's speed tables read, so a re-measured
# suite moves its table and its bars together
PANELS = [
    (rt.FOUNDATION, "AdamW", [("peer:forward", "forward"), ("peer:adamw", "AdamW"), ("peer:adamw_ckpt", "AdamW ckpt")]),
    (rt.MEZO_LATEST, "MeZO", [("peer:mezo_official", "official"), ("ours:mezo", "ours"),
                              ("ours:mezo_rademacher", "ours ±1")]),
    (rt.LOMO, "LOMO", [("peer:lomo_ckpt", "lomo-optim ckpt"), ("ours:lomo_ckpt", "ours ckpt"),
                       ("peer:adalomo_ckpt", "AdaLomo peer ckpt"), ("ours:adalomo_ckpt", "AdaLomo ours ckpt")]),
    (rt.GALORE, "GaLore", [("peer:galore", "galore-torch"), ("ours:galore", "ours")]),
    (rt.DFO, "DFO-LoRA (4×128)", [("ours:inference", "inference"), ("ours:dfo_batched", "batched, whole population"),
                                  ("ours:dfo_batched_chunk10", "batched, chunk 10 (default)"),
                                  ("ours:dfo_sequential", "sequential")]),
]
# the task_results JSON (several, comma-separated, share one set of axes) whose curves and peaks docs/results.md
# shows, and the prefix of their PNGs
TASK_PLOTS = {"sst2_smollm2.json": "sst2", "sst2_tta_eager_vs_graph_h100.json": "sst2_fastpath",
              # plain MeZO, the 16-direction population at three lengths, the config's three seeds
              "sst2_tta_pop_vs_plain_h200.json,sst2_tta_mezo_pop10k_h200.json,sst2_pop_best_h200.json": "sst2_pop"}


def gpus() -> str:
    """The cards named in the bench panels' JSON ``environment`` (e.g. "H100"), as the docs' source lines name them."""
    names = []
    for fname, _, _ in PANELS:
        path = RESULTS / fname
        if path.exists():
            names.append(rt.card_name(rt.file_env(json.loads(path.read_text())).get("gpu")))
    return " / ".join(dict.fromkeys(names)) or "GPU not recorded"


def rows(size: str) -> list[tuple[str, str, float | None, float | None]]:
    out = []
    for fname, group, keys in PANELS:
        path = RESULTS / fname
        if not path.exists():
            continue
        recs = json.loads(path.read_text())["records"]
        for key, label in keys:
            r = next((r for r in recs if r["key"] == key and r["size"] == size), None)
            if r is None:
                continue
            step = r["step_s"] * 1e3 if isinstance(r.get("step_s"), (int, float)) else None
            peak = r["peak_gib"] if isinstance(r.get("peak_gib"), (int, float)) else None
            out.append((group, label, step, peak))
    return out


def main(out_dir: str = str(ROOT / "docs" / "img")) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    files = []
    for size in ("1b", "7b"):
        data = rows(size)
        if not data:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 0.32 * len(data) + 1.6), sharey=True)
        labels = [f"{g}: {lbl}" for g, lbl, _, _ in data]
        groups = list(dict.fromkeys(g for g, *_ in data))  # one colour per method, in table order
        colors = [f"C{groups.index(g)}" for g, *_ in data]
        for ax, col, title in ((axes[0], 2, "step (ms)"), (axes[1], 3, "peak memory (GiB)")):
            vals = [d[col] or 0.0 for d in data]
            ax.barh(range(len(data)), vals, color=colors)
            for i, v in enumerate(vals):
                ax.text(v, i, f" {v:,.1f}" if v else " —", va="center", fontsize=7)
            ax.set_xlabel(title)
        axes[0].set_yticks(range(len(data)), labels, fontsize=8)
        axes[0].invert_yaxis()
        fig.suptitle(f"Random-init Llama {size.upper()}, bf16, batch 8×512 (DFO: 4×128 per candidate), {gpus()}")
        fig.tight_layout()
        f = str(Path(out_dir) / f"bench_{size}.png")
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    from benchmarks.task_results import plot as task_plot

    for fname, prefix in TASK_PLOTS.items():
        files += task_plot(",".join(str(RESULTS / f) for f in fname.split(",")), out_dir, prefix)
    files += grid_plots(out_dir)
    return files


def grid_plots(out_dir: str, results: Path = RESULTS) -> list[str]:
    """Issue 17's grid, one figure set per task: every method's seed-0 cell (the timed curves), as
    ``<task>_grid_acc_vs_<x>.png``; a task without a measured cell gets none."""
    from benchmarks import grid
    from benchmarks.task_results import plot_records

    cells = grid.done_cells(results)
    files = []
    for task in grid.TASKS:
        recs = [cells[(task, m, 0)] for m in grid.METHODS if (task, m, 0) in cells]
        if recs:
            files += plot_records(recs, out_dir, f"{task}_grid")
    return files


if __name__ == "__main__":
    print("\n".join(main(*sys.argv[1:])))
