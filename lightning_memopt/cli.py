"""The ``memopt`` command: Lightning's CLI with any LightningModule/DataModule given by class path.

Example::

    memopt fit --config configs/quickstart.yaml
    memopt fit --config configs/full_ft_adamw.yaml --print_config
    memopt fit --config configs/full_ft_adamw.yaml --trainer.max_steps=20 --data.k=32 --trainer.callbacks+=MeZO
    memopt download-smollm2 --dest models
    memopt consolidate runs/lightning_logs/version_0/checkpoints/step=100.ckpt out/  # a HF save_pretrained folder
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

import lightning
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_memopt  # registers the "fsdp2" strategy name and the lazy short class paths
from lightning_memopt.cli_parser import MemoptArgumentParser, is_rank_zero

_PKG_DIR = os.path.dirname(os.path.abspath(lightning_memopt.__file__))
_LIGHTNING_DIR = os.path.dirname(os.path.abspath(lightning.__file__))

# What `memopt --help` lists. jsonargparse resolves a short class name (--trainer.callbacks+=MeZO) among the
# subclasses it can see, so the CLI imports these lazily exported classes before it parses.
METHODS = ("MeZO", "LOMO", "AdaLomo", "GaLore", "DFOLoRA")
CALLBACKS = ("BestWeights", "MemoryReport", "MemoptProgressBar", "MemoptRichProgressBar")
COMPONENTS = ("HFCausalLM", "PromptClassificationDataModule")
SHORT_NAMES = (*METHODS, *CALLBACKS, *COMPONENTS)


def _first_line(name: str) -> str:
    doc = (getattr(lightning_memopt, name).__doc__ or "").strip()
    return doc.splitlines()[0].replace("``", "") if doc else ""


def import_short_names() -> dict[str, type]:
    """Import the classes users name without a module (``MeZO``, ``HFCausalLM``), so jsonargparse knows them."""
    return {name: getattr(lightning_memopt, name) for name in SHORT_NAMES}


def methods_epilog() -> str:
    """The methods and components, one line each, for ``memopt --help`` and ``memopt fit --help``."""
    import_short_names()
    width = max(len(n) for n in (*SHORT_NAMES, "download-smollm2"))

    def rows(names: tuple[str, ...]) -> list[str]:
        return [f"  {n:<{width}}  {_first_line(n)}" for n in names]

    return "\n".join([
        "methods (add one with --trainer.callbacks+=NAME; its options: --trainer.callbacks.help NAME):",
        *rows(METHODS),
        "other callbacks:",
        *rows(CALLBACKS),
        "model and data (--model NAME, --data NAME; options: --model.help NAME, --data.help NAME):",
        *rows(COMPONENTS),
        "other commands:",
        (f"  {'download-smollm2':<{width}}  get SmolLM2-135M-Instruct's GGUF file and print its path ([--dest DIR]; "
         "--dequantize: a Hugging Face folder that loads in under a second)"),
        f"  {'consolidate':<{width}}  a checkpoint (sharded folder or .ckpt) as a Hugging Face folder: CKPT OUT_DIR",
        "Quoting of values, short class names, progress bars: docs/cli.md",
    ])


def user_error(exc: BaseException) -> Optional[BaseException]:
    """The configuration error behind ``exc``, or None when ``exc`` looks like a bug.

    jsonargparse wraps an exception raised in ``__init__`` in its own ValueError; the original is its cause. A
    configuration error is a MisconfigurationException, or a ValueError/FileNotFoundError/ImportError/TypeError
    raised by this package's own code (those messages name the problem and the fix).
    """
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, MisconfigurationException):
        return root
    if isinstance(root, FileNotFoundError):  # a path the user gave (--ckpt_path, a data file)
        return root
    if isinstance(root, (ValueError, ImportError, TypeError)) and root.__traceback__ is not None:
        tb = root.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        where = os.path.abspath(tb.tb_frame.f_code.co_filename)
        # ours name the problem and the fix; Lightning's ValueErrors check the Trainer's arguments
        if where.startswith(_PKG_DIR) or (isinstance(root, ValueError) and where.startswith(_LIGHTNING_DIR)):
            return root
    return None


def _checkpoint_hparams(ckpt: str) -> dict[str, Any]:
    """The hyperparameters of a checkpoint file or sharded folder; a file inside a sharded folder, or a file that is
    no Lightning checkpoint, is refused naming what to give instead."""
    from lightning_memopt.consolidate import load_checkpoint_meta

    parent = os.path.dirname(os.path.abspath(ckpt))
    if os.path.isfile(ckpt) and os.path.isfile(os.path.join(parent, "meta.pt")):
        raise MisconfigurationException(
            f"--ckpt_path={ckpt} is a file inside a sharded checkpoint; give its folder: --ckpt_path={parent}."
        )
    if os.path.isdir(ckpt) and not os.path.isfile(os.path.join(ckpt, "meta.pt")):
        return {}  # not a sharded checkpoint: before_instantiate_classes and the strategy say what is wrong
    try:
        meta = load_checkpoint_meta(ckpt, weights_only=True)  # a file as Lightning reads its hyperparameters
    except ValueError as err:
        raise MisconfigurationException(f"--ckpt_path: {err}") from None
    except Exception as err:  # noqa: BLE001 - torch.load's errors for a file that is no checkpoint vary
        raise MisconfigurationException(
            f"--ckpt_path={ckpt} is not a Lightning checkpoint torch can read ({type(err).__name__}); give a .ckpt "
            f"file or a sharded checkpoint's folder."
        ) from None
    return dict(meta.get("hyper_parameters") or {})


def _model_args(config: Any, sub: Optional[str]) -> dict[str, Any]:
    """The model's init arguments in a parsed config, as plain values."""
    try:
        model = config[sub]["model"] if sub else config["model"]
        args = model.get("init_args") or model.get("dict_kwargs") or {}
        return dict(args.as_dict() if hasattr(args, "as_dict") else args)
    except (KeyError, TypeError, AttributeError):
        return {}


class MemoptCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data, plus ``test_after_fit`` for the fit subcommand.

    Its parser (:class:`~lightning_memopt.cli_parser.MemoptArgumentParser`) takes string values as typed and refuses
    abbreviated options. A run whose config names no progress bar gets :class:`MemoptProgressBar`.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="fit only: run trainer.test with the final weights after training (prints test accuracy)",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        argv = sys.argv[1:] if args is None else args
        self._argv = [str(a) for a in argv] if isinstance(argv, (list, tuple)) else []
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        # every subcommand's parser has the option (Lightning adds ours to each) and only fit acts on it; a config
        # shared with fit may set it, but typed after `memopt validate` it would be ignored
        sub = self.subcommand
        typed = any(a.split("=")[0] == "--test_after_fit" for a in getattr(self, "_argv", []))
        if sub not in (None, "fit") and typed and self.config.get(sub, {}).get("test_after_fit", False):
            raise MisconfigurationException(
                f"--test_after_fit belongs to `memopt fit`; `memopt {sub}` would ignore it. Drop it, or run "
                "`memopt test` with the same config (and --ckpt_path) for the test set."
            )
        cfg = self.config.get(sub, {}) if sub else {}
        ckpt, strategy = cfg.get("ckpt_path"), (cfg.get("trainer") or {}).get("strategy", "auto")
        if isinstance(ckpt, str) and os.path.isdir(ckpt) and strategy in (None, "auto"):
            # a sharded checkpoint folder; a plain Trainer reads one file and failed with IsADirectoryError
            raise MisconfigurationException(
                f"--ckpt_path={ckpt} is a folder (a sharded FSDP2 checkpoint), which a Trainer without a strategy "
                "cannot read. Add --trainer.strategy=fsdp2 (with --trainer.devices=1 it runs on one device), or turn "
                "its weights into a Hugging Face folder with `memopt consolidate CKPT OUT_DIR` for model_name_or_path."
            )

    def _parse_ckpt_path(self) -> None:
        # Lightning builds the model from the checkpoint's hyperparameters, over what the command line said: say so
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        before = _model_args(self.config, sub)
        if isinstance(ckpt, str) and ckpt and os.path.exists(ckpt):
            # Lightning's own reading, for a sharded folder too (Lightning reads a file only; a folder keeps them in
            # meta.pt), with what is no checkpoint named
            hparams = _checkpoint_hparams(ckpt)
            if hparams:
                self._apply_ckpt_hparams(sub, hparams)
        after = _model_args(self.config, sub)
        replaced = [f"{k}: {before[k]!r} -> {after[k]!r}" for k in before if k in after and before[k] != after[k]]
        if replaced:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                "--ckpt_path: the model is built with the checkpoint's hyperparameters, which replace these model "
                "options: " + "; ".join(replaced) + "."
            )

    def _apply_ckpt_hparams(self, sub: str, hparams: dict[str, Any]) -> None:
        """What Lightning's ``_parse_ckpt_path`` does with a checkpoint's hyperparameters."""
        hparams = {k: v for k, v in hparams.items() if k != "_instantiator"}
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            # jsonargparse wraps what __init__ raised in "Does not validate against any of the Union subtypes";
            # the original exception (its cause) says what is wrong.
            root = err
            while root.__cause__ is not None:
                root = root.__cause__
            if root is err:
                raise
            if str(root).startswith("Expected a "):
                # the cause is the Union's other branch (a strategy given as a class, not a string); the error of
                # the branch the user meant is only in the list jsonargparse printed
                listed = [ln.strip()[2:] for ln in str(err).splitlines() if ln.strip().startswith("- ")]
                meant = [m for m in listed if not m.startswith("Expected a ")]
                if meant:
                    raise MisconfigurationException(meant[0]) from None
            raise root from None

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer_cfg = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if trainer_cfg.get("enable_progress_bar") is False:
            # the flag turns off the bar a config names too (Lightning would refuse the pair)
            kwargs["callbacks"] = [c for c in callbacks if not isinstance(c, ProgressBar)]
        elif not any(isinstance(c, ProgressBar) for c in callbacks):
            from lightning_memopt.callbacks.progress import MemoptProgressBar

            kwargs["callbacks"] = [*callbacks, MemoptProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        if self.config.get(self.subcommand, {}).get("test_after_fit", False):
            self.trainer.test(self.model, datamodule=self.datamodule)


DESCRIPTION = "lightning_memopt: memory-efficient LLM fine-tuning with Lightning callbacks."


def run_cli(args: ArgsType = None, run: bool = True) -> MemoptCLI:
    """Build (and with ``run=True`` run) the CLI; ``args`` (a list or dict) makes it usable in-process."""
    epilog = methods_epilog()
    return MemoptCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # Logs, checkpoints and the saved config.yaml go under runs/ rather than into the working directory.
        trainer_defaults={"default_root_dir": "runs"},
        parser_class=MemoptArgumentParser,
        parser_kwargs={
            "description": DESCRIPTION,
            "epilog": epilog,
            **{sub: {"epilog": epilog} for sub in MemoptCLI.subcommands()},
        },
        args=args,
        run=run,
    )


