"""Run a benchmark suite: ours and the peers' cases, one process each, into one JSON file and one Markdown table.

Usage (from the repository root)::

    python -m benchmarks.harness --suite foundation            # GPU: writes benchmarks/results/foundation.{json,md}
    python -m benchmarks.harness --suite mezo --sizes 1b --out $OUT/mezo_1b
    python -m benchmarks.harness --suite foundation --smoke          # CPU smoke: DEV=cpu, tiny model, temp dir
    python -m benchmarks.harness --suite lomo --from a.json b.json   # re-render one table from earlier runs

Each case prints ``RESULT {json}`` (see ``benchmarks/common.py``). A crash, timeout, missing module or OOM becomes a
row with its error, never a harness failure. Outputs are rewritten after every case, so a run cut short keeps its rows.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.suites import PEER_SOURCE, SIZE_ORDER, SUITES, Case, Ratio, Suite

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = (ROOT / ".gpu" / "anchors_gpu.py", ROOT.parent / "shared" / "tools" / "anchors_gpu.py")
Record = dict[str, Any]


def command(case: Case, size: str, batch: int, seq: int, anchors: Path) -> list[str]:
    if case.impl == "peer":
        return [sys.executable, "-u", str(anchors), case.name, size, str(batch), str(seq)]
    return [sys.executable, "-u", "-m", f"benchmarks.cases.{case.module}", case.name, size, str(batch), str(seq)]


def parse(stdout: str, stderr: str, returncode: int) -> dict[str, Any]:
    """The case's last RESULT record; without one, an OOM or error record taken from its output."""
    results = [json.loads(line[len("RESULT "):]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    if results:
        res = results[-1]
        if returncode != 0:
            res["error"] = f"exit code {returncode} after its RESULT"
        return res
    text = stderr + stdout
    if "OutOfMemoryError" in text or "out of memory" in text.lower():
        return {"step_s": None, "peak_gib": "OOM"}
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    error = lines[-1] if lines else f"exit code {returncode}, no output"
    return {"step_s": None, "peak_gib": None, "error": error[:300]}


def record(case: Case, size: str, batch: int, seq: int, **fields: Any) -> Record:
    rec: Record = {"key": case.key, "impl": case.impl, "case": case.name, "size": size, "batch": batch, "seq": seq,
                   "step_s": None, "peak_gib": None, "tok_per_s": None, "error": None}
    return {**rec, **fields}


def run_one(case: Case, size: str, batch: int, seq: int, anchors: Path, timeout: float, env: dict[str, str]) -> Record:
    cmd = command(case, size, batch, seq, anchors)
    rec = record(case, size, batch, seq)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        res = parse(p.stdout, p.stderr, p.returncode)
    except subprocess.TimeoutExpired:
        res = {"error": f"timeout after {timeout:.0f} s"}
    rec.update({k: v for k, v in res.items() if k not in ("impl", "method", "size", "batch", "seq")})
    rec.update(wall_s=round(time.perf_counter() - t0, 1), cmd=" ".join(cmd[1:]))
    return rec


def is_oom(rec: Record) -> bool:
    return rec.get("peak_gib") == "OOM"


def _num(rec: Record | None, metric: str) -> float | None:
    v = None if rec is None else rec.get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


def ratio_value(rec: Record, ratio: Ratio, records: list[Record]) -> float | None:
    """``ratio.metric`` of ``rec`` over that of its reference row (same size, batch, seq); None where undefined."""
    if ratio.pairs:
        ref_key = dict(ratio.pairs).get(rec["key"])
        if ref_key is None:
            return None
    elif ratio.rows and rec["key"] not in ratio.rows:
        return None
    else:
        ref_key = ratio.ref or (f"peer:{rec['case']}" if rec["impl"] == "ours" else None)
    ref = next((r for r in records if r["key"] == ref_key and all(r[k] == rec[k] for k in ("size", "batch", "seq"))),
               None)
    a, b = _num(rec, ratio.metric), _num(ref, ratio.metric)
    if a is None or b is None:
        return None
    return b / a if ratio.invert else a / b


def add_ratios(records: list[Record], suite: Suite) -> None:
    for rec in records:
        rec["ratios"] = {r.title: ratio_value(rec, r, records) for r in suite.ratios}


def sort_key(suite: Suite, rec: Record) -> tuple[int, int]:
    keys = [c.key for c in suite.cases]
    size = SIZE_ORDER.index(rec["size"]) if rec["size"] in SIZE_ORDER else len(SIZE_ORDER)
    return size, keys.index(rec["key"]) if rec["key"] in keys else len(keys)


def _fmt(v: Any, spec: str) -> str:
    if v == "OOM":
        return "OOM"
    return "—" if v is None else format(v, spec)


def markdown(suite: Suite, records: list[Record], env: dict[str, Any]) -> str:
    add_ratios(records, suite)
    head = ["case", "impl", "size", "params B", "batch×seq", "step ms", "peak GiB", "tok/s",
            *[r.title for r in suite.ratios], "note"]
    smoke = " CPU smoke run: the figures only show that the cases run." if env.get("smoke") else ""
    about = (f"GPU: {env.get('gpu')}; torch {env.get('torch')}, transformers {env.get('transformers')}; "
             f"{env.get('date')}; commit {env.get('commit')}. Step: median after warm-up (ours: CUDA events; anchors: "
             "synchronized wall clock). Peak: `torch.cuda.max_memory_allocated` over the timed steps. Random-init "
             f"Llama in bf16, one process per case.{smoke}")
    lines = [
        f"# Benchmark suite `{suite.name}`",
        "",
        suite.description,
        "",
        about,
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 4) + ["---"]) + "|",
    ]
    peer_of = {c.key: c.peer_of for c in suite.cases if c.peer_of}
    for rec in records:
        impl = "ours" if rec["impl"] == "ours" else f"peer ({PEER_SOURCE.get(rec['case'], 'anchors')})"
        if rec["key"] in peer_of:
            impl = f"peer ({peer_of[rec['key']]})"
        step = rec["step_s"] * 1e3 if isinstance(rec.get("step_s"), (int, float)) else None
        cells = [rec["case"], impl, rec["size"], _fmt(rec.get("params_b"), ".2f"), f"{rec['batch']}×{rec['seq']}",
                 _fmt(step, ".1f"), _fmt(rec.get("peak_gib"), ".2f"), _fmt(rec.get("tok_per_s"), ",.0f"),
                 *[_fmt(rec["ratios"][r.title], ".2f") for r in suite.ratios],
                 _note(rec)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if suite.ratios:
        lines += ["", "Ratios (same size, batch and seq; — where either side is missing, OOM or zero):"]
        for r in suite.ratios:
            if r.pairs:
                pairs = "; ".join(f"{row} ÷ {ref}" for row, ref in r.pairs)
                lines.append(f"- **{r.title}**: `{r.metric}`, row ÷ its reference ({pairs}).")
                continue
            ref = r.ref or "the peer case of the same name"
            what = f"{ref} ÷ row" if r.invert else f"row ÷ {ref}"
            rows = f" (rows {', '.join(r.rows)})" if r.rows else ""
            lines.append(f"- **{r.title}**: `{r.metric}` of {what}{rows}.")
    return "\n".join(lines) + "\n"


def _note(rec: dict[str, Any]) -> str:
    """The error, else the last step's loss and the build's peak over the weights where the case reports them."""
    if rec.get("error"):
        return str(rec["error"]).replace("|", "/")
    parts = [f"loss {rec['loss']:.3f}" if isinstance(rec.get("loss"), (int, float)) else "",
             f"load peak {rec['load_peak_x']:.2f}× weights" if isinstance(rec.get("load_peak_x"), (int, float)) else ""]
    return ", ".join(p for p in parts if p)


def environment(dev: str) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env: dict[str, Any] = {"date": now, "python": platform.python_version(), "dev": dev, "gpu": "none", "commit": None}
    for pkg in ("torch", "transformers", "lightning", "lomo-optim", "galore-torch", "bitsandbytes"):
        try:
            env[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            env[pkg] = None
    # nvidia-smi rather than torch.cuda: a CUDA context in this process would take GPU memory from the cases.
    for key, cmd in (("gpu", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]),
                     ("commit", ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])):
        try:
            out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                env[key] = out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    # A device machine gets a copy of the working tree whose git HEAD can be older than the code: the caller says.
    env["commit"] = os.environ.get("MEMOPT_COMMIT") or env["commit"]
    return env


