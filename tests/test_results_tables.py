"""The README's "which method" table against the committed JSON (issue 17), and the renderer on a fake JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import results_tables as rt


def test_readme_table_matches_committed_json() -> None:
    diffs = rt.differences(rt.README.read_text())
    assert not diffs, ("README.md's table disagrees with benchmarks/results/*.json; fix the JSON or "
                       "benchmarks/results_tables.py, then `python -m benchmarks.results_tables --write`:\n"
                       + "\n".join(diffs))


def test_check_cli_passes_on_committed_readme(capsys: pytest.CaptureFixture[str]) -> None:
    assert rt.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "README.md's tables match the JSON" in out and "results.md's tables match the JSON" in out
    assert "no JSON source" not in out and rt.missing_sources() == []  # every figure has its JSON now


def test_every_figure_resolves() -> None:
    """Each selector finds its record(s) and field: a renamed key or label fails here, not silently."""
    ld = rt.Loader()
    for table in (rt.WHICH_METHOD, *rt.DOC_TABLES.values()):
        for where, name, fig in rt.all_figures(table):
            fig.render(ld)  # raises LookupError/KeyError naming the selector


def test_docs_speed_tables_match_committed_json() -> None:
    diffs = rt.doc_differences(rt.DOCS.read_text())
    assert not diffs, ("docs/results.md's tables disagree with benchmarks/results/*.json; fix the JSON or "
                       "benchmarks/results_tables.py, then `python -m benchmarks.results_tables --write`:\n"
                       + "\n".join(diffs))


def test_goals_and_docs_blocks_on_fake_json(tmp_path: Path) -> None:
    (tmp_path / "fake.json").write_text(json.dumps(FAKE))
    ld = rt.Loader(tmp_path)
    ratio = rt.Ratio(rt.sel("fake.json", "peak_gib", label="b", seed=0), rt.sel("fake.json", "peak_gib", label="a"))
    assert rt.Goal(ratio, "<=", 0.5, "≤ 0.5").render(ld) == "≤ 0.5 ✓"  # exactly at the bound meets it
    assert rt.Goal(ratio, "<=", 0.49, "≤ 0.49").render(ld) == "≤ 0.49 ✗"
    assert rt.Goal(rt.Value(rt.sel("fake.json", "dev_acc", label="a")), ">=", 87.7, "≥ 87.7").render(ld) == "≥ 87.7 ✗"
    with pytest.raises(ValueError, match="op must be"):
        rt.Goal(ratio, "<", 1.0, "< 1").render(ld)

    tables = {"t": rt.Table("", {}, ("case", "peak", "goal"), (
        rt.Row(("b", "{r}", "{g}"), {"r": ratio, "g": rt.Goal(ratio, "<=", 0.6, "≤ 0.6")}),))}
    doc = tmp_path / "results.md"
    doc.write_text("# r\n\n<!-- table:t (x) -->\n| old |\n<!-- table:t:end -->\n\nprose\n")
    assert rt.doc_differences(doc.read_text(), tables, tmp_path)
    assert rt.write_docs(doc, tables, tmp_path) and not rt.write_docs(doc, tables, tmp_path)
    # the block opens with the files it reads: the card and commit of each record used, "not recorded" where silent
    source = "From [fake.json](../benchmarks/results/fake.json): GPU not recorded, H200, commits not recorded, abc1234."
    assert doc.read_text() == (f"# r\n\n<!-- table:t (x) -->\n{source}\n\n| case | peak | goal |\n|---|---|---|\n"
                               "| b | 0.50 | ≤ 0.6 ✓ |\n<!-- table:t:end -->\n\nprose\n")
    assert rt.doc_differences(doc.read_text(), tables, tmp_path) == []
    with pytest.raises(SystemExit, match="markers around the 'u' table"):
        rt.doc_block(doc.read_text(), "u")
    (tmp_path / "fake.md").write_text("# the run's report\n")  # a report beside the JSON is what the line links
    harness = {"environment": {"gpu": "NVIDIA H100 80GB HBM3, 81559 MiB", "date": "2026-12-06 01:47 UTC"},
               "records": [{"key": "k", "step_s": 1.0, "env": {"commit": "c4100e0"}}]}
    (tmp_path / "suite.json").write_text(json.dumps(harness))
    step = rt.Value(rt.sel("suite.json", "step_s"))
    two = rt.Table("", {}, ("a", "b"), (rt.Row(("{r}", "{s}"), {"r": ratio, "s": step}),))
    assert rt.sources_line(two, tmp_path) == (
        "From [fake.md](../benchmarks/results/fake.md): GPU not recorded, H200, commits not recorded, abc1234; "
        "[suite.json](../benchmarks/results/suite.json): H100, 2026-12-06, commit c4100e0.")


FAKE = [
    {"label": "a", "method": "adamw", "seed": 0, "dev_acc": 87.614, "peak_gib": 3.0,
     "env": {"commit": "abc1234", "gpu": "NVIDIA H200", "command": "python -m benchmarks.task_results"}},
    {"label": "b", "method": "lomo", "seed": 0, "dev_acc": 80.05, "peak_gib": 1.5, "ratios": {"x / y": 0.4313}},
    {"label": "b", "method": "lomo", "seed": 1, "dev_acc": 82.95, "peak_gib": 1.5, "ratios": {"x / y": 0.8862}},
]


def _table() -> rt.Table:
    s = lambda fld, **w: rt.sel("fake.json", fld, **w)
    return rt.Table(
        intro="Intro: AdamW {acc}.",
        intro_figures={"acc": rt.Value(s("dev_acc", label="a"))},
        header=("need", "use", "figures"),
        rows=(
            rt.Row(("cheap", "`B`", "{peak}× of a; {rng}× the peer; {acc} dev; {mem} GiB; {big}B"),
                   {"peak": rt.Ratio(s("peak_gib", label="b", seed=0), s("peak_gib", label="a")),
                    "rng": rt.Range((s("ratios.x / y", label="b"),)),
                    "acc": rt.Range((s("dev_acc", label="b"),), "{:.0f}"),
                    "mem": rt.Value(s("peak_gib", label="b", seed=1), scale=1024, fmt="{:.0f}"),
                    "big": rt.Missing("32.5", "txt only")}),
        ),
    )


def test_renderer_on_fake_json(tmp_path: Path) -> None:
    (tmp_path / "fake.json").write_text(json.dumps(FAKE))
    table = _table()
    got = rt.render(table, tmp_path)
    assert got == ("Intro: AdamW 87.6.\n\n| need | use | figures |\n|---|---|---|\n"
                   "| cheap | `B` | 0.50× of a; 0.43–0.89× the peer; 80–83 dev; 1536 GiB; 32.5B |")

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{rt.START} -->\nold\n{rt.END}\n\ntail\n")
    diffs = rt.differences(readme.read_text(), table, tmp_path)
    assert diffs and any("old" in d for d in diffs)
    assert rt.write_readme(readme, table, tmp_path)
    assert not rt.differences(readme.read_text(), table, tmp_path)
    assert readme.read_text().endswith(f"{rt.END}\n\ntail\n") and readme.read_text().startswith("# x\n")
    assert not rt.write_readme(readme, table, tmp_path)  # idempotent

    # a figure edited in the README is named with both values; the prose around it is left to the template
    readme.write_text(readme.read_text().replace("0.43–0.89×", "0.43–0.90×"))
    diffs = rt.differences(readme.read_text(), table, tmp_path)
    assert diffs == ["row `B`, column 'figures': {rng}: README has '0.43–0.90', the JSON gives '0.43–0.89'"]

    # provenance: record "a" has its env, the two "b" records lack all three fields; the Missing one is listed
    prov = rt.provenance_report(table, tmp_path)
    assert prov == ["fake.json: 2 of 3 records used lack commit, gpu, command: b, b"]
    assert rt.missing_sources(table) == ["`B` {big} = '32.5': txt only"]


def test_selector_errors(tmp_path: Path) -> None:
    (tmp_path / "fake.json").write_text(json.dumps(FAKE))
    ld = rt.Loader(tmp_path)
    with pytest.raises(LookupError, match="matches 2 records"):
        rt.Value(rt.sel("fake.json", "dev_acc", label="b")).render(ld)
    with pytest.raises(LookupError, match="no record matches"):
        rt.Value(rt.sel("fake.json", "dev_acc", label="zzz")).render(ld)


def test_provenance_of_harness_shape() -> None:
    """A harness JSON: commit and GPU in the file's ``environment``, the command in each record's ``cmd``."""
    data = {"environment": {"gpu": "NVIDIA H200", "commit": None}, "records": [{"key": "ours:x", "cmd": "-m x"}]}
    assert rt.provenance(data, data["records"][0]) == {"commit": None, "gpu": "NVIDIA H200", "command": "-m x"}


def test_mean_and_sample_std() -> None:
    mean, std = rt.mean_std([85.0, 86.0, 87.5])
    assert (round(mean, 1), round(std, 1)) == (86.2, 1.3)
    assert rt.mean_std([2.0]) == (2.0, 0.0)


def test_grid_cell_over_the_grid_files(tmp_path: Path) -> None:
    """A GridCell reads every <task>_grid_*.json through the grid's rules: a seed-0 run that shared the GPU and a
    run with overrides do not count; solo keeps the runs alone on the grid's card; provenance names each file."""
    from benchmarks import grid

    other = next(c for c in grid.CARDS if c != grid.CARD)
    env = lambda gpu: {"commit": "abc1234", "gpu": f"NVIDIA {gpu}", "command": "python -m benchmarks.task_results"}
    rec = lambda seed, acc, gpu=grid.CARD, **kw: dict({"method": "lomo", "task": "mrpc", "seed": seed, "dev_acc": acc,
                                                       "train_s": 10.0 * (seed + 1), "env": env(gpu)}, **kw)
    (tmp_path / "mrpc_grid_s0_lomo.json").write_text(json.dumps([rec(0, 80.0)]))
    (tmp_path / "mrpc_grid_s1_lomo-x.json").write_text(json.dumps([
        rec(1, 82.0, other, note="ran beside up to 4 other runs on the GPU", time_capped=False),
        rec(2, 99.0, overrides=["lr=1"]),  # a config changed: not a cell
        rec(0, 50.0, note="ran beside up to 4 other runs on the GPU", time_capped=False),  # seed 0 shares: no
    ]))
    ld = rt.Loader(tmp_path)
    assert rt.GridCell("mrpc", "lomo", min_n=1).render(ld) == "81.0 ± 1.4 (seeds 0, 1)"
    assert rt.GridCell("mrpc", "lomo", "train_s", "{:.0f}", solo=True, min_n=1).render(ld) == "10 (seed 0)"
    with pytest.raises(LookupError, match="mrpc/lomo has 2 seeds, expected at least 3"):
        rt.GridCell("mrpc", "lomo").render(ld)
    (tmp_path / "mrpc_grid_s2_lomo.json").write_text(json.dumps([rec(2, 84.0, other, time_capped=False)]))
    assert rt.GridCell("mrpc", "lomo").render(rt.Loader(tmp_path)) == "82.0 ± 2.0"
    # seed 2 had the other card to itself: a cell, but not a time (the grid's times are its card's)
    solo = rt.GridCell("mrpc", "lomo", "train_s", "{:.0f}", solo=True, min_n=1)
    assert solo.render(rt.Loader(tmp_path)) == "10 (seed 0)"

    table = rt.Table("{acc}", {"acc": rt.GridCell("mrpc", "lomo")}, ("a",), ())
    assert rt.provenance_report(table, tmp_path) == []
    assert rt.other_files_report(table, tmp_path) == []
    (tmp_path / "mrpc_grid_s2_lomo.json").write_text(json.dumps([dict(rec(2, 84.0), env={"gpu": f"NVIDIA {other}"})]))
    assert rt.provenance_report(table, tmp_path) == [
        "mrpc_grid_s2_lomo.json: all 1 records used lack commit, command: lomo"]


