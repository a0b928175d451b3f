"""Command-line values as users type them: strings with ': ', '{', '#', newlines and quotes; no abbreviations."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from lightning_memopt.cli import run_cli
from lightning_memopt.cli_parser import _Literal, _Raw, accepts_str, yaml_unquote

BASE = ["--config", "configs/full_ft_adamw.yaml", "--trainer.accelerator=cpu", "--trainer.devices=1"]

# (what the shell hands over, the template the data module gets)
TEMPLATES = [
    ("Article: {sentence}\nTopic:", "Article: {sentence}\nTopic:"),  # real newline: bash $'...\n...'
    ("Article: {sentence} Topic:", "Article: {sentence} Topic:"),  # YAML would read a mapping
    ("a: {sentence}", "a: {sentence}"),
    ("{sentence}: yes", "{sentence}: yes"),
    ("Article: {sentence} # Topic:", "Article: {sentence} # Topic:"),  # YAML would drop a comment
    ("[{sentence}]", "[{sentence}]"),  # YAML would read a list
    ("- {sentence}", "- {sentence}"),
    ("{sentence}", "{sentence}"),  # YAML would read a mapping {sentence: null}
    ('"Article: {sentence}\\nTopic:"', "Article: {sentence}\nTopic:"),  # YAML-quoted: one level of quotes, \n
    ("'It''s {sentence}'", "It's {sentence}"),  # YAML single quotes
    ("'\"{sentence}\"'", '"{sentence}"'),  # quotes inside quotes stay
    ("'a' {sentence} 'b'", "'a' {sentence} 'b'"),  # not one quoted scalar: kept as typed
]


def _no_raw(value) -> bool:
    if isinstance(value, dict) or hasattr(value, "items"):
        return all(_no_raw(v) for _, v in value.items())
    if isinstance(value, list):
        return all(_no_raw(v) for v in value)
    return not isinstance(value, (_Raw, _Literal))


@pytest.mark.parametrize(("typed", "expected"), TEMPLATES)
@pytest.mark.parametrize("form", ["--data.template=", "--data.template", "--data.init_args.template="])
def test_string_option_takes_the_value_as_typed(typed, expected, form, in_repo):
    args = [f"{form}{typed}"] if form.endswith("=") else [form, typed]
    cli = run_cli([*BASE, *args], run=False)
    assert cli.datamodule.hparams.template == expected
    assert type(cli.config.data.init_args.template) is str and _no_raw(cli.config)


def test_backslash_n_stays_two_characters_and_warns(in_repo):
    with pytest.warns(UserWarning, match=r"--data.template contains a backslash.*\$'\.\.\.\\n\.\.\.'"):
        cli = run_cli([*BASE, "--data.template=Article: {sentence}\\nTopic:"], run=False)
    assert cli.datamodule.hparams.template == "Article: {sentence}\\nTopic:"


def test_other_types_still_parse_from_text(in_repo):
    """Only str options take text literally: ints, bools, dicts, None and nested keys load as before."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*backslash")  # no newline warning for values without one
        cli = run_cli(
            [*BASE, "--data.k=7", "--data.data_dir=null", "--data.label_words=[bad, good]",
             ("--model.model_config={model_type: llama, vocab_size: 256, hidden_size: 32, intermediate_size: 64, "
              "num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 64}"),
             "--model.model_config.hidden_size=48", "--trainer.callbacks.print_table", "false",
             "--trainer.default_root_dir", "'runs: x'"],
            run=False,
        )
    hp = cli.datamodule.hparams
    assert hp.k == 7 and hp.data_dir is None and hp.label_words == ["bad", "good"]
    assert cli.config.model.init_args.model_config["hidden_size"] == 48
    assert cli.config.model.init_args.model_config["num_hidden_layers"] == 1
    assert cli.trainer.callbacks[0].print_table is False
    assert cli.trainer.default_root_dir == "runs: x"  # a direct str option: YAML quotes removed
    assert _no_raw(cli.config)


