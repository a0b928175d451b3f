"""The ``memopt`` argument parser: command-line strings taken as the user typed them, and no abbreviated options.

jsonargparse reads every command-line value as YAML before it knows the option's type. For an option of a class given
by class path (``--data.template``, ``--model.tokenizer``, ``--trainer.callbacks.print_table``) the value is loaded
one level up, where the class is not yet known, so ``--data.template="Article: {sentence}"`` arrived as the dict
``{'Article': {'sentence': None}}`` and was refused. Here such a value travels unparsed (as :class:`_Raw`) down to
the class's own parser, which parses it knowing the option's type: a ``str`` option keeps the text, an ``int`` or a
``dict`` option loads it as before.

For an option that accepts ``str``, a value in one level of YAML quotes (``'...'`` or ``"..."``) means the string
that YAML reads from it (``"a\\nb"`` gives a newline; the quotes are dropped). An unquoted value is taken literally:
a backslash followed by ``n`` stays two characters (as in a YAML plain scalar), and a warning names the two
spellings that give a newline.

Private jsonargparse API used here (pinned by tests/test_cli_strings.py): ``ArgumentParser._check_value_key`` and
``ActionTypeHint.is_subclass_typehint``; argparse's ``_parse_optional``. Without them the parser behaves as
jsonargparse's own.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, Optional, Union

import yaml
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_only

try:  # private: the test of "an option whose value is a class" that jsonargparse itself uses
    from jsonargparse._typehints import ActionTypeHint as _ActionTypeHint
except ImportError:  # pragma: no cover - a jsonargparse that moved it: values are then parsed as jsonargparse does
    _ActionTypeHint = None

NEWLINE_HINT = (
    "a newline: write it as YAML in quotes, --{opt}='\"...\\n...\"', or let bash make it, --{opt}=$'...\\n...'"
)


class _Literal(str):
    """A ``str`` option's value as the user meant it, past jsonargparse's YAML reading (which took ``#x`` for a
    comment: None to an ``Optional[str]``)."""


class _Raw(str):
    """A value given to a nested option of a class (``--data.template=...``), not yet parsed: the class's own
    parser parses it once it knows the option's type. ``option`` is the option as typed, for messages."""

    option: str = ""


def accepts_str(typehint: Any) -> bool:
    """True for ``str``, ``Optional[str]`` and unions with ``str`` in them (not for ``Literal``)."""
    if typehint is str:
        return True
    if typing.get_origin(typehint) in (Union, types.UnionType):
        return any(accepts_str(a) for a in typing.get_args(typehint))
    return False


def yaml_unquote(text: str) -> Optional[str]:
    """The string that ``text`` stands for when it is one YAML-quoted scalar (``'a'``, ``"a\\n"``), else None."""
    if len(text) < 2 or text[0] != text[-1] or text[0] not in "'\"":
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:  # e.g. 'a' 'b': not one quoted scalar
        return None
    return value if isinstance(value, str) else None


def yaml_reads_none(text: str) -> bool:
    """``text`` is no ``null`` but YAML reads it as None: ``#...`` (a comment) or ``~``; what a user typed for a
    ``str`` option, not a None."""
    if not text.strip() or text.strip().lower() == "null":
        return False
    try:
        return yaml.safe_load(text) is None
    except yaml.YAMLError:
        return False


def cli_string(text: str, option: str) -> Optional[str]:
    """The literal string for a command-line ``text`` given to a ``str`` option, or None to let jsonargparse parse
    an unquoted ``text`` (so that ``null`` still means None for an ``Optional[str]``)."""
    unquoted = yaml_unquote(text)
    if unquoted is not None:
        return unquoted
    if yaml_reads_none(text):
        return text
    if "\\n" in text:
        opt = option.lstrip("-")
        rank_zero_warn(
            f"--{opt} contains a backslash followed by 'n', kept as two characters. For "
            + NEWLINE_HINT.format(opt=opt)
        )
    return None


def is_rank_zero() -> bool:
    """False on every process but the first of a multi-process run, also before Lightning has set the ranks up.

    Both must say rank 0: the launcher's environment, read in Lightning's order (``RANK``, else ``LOCAL_RANK``
    with ``NODE_RANK``, else ``SLURM_PROCID``), and Lightning's ``rank_zero_only.rank``, which the strategy sets.
    """
    if getattr(rank_zero_only, "rank", 0) != 0:
        return False
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value) == 0 and (key != "LOCAL_RANK" or os.environ.get("NODE_RANK", "0") in ("", "0"))
    return True


def _typehint(action: argparse.Action) -> Any:
    return getattr(action, "_typehint", None)


def _is_class_option(action: argparse.Action) -> bool:
    """An option whose value is a class given by class path (``--data``, ``--trainer.callbacks``)."""
    if _ActionTypeHint is None or _typehint(action) is None:
        return False
    return _ActionTypeHint.is_subclass_typehint(action, all_subtypes=False, also_lists=True)