def main(args: ArgsType = None) -> None:
    """Entry point of the ``memopt`` console script.

    A configuration error is printed as one message naming the problem and the fix (exit status 2), not as a
    traceback, and only by the first process of a multi-process run (the others exit with the same status);
    set ``MEMOPT_TRACEBACK=1`` to see the traceback anyway. ``memopt download-smollm2`` gets the SmolLM2 GGUF file;
    ``memopt consolidate CKPT OUT_DIR`` turns a checkpoint into a Hugging Face ``save_pretrained`` folder.
    """
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
    if argv and argv[0] == "download-smollm2":
        from lightning_memopt.fetch import main as fetch_main

        fetch_main(argv[1:], prog="memopt download-smollm2", what="smollm2")
        return
    if argv and argv[0] == "consolidate":
        from lightning_memopt.consolidate import main as consolidate_main

        consolidate_main(argv[1:])
        return
    try:
        run_cli(args)
    except Exception as err:
        root = user_error(err)
        if root is None or os.environ.get("MEMOPT_TRACEBACK"):
            raise
        if is_rank_zero():
            print(f"memopt: error: {root}\n(set MEMOPT_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        sys.exit(2)
    _end_process_group()


def _end_process_group() -> None:
    """Destroy the process group of a finished multi-process run. Lightning leaves it to interpreter teardown,
    where gloo's threads have aborted a finished rank ("terminate called without an active exception", exit -6)
    and torchrun then reported the job failed (seen in CI on two busy cores). Not after an error: with NCCL a
    rank whose peers are stuck could wait here."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
