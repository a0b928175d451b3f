"""Benchmark harness: ratio and table code on fake records, error rows, and the CPU smoke run of the foundation suite."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not part of the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import harness
from benchmarks.suites import SUITES, Case, Ratio, Suite

ANCHORS = Path(__file__).parents[1].parent / "shared/tools/anchors_gpu.py"


def rec(key: str, size: str = "1b", step: float | None = 1.0, peak: float | str | None = 10.0, **kw) -> dict:
    impl, case = key.split(":")
    fields = {"step_s": step, "peak_gib": peak, "tok_per_s": None if step is None else 4096 / step, **kw}
    return {"key": key, "impl": impl, "case": case, "size": size, "batch": 8, "seq": 512, "error": None, **fields}


SUITE = Suite(
    "fake", "fake suite",
    (Case("peer", "forward"), Case("peer", "lomo"), Case("ours", "lomo", module="lomo"),
     Case("ours", "galore", module="galore")),
    (Ratio("step / forward", "step_s", "peer:forward"),
     Ratio("peak / peer", "peak_gib"),
     Ratio("speed-up", "step_s", invert=True, rows=("ours:lomo",))),
)


def test_ratios_pair_by_reference_and_size():
    records = [rec("peer:forward", step=0.5, peak=4.0), rec("peer:lomo", step=2.0, peak=16.0),
               rec("ours:lomo", step=1.0, peak=8.0), rec("ours:lomo", size="7b", step=3.0, peak=20.0),
               rec("peer:forward", size="7b", step=1.5, peak=14.0), rec("ours:galore", step=4.0, peak=12.0)]
    harness.add_ratios(records, SUITE)
    r = {(x["key"], x["size"]): x["ratios"] for x in records}
    assert r["ours:lomo", "1b"] == {"step / forward": 2.0, "peak / peer": 0.5, "speed-up": 2.0}
    assert r["peer:forward", "1b"]["step / forward"] == 1.0
    assert r["ours:lomo", "7b"]["step / forward"] == 2.0  # the 7b forward, not the 1b one
    assert r["ours:lomo", "7b"]["peak / peer"] is None  # no 7b peer lomo row
    assert r["ours:galore", "1b"]["peak / peer"] is None and r["ours:galore", "1b"]["speed-up"] is None
    assert r["peer:lomo", "1b"]["peak / peer"] is None  # a peer row has no same-name peer


def test_ratios_with_a_reference_per_row():
    """``pairs``: each row against its own reference (a method through the Trainer against its bare step)."""
    suite = Suite("fake", "d", (), (Ratio("Trainer / bare step", "step_s",
                                          pairs=(("ours:a_lightning", "ours:a"), ("ours:b_lightning", "peer:b"))),))
    records = [rec("ours:a", step=1.0), rec("ours:a_lightning", step=1.5), rec("peer:b", step=2.0),
               rec("ours:b_lightning", step=1.0), rec("ours:c", step=3.0)]
    harness.add_ratios(records, suite)
    got = {x["key"]: x["ratios"]["Trainer / bare step"] for x in records}
    assert got == {"ours:a": None, "ours:a_lightning": 1.5, "peer:b": None, "ours:b_lightning": 0.5, "ours:c": None}
    text = harness.markdown(suite, records, {})
    assert "row ÷ its reference (ours:a_lightning ÷ ours:a; ours:b_lightning ÷ peer:b)" in text
    lightning = SUITES["lightning"]
    keys = {c.key for c in lightning.cases}
    assert all(row in keys and ref in keys for r in lightning.ratios for row, ref in r.pairs)


def test_ratios_skip_oom_errors_and_zero():
    records = [rec("peer:forward", step=None, peak="OOM"), rec("ours:lomo", step=1.0, peak=0.0),
               rec("peer:lomo", step=None, peak=None, error="boom")]
    harness.add_ratios(records, SUITE)
    assert all(v is None for x in records for v in x["ratios"].values())


def test_markdown_table():
    records = [rec("ours:lomo", step=1.0, peak=8.0), rec("peer:lomo", step=2.0, peak=16.0, params_b=1.1),
               rec("peer:forward", size="7b", step=None, peak="OOM"), rec("ours:galore", step=None, peak=None,
                                                                           error="No module named x | y")]
    records.sort(key=lambda x: harness.sort_key(SUITE, x))
    assert [(x["key"], x["size"]) for x in records] == [("peer:lomo", "1b"), ("ours:lomo", "1b"),
                                                       ("ours:galore", "1b"), ("peer:forward", "7b")]
    md = harness.markdown(SUITE, records, {"gpu": "H100", "torch": "2.x", "date": "today"})
    lines = md.splitlines()
    header = next(ln for ln in lines if ln.startswith("| case"))
    assert header == ("| case | impl | size | params B | batch×seq | step ms | peak GiB | tok/s | step / forward | peak / peer "
                      "| speed-up | note |")
    rows = [ln for ln in lines if ln.startswith("| ") and ln is not header]
    assert len(rows) == 4 and all(ln.count("|") == header.count("|") for ln in rows)
    assert rows[0] == "| lomo | peer (lomo-optim) | 1b | 1.10 | 8×512 | 2000.0 | 16.00 | 2,048 | — | — | — |  |"
    assert rows[1] == "| lomo | ours | 1b | — | 8×512 | 1000.0 | 8.00 | 4,096 | — | 0.50 | 2.00 |  |"
    assert "No module named x / y" in rows[2] and "| OOM |" in rows[3]
    assert "- **speed-up**: `step_s` of the peer case of the same name ÷ row (rows ours:lomo)." in lines


def test_parse_result_oom_and_error():
    out = 'noise\nRESULT {"method": "lomo", "step_s": 0.5, "peak_gib": 3.2, "tok_per_s": 8192.0}\n'
    assert harness.parse(out, "", 0) == {"method": "lomo", "step_s": 0.5, "peak_gib": 3.2, "tok_per_s": 8192.0}
    assert harness.parse(out, "", 1)["error"] == "exit code 1 after its RESULT"
    oom = "Traceback...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert harness.parse("", oom, 1) == {"step_s": None, "peak_gib": "OOM"}
    err = harness.parse("", "Traceback (most recent call last):\n  ...\nValueError: bad size\n\n", 1)
    assert err["error"] == "ValueError: bad size" and err["step_s"] is None


def test_plan_orders_sizes_filters_and_smoke():
    suite = SUITES["lomo"]
    todo = harness.plan(suite, None, None, smoke=False)
    sizes = [s for _, s in todo]
    assert sizes == sorted(sizes, key=["smol", "1b", "7b"].index) and ("7b" in sizes)
    assert {c.key for c, s in todo if s == "7b"} == {"peer:lomo_ckpt", "peer:adalomo_ckpt", "ours:lomo_ckpt",
                                                     "ours:adalomo_ckpt", "ours:adalomo_torch_ckpt",
                                                     "ours:backward_floor_ckpt"}
    assert [(c.key, s) for c, s in harness.plan(suite, ["7b"], ["lomo_ckpt"], False)] == [
        ("peer:lomo_ckpt", "7b"), ("ours:lomo_ckpt", "7b")]
    smoke = harness.plan(SUITES["foundation"], None, None, smoke=True)
    assert {c.key for c, _ in smoke} == {"peer:forward", "peer:adamw", "peer:mezo_official", "ours:forward",
                                         "ours:adamw"} and {s for _, s in smoke} == {"tiny"}


def test_tabled_runs_what_the_tables_read(capsys):
    """--tabled keeps the cases the published tables read, with the reference rows of the ratios they read."""
    from benchmarks.results_tables import suite_reads

    assert harness.main(["--suite", "dfo", "--dry-run", "--tabled"]) == 0
    runs = {tuple(line.split()[1:3]) for line in capsys.readouterr().out.splitlines() if line.startswith("[")}
    read = suite_reads()[0]["dfo"]
    cases = SUITES["dfo"].cases
    assert runs == {(c.key, z) for c in cases for z in c.sizes if {(c.key, z), (c.key, "*")} & read}
    assert len(runs) < sum(len(c.sizes) for c in cases)
    assert ("ours:dfo_sequential", "smol") in runs  # the reference of "sequential / row"


def test_missing_module_and_oom_stop_become_rows(tmp_path, monkeypatch):
    """A case whose module does not exist is an error row; a case that OOMs is not run at larger sizes."""
    suite = Suite("t", "t", (Case("ours", "nothing", ("1b",), module="no_such_module"),
                             Case("ours", "big", ("1b", "7b", "13b"), module="no_such_module")))
    monkeypatch.setitem(SUITES, "t", suite)
    calls = []
    real = harness.run_one

    def fake_run_one(case, size, *a):
        calls.append((case.name, size))
        if case.name == "big":
            return harness.record(case, size, 8, 512, peak_gib="OOM" if size == "7b" else 1.0)
        return real(case, size, *a)

    monkeypatch.setattr(harness, "run_one", fake_run_one)
    assert harness.main(["--suite", "t", "--out", str(tmp_path / "t"), "--batch", "8"]) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    by = {(r["case"], r["size"]): r for r in data["records"]}
    assert "No module named benchmarks.cases.no_such_module" in by["nothing", "1b"]["error"]
    assert by["big", "7b"]["peak_gib"] == "OOM" and by["big", "13b"]["error"] == "skipped: OOM at a smaller size"
    assert ("big", "13b") not in calls
    assert "| big | ours | 13b |" in (tmp_path / "t.md").read_text()


@pytest.mark.skipif(not ANCHORS.exists(), reason=f"peers' script not found at {ANCHORS}")
def test_smoke_foundation_suite(tmp_path):
    """The CI smoke mode: ours and the peers' CPU cases run, and the tables carry their ratios."""
    out = tmp_path / "foundation"
    assert harness.main(["--suite", "foundation", "--smoke", "--anchors", str(ANCHORS), "--out", str(out)]) == 0
    data = json.loads(out.with_name("foundation.json").read_text())
    assert data["environment"]["torch"] and data["environment"]["smoke"] is True
    assert data["environment"]["command"] == (
        f"python -m benchmarks.harness --suite foundation --smoke --anchors {ANCHORS} --out {out}")
    recs = {r["key"]: r for r in data["records"]}
    assert set(recs) == {"peer:forward", "peer:adamw", "peer:mezo_official", "ours:forward", "ours:adamw"}
    for r in recs.values():
        assert r["error"] is None and r["size"] == "tiny" and (r["batch"], r["seq"]) == (2, 16)
        assert r["step_s"] > 0 and r["tok_per_s"] > 0
        assert r["ratios"]["step / AdamW"] == pytest.approx(r["step_s"] / recs["peer:adamw"]["step_s"])
    assert recs["ours:adamw"]["ratios"]["step / peer"] == pytest.approx(
        recs["ours:adamw"]["step_s"] / recs["peer:adamw"]["step_s"])
    assert recs["peer:adamw"]["ratios"]["step / peer"] is None
    md = out.with_name("foundation.md").read_text()
    assert "| step / AdamW | peak / AdamW | step / peer | peak / peer |" in md
    assert "| adamw | peer (torch AdamW) | tiny | 0.00 | 2×16 |" in md
    assert "| adamw | ours | tiny | 0.00 | 2×16 |" in md