def test_grid_ratio_and_the_readme_quality_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ratio of two grid cells divides their means over their seeds and names both cells' files; a cell with no
    seed renders — but has no number; quality() gives the three tasks' cells the README's templates name, the times
    as the mean over the solo runs without a spread."""
    from benchmarks import grid

    env = {"commit": "abc1234", "gpu": f"NVIDIA {grid.CARD}", "command": "python -m benchmarks.task_results"}
    rec = lambda m, seed, peak: {"method": m, "task": "sst2", "seed": seed, "dev_acc": 80.0, "peak_gib": peak,
                                 "train_s": 40.4 + seed, "env": env}
    (tmp_path / "sst2_grid_s0_adamw.json").write_text(json.dumps([rec("adamw", 0, 4.0), rec("adamw", 1, 6.0)]))
    (tmp_path / "sst2_grid_s0_lomo.json").write_text(json.dumps([rec("lomo", 0, 2.5)]))
    ld = rt.Loader(tmp_path)
    ratio = rt.Ratio(rt.GridCell("sst2", "lomo", "peak_gib", min_n=1), rt.GridCell("sst2", "adamw", "peak_gib"))
    with pytest.raises(LookupError, match="sst2/adamw has 2 seeds, expected at least 3"):
        ratio.render(ld)
    assert rt.peak_vs_adamw("lomo").render(ld) == "0.50"  # 2.5 over the mean of 4 and 6
    table = rt.Table("{r}", {"r": rt.peak_vs_adamw("lomo")}, ("a",), ())
    assert sorted(rt.records_by_file(table, ld)) == ["sst2_grid_s0_adamw.json", "sst2_grid_s0_lomo.json"]
    empty = rt.GridCell("mrpc", "lomo", min_n=0)
    assert empty.render(ld) == "—"
    with pytest.raises(LookupError, match="mrpc/lomo has no dev_acc"):
        empty.number(ld)
    monkeypatch.setattr(rt, "GRID_MIN_SEEDS", 0)  # while the grid fills
    figs = rt.render_figures(rt.quality("lomo", "x_"), ld)
    assert rt.QUALITY.replace("{", "{x_").format(**figs) == "80.0 (seed 0) / — / — after 40 / — / — s"
    scores = rt.render_figures(rt.quality("adamw", times=False), ld)
    assert rt.SCORES.format(**scores) == "80.0 ± 0.0 (seeds 0, 1) / — / —"
    assert rt.quality("adamw")["t_sst2"].render(ld) == "41"  # the mean alone: 40.4 and 41.4


def test_every_suite_figure_is_a_case_its_suite_runs() -> None:
    """Each figure read from a suite's file names a case, size and ratio column that the suite (benchmarks/suites.py)
    runs today, so a new run of the suite, its file swapped in for the constant, still fills every table."""
    reads, problems = rt.suite_reads()
    assert not problems, "\n".join(problems)
    assert sum(map(len, reads.values())) > 60
    # a ratio column brings its reference: the sequential generation each batched DFO row is set against
    assert ("ours:dfo_sequential", "1b") in reads["dfo"] and ("ours:inference", "smol") in reads["dfo"]
    assert ("peer:galore_refresh", "1b") in reads["galore"]  # ours:galore_refresh's speed-up, and a cell itself


def test_the_trainer_table_has_every_pair_the_lightning_suite_runs() -> None:
    """docs/results.md's Trainer table sets each Trainer case beside its bare step at every size the suite runs it."""
    from benchmarks.suites import SUITES, THROUGH_TRAINER

    sizes = {c.key: c.sizes for c in SUITES["lightning"].cases}
    want = {(t, b, z) for t, b in THROUGH_TRAINER for z in sizes[t]}
    assert {(t, b, z) for t, b, _, z in rt.TRAINER_ROWS} == want
    reads = rt.suite_reads()[0]["lightning"]
    assert all((k, z) in reads for t, b, z in want for k in (t, b))
