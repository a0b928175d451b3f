"""Bad input (issue 2): each gets an error that names the problem and the fix, not a deep traceback."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_memopt.cli import main, run_cli

BASE = ["fit", "--config", "configs/full_ft_adamw.yaml", "--trainer.max_steps=1", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.accelerator=cpu", "--trainer.callbacks=[]",
        "--test_after_fit=false"]


def run(tmp_path, *extra: str):
    return run_cli([*BASE, f"--trainer.default_root_dir={tmp_path}", *extra])


def test_missing_data_folder(tmp_path, in_repo):
    with pytest.raises(FileNotFoundError, match=r"Data folder .*no_such_dir.* does not exist\. Point data_dir at"):
        run(tmp_path, f"--data.init_args.data_dir={tmp_path / 'no_such_dir'}")


def test_unknown_model(tmp_path, in_repo):
    with pytest.raises(ValueError, match=r"Could not load model .*no_such_model.*Check the name, or pass model_config"):
        run(tmp_path, "--model.init_args.model_config=null",
            f"--model.init_args.model_name_or_path={tmp_path}/no_such_model")


def test_template_without_placeholder(tmp_path, in_repo):
    with pytest.raises(ValueError, match=r"has no '\{sentence\}' placeholder; add one"):
        run(tmp_path, "--data.init_args.template=Review: Sentiment:")


def test_multi_token_label_word(tmp_path, in_repo):
    # once refused ("must be one token"): now each label word is scored by its log-probability given the prompt
    cli = run(tmp_path, "--data.init_args.label_words=[very good, bad]")
    assert cli.trainer.global_step == 1
    assert cli.datamodule.label_token_ids is None and cli.model.num_choices == 2


def test_empty_label_word(tmp_path, in_repo):
    with pytest.raises(ValueError, match=r"Label word '' tokenizes to nothing; pick a word with text in it"):
        run(tmp_path, "--data.init_args.label_words=['', bad]")


def test_k_larger_than_a_class(tmp_path, in_repo):
    # the embedded task has 2000 rows per class (synthetic_size 4000)
    with pytest.raises(ValueError, match=r"k=3000 .* class 0 has only 2000 available; lower k"):
        run(tmp_path, "--data.init_args.k=3000")


@pytest.mark.parametrize(
    ("override", "named"),
    [("--trainer.max_stepz=3", "trainer.max_stepz"), ("--model.init_args.lrr=0.1", "'lrr' is not accepted")],
)
def test_unknown_config_key_on_the_command_line(tmp_path, in_repo, capsys, override, named):
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, override)
    assert exc.value.code == 2
    assert named in capsys.readouterr().err


def test_unknown_config_key_in_yaml(tmp_path, in_repo, capsys):
    text = (in_repo / "configs" / "full_ft_adamw.yaml").read_text().replace("  max_steps: 100", "  max_stepz: 100")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit) as exc:
        run_cli(["fit", "--config", str(bad)])
    assert exc.value.code == 2
    assert "does not accept option 'trainer.max_stepz'" in capsys.readouterr().err


def test_console_script_prints_one_message_not_a_traceback(tmp_path, in_repo, capsys, monkeypatch):
    monkeypatch.delenv("MEMOPT_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exc:
        main([*BASE, f"--trainer.default_root_dir={tmp_path}", "--data.init_args.template=no placeholder"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "memopt: error: The template 'no placeholder' has no '{sentence}' placeholder" in err
    assert "Traceback" not in err and "Union subtypes" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ckpt_path=missing.ckpt"], "Checkpoint file not found"),  # a path the user gave
        (["--model.init_args.torch_dtype=bfloat"], "torch_dtype='bfloat' is not a torch dtype"),
        (["--trainer.num_nodes=0"], "num_nodes"),  # Lightning's own argument check
    ],
    ids=["ckpt_path", "torch_dtype", "num_nodes"],
)
def test_more_configuration_mistakes_print_one_message(tmp_path, in_repo, capsys, monkeypatch, args, message):
    monkeypatch.delenv("MEMOPT_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exc:
        main([*BASE, f"--trainer.default_root_dir={tmp_path}", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "memopt: error: " in err and message in err and "Traceback" not in err


def test_a_strategy_class_own_error_is_the_one_printed(tmp_path, in_repo, capsys, monkeypatch):
    # trainer.strategy is a str or a Strategy: jsonargparse's cause is the str branch's "Expected a <class 'str'>"
    monkeypatch.delenv("MEMOPT_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exc:
        main([*BASE, f"--trainer.default_root_dir={tmp_path}",
              "--trainer.strategy.class_path=lightning_memopt.FSDP2Strategy",
              "--trainer.strategy.init_args.shard_size=1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "memopt: error: FSDP2Strategy(shard_size=1) sets the shard group size" in err and "Expected a" not in err


def test_enable_progress_bar_false_turns_off_a_bar_the_config_names(tmp_path, in_repo):
    (tmp_path / "bar.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.TQDMProgressBar\n"
    )
    cli = run_cli([*BASE, "--config", str(tmp_path / "bar.yaml"), f"--trainer.default_root_dir={tmp_path}",
                   "--trainer.enable_progress_bar=false"])
    assert cli.trainer.progress_bar_callback is None


def test_model_options_the_checkpoint_replaces_are_named(tmp_path, in_repo):
    ckpt = tmp_path / "fit.ckpt"
    run_cli([*BASE, f"--trainer.default_root_dir={tmp_path}"]).trainer.save_checkpoint(ckpt)
    test = ["test", *BASE[1:3], "--trainer.logger=false", "--trainer.limit_test_batches=1", "--trainer.callbacks=[]",
            "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}"]
    with pytest.warns(UserWarning, match=r"checkpoint's hyperparameters, which replace these model options: lr: 0\.5"):
        run_cli([*test, f"--ckpt_path={ckpt}", "--model.init_args.lr=0.5"])


def test_consolidate_input_mistakes_print_one_message(tmp_path, capsys):
    from lightning_memopt.consolidate import main as consolidate

    (tmp_path / "not.ckpt").write_bytes(b"not a checkpoint")
    (tmp_path / "afile").write_text("")
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    for args, message in [
        ([str(tmp_path / "not.ckpt"), str(tmp_path / "out"), "--dtype", "bfloat"], "--dtype='bfloat' is not a torch"),
        ([str(tmp_path / "not.ckpt"), str(tmp_path / "out")], "not.ckpt: "),
        ([str(tmp_path / "not.ckpt"), str(tmp_path / "afile")], "afile is a file"),
        ([str(tmp_path / "not.ckpt"), str(tmp_path)], "already holds files"),  # e.g. the base model's own folder
        ([str(tmp_path / "tensor.pt"), str(tmp_path / "out")], "not a Lightning checkpoint"),
        ([str(tmp_path / "not.ckpt"), str(tmp_path / "out"), "--dtype", "int8"], "not a floating-point dtype"),
        ([str(tmp_path), str(tmp_path / "hf")], "is the checkpoint"),  # into a sharded checkpoint's folder
    ]:
        with pytest.raises(SystemExit) as exc:
            consolidate(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "memopt consolidate: error: " in err and message in err and "Traceback" not in err


def test_console_script_keeps_tracebacks_of_bugs(tmp_path, in_repo, monkeypatch):
    # an error raised outside this package's own checks is not disguised as a configuration error
    from lightning_memopt.models import hf

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(hf, "load_hf_model", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main([*BASE, f"--trainer.default_root_dir={tmp_path}"])


def test_installed_console_script_exit_status(tmp_path, in_repo):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("memopt") or str(Path(sys.executable).parent / "memopt")
    if not Path(exe).exists():
        pytest.skip("the memopt console script is not installed (pip install -e .)")
    proc = subprocess.run(
        [exe, "fit", "--config", "configs/quickstart.yaml", f"--trainer.default_root_dir={tmp_path}",
         "--data.template=no placeholder"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "memopt: error: The template 'no placeholder' has no '{sentence}' placeholder" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("env", "printed"),
    [({}, True), ({"RANK": "0", "LOCAL_RANK": "0"}, True), ({"RANK": "1", "LOCAL_RANK": "1"}, False),
     ({"LOCAL_RANK": "1"}, False), ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False), ({"SLURM_PROCID": "3"}, False),
     ({"LOCAL_RANK": "0", "SLURM_PROCID": "3"}, True)],  # LOCAL_RANK before SLURM_PROCID, as Lightning reads them
)
def test_config_error_printed_by_rank_zero_only(tmp_path, in_repo, capsys, monkeypatch, env, printed):
    """Every rank of a multi-process run raises the same error; one message is enough, every rank exits 2."""
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "MEMOPT_TRACEBACK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exc:
        main([*BASE, f"--trainer.default_root_dir={tmp_path}", "--data.template=no placeholder"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert ("memopt: error: The template" in err) is printed
    if not printed:
        assert err.strip() == ""


def test_config_error_silent_once_lightning_knows_the_rank(tmp_path, in_repo, capsys, monkeypatch):
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "MEMOPT_TRACEBACK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # what a strategy sets up on the second process
    with pytest.raises(SystemExit) as exc:
        main([*BASE, f"--trainer.default_root_dir={tmp_path}", "--data.template=no placeholder"])
    assert exc.value.code == 2 and capsys.readouterr().err.strip() == ""


@pytest.mark.parametrize(("rank", "printed"), [("0", True), ("1", False)])
def test_parser_error_printed_by_rank_zero_only(tmp_path, in_repo, capsys, monkeypatch, rank, printed):
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as exc:
        main([*BASE, "--trainer.max_stepz=3"])
    assert exc.value.code == 2
    assert ("trainer.max_stepz" in capsys.readouterr().err) is printed


def test_test_after_fit_outside_fit_is_refused(tmp_path, in_repo):
    # Lightning adds the option to every subcommand's parser; validate would have run and ignored it
    args = [a for a in BASE if a != "--test_after_fit=false"]
    with pytest.raises(MisconfigurationException, match=r"--test_after_fit belongs to `memopt fit`; `memopt validate`"):
        run_cli(["validate", *args[1:], f"--trainer.default_root_dir={tmp_path}", "--test_after_fit=true"])


def test_a_checkpoint_folder_without_a_strategy_names_fsdp2(tmp_path, in_repo):
    # a plain Trainer reads one file: it failed with IsADirectoryError
    folder = tmp_path / "epoch=0-step=2.ckpt"
    folder.mkdir()
    test = ["test", *BASE[1:3], "--trainer.logger=false", "--trainer.accelerator=cpu", "--trainer.callbacks=[]"]
    with pytest.raises(MisconfigurationException, match=r"is a folder \(a sharded FSDP2 checkpoint\).*strategy=fsdp2"):
        run_cli([*test, f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={folder}"])


def test_a_file_that_is_no_checkpoint_and_a_file_inside_a_sharded_one_are_named(tmp_path, in_repo):
    folder = tmp_path / "epoch=0-step=2.ckpt"
    folder.mkdir()
    torch.save({"hyper_parameters": {}}, folder / "meta.pt")
    test = ["test", *BASE[1:3], "--trainer.logger=false", "--trainer.accelerator=cpu", "--trainer.callbacks=[]"]
    with pytest.raises(MisconfigurationException, match=r"is a file inside a sharded checkpoint; give its folder"):
        run_cli([*test, f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={folder / 'meta.pt'}"])
    (tmp_path / "notes.md").write_text("# not a checkpoint\n")
    with pytest.raises(MisconfigurationException, match=r"notes\.md is not a Lightning checkpoint torch can read"):
        run_cli([*test, f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={tmp_path / 'notes.md'}"])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(MisconfigurationException, match=r"plain\.pt holds no state_dict: not a Lightning checkpoint"):
        run_cli([*test, f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={tmp_path / 'plain.pt'}"])


def test_a_sharded_checkpoint_builds_the_model_from_its_hyperparameters(tmp_path):
    """`memopt validate --ckpt_path=<sharded folder>` builds the model the fit built (LoRA here, not in the config),
    as Lightning does for a checkpoint file; it failed on the missing adapter keys. Subprocesses: FSDP2 leaves a
    process group behind."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    cfg = str(REPO / "configs" / "quickstart.yaml")
    common = ["--trainer.strategy=fsdp2", "--trainer.devices=1", "--trainer.limit_val_batches=1",
              "--trainer.callbacks=[]"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))  # keep site dirs
    run = lambda *args: subprocess.run([sys.executable, "-m", "lightning_memopt.cli", *args], cwd=tmp_path, env=env,
                                       capture_output=True, text=True, timeout=600)
    fit = run("fit", "--config", cfg, "--trainer.max_steps=2", "--model.lora_rank=4",
              "--trainer.enable_checkpointing=true", *common)
    assert fit.returncode == 0, fit.stderr[-2000:]
    (ckpt,) = (tmp_path / "runs").rglob("*.ckpt")
    assert (ckpt / "meta.pt").is_file()
    val = run("validate", "--config", cfg, f"--ckpt_path={ckpt}", *common)
    assert val.returncode == 0, val.stderr[-2000:]
    assert "which replace these model options: lora_rank: 0 -> 4" in val.stderr