def test_merge_runs_and_reject_bad_filters(tmp_path, monkeypatch):
    monkeypatch.setitem(SUITES, "fake", SUITE)
    env = {"gpu": "H100"}
    harness.write(tmp_path / "a", SUITE, [rec("peer:lomo", step=2.0), rec("ours:lomo", step=9.0)], env)
    harness.write(tmp_path / "b", SUITE, [rec("ours:lomo", step=1.0)], env)  # a rerun replaces the earlier row
    assert harness.main(["--suite", "fake", "--from", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                         "--out", str(tmp_path / "ab")]) == 0
    data = json.loads((tmp_path / "ab.json").read_text())
    assert [(r["key"], r["step_s"], r["ratios"]["speed-up"]) for r in data["records"]] == [
        ("peer:lomo", 2.0, None), ("ours:lomo", 1.0, 2.0)]
    for bad in (["--cases", "nope"], ["--sizes", "1B"]):
        with pytest.raises(SystemExit):
            harness.main(["--suite", "lomo", "--dry-run", *bad])


def test_task_run_specs_and_table():
    from benchmarks import task_results as S

    assert S.parse_spec("mezo") == ("mezo", "mezo", [])
    label, method, over = S.parse_spec("clora_k16=clora@--data.k=16@--data.batch_size=32")
    assert (label, method, over) == ("clora_k16", "clora", ["--data.k=16", "--data.batch_size=32"])
    with pytest.raises(SystemExit, match="unknown method"):
        S.parse_spec("x=nosuch")
    lower = 'lower=mezo_pop@--model.init_args.frozen=["model.embed_tokens.*","model.layers.[0-9].*"]'
    assert S.split_specs(f"adamw,{lower},mezo") == ["adamw", lower, "mezo"]
    assert S.parse_spec(lower)[2] == ['--model.init_args.frozen=["model.embed_tokens.*","model.layers.[0-9].*"]']
    with pytest.raises(SystemExit, match="unbalanced brackets or quotes"):
        S.split_specs("x=mezo@--a=[1,2")
    rows = [
        {"method": "clora", "label": "clora_k16", "overrides": over, "seed": 0, "dev_acc": 81.8, "dev_f1": 81.7,
         "steps": 400, "forwards": 803, "wall_s": 1.0, "peak_gib": 1.1},
        {"method": "mezo", "seed": 0, "error": "Traceback\nboom | bad"},
    ]
    table = S.table(rows)
    assert "| clora_k16 | clora | 0 | 81.8 |" in table and "error: boom / bad" in table
    assert S.summary(rows) == ""  # one seed per run: no summary