def _nested_under(action: Optional[argparse.Action], option_string: Optional[str]) -> bool:
    """``--data.template`` under ``--data``: how jsonargparse's ActionTypeHint tells a nested option."""
    if action is None or not isinstance(option_string, str):
        return False
    return any(option_string.startswith(f"{o}.") for o in action.option_strings)


def _without_raw(value: Any) -> Any:
    """Plain ``str`` for any :class:`_Raw` left in a parsed config (none should be; a later jsonargparse might)."""
    if isinstance(value, (_Raw, _Literal)):
        return str(value)
    if isinstance(value, Namespace):
        for key in list(value.keys()):
            value[key] = _without_raw(value[key])
        return value
    if isinstance(value, dict):
        return {k: _without_raw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_raw(v) for v in value]
    return value


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter, keeping the line breaks of descriptions and epilogs (one line per method)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line for line in text.splitlines())


class MemoptArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` that takes command-line strings literally and refuses abbreviated options.

    jsonargparse builds the parser of each class given by class path with the type of its parent parser, so the
    classes' own options (``--data.template``) get the same treatment.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # --trainer.max_step=5 must be an error, not max_steps (argparse's prefix matching)
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None, **kwargs: Any) -> Namespace:
        args = self._join_option_values(list(sys.argv[1:] if args is None else args))
        return _without_raw(super().parse_args(args, namespace, **kwargs))

    def _join_option_values(self, args: list[str]) -> list[str]:
        """``--opt value`` as ``--opt=value`` for the options handled below, so that one code path sees the value."""
        out: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if (
                arg.startswith("--")
                and "=" not in arg
                and i + 1 < len(args)
                and not args[i + 1].startswith("--")
                and self._value_option(arg)
            ):
                out.append(f"{arg}={args[i + 1]}")
                i += 2
                continue
            out.append(arg)
            i += 1
        return out

    def _value_option(self, option: str) -> bool:
        """A typed option taking one value: a ``str`` option, or a nested option of a class (``--data.template``)."""
        action = self._option_string_actions.get(option)
        if action is not None:
            return action.nargs is None and accepts_str(_typehint(action))
        parts = option[2:].split(".")
        for k in range(len(parts) - 1, 0, -1):
            parent = self._option_string_actions.get("--" + ".".join(parts[:k]))
            if parent is not None:
                return _is_class_option(parent)
        return False

    def _parse_optional(self, arg_string: str) -> Any:
        result = super()._parse_optional(arg_string)
        if isinstance(result, list):  # Python >= 3.12.7 returns a list of (action, option, sep, explicit_arg)
            return [self._literal(t) for t in result]
        return self._literal(result)

    def _literal(self, parsed: Any) -> Any:
        """Mark a nested class option's value as unparsed; unquote a ``str`` option's YAML-quoted value."""
        if not isinstance(parsed, tuple) or len(parsed) not in (3, 4) or not isinstance(parsed[-1], str):
            return parsed
        action, option, value = parsed[0], parsed[1], parsed[-1]
        if _nested_under(action, option) and _is_class_option(action):
            value = _Raw(value)
            value.option = option
        elif action is not None and option in action.option_strings and accepts_str(_typehint(action)):
            literal = cli_string(value, option)
            if literal is not None:
                value = _Literal(literal)
        else:
            return parsed
        return (*parsed[:-1], value)

    def error(self, message: str, ex: Optional[Exception] = None) -> typing.NoReturn:
        """jsonargparse's error, naming the option meant when an unknown one is close to a real one; printed by
        the first process only when every process of a multi-process run parses the same command line."""
        if self.exit_on_error and not is_rank_zero():
            sys.exit(2)
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown and "did you mean" not in message:
            hints = []
            for arg in unknown.group(1).split():
                option = arg.split("=", 1)[0]
                if option.startswith("--"):
                    close = difflib.get_close_matches(option, list(self._option_string_actions), n=1, cutoff=0.8)
                    hints += [f"{option}: did you mean {close[0]}?"] if close else []
            if hints:
                message += "\n" + "\n".join(hints) + " (options are never abbreviated)"
        # YAML reads an unquoted [0-9] inside a list as a nested list (or fails on it)
        if re.search(r"while parsing a flow sequence|Got value: \[[^\]]*[\w.*?]\[", message):
            message += ('\nIf a list item holds brackets, such as the fnmatch class in model.layers.[0-9].*, quote it: '
                        'frozen: ["model.layers.[0-9].*"]')
        super().error(message, ex)

    def _check_value_key(self, action: argparse.Action, value: Any, key: str, cfg: Any, *args: Any, **kw: Any) -> Any:
        if isinstance(value, _Literal):  # kept through jsonargparse's later checks of the same value
            return value
        if isinstance(value, _Raw):  # reached the class's own parser: the option's type is known now
            option, value = value.option or key, str(value)
            if accepts_str(_typehint(action)):
                literal = cli_string(value, option)
                if literal is not None:
                    return _Literal(literal)
        if type(value) is str and accepts_str(_typehint(action)) and yaml_reads_none(value):
            # checked again as plain text (the top-level parser checks a subcommand's values): YAML would make it None
            return value
        return super()._check_value_key(action, value, key, cfg, *args, **kw)