@pytest.mark.parametrize(("typed", "expected"), [("###", "###"), ("#runs", "#runs"), ("~", "~"), ("null", None)])
def test_an_optional_string_that_yaml_reads_as_none_stays_as_typed(typed, expected, in_repo):
    """'#...' is a YAML comment and '~' YAML's null: an Optional[str] took None for them (a stop text that never
    stopped, a ckpt_path that started afresh); only 'null' means None."""
    cli = run_cli([*BASE, f"--model.stop_text={typed}", f"--trainer.default_root_dir={typed}"], run=False)
    assert cli.model.hparams.stop_text == expected
    assert cli.config.trainer.default_root_dir == expected and _no_raw(cli.config)


@pytest.mark.parametrize(("typed", "expected"), [("###", "###"), ("#x", "#x"), ("~", "~"), ("null", None)])
def test_under_fit_a_string_that_yaml_reads_as_none_stays_as_typed(typed, expected, in_repo, capsys):
    """The same under a subcommand, whose values the top-level parser checks again as plain text."""
    with pytest.raises(SystemExit):
        run_cli(["fit", *BASE, f"--model.stop_text={typed}", f"--ckpt_path={typed}",
                 f"--trainer.default_root_dir={typed}", "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["init_args"]["stop_text"] == cfg["ckpt_path"] == expected
    assert cfg["trainer"]["default_root_dir"] == expected


def test_print_config_round_trips_a_typed_template(tmp_path, in_repo, capsys):
    template = "Article: {sentence}\nTopic: #1"

    def printed(args: list[str]) -> dict:
        with pytest.raises(SystemExit):
            run_cli(["fit", *args, "--print_config"])
        return yaml.safe_load(capsys.readouterr().out)

    cfg = printed([*BASE, f"--data.template={template}"])
    assert cfg["data"]["init_args"]["template"] == template
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert printed(["--config", str(path)]) == cfg


def test_fit_with_a_typed_template(tmp_path, in_repo):
    cli = run_cli(["fit", *BASE, "--data.template=Article: {sentence}\nTopic:", "--data.k=4", "--trainer.max_steps=1",
                   "--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.limit_val_batches=0",
                   "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 1 and cli.datamodule.hparams.template == "Article: {sentence}\nTopic:"


@pytest.mark.parametrize("bad", ["--trainer.max_step=5", "--trainer.max_step", "--model.l=1e-3"])
def test_abbreviated_options_are_refused(bad, in_repo, capsys):
    args = ["fit", *BASE, *bad.split("=", 1)] if bad.count("=") else ["fit", *BASE, bad, "5"]
    with pytest.raises(SystemExit) as exc:
        run_cli(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    if bad.startswith("--trainer"):
        assert "did you mean --trainer.max_steps?" in err
    else:
        assert "Option 'l' is not accepted" in err


@pytest.mark.parametrize("where", ["option", "config"])
def test_an_unquoted_bracket_pattern_gets_the_quoting_hint(where, tmp_path, in_repo, capsys):
    value = "[model.embed_tokens.*, model.layers.[0-9].*]"
    if where == "option":
        extra = [f"--model.init_args.frozen={value}"]
    else:
        (tmp_path / "bad.yaml").write_text(f"model:\n  init_args:\n    frozen: {value}\n")
        extra = ["--config", str(tmp_path / "bad.yaml")]
    with pytest.raises(SystemExit) as exc:
        run_cli(["fit", *BASE, *extra, "--print_config"])
    assert exc.value.code == 2
    assert 'quote it: frozen: ["model.layers.[0-9].*"]' in capsys.readouterr().err


def test_helpers():
    assert accepts_str(str) and accepts_str(str | None) and not accepts_str(int)
    assert yaml_unquote("'a: b'") == "a: b" and yaml_unquote('"a\\tb"') == "a\tb"
    assert yaml_unquote("'a' 'b'") is None and yaml_unquote("a") is None and yaml_unquote("'") is None


def _console_script() -> str | None:
    here = Path(sys.executable).parent / "memopt"
    return str(here) if here.is_file() else shutil.which("memopt")


def test_console_script_takes_a_template_with_colon_and_newline(in_repo):
    script = _console_script()
    if script is None:
        pytest.skip("the memopt console script is not installed (pip install -e .)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [script, "fit", "--config", "configs/quickstart.yaml", "--data.template", "Article: {sentence}\nTopic:",
         "--print_config"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load(proc.stdout)["data"]["init_args"]["template"] == "Article: {sentence}\nTopic:"