def test_runs_load_a_gguf_dequantized_once_unless_kept(tmp_path, monkeypatch):
    from benchmarks import task_results as S
    from lightning_memopt import fetch

    calls = []
    monkeypatch.setattr(fetch, "dequantize_gguf", lambda p: calls.append(p) or Path(p[:-5]))
    assert S.model_for_runs(str(tmp_path / "m.gguf")) == str(tmp_path / "m") and len(calls) == 1
    assert S.model_for_runs(str(tmp_path / "m.gguf"), keep_gguf=True) == str(tmp_path / "m.gguf")
    assert S.model_for_runs(str(tmp_path / "folder")) == str(tmp_path / "folder") and len(calls) == 1


def test_merge_joins_one_tasks_calls_and_refuses_a_run_twice(tmp_path):
    from benchmarks import task_results as S

    def rec(seed, dev, task="sst2"):
        return {"task": task, "method": "mezo_pop", "label": "pop", "seed": seed, "dev_acc": dev, "dev_f1": dev,
                "steps": 5, "forwards": 85, "wall_s": 1.2, "train_s": 1.0, "peak_gib": 1.0}

    a, b, c = (tmp_path / f"{n}.json" for n in "abc")
    a.write_text(json.dumps([rec(0, 86.0)]))
    b.write_text(json.dumps([rec(1, 84.0), rec(2, 85.0)]))
    merged = S.merge(f"{a},{b}", str(tmp_path / "all"))
    assert [r["seed"] for r in merged] == [0, 1, 2]
    assert json.loads((tmp_path / "all.json").read_text()) == merged
    assert "| pop | 3 | 0 | 85.0 ± 1.0 |" in (tmp_path / "all.md").read_text()
    with pytest.raises(SystemExit, match="run 'pop' seed 1 is in both"):
        S.merge(f"{b},{b}", str(tmp_path / "twice"))
    c.write_text(json.dumps([rec(3, 80.0, task="mrpc")]))
    with pytest.raises(SystemExit, match="several tasks"):
        S.merge(f"{a},{c}", str(tmp_path / "tasks"))
    assert not (tmp_path / "twice.json").exists() and not (tmp_path / "tasks.json").exists()