def paths(out: Path) -> tuple[Path, Path]:
    return Path(f"{out}.json"), Path(f"{out}.md")


def write(out: Path, suite: Suite, records: list[Record], env: dict[str, Any]) -> str:
    records.sort(key=lambda r: sort_key(suite, r))
    table = markdown(suite, records, env)
    out.parent.mkdir(parents=True, exist_ok=True)
    js, md = paths(out)
    js.write_text(json.dumps({"suite": suite.name, "environment": env, "records": records}, indent=1) + "\n")
    md.write_text(table)
    return table


def plan(suite: Suite, sizes: list[str] | None, cases: list[str] | None, smoke: bool,
         only: set[tuple[str, str]] | None = None) -> list[tuple[Case, str]]:
    """(case, size) pairs in run order: smallest size first, then the suite's case order. ``only``: the (case key,
    size) pairs to keep (size ``"*"``: any)."""
    chosen = [c for c in suite.cases if not cases or c.key in cases or c.name in cases]
    if smoke:  # CPU-capable cases only; ours only where the module exists yet
        exists = {c.module for c in chosen if (ROOT / "benchmarks" / "cases" / f"{c.module}.py").exists()}
        chosen = [c for c in chosen if c.smoke and (c.impl == "peer" or c.module in exists)]
        return [(c, "tiny") for c in chosen]
    pairs = [(c, s) for c in chosen for s in c.sizes if (not sizes or s in sizes)
             and (only is None or (c.key, s) in only or (c.key, "*") in only)]
    return sorted(pairs, key=lambda p: SIZE_ORDER.index(p[1]) if p[1] in SIZE_ORDER else len(SIZE_ORDER))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.harness", description=__doc__.splitlines()[0])
    ap.add_argument("--suite", required=True, choices=sorted(SUITES))
    ap.add_argument("--sizes", help="comma-separated subset of the suite's sizes, e.g. 1b,7b")
    ap.add_argument("--cases", help="comma-separated case keys or names, e.g. peer:adamw,mezo")
    ap.add_argument("--anchors", type=Path, help="anchors_gpu.py (default: .gpu/ then ../shared/tools/)")
    ap.add_argument("--out", type=Path, help="output prefix (default benchmarks/results/SUITE; smoke: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke mode: DEV=cpu, size tiny, batch 2, seq 16")
    ap.add_argument("--batch", type=int, help="override every case's batch")
    ap.add_argument("--seq", type=int, help="override every case's sequence length")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per case (default 480; smoke 120)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--tabled", action="store_true",
                    help="only the cases and sizes that README.md's and docs/results.md's tables read from this suite "
                         "(benchmarks/results_tables.py), with the references of their ratio columns")
    ap.add_argument("--from", dest="sources", nargs="+", type=Path, help="re-render the table from these JSON files")
    args = ap.parse_args(argv)
    suite = SUITES[args.suite]
    out = args.out or ((Path(tempfile.mkdtemp()) if args.smoke else ROOT / "benchmarks/results") / suite.name)

    if args.sources:
        data = [json.loads(p.read_text()) for p in args.sources]
        latest = {(r["key"], r["size"], r["batch"], r["seq"]): r for d in data for r in d["records"]}  # later wins
        records = list(latest.values())
        print(write(out, suite, records, data[-1]["environment"]), end="")
        print("wrote {} and {}".format(*paths(out)))
        return 0

    anchors = args.anchors or next((p for p in ANCHORS if p.exists()), ANCHORS[-1])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.smoke:
        env["DEV"] = "cpu"
    batch_over, seq_over = (args.batch or 2, args.seq or 16) if args.smoke else (args.batch, args.seq)
    timeout = args.timeout or (120.0 if args.smoke else 480.0)
    sizes, cases = args.sizes and args.sizes.split(","), args.cases and args.cases.split(",")
    unknown = set(cases or ()) - {n for c in suite.cases for n in (c.key, c.name)}
    if unknown:
        ap.error(f"suite {suite.name} has no case {sorted(unknown)}; it has {[c.key for c in suite.cases]}")
    only = None
    if args.tabled:
        from benchmarks.results_tables import suite_reads

        only = suite_reads()[0].get(suite.name, set())
    todo = plan(suite, sizes, cases, args.smoke, only)
    if not todo:
        ap.error(f"nothing to run: suite {suite.name} has no case at sizes {sizes}")
    info = environment(env.get("DEV", "cuda"))
    # the invocation that made the file, beside each record's own case command (``cmd``)
    info.update(anchors=str(anchors), smoke=args.smoke,
                command=shlex.join(["python", "-m", "benchmarks.harness", *(sys.argv[1:] if argv is None else argv)]))
    print(f"suite {suite.name}: {len(todo)} runs, anchors {anchors}, out {out}.{{json,md}}", flush=True)

    records: list[Record] = []
    oom: set[str] = set()
    for i, (case, size) in enumerate(todo, 1):
        batch, seq = batch_over or case.batch, seq_over or case.seq
        tag = f"[{i}/{len(todo)}] {case.key} {size} {batch}x{seq}"
        if args.dry_run:
            print(tag, " ".join(command(case, size, batch, seq, anchors)), flush=True)
            continue
        if case.key in oom:  # sizes run in ascending order: a larger model cannot fit either
            rec = record(case, size, batch, seq, error="skipped: OOM at a smaller size")
        else:
            print(f"{tag} ...", flush=True)
            rec = run_one(case, size, batch, seq, anchors, timeout, env)
            if is_oom(rec):
                oom.add(case.key)
        records.append(rec)
        step = f"{rec['step_s'] * 1e3:.1f} ms" if isinstance(rec.get("step_s"), (int, float)) else "—"
        print(f"{tag}: step {step}, peak {rec.get('peak_gib')} GiB, tok/s {rec.get('tok_per_s')}"
              f"{', ' + rec['error'] if rec.get('error') else ''} ({rec.get('wall_s', 0)} s)", flush=True)
        write(out, suite, records, info)
    if not args.dry_run:
        print(write(out, suite, records, info), end="")
        print("wrote {} and {}".format(*paths(out)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
