"""Text tables (TSV, CSV, JSONL) with any columns, and prompt templates with named fields.

A template such as ``"{sentence1} ... {sentence2}"`` names fields; ``columns`` maps a field (and ``label``) to the
file's column when their names differ. Nothing here knows a task: the DataModules build on it.
"""

from __future__ import annotations

import csv
import json
import os
import string
from typing import Any, Literal, Optional

from lightning.pytorch.utilities import rank_zero_warn

Quoting = Literal["auto", "none", "csv"]
FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class Table:
    """Rows of one file as dicts, with the header (the columns in file order) and the path for messages."""

    def __init__(self, path: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
        self.path, self.columns, self.rows = path, columns, rows

    def __len__(self) -> int:
        return len(self.rows)


def file_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"{path}: cannot tell the format from the extension {ext!r}; use .tsv, .csv or .jsonl.")
    return FORMATS[ext]


def read_table(path: str, quoting: Quoting = "auto", fmt: Optional[str] = None) -> Table:
    """Read a TSV, CSV or JSONL file (format from the extension) with a header row; a UTF-8 BOM is dropped.

    ``quoting="auto"`` reads .tsv unquoted (GLUE TSVs hold bare ``"`` characters) and .csv with CSV quoting;
    ``"none"``/``"csv"`` force one or the other for delimited files. ``fmt`` (``"tsv"``, ``"csv"``, ``"jsonl"``)
    overrides the extension.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Data file {path!r} does not exist.")
    fmt = fmt or file_format(path)
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a byte-order mark is not part of a name
        if fmt == "jsonl":
            return _read_jsonl(path, f)
        quoted = quoting == "csv" or (quoting == "auto" and fmt == "csv")
        reader = csv.reader(
            f, delimiter="\t" if fmt == "tsv" else ",", quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE
        )
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty; it needs a header row naming the columns.")
        header = [h.strip() for h in header]
        rows = []
        for r in reader:
            if len(r) > len(header) and any(x.strip() for x in r[len(header):]):  # zip would cut the text short
                raise ValueError(
                    f"{path}, line {reader.line_num}: {len(r)} fields where the header has {len(header)}; a "
                    f"delimiter inside a text field needs quoting (quoting='csv' reads quoted fields)."
                )
            if r:
                rows.append(dict(zip(header, r)))
    short = sum(len(r) < len(header) for r in rows)
    if short:
        rank_zero_warn(f"{path}: {short} rows have fewer fields than the header's {len(header)}; they are skipped.")
        rows = [r for r in rows if len(r) == len(header)]
    return Table(path, header, rows)


def _read_jsonl(path: str, f) -> Table:
    rows, columns = [], {}
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {n}: not valid JSON ({err.msg}); a JSONL file has one object per line."
            ) from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}.")
        columns.update(dict.fromkeys(row))
        rows.append(row)
    return Table(path, list(columns), rows)


def find_split(data_dir: str, stems: tuple[str, ...]) -> Optional[str]:
    """The first ``<stem>.<tsv|csv|jsonl>`` found in ``data_dir`` (stems in order of preference)."""
    for stem in stems:
        for ext in FORMATS:
            p = os.path.join(data_dir, stem + ext)
            if os.path.isfile(p):
                return p
    return None


def template_fields(template: str) -> list[str]:
    """The placeholder names of a ``str.format`` template, in order, without repeats."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"The template {template!r} is not a valid format string ({err}); write a literal brace as "
                         f"'{{{{' or '}}}}'.") from None
    for n in names:
        if not n.isidentifier():
            raise ValueError(f"The template {template!r} has the placeholder {{{n}}}; name fields like {{sentence1}} "
                             f"and map them to columns with columns={{'sentence1': '<column>'}}.")
    return list(dict.fromkeys(names))


def resolve_columns(
    table: Table, fields: list[str], columns: dict[str, str], what: str = "template field"
) -> dict[str, str]:
    """Field name -> the table's column: ``columns[field]`` when given, else the column named like the field."""
    out = {}
    for f in fields:
        col = columns.get(f, f)
        if col not in table.columns:
            hint = (f"columns={{'{f}': '<one of those>'}}" if f not in columns else
                    f"correct columns['{f}']")
            raise ValueError(
                f"{table.path}: the {what} '{f}' needs a column {col!r}, which the file does not have; its columns "
                f"are {table.columns}. Map it with {hint}."
            )
        out[f] = col
    return out


def check_template(template: str, label_words: tuple[str, ...] = (), name: str = "template") -> list[str]:
    """Warn (and return the problems) when the template's text does not end where the answer goes.

    The usual cause is shell/YAML quoting: ``'--data.template="Review: {sentence}\\nSentiment:"'`` keeps the
    double quotes and a two-character backslash-n. The model then sees ``Sentiment:"`` before the label word.
    """
    problems = []
    stripped = template.strip()
    if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "\"'":
        problems.append(f"it is wrapped in {stripped[0]} quotes, which become part of the prompt")
    elif stripped[-1:] in ("\"", "'"):
        problems.append(f"it ends with a {stripped[-1]} character, so the answer follows a quote")
    if "\\n" in template:
        problems.append("it contains a literal backslash-n (two characters '\\' 'n'), not a line break")
    if template[-1:] in (" ", "\t") and any(w[:1].isspace() for w in label_words):
        problems.append("it ends with whitespace and the label words start with a space, so two spaces come before "
                        "the answer")
    if problems:
        rank_zero_warn(
            f"The {name} {template!r} looks mangled: {'; '.join(problems)}. Write it in a YAML config as a "
            f"double-quoted string (\"Review: {{sentence}}\\nSentiment:\" there gives a real line break), or on the "
            f"command line without inner quotes, e.g. --data.{name}=$'Review: {{sentence}}\\nSentiment:' in bash."
        )
    return problems