def test_a_timed_out_task_run_keeps_its_curve(tmp_path):
    """A run killed at its timeout (or failing) keeps the validation points it printed; the table and the plots
    show them."""
    import subprocess
    import time

    from benchmarks import task_results as S

    points = [{"step": 2, "wall_s": 1.0, "train_s": 0.5, "val": 0.7, "forwards": 4, "dev": 0.69},
              {"step": 4, "wall_s": 2.0, "train_s": 1.0, "val": 0.8, "forwards": 8, "dev": 0.81}]
    code = ("import json, time\n" + "".join(f"print('TASKPOINT ' + json.dumps({p!r}), flush=True)\n" for p in points)
            + "print('TASKSTEP ' + json.dumps({'step': 5, 'train_s': 1.3}), flush=True)\n"
            + "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rec = S._collect(("pop", "mezo_pop", [], 0), proc, time.perf_counter(), timeout=5.0, task="sst2")
    assert rec["error"] == "timeout after 5.0s" and rec["curve"] == points and proc.returncode is not None
    assert rec["task"] == "sst2" and rec["last_step"] == {"step": 5, "train_s": 1.3}
    assert ("error: timeout after 5.0s; kept its curve to step 4 (dev 81.0); reached step 5 in 1.3 s of training"
            in S.table([rec]))
    # a run that fails keeps its points too, with its error
    proc = subprocess.Popen([sys.executable, "-c", code.replace("time.sleep(60)", "raise SystemExit('boom')")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    failed = S._collect(("pop", "mezo_pop", ["--x=1"], 0), proc, time.perf_counter(), timeout=30.0,
                        extra=["--trainer.max_steps=100"])
    assert "boom" in failed["error"] and failed["curve"] == points
    # the overrides after -- are the run's too: the grid counts no record that names any
    assert rec["overrides"] == [] and failed["overrides"] == ["--trainer.max_steps=100", "--x=1"]
    pytest.importorskip("matplotlib")
    (tmp_path / "r.json").write_text(json.dumps([rec]))
    assert all(os.path.getsize(f) > 0 for f in S.plot(str(tmp_path / "r.json"), str(tmp_path / "img")))


def test_task_summary_over_seeds():
    from benchmarks import task_results as S

    def rec(seed: int, acc: float, best: float) -> dict:
        return {"method": "mezo", "label": "pop", "seed": seed, "dev_acc": acc, "dev_f1": acc - 1,
                "dev_acc_best_val": best, "train_s": 10.0 * (seed + 1), "forwards": 100}

    failed = {"method": "mezo", "label": "pop", "seed": 3, "error": "timeout"}
    rows = [rec(0, 85.0, 86.0), rec(1, 86.0, 86.0), rec(2, 87.5, 87.0), failed]
    assert S.summary(rows).splitlines()[-1] == "| pop | 3 | 1 | 86.2 ± 1.3 | 85.2 ± 1.3 | 86.3 ± 0.6 | 20.0 | 100.0 |"


@pytest.mark.parametrize(("module", "case"), [("dfo", "dfo_batched_chunk10"), ("dfo", "dfo_forward_chunk10_graph"),
                                             ("lightning", "dfo_lightning_graph")])
def test_dfo_cases_run_on_cpu(module, case):
    """The DFO cases go through the public core (LayerwiseDFO) and the callback under a Trainer; a CPU smoke run keeps
    them from drifting."""
    import os
    import subprocess

    env = {**os.environ, "DEV": "cpu", "POP": "4"}
    out = subprocess.run([sys.executable, "-m", f"benchmarks.cases.{module}", case, "tiny", "2", "16"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    rows = [json.loads(ln[7:]) for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and rows and rows[0]["step_s"] > 0, out.stderr[-2000:]


def test_task_run_tests_the_best_validation_weights_too(tmp_path, in_repo):
    """``--best_val`` tests the final weights, then those of the best validation (BestWeights), and ``--dev_curve``
    scores dev at each validation, on a CPU run of the population config with the tiny model in place of SmolLM2."""
    from conftest import SST2
    from test_cli import TINY_MODEL, short

    from benchmarks import task_results as S

    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"{SST2} not found")
    extra = [*TINY_MODEL, *short(tmp_path, steps=4), "--trainer.val_check_interval=2", "--data.init_args.k=16",
             "--trainer.callbacks.init_args.cuda_graph=false", "--trainer.limit_test_batches=1.0"]
    rec = S._one("sst2", "mezo_pop", 0, "unused", str(SST2), extra, best_val=True, dev_curve=True)
    assert rec["steps"] == 4 and [p["step"] for p in rec["curve"]] == [2, 4] and rec["time_capped"] is False
    # --dev_curve: the last validation saw the final weights, which the test then scores on the same dev set
    assert round(100 * rec["curve"][-1]["dev"], 2) == rec["dev_acc"]
    best = max(rec["curve"], key=lambda p: p["val"])
    assert (rec["best_val_step"], rec["best_val"]) == (best["step"], round(100 * best["val"], 2))
    assert 0 <= rec["dev_acc_best_val"] <= 100 and 0 <= rec["dev_acc"] <= 100


def test_a_task_run_says_whether_the_time_cap_ended_it(tmp_path, in_repo):
    """``time_capped``: Lightning's Timer (``--max_minutes``) stopped the fit before its max_steps."""
    from conftest import SST2
    from test_cli import TINY_MODEL, short

    from benchmarks import task_results as S

    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"{SST2} not found")
    extra = [*TINY_MODEL, *short(tmp_path, steps=10**6), "--data.init_args.k=16", "--trainer.max_time=00:00:00:01",
             "--trainer.callbacks.init_args.cuda_graph=false", "--trainer.val_check_interval=null"]
    rec = S._one("sst2", "mezo", 0, "unused", str(SST2), extra)
    assert rec["time_capped"] is True and 0 < rec["steps"] < 10**6
    assert rec["skipped_steps"] == 0 and "partial_steps" not in rec  # recorded where a method had any; none here
    assert "skipped" not in S.table([rec]) and "(3 steps skipped)" in S.table([dict(rec, skipped_steps=3)])
    assert "(3 steps skipped, 2 steps left tensors out)" in S.table([dict(rec, skipped_steps=3, partial_steps=2)])


def test_the_dev_curve_scores_the_weights_validation_scored(tmp_path, in_repo):
    """With Lightning's EMAWeightAveraging the validations score the average, and so does each dev point; the fit
    ends on the average, so the last dev point equals the final test."""
    from conftest import SST2
    from test_cli import TINY_MODEL, short

    from benchmarks import task_results as S

    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"{SST2} not found")
    extra = [*TINY_MODEL, *short(tmp_path, steps=4), "--trainer.val_check_interval=2", "--data.init_args.k=16",
             "--trainer.callbacks.init_args.cuda_graph=false", "--trainer.limit_test_batches=1.0",
             "--model.init_args.lr=0.05", "--trainer.callbacks+=EMAWeightAveraging", "--trainer.callbacks.decay=0.5"]
    rec = S._one("sst2", "mezo_pop", 0, "unused", str(SST2), extra, dev_curve=True)
    assert [p["step"] for p in rec["curve"]] == [2, 4]
    assert round(100 * rec["curve"][-1]["dev"], 2) == rec["dev_acc"]


def _cards(grid):
    """The grid's card and the other card whose seeds 1 and 2 count, as records name them."""
    other = next(c for c in grid.CARDS if c != grid.CARD)
    return {"gpu": f"NVIDIA {grid.CARD} 80GB HBM3"}, {"gpu": f"NVIDIA {other}"}


def test_grid_counts_solo_cells_on_its_card_and_packs_the_rest_seed_0_first(tmp_path, capsys):
    from benchmarks import grid

    card, other = _cards(grid)

    def rec(method, seed, env=card, **kw):
        return dict(task="sst2", method=method, seed=seed, dev_acc=80.0 + seed, process_s=100.0, env=env, **kw)

    (tmp_path / "sst2_grid_s0_0.json").write_text(json.dumps([
        rec("adamw", 0),  # a cell
        dict(rec("lomo", 0, env=other), process_s=200.0),  # seed 0 (the timed curves) counts on the grid's card only
        rec("lomo", 2, env=other, note="shared", time_capped=False),  # a cell: seeds 1 and 2 count on either card
        rec("clora", 1, env={"gpu": "NVIDIA A100-SXM4-80GB"}),  # nor another GPU
        rec("galore", 0, note="ran beside up to 2 other runs on the GPU", time_capped=False),  # seed 0 shared
        rec("galore", 1, note="shared", time_capped=False),  # a cell: seeds 1 and 2 may share, if the cap did not end them
        rec("galore", 2, note="shared", time_capped=True),  # the cap ended it: fewer steps than a solo run
        rec("lomo", 1, note="shared"),  # from before time_capped was recorded
        rec("mezo", 0, error="timeout after 580s"),
        rec("mezo_pop", 0, overrides=["--model.init_args.lr=2e-4"], label="lr2"),  # not the config
        # before and since the code change grid.SUPERSEDED names (git history decides)
        rec("adalomo", 0, env={**card, "commit": "3f91527"}),
        rec("adalomo", 2, env={**card, "commit": grid.SUPERSEDED["adalomo"][0]}),
    ]))
    (tmp_path / "sst2_grid_merged.json").write_text(json.dumps([rec("adamw", 0), rec("adamw", 1)]))  # a merge
    (tmp_path / "sst2_gpu_check.json").write_text(json.dumps([rec("clora", 2, env=card)]))  # not a grid file
    (tmp_path / "sst2_other.json").write_text(json.dumps([  # estimates only
        {"task": "sst2", "method": "lomo", "seed": 0, "process_s": 300.0, "env": card, "overrides": ["--x=1"]},
        {"task": "sst2", "method": "lomo", "seed": 0, "process_s": 900.0, "env": card, "note": "shared"},
        {"task": "mrpc", "method": "flora", "seed": 0, "process_s": 250.0, "env": card},
        {"task": "sst2", "method": "galore", "seed": 0, "process_s": 300.0, "env": card, "overrides": ["--x=1"]},
        {"task": "sst2", "method": "galore", "seed": 0, "process_s": 50.0, "env": {"gpu": "NVIDIA A100"}},  # no card
    ]))
    # a config's runs under its earlier name, and runs of the grid's configs outside its calls
    assert "sst2_pop_best_h200.json" in grid.ADOPTED and grid.ADOPTED[grid.EQUIVALENCE]["adamw"] == "adamw"
    (tmp_path / "sst2_pop_best_h200.json").write_text(json.dumps([
        rec("mezo_pop32", 2, env=other), rec("mezo_pop", 1, overrides=["--x=1"], label="f10n32")]))
    (tmp_path / grid.EQUIVALENCE).write_text(json.dumps([rec("zero_shot", 0), rec("mezo", 0)]))  # mezo: not named
    cells = grid.done_cells(tmp_path)
    assert set(cells) == {("sst2", "adamw", 0), ("sst2", "adamw", 1), ("sst2", "galore", 1), ("sst2", "mezo_pop", 2),
                          ("sst2", "adalomo", 2), ("sst2", "lomo", 2), ("sst2", "zero_shot", 0)}
    assert cells[("sst2", "mezo_pop", 2)]["adopted_from"] == "sst2_pop_best_h200.json: mezo_pop32"
    assert cells[("sst2", "zero_shot", 0)]["adopted_from"] == f"{grid.EQUIVALENCE}: zero_shot"
    est = grid.estimates(tmp_path, default_s=600)
    assert est[("sst2", "adamw")] == 100.0  # its own task, alone, no overrides
    assert est[("sst2", "lomo")] == 200.0  # alone on the other card beats runs with overrides or shared
    assert est[("sst2", "galore")] == 300.0  # alone with overrides beats the shared runs
    assert est[("sst2", "flora")] == 250.0  # another task's record where its own has none
    assert est[("sst2", "clora")] == 100.0  # alone on the card, in a file that is not the grid's
    only = tmp_path / "only_adamw"
    only.mkdir()
    (only / "sst2_grid_s0_0.json").write_text(json.dumps([rec("adamw", 0), rec("flora", 0)]))
    (only / "mrpc_grid_s0_0.json").write_text(json.dumps([dict(rec("clora", 0), task="mrpc", process_s=200.0)]))
    est2 = grid.estimates(only, default_s=600)
    assert est2[("sst2", "clora")] == 200.0  # another task's record, with no proxy
    assert est2[("sst2", "flora")] == 100.0  # its own
    # the larger of its record on another task (100) and its proxy's here (or elsewhere) scaled (300)
    assert est2[("mrpc", "flora")] == est2[("squad", "flora")] == 200.0 * grid.PROXY["flora"][1] > 100.0
    assert est2[("sst2", "mezo")] == grid.CAPPED_S < 600  # never run, no proxy: the default, no longer than the cap
    assert est2[("sst2", "lomo")] == 100.0 * grid.PROXY["lomo"][1]  # never run anywhere: from its proxy, scaled

    missing = [(t, m, s) for s in grid.SEEDS for t in grid.TASKS for m in grid.METHODS if (t, m, s) not in cells]
    calls = grid.plan_calls(missing, est, budget=540)
    first = [c["seed"] == 0 for c in calls]
    assert first == sorted(first, reverse=True) and any(first)  # seed 0 of every task first
    assert sorted((c["task"], m, c["seed"]) for c in calls for m in c["methods"]) == sorted(missing)
    assert all(c["seeds"] == (c["seed"],) for c in calls)  # solo calls: one seed each
    for c in calls:  # within the budget, or one cell alone
        assert c["est_s"] <= 540 or len(c["methods"]) == 1
        assert c["command"].startswith(f"bash benchmarks/device_run.sh task {c['task']} {c['seed']} ")
        # the output's name: seed 0 runs on the grid's card; seeds 1 and 2 on either, and the record names it
        assert (f" {c['task']}_grid_{grid.CARD.lower()}_s0_" in c["command"]) == (c["seed"] == 0)
        # seed 0's curves are the plotted ones; task_results refuses a dev curve on squad
        assert ("--dev_curve" in c["command"]) == (c["task"] != "squad" and c["seed"] == 0)
    grid.main(["--results", str(tmp_path), "--calls"])
    out = capsys.readouterr().out
    assert "| sst2 | adamw | 80.0 | 81.0 | (~100 s) |" in out and "7 of 81 cells measured; 74 left" in out
    assert f"Seed 0 needs an {grid.CARD} (kind {grid.KIND})" in out

    # --jobs: seeds 1 and 2 share the GPU J at a time (no dev curve), each run slowed J / speedup times unless the
    # grid has its shared time, a call's estimate when its last run ends; a method missing on both seeds runs both
    # in one call; a cell too long to share safely keeps a solo call; seed 0 is always solo
    est[("sst2", "mezo")] = 400.0
    beside = {("mrpc", "adamw"): 50.0}
    calls = grid.plan_calls(missing, est, budget=540, jobs=3, speedup=2.0, shared_est=beside)
    assert sorted((c["task"], m, s) for c in calls for m in c["methods"] for s in c["seeds"]) == sorted(missing)
    for c in calls:
        shared = c["jobs"] > 1
        assert c["command"].endswith(" --jobs 3") == shared
        assert ("--dev_curve" in c["command"]) == (c["seed"] == 0 and c["task"] != "squad")
        assert f" task {c['task']} {','.join(map(str, c['seeds']))} " in c["command"]
        if shared:
            assert 0 not in c["seeds"] and c["est_s"] <= 540
            runs = [beside.get((c["task"], m), est[(c["task"], m)] * 1.5) for m in c["methods"] for _ in c["seeds"]]
            assert c["est_s"] == round(grid.SETUP_S + grid.makespan(runs, 3))
    assert all(c["jobs"] == 1 for c in calls if c["seed"] == 0)
    both = [c for c in calls if c["seeds"] == (1, 2)]
    assert both and all(c["jobs"] == 3 and f"_grid_s1-2_{'-'.join(c['methods'])} " in c["command"] for c in both)
    assert any("adamw" in c["methods"] for c in both if c["task"] == "mrpc")
    # 400 s slowed 3/2 times would run 600 s: past 0.8 of the 580 s timeout, so alone
    assert all(c["jobs"] == 1 for c in calls if c["task"] == "sst2" and "mezo" in c["methods"])
    assert grid.makespan([3.0, 1.0, 1.0, 1.0], 2) == 3.0 and grid.makespan([1.0, 1.0, 1.0], 2) == 2.0
    # memory: a cell shares only where jobs of its largest recorded peak fit 90% of the card; unknown peaks run alone
    mem = grid.plan_calls(missing, est, budget=540, jobs=3, speedup=2.0, shared_est=beside, gpu_gib=80.0,
                          peak={("mrpc", "adamw"): 20.0, ("mrpc", "lomo"): 30.0})
    shared = {(c["task"], m) for c in mem if c["jobs"] > 1 for m in c["methods"]}
    assert shared == {("mrpc", "adamw")}  # 3 x 20 <= 72 GiB; 3 x 30 > 72; the rest have no peak
    (tmp_path / "mrpc_grid_s1_lomo.json").write_text(json.dumps([
        {"task": "mrpc", "method": "lomo", "seed": 1, "peak_gib": 7.0, "env": other},
        {"task": "mrpc", "method": "lomo", "seed": 2, "peak_gib": 70.0, "env": other, "overrides": ["--x=1"]},
        {"task": "mrpc", "method": "lomo", "seed": 2, "error": "CUDA out of memory", "env": other}]))
    assert grid.peaks(tmp_path)[("mrpc", "lomo")] == 7.0  # finished runs of the config only
    with pytest.raises(SystemExit):
        grid.main(["--results", str(tmp_path), "--calls", "--jobs", "0"])
    assert "--jobs must be >= 1" in capsys.readouterr().err


def test_grid_counts_a_run_only_where_its_cap_ended_it_as_the_grids_would(tmp_path):
    """A cell ran under the grid's cap (CAP_MIN), or ended by its steps within it: a run under a longer cap that
    trained past CAP_MIN minutes, or that its own longer cap ended, is not a cell; the plan runs the grid's cap."""
    from benchmarks import grid

    card, other = _cards(grid)
    cmd = lambda cap: {**card, "command": f"task_results.py --task sst2 --max_minutes {cap}"}
    cap_s = grid.CAP_MIN * 60

    def rec(method, wall_s, cap, capped):
        return dict(task="sst2", method=method, seed=0, dev_acc=80.0, wall_s=wall_s, time_capped=capped, env=cmd(cap))

    recs = [rec("adamw", cap_s - 1, 10, False),  # steps ended it within the grid's cap: a cell
            rec("lomo", cap_s + 60, 10, False),  # steps ended it, but past the grid's cap: that cap would have
            rec("mezo", 600.4, 10, True),  # a 10-minute cap ended it
            rec("mezo_pop", cap_s + 0.5, grid.CAP_MIN, True),  # the grid's cap ended it: a cell
            rec("clora", cap_s + 30, grid.CAP_MIN, None)]  # before time_capped was recorded: by its fit time
    # where the cap ends a run the card sets its steps: seeds 1 and 2 count on the other card only where their steps
    # ended it
    elsewhere = dict(rec("flora", cap_s + 0.5, grid.CAP_MIN, True), seed=1)
    elsewhere["env"] = dict(elsewhere["env"], **other)
    recs += [elsewhere, dict(rec("mezo", cap_s + 0.5, grid.CAP_MIN, True), seed=1),
             dict(rec("galore", cap_s - 5, grid.CAP_MIN, False), seed=1, env=elsewhere["env"])]
    (tmp_path / "sst2_grid_s0_x.json").write_text(json.dumps(recs))
    assert set(grid.done_cells(tmp_path)) == {("sst2", "adamw", 0), ("sst2", "mezo_pop", 0), ("sst2", "mezo", 1),
                                              ("sst2", "galore", 1)}
    assert grid.run_cap(recs[0]) == 10 and grid.run_cap({"env": {"command": "task_results.py"}}) is None
    calls = grid.plan_calls([("mrpc", "mezo", 0)], {("mrpc", "mezo"): 300.0}, budget=540)
    assert f" --max_minutes {grid.CAP_MIN} " in calls[0]["command"] + " "
    # a capped run's process time bounds every estimate: load, the capped fit, test
    (tmp_path / "mrpc_other.json").write_text(json.dumps([
        {"task": "mrpc", "method": "mezo", "seed": 0, "process_s": 900.0, "env": card}]))
    assert grid.estimates(tmp_path)[("mrpc", "mezo")] == grid.CAPPED_S

    # a probe (the config alone, only its step budget overridden) scales its training to the config's steps
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "squad_smollm2_mezo.yaml").write_text("trainer:\n  max_steps: 4000\n  val_check_interval: 1000\n")
    probe = dict(task="squad", method="mezo", seed=1, process_s=31.7, train_s=8.3, env=other)
    (tmp_path / "squad_probe.json").write_text(json.dumps([
        dict(probe, overrides=["--trainer.max_steps=100"]),
        dict(probe, overrides=["--trainer.max_steps=100", "--x=1"], process_s=900.0),  # another config: no
        dict(probe, overrides=["--trainer.max_steps=100"], note="shared", process_s=900.0)]))  # shared: no
    probes = grid.probe_estimates(grid._records("*.json", tmp_path), configs)
    assert probes == {("squad", "mezo"): round(31.7 - 8.3 + 8.3 * 40, 1)}
    assert grid.config_steps("squad", "mezo", configs) == 4000 and grid.config_steps("squad", "x", configs) is None
    # a run that stopped short of its config's steps (a shorter cap ended it) would run to this cap
    (configs / "squad_smollm2_adamw.yaml").write_text("trainer:\n  max_steps: 300\n")
    (tmp_path / "squad_old.json").write_text(json.dumps([
        dict(task="squad", method="mezo", seed=0, steps=2721, process_s=405.0, env=card),
        dict(task="squad", method="adamw", seed=0, steps=300, process_s=120.0, env=card),
        dict(task="squad", method="adamw", seed=1, steps=30, process_s=20.0, env=card,
             overrides=["--trainer.max_steps=30"])]))  # a probe on the card: not the config's run time
    est = grid.estimates(tmp_path, configs=configs)
    assert est[("squad", "mezo")] == grid.CAPPED_S and est[("squad", "adamw")] == 120.0
    # a run the cap may end runs on the grid's card, as seed 0 does; the output's name says so
    calls = grid.plan_calls([("squad", "mezo", 1), ("squad", "adamw", 1)], est, budget=540)
    named = f"_grid_{grid.CARD.lower()}_s1_"
    assert {c["methods"][0]: named in c["command"] for c in calls} == {"mezo": True, "adamw": False}


def test_grid_summary_over_seeds_into_the_docs(tmp_path):
    from benchmarks import grid

    card, other = _cards(grid)
    recs = [dict(task="sst2", method="adamw", seed=s, dev_acc=v, train_s=60.0 + s, peak_gib=3.0, env=card,
                 curve=[{"step": 10, "train_s": 5.0, "forwards": 10, "val": 0.8, "dev": 0.8}])
            for s, v in [(0, 86.0), (1, 87.0), (2, 88.0)]]
    recs += [dict(task="mrpc", method="adamw", seed=1, dev_acc=70.0, train_s=50.0, peak_gib=3.5, env=card),
             dict(task="mrpc", method="adamw", seed=2, dev_acc=72.0, train_s=40.0, peak_gib=3.5, env=other),
             dict(task="sst2", method="zero_shot", seed=0, dev_acc=77.0, train_s=0.0, peak_gib=0.6, env=card),
             dict(task="squad", method="lomo", seed=0, dev_f1=40.0, train_s=90.0, env=card),
             dict(task="squad", method="lomo", seed=2, dev_f1=44.0, train_s=110.0, env=card)]
    for task in grid.TASKS:
        (tmp_path / f"{task}_grid_x.json").write_text(json.dumps([r for r in recs if r["task"] == task]))
    table = grid.summary_table(grid.done_cells(tmp_path))
    # three seeds: mean ± sample std; fewer: named; zero-shot trains for no seconds; the largest peak; times from the
    # grid's card only (seed 2 on the other card gives its dev, not its time)
    assert "| `adamw` | 87.0 ± 1.0 | 71.0 ± 1.4 (seeds 1, 2) | — | 61 ± 1 | 50 (seed 1) | — | 3.50 |" in table
    assert "| `zero_shot` | 77.0 (seed 0) | — | — | — | — | — | 0.60 |" in table
    assert "| `lomo` | — | — | 42.0 ± 2.8 (seeds 0, 2) | — | — | 100 ± 14 (seeds 0, 2) | — |" in table
    assert "`galore`" not in table and "8 of 81 cells measured." in table

    docs = tmp_path / "results.md"
    docs.write_text(f"intro\n{grid.START}\nstale\n{grid.END}\nafter\n")
    args = ["--results", str(tmp_path), "--docs", str(docs)]
    assert grid.main([*args, "--check"]) == 1
    assert grid.main([*args, "--write"]) == 0
    assert grid.main([*args, "--check"]) == 0
    assert docs.read_text() == f"intro\n{grid.START}\n{table}\n{grid.END}\nafter\n"
    docs.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        grid.main([*args, "--check"])

    pytest.importorskip("matplotlib")
    from benchmarks.plot_results import grid_plots

    files = grid_plots(str(tmp_path / "img"), results=tmp_path)  # seed-0 cells: SST-2 and SQuAD, not MRPC
    names = sorted(os.path.basename(f) for f in files)
    assert "sst2_grid_acc_vs_wall_s.png" in names and "squad_grid_peak_memory.png" in names
    assert not any(n.startswith("mrpc") for n in names) and all(os.path.getsize(f) > 0 for f in files)


def test_docs_grid_summary_matches_committed_json():
    from benchmarks import grid

    assert grid.main(["--check"]) == 0, "run `python -m benchmarks.grid --write`"


@pytest.mark.parametrize("dev", ["cpu", "cuda"])
def test_overlap_probe_leaves_the_weights_and_logits_of_the_serial_order(dev, tmp_path):
    """benchmarks/overlap_probe.py (issue 18): the pass on a side stream, each layer's forward waiting for its own
    layer only, gives the serial order's weights and logits (on CPU the order runs inline: the plumbing only)."""
    import subprocess

    import torch

    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    env = {**os.environ, "DEV": dev, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "benchmarks.overlap_probe", "--size", "tiny", "--batch", "2",
                          "--seq", "16", "--reps", "1", "--out", str(tmp_path / "p")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["same_weights"] is True and res["max_logit_diff"] == 0.0
    assert set(res["ms"]) == {"forward", "pass", "serial", "pipelined"}
    assert res["env"]["commit"] and "overlap_probe" in res["env"]["command"]  # results name what made them


def test_grid_packs_the_longest_cells_first():
    from benchmarks import grid

    # 520 s of room per call: in the grid's order 100 + 300, then 200, then 400 (three calls); longest first,
    # 400 + 100 and 300 + 200 (two)
    est = {(t, m): 1.0 for t in grid.TASKS for m in grid.METHODS}
    est.update({("mrpc", "adamw"): 100.0, ("mrpc", "lomo"): 300.0, ("mrpc", "adalomo"): 200.0,
                ("mrpc", "galore"): 400.0})
    missing = [("mrpc", m, 0) for m in ("adamw", "lomo", "adalomo", "galore")]
    calls = grid.plan_calls(missing, est, budget=540)
    assert [c["methods"] for c in calls] == [["adamw", "galore"], ["lomo", "adalomo"]]
    assert all(c["est_s"] <= 540 for c in calls)


def test_step_profile_counts_busy_time_and_gaps_over_overlapping_intervals():
    from benchmarks.zo_step_profile import _union_ms

    # µs: two overlapping kernels, one nested, a gap of 5, then one more; what the profile sums per step
    busy, gaps = _union_ms([(10.0, 20.0), (15.0, 30.0), (16.0, 18.0), (35.0, 45.0)])
    assert busy == pytest.approx(0.030) and gaps == [5.0]
    assert _union_ms([]) == (0.0, [])


def test_attention_widths_finds_the_batches_of_cudnns_nan_lengths():
    from conftest import SST2
    from test_cli import TINY_MODEL

    from benchmarks.attention_widths import unsafe_steps

    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"{SST2} not found")
    # padded to max_length: every batch is that wide, and padded
    for width, unsafe in ((64, True), (65, False), (192, True)):
        extra = (*TINY_MODEL, "--data.init_args.k=32", "--trainer.max_steps=6", "--data.init_args.padding=max_length",
                 f"--data.init_args.max_length={width}")
        rec = unsafe_steps("sst2", "adamw", 1, "unused", str(SST2), extra)
        assert rec["steps"] == 6 and rec["widths"] == {width: 6}
        assert rec["unsafe"] == ([{"step": i, "width": width} for i in range(6)] if unsafe else [])


def test_nan_grad_probe_finds_the_first_non_finite_gradient(monkeypatch, capsys):
    import torch
    from conftest import SST2
    from test_cli import TINY_MODEL

    from benchmarks import nan_grad_probe
    from lightning_memopt.models.hf import HFCausalLM

    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"{SST2} not found")
    extra = (*TINY_MODEL, "--data.init_args.k=16")
    assert nan_grad_probe.fit("sst2", "adamw", 1, "unused", str(SST2), 3, extra)
    assert "3 steps, every gradient finite" in capsys.readouterr().out

    class NaNGrad(torch.autograd.Function):
        forward = staticmethod(lambda ctx, x: x.clone())
        backward = staticmethod(lambda ctx, g: g * float("nan"))

    step = HFCausalLM._step
    monkeypatch.setattr(HFCausalLM, "_step", lambda self, batch: {**step(self, batch),
                                                                  "loss": NaNGrad.apply(step(self, batch)["loss"])})
    assert not nan_grad_probe.fit("sst2", "adamw", 1, "unused", str(SST2), 3, extra)
    out = capsys.readouterr().out
    assert "step 0: gradient norm nan" in out and "stopped at the first non-finite gradient" in out
    assert "rows whose gradient alone is not finite: [0, 1, 2, 3, 4, 5, 6, 7" in out


@pytest.mark.parametrize("method", ["lomo", "adalomo", "galore", "galore_layerwise"])
def test_guard_interleaved_steps_train_checked_and_unchecked(method):
    """benchmarks/guard_interleaved.py's steps (timed on a GPU) run on CPU, checked and unchecked, and train."""
    import argparse

    import torch

    from benchmarks import guard_interleaved as G
    from benchmarks.common import build

    model = build("tiny", dtype=torch.float32)  # on the GPU where there is one
    x = torch.randint(0, model.config.vocab_size, (2, 16), device=next(model.parameters()).device)
    steps = G.METHODS[method](model, x, argparse.Namespace(dist="normal"))
    before = [p.detach().clone() for p in model.parameters()]
    for name in ("checked", "unchecked", "checked"):
        steps[name]()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(not torch.equal(a, p) for a, p in zip(before, model.parameters())) > len(before) // 2
