"""Short class names (--trainer.callbacks+=MeZO, --trainer.callbacks.help MeZO) and the methods in --help."""

from __future__ import annotations

import pytest

import lightning_memopt
from lightning_memopt.cli import CALLBACKS, COMPONENTS, METHODS, run_cli

BASE = ["--config", "configs/full_ft_adamw.yaml", "--trainer.accelerator=cpu", "--trainer.devices=1"]


def _help(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli(args)
    assert exc.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("name", [*METHODS, *CALLBACKS])
def test_callback_by_short_name(name, in_repo):
    cli = run_cli([*BASE, "--trainer.callbacks=[]", f"--trainer.callbacks+={name}"], run=False)
    assert [type(c) for c in cli.trainer.callbacks].count(getattr(lightning_memopt, name)) == 1


def test_short_name_with_options(in_repo):
    cli = run_cli([*BASE, "--trainer.callbacks=[]", "--trainer.callbacks+=MeZO", "--trainer.callbacks.lr=3e-5",
                   "--trainer.callbacks.eps=1e-2", "--model=HFCausalLM", "--data=PromptClassificationDataModule"],
                  run=False)
    assert sum(isinstance(c, lightning_memopt.MeZO) for c in cli.trainer.callbacks) == 1
    assert type(cli.model) is lightning_memopt.HFCausalLM
    assert type(cli.datamodule) is lightning_memopt.PromptClassificationDataModule
    assert cli.config.trainer.callbacks[-1].class_path == "lightning_memopt.MeZO"
    assert cli.config.trainer.callbacks[-1].init_args.lr == 3e-5 and cli.config.trainer.callbacks[-1].init_args.eps == 1e-2


@pytest.mark.parametrize(("option", "name", "shows"), [
    ("--trainer.callbacks.help", "MeZO", "--trainer.callbacks.eps"),
    ("--trainer.callbacks.help", "GaLore", "--trainer.callbacks.rank"),
    ("--trainer.callbacks.help", "DFOLoRA", "--trainer.callbacks.population"),
    ("--model.help", "HFCausalLM", "--model.model_name_or_path"),
    ("--data.help", "PromptClassificationDataModule", "--data.template"),
])
def test_class_help_by_short_name(option, name, shows, in_repo, capsys):
    assert shows in _help(["fit", option, name], capsys)


@pytest.mark.parametrize("args", [["--help"], ["fit", "--help"]])
def test_help_lists_each_method_on_one_line(args, in_repo, capsys):
    out = _help(args, capsys)
    for name in (*METHODS, *CALLBACKS, *COMPONENTS):
        (line,) = [ln for ln in out.splitlines() if ln.split()[:1] == [name]]
        doc = getattr(lightning_memopt, name).__doc__.strip().splitlines()[0].replace("``", "")
        assert line.split(None, 1)[1] == doc
    assert "download-smollm2" in out and "--trainer.callbacks+=NAME" in out


def test_download_smollm2_help_shows_only_what_it_takes(capsys):
    from lightning_memopt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["download-smollm2", "--help"])
    assert exc.value.code in (0, None)
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage == "usage: memopt download-smollm2 [-h] [--dest DEST] [--dequantize]"  # no {smollm2} to type
