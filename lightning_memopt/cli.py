"""The ``memopt`` command: Lightning's CLI with any LightningModule/DataModule given by class path.

Example::

    memopt fit --config configs/quickstart.yaml
    memopt fit --config configs/full_ft_adamw.yaml --print_config
    memopt fit --config configs/full_ft_adamw.yaml --trainer.max_steps=20 --data.init_args.k=32
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_memopt  # noqa: F401 - registers the "fsdp2" strategy name and the lazy short class paths

_PKG_DIR = os.path.dirname(os.path.abspath(lightning_memopt.__file__))


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
    if isinstance(root, (ValueError, FileNotFoundError, ImportError, TypeError)) and root.__traceback__ is not None:
        tb = root.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        if os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PKG_DIR):
            return root
    return None


class MemoptCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data, plus ``test_after_fit`` for the fit subcommand."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="fit only: run trainer.test with the final weights after training (prints test accuracy)",
        )

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
            raise root from None

    def after_fit(self) -> None:
        if self.config.get(self.subcommand, {}).get("test_after_fit", False):
            self.trainer.test(self.model, datamodule=self.datamodule)


def run_cli(args: ArgsType = None, run: bool = True) -> MemoptCLI:
    """Build (and with ``run=True`` run) the CLI; ``args`` (a list or dict) makes it usable in-process."""
    return MemoptCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # Logs, checkpoints and the saved config.yaml go under runs/ rather than into the working directory.
        trainer_defaults={"default_root_dir": "runs"},
        parser_kwargs={"description": "lightning_memopt: memory-efficient LLM fine-tuning with Lightning callbacks."},
        args=args,
        run=run,
    )


def main(args: ArgsType = None) -> None:
    """Entry point of the ``memopt`` console script.

    A configuration error is printed as one message naming the problem and the fix (exit status 2), not as a
    traceback; set ``MEMOPT_TRACEBACK=1`` to see the traceback anyway.
    """
    try:
        run_cli(args)
    except Exception as err:
        root = user_error(err)
        if root is None or os.environ.get("MEMOPT_TRACEBACK"):
            raise
        print(f"memopt: error: {root}\n(set MEMOPT_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
