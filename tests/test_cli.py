"""The memopt CLI: every shipped config runs, --print_config is complete, SST-2 runs end to end."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import yaml
from conftest import MRPC, REPO, SQUAD, SST2, needs_mrpc, needs_sst2
from lightning.pytorch import Trainer

from lightning_memopt.callbacks.memory_report import MemoryReport
from lightning_memopt.cli import main, run_cli
from lightning_memopt.data.prompt import PromptClassificationDataModule
from lightning_memopt.models.hf import HFCausalLM
from lightning_memopt.strategies import FSDP2Strategy

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
# Real-model configs (*_smollm2*) run on the GPU, and below on the tiny model; sst2_tiny has its own test below.
QUICK = [c for c in CONFIGS if "_smollm2" not in c and c != "sst2_tiny.yaml"]
TINY_MODEL = [
    "--model.init_args.model_name_or_path=null", "--model.init_args.tokenizer=builtin",
    ("--model.init_args.model_config={model_type: llama, vocab_size: 256, hidden_size: 64, intermediate_size: 128, "
     "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 1024}"),
    "--trainer.precision=32-true",
]


def short(tmp_path, steps: int = 2) -> list[str]:
    return [
        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.accelerator=cpu", "--trainer.devices=1", f"--trainer.default_root_dir={tmp_path}",
    ]


def test_configs_found():
    assert {"full_ft_adamw.yaml", "quickstart.yaml", "sst2_tiny.yaml", "sst2_smollm2_adamw.yaml"} <= set(CONFIGS)


@pytest.mark.parametrize("config", QUICK)
def test_config_fits_two_steps(config, tmp_path, in_repo, capsys, no_unexpected_warnings):
    cli = run_cli(["fit", "--config", f"configs/{config}", *short(tmp_path), "--data.init_args.k=8"])
    assert cli.trainer.global_step == 2
    assert isinstance(cli.model, HFCausalLM)
    # every callback named in the YAML was built from its class_path
    with open(REPO / "configs" / config) as f:
        wanted = [c["class_path"].rsplit(".", 1)[-1] for c in (yaml.safe_load(f)["trainer"].get("callbacks") or [])]
    have = {type(c).__name__ for c in cli.trainer.callbacks}
    assert set(wanted) <= have
    loss = cli.trainer.callback_metrics.get("train_loss")
    assert loss is None or torch.isfinite(loss)


def test_quickstart_shows_memory_table_and_test_accuracy(tmp_path, in_repo, capsys):
    cli = run_cli(["fit", "--config", "configs/quickstart.yaml", *short(tmp_path, steps=3), "--data.init_args.k=8"])
    out = capsys.readouterr().out
    assert "Peak memory during fit" in out and "Optimizer state" in out
    assert "test_acc" in cli.trainer.callback_metrics  # test_after_fit ran trainer.test
    report = next(c for c in cli.trainer.callbacks if isinstance(c, MemoryReport))
    assert report.breakdown is not None and report.breakdown.params > 0


def _printed_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exc:
        run_cli(args)
    assert exc.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _params(cls) -> set[str]:
    return {n for n in inspect.signature(cls.__init__).parameters if n != "self"}


def test_print_config_is_complete_and_round_trips(tmp_path, in_repo, capsys):
    cfg = _printed_config(["fit", "--config", "configs/full_ft_adamw.yaml", "--print_config"], capsys)
    assert cfg["model"]["class_path"].endswith("HFCausalLM")
    assert set(cfg["model"]["init_args"]) == _params(HFCausalLM)
    assert set(cfg["data"]["init_args"]) == _params(PromptClassificationDataModule)
    assert _params(Trainer) <= set(cfg["trainer"])
    (cb,) = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("MemoryReport")]
    assert set(cb["init_args"]) == _params(MemoryReport)  # flat typed args are all shown
    assert cfg["trainer"]["max_steps"] == 100 and cfg["model"]["init_args"]["lr"] == 1e-3
    assert cfg["test_after_fit"] is True
    # the printed config is itself a valid config that prints the same
    path = tmp_path / "printed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert _printed_config(["fit", "--config", str(path), "--print_config"], capsys) == cfg


def test_fsdp2_strategy_by_name_and_class_path(tmp_path, in_repo):
    base = ["--config", "configs/full_ft_adamw.yaml", "--trainer.accelerator=cpu", "--trainer.devices=1"]
    cli = run_cli([*base, "--trainer.strategy=fsdp2"], run=False)
    assert isinstance(cli.trainer.strategy, FSDP2Strategy)
    cli = run_cli(
        [*base, "--trainer.strategy.class_path=lightning_memopt.FSDP2Strategy",
         "--trainer.strategy.init_args.reshard_after_forward=false", "--trainer.strategy.init_args.hsdp=true"],
        run=False,
    )
    assert isinstance(cli.trainer.strategy, FSDP2Strategy) and cli.trainer.strategy.reshard_after_forward is False
    assert cli.trainer.strategy.hsdp is True


def test_short_class_paths_resolve(tmp_path, in_repo):
    cli = run_cli(
        ["--config", "configs/full_ft_adamw.yaml", "--trainer.callbacks+=lightning_memopt.MemoryReport",
         "--trainer.callbacks.print_table=false"],
        run=False,
    )
    reports = [c for c in cli.trainer.callbacks if isinstance(c, MemoryReport)]
    assert len(reports) == 2 and reports[-1].print_table is False


@needs_sst2
def test_sst2_tiny_end_to_end(tmp_path, in_repo, capsys):
    cli = run_cli(["fit", "--config", "configs/sst2_tiny.yaml", f"--trainer.default_root_dir={tmp_path}"])
    dm = cli.datamodule
    assert cli.trainer.global_step == 8
    assert len(dm._splits["train"]) == 2 * 16 and len(dm._splits["test"]) == 128
    assert 0.0 <= float(cli.trainer.callback_metrics["test_acc"]) <= 1.0
    assert "Peak memory during fit" in capsys.readouterr().out


def test_main_returns_none_for_the_console_script(tmp_path, in_repo, capsys):
    # sys.exit(main()) must exit 0: main returns None, not the CLI object
    assert main(["fit", "--config", "configs/full_ft_adamw.yaml", *short(tmp_path, steps=1),
                 "--data.init_args.k=4", "--trainer.callbacks=[]"]) is None


@pytest.mark.parametrize(
    ("config", "needs"),
    [*[(f"mrpc_smollm2_{m}.yaml", MRPC / "train.tsv")
       for m in ("adamw", "mezo", "mezo_pop", "lomo", "adalomo", "galore", "clora", "flora")],
     *[(f"squad_smollm2_{m}.yaml", SQUAD)
       for m in ("adamw", "mezo", "mezo_f1", "mezo_pop", "lomo", "adalomo", "galore", "clora", "flora")],
     *[(f"sst2_smollm2_{m}.yaml", SST2 / "train.tsv")
       for m in ("adamw", "mezo", "mezo_pop", "mezo_lora", "lomo", "adalomo", "galore", "clora", "flora")],
     ("instruct_smollm2.yaml", None)],
)
def test_real_task_configs_on_the_tiny_model(config, needs, tmp_path, in_repo):
    # the GPU configs' data and objective, with the model swapped for the tiny one: 2 steps, then test
    if needs is not None and not needs.is_file():
        pytest.skip(f"{needs} not found")
    extra = list(TINY_MODEL)
    if config.startswith("instruct"):
        data = tmp_path / "train.jsonl"
        rows = [{"prompt": f"review: {w}", "response": w} for w in ["good", "bad"] * 40]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        extra += [f"--data.init_args.train_file={data}", f"--data.init_args.test_file={data}", "--test_after_fit=true"]
    cli = run_cli(["fit", "--config", f"configs/{config}", *short(tmp_path), *extra])
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    if config.startswith("mrpc"):
        assert cli.datamodule.label_token_ids is not None and "test_acc" in metrics
    elif config.startswith("squad"):
        assert {"test_em", "test_f1"} <= set(metrics)
    else:
        assert torch.isfinite(metrics["test_loss"])
    if config.endswith("_smollm2_mezo_pop.yaml"):  # the input embedding and decoder layers 0-9 (all the tiny model's)
        assert not cli.model.model.get_input_embeddings().weight.requires_grad
        assert not any(p.requires_grad for n, p in cli.model.model.named_parameters() if n.startswith("model.layers."))


@needs_mrpc
def test_mrpc_two_field_template_and_columns_on_the_command_line(tmp_path, in_repo, no_unexpected_warnings):
    cli = run_cli([
        "fit", "--config", "configs/full_ft_adamw.yaml", *short(tmp_path), "--trainer.callbacks=[]",
        "--data.init_args.data_dir=../shared/data/mrpc", "--data.init_args.k=8", "--data.init_args.max_length=128",
        "--data.init_args.template=sentence : {sentence1} . input : {sentence2} . answer :",
        '--data.init_args.columns={label: Quality, sentence1: "#1 String", sentence2: "#2 String"}',
        '--data.init_args.label_words=["no", "yes"]',  # quoted: YAML reads a bare no/yes as a bool
    ])
    dm = cli.datamodule
    assert cli.trainer.global_step == 2 and len(dm._splits["train"]) == 16
    assert dm.hparams.columns == {"label": "Quality", "sentence1": "#1 String", "sentence2": "#2 String"}
    assert len(dm._splits["test"]) == 256 and "test_acc" in cli.trainer.callback_metrics  # test_limit of the config


def test_best_weights_by_short_name_ends_fit_at_the_best_validation(tmp_path, in_repo):
    from lightning_memopt import BestWeights

    cli = run_cli(["fit", "--config", "configs/full_ft_adamw.yaml", *short(tmp_path, steps=3), "--data.init_args.k=4",
                   "--trainer.callbacks=[]", "--trainer.val_check_interval=1", "--trainer.callbacks+=BestWeights",
                   "--trainer.callbacks.monitor=val_loss", "--trainer.callbacks.mode=min"])
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, BestWeights)]
    assert (cb.monitor, cb.mode) == ("val_loss", "min") and cb.best_step in (1, 2, 3)
    assert cb.best_weights is not None and torch.isfinite(torch.tensor(cb.best_score))


def test_a_finished_run_destroys_the_process_group(tmp_path, in_repo):
    # left to interpreter teardown, gloo's threads have aborted finished ranks (exit -6): memopt ends it itself
    import torch.distributed as dist

    from lightning_memopt.cli import main

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        main(["fit", "--config", "configs/quickstart.yaml", *short(tmp_path, steps=1), "--data.init_args.k=8"])
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
