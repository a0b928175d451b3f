"""Real tasks from real files: TSV/CSV/JSONL, any columns, several template fields, string labels, template checks."""

from __future__ import annotations

import csv
import json
import warnings

import pytest
from conftest import MRPC, SST2, needs_mrpc, needs_sst2

from lightning_memopt.data.prompt import PromptClassificationDataModule, read_glue_tsv
from lightning_memopt.data.tables import check_template, read_table

MRPC_COLUMNS = {"label": "Quality", "sentence1": "#1 String", "sentence2": "#2 String"}
MRPC_TEMPLATE = '{sentence1}\nQuestion: Does that mean "{sentence2}"? Yes or No?\nAnswer:'


def mrpc_dm(data_dir, **kw) -> PromptClassificationDataModule:
    kw.setdefault("k", 8)
    return PromptClassificationDataModule(data_dir=str(data_dir), template=MRPC_TEMPLATE, label_words=[" No", " Yes"],
                                          columns=MRPC_COLUMNS, tokenizer="builtin", max_length=512, **kw)


def test_read_table_formats_bom_and_quoting(tmp_path):
    (tmp_path / "a.tsv").write_text('\ufeffid\ttext\n1\the said " hi " .\n', encoding="utf-8")
    (tmp_path / "a.csv").write_text('\ufeffid,text\n1,"he said "" hi "" , then left"\n', encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"id": 1, "text": "x"}\n\n{"id": 2, "text": "y", "extra": true}\n')
    tsv = read_table(str(tmp_path / "a.tsv"))
    assert tsv.columns == ["id", "text"]  # the byte-order mark is not part of the first name
    assert tsv.rows == [{"id": "1", "text": 'he said " hi " .'}]  # TSV: quotes are text (GLUE)
    assert read_table(str(tmp_path / "a.csv")).rows == [{"id": "1", "text": 'he said " hi " , then left'}]
    jl = read_table(str(tmp_path / "a.jsonl"))
    assert jl.columns == ["id", "text", "extra"] and [r["id"] for r in jl.rows] == [1, 2]
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"cannot tell the format .*'\.txt'; use \.tsv, \.csv or \.jsonl"):
        read_table(str(tmp_path / "a.txt"))
    (tmp_path / "b.jsonl").write_text('{"id": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"b\.jsonl, line 2: not valid JSON"):
        read_table(str(tmp_path / "b.jsonl"))


@needs_sst2
def test_sst2_rows_are_unchanged():
    # a lone {sentence} still reads GLUE's single text column, whatever it is called (dev.tsv says 'content')
    dm = PromptClassificationDataModule(data_dir=str(SST2), tokenizer="builtin")
    train, test = dm._tables()
    glue = read_glue_tsv(str(SST2 / "dev.tsv"))
    assert [(y, v["sentence"]) for y, v in dm._rows(test)] == [(y, s.strip()) for y, s in glue]
    assert len(dm._rows(train)) == 67349


@needs_mrpc
def test_mrpc_loads_with_only_options():
    dm = mrpc_dm(MRPC)
    train, test = dm._tables()
    rows = dm._rows(train)
    assert len(rows) == 3667 and len(dm._rows(test)) == 398
    assert sum(y for y, _ in rows) == 2473  # 1 = paraphrase
    y, v = rows[0]
    assert y == 1 and v["sentence1"].startswith("Amrozi accused his brother , whom he called \" the witness \"")
    dm.setup()
    assert dm.label_token_ids is not None  # " No"/" Yes" are single tokens: the fast path
    assert len(dm._splits["train"]) == 16 and len(dm._splits["test"]) == 398


@needs_mrpc
def test_mrpc_as_csv_and_jsonl_reads_the_same(tmp_path):
    tsv = mrpc_dm(MRPC, test_limit=50)
    tsv.setup()
    for split in ("train", "dev"):
        t = read_table(str(MRPC / f"{split}.tsv"))
        (tmp_path / "csv").mkdir(exist_ok=True)
        (tmp_path / "jsonl").mkdir(exist_ok=True)
        with open(tmp_path / "csv" / f"{split}.csv", "w", newline="", encoding="utf-8-sig") as f:
            w = csv.writer(f)  # quotes fields with commas or quotes, as spreadsheets do
            w.writerow(t.columns)
            w.writerows([r[c] for c in t.columns] for r in t.rows)
        with open(tmp_path / "jsonl" / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for r in t.rows:
                f.write(json.dumps({**r, "Quality": int(r["Quality"])}) + "\n")  # integer labels
    for fmt in ("csv", "jsonl"):
        other = mrpc_dm(tmp_path / fmt, test_limit=50)
        other.setup()
        for split in ("train", "val", "test"):
            assert other._splits[split].items == tsv._splits[split].items, (fmt, split)


def test_missing_column_names_the_columns_the_file_has(tmp_path):
    (tmp_path / "train.tsv").write_text("Quality\t#1 String\t#2 String\n1\ta\tb\n")
    (tmp_path / "dev.tsv").write_text("Quality\t#1 String\t#2 String\n1\ta\tb\n")
    dm = PromptClassificationDataModule(data_dir=str(tmp_path), template="{sentence1} ? {sentence2}",
                                        columns={"label": "Quality", "sentence1": "#1 String"}, tokenizer="builtin")
    with pytest.raises(ValueError, match=r"train\.tsv: the template field 'sentence2' needs a column 'sentence2', "
                                         r"which the file does not have; its columns are \['Quality', '#1 String', "
                                         r"'#2 String'\]\. Map it with columns="):
        dm.setup()
    dm = PromptClassificationDataModule(data_dir=str(tmp_path), template="{sentence}", tokenizer="builtin")
    with pytest.raises(ValueError, match=r"the label column 'label' is not in the file; its columns are \['Quality', "
                                         r"'#1 String', '#2 String'\]\. Name it with columns=\{'label'"):
        dm.setup()
    (tmp_path / "train.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no train file \(\.tsv, \.csv or \.jsonl\); it holds "
                                                r"\['dev\.tsv'\]"):
        PromptClassificationDataModule(data_dir=str(tmp_path), tokenizer="builtin").setup()


def test_string_labels_label_words_and_label_map(tmp_path):
    rows = [{"premise": f"a film {i}", "hypothesis": "it is good", "gold": g}
            for i, g in enumerate(["entailment", "contradiction"] * 6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    common = dict(data_dir=str(tmp_path), template="{premise} ? {hypothesis} answer:", columns={"label": "gold"},
                  tokenizer="builtin", k=2)
    with pytest.raises(ValueError, match=r"the label 'entailment' is neither a class index nor one of the label words "
                                         r"\['no', 'yes'\]; map each label value with label_map="):
        PromptClassificationDataModule(label_words=["no", "yes"], **common).setup()
    dm = PromptClassificationDataModule(label_words=["no", "yes"], label_map={"entailment": "yes", "contradiction": 0},
                                        **common)
    dm.setup()
    assert [y for y, _ in dm._rows(dm._tables()[1])] == [1, 0, 1, 0]
    # the label word itself (without its leading space, any case) is a label too
    (tmp_path / "dev.jsonl").write_text(json.dumps({"premise": "x", "hypothesis": "y", "gold": "Entailment"}) + "\n")
    dm = PromptClassificationDataModule(label_words=[" contradiction", " entailment"], **common)
    assert [y for y, _ in dm._rows(dm._tables()[1])] == [1]


def test_label_map_keys_read_as_yaml_integers_still_map(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"good {i}\t1\nbad {i}\t0\n" for i in range(4)))
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    dm = PromptClassificationDataModule(data_dir=str(tmp_path), label_map={0: 1, 1: 0}, tokenizer="builtin", k=2)
    assert [y for y, _ in dm._rows(dm._tables()[1])] == [0]


def test_a_columns_key_the_template_does_not_use_is_refused(tmp_path):
    (tmp_path / "train.tsv").write_text("Quality\t#1 ID\t#1 String\n1\t7\ta\n")
    (tmp_path / "dev.tsv").write_text("Quality\t#1 ID\t#1 String\n1\t7\ta\n")
    dm = PromptClassificationDataModule(data_dir=str(tmp_path), template="{sentence} ?", tokenizer="builtin",
                                        columns={"label": "Quality", "sentense": "#1 String"})
    with pytest.raises(ValueError, match=r"columns names \['sentense'\], which is neither 'label' nor a field"):
        dm.setup()
    # the typo fixed by dropping the key: with two other columns, which is the text is not guessed (the ID was)
    dm = PromptClassificationDataModule(data_dir=str(tmp_path), template="{sentence} ?", tokenizer="builtin",
                                        columns={"label": "Quality"})
    with pytest.raises(ValueError, match=r"the template field 'sentence' needs a column"):
        dm.setup()


def test_a_class_without_rows_and_bad_split_sizes_are_refused(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"bad {i}\t0\n" for i in range(8)))
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nbad\t0\n")
    with pytest.raises(ValueError, match="class 1 has no example in the data"):
        PromptClassificationDataModule(data_dir=str(tmp_path), tokenizer="builtin", k=2).setup()
    with pytest.raises(ValueError, match="val_k must be at least 1"):
        PromptClassificationDataModule(data_dir=str(tmp_path), val_k=0)
    with pytest.raises(ValueError, match="test_limit must be at least 1"):
        PromptClassificationDataModule(data_dir=str(tmp_path), test_limit=-5)


@pytest.mark.parametrize("cls", ["prompt", "qa", "instruct"])
@pytest.mark.parametrize(("arg", "bad"), [("batch_size", 0), ("eval_batch_size", -1), ("num_workers", -1),
                                          ("max_length", 0), ("batch_size", 2.5)])
def test_loader_sizes_are_checked_when_the_datamodule_is_built(cls, arg, bad):
    # torch's own errors came at the first batch, from inside the DataLoader
    from lightning_memopt.data.instruct import InstructionDataModule
    from lightning_memopt.data.qa import SQuADDataModule

    make = {"prompt": PromptClassificationDataModule, "qa": SQuADDataModule, "instruct": InstructionDataModule}[cls]
    with pytest.raises(ValueError, match=rf"{arg} must be an integer >= {int(arg != 'num_workers')}, got {bad}\."):
        need = {"prompt": {}, "qa": {"data_file": "dev.json"}, "instruct": {"train_file": "t.jsonl"}}[cls]
        make(**{arg: bad}, **need)


def test_a_row_with_more_fields_than_the_header_is_refused(tmp_path):
    (tmp_path / "t.csv").write_text("label,sentence\n1,great movie, loved it\n0,dull\n")
    with pytest.raises(ValueError, match=r"t\.csv, line 2: 3 fields where the header has 2.*quoting"):
        read_table(str(tmp_path / "t.csv"))
    (tmp_path / "t.tsv").write_text("label\tsentence\n1\tgreat\t\n")  # an empty trailing field is harmless
    assert read_table(str(tmp_path / "t.tsv")).rows == [{"label": "1", "sentence": "great"}]


def test_train_file_and_test_file_by_name(tmp_path):
    for name in ("mine.csv", "held_out.csv"):
        (tmp_path / name).write_text("text,y\n" + "".join(f"good film {i},1\nbad film {i},0\n" for i in range(6)))
    dm = PromptClassificationDataModule(train_file=str(tmp_path / "mine.csv"), test_file=str(tmp_path / "held_out.csv"),
                                        template="review: {text} sentiment:", columns={"label": "y"},
                                        label_words=["negative", "positive"], tokenizer="builtin", k=2)
    dm.setup()
    assert len(dm._splits["test"]) == 12
    only_train = PromptClassificationDataModule(train_file=str(tmp_path / "mine.csv"), template="{text}",
                                                columns={"label": "y"}, tokenizer="builtin", k=2)
    only_train.setup()
    with pytest.raises(ValueError, match="No test data: give test_file="):
        only_train.test_dataloader()


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ('"Article: {sentence}\\nTopic:"', "wrapped in \" quotes"),  # what '--data.template="...\n..."' gives
        ("Article: {sentence}\\nTopic:", "literal backslash-n"),
        ("Article: {sentence} Topic:'", "ends with a ' character"),
        ("Article: {sentence} Topic: ", "ends with whitespace"),
    ],
)
def test_mangled_template_warns_with_the_fix(template, problem):
    with pytest.warns(UserWarning, match=r"looks mangled: .*" + problem + r".* double-quoted string"):
        PromptClassificationDataModule(template=template, label_words=[" world", " sports"])


def test_clean_templates_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in ("Article: {sentence}\nTopic:", MRPC_TEMPLATE, "Review: {sentence} Sentiment: "):
            check_template(t, ("negative",))  # a trailing space is right before label words without one
        PromptClassificationDataModule(template="Review: {sentence}\nSentiment:")


def test_template_field_errors():
    with pytest.raises(ValueError, match=r"has no '\{sentence\}' placeholder; add one"):
        PromptClassificationDataModule(template="no fields")
    with pytest.raises(ValueError, match=r"uses \{label\}: the answer would be in the prompt"):
        PromptClassificationDataModule(template="{sentence} {label}")
    with pytest.raises(ValueError, match=r"placeholder \{0\}; name fields like \{sentence1\}"):
        PromptClassificationDataModule(template="{0} and {1}")


def test_a_jsonl_row_without_a_field_or_with_null_is_named(tmp_path):
    rows = [{"sentence": "good film", "label": 1}, {"sentence": "bad film", "label": 0}]
    for i, bad in enumerate(({"sentence": None, "label": 1}, {"label": 0})):
        d = tmp_path / str(i)
        d.mkdir()
        for split in ("train", "dev"):
            (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, bad]))
        dm = PromptClassificationDataModule(data_dir=str(d), k=1, tokenizer="builtin",
                                            label_words=["negative", "positive"])
        with pytest.raises(ValueError, match=r"train\.jsonl: data row 3 has no value for \['sentence'\]"):
            dm.setup()


def test_an_empty_test_split_is_an_error_not_an_empty_result(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "good film\t1\nbad film\t0\n" * 2)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n")
    dm = PromptClassificationDataModule(data_dir=str(tmp_path), k=1, tokenizer="builtin",
                                        label_words=["negative", "positive"])
    dm.setup()
    with pytest.raises(ValueError, match=r"dev\.tsv\) holds no rows \(a header only\?\)"):
        dm.test_dataloader()
    with pytest.raises(ValueError, match="test_limit must be at least 1"):
        PromptClassificationDataModule(data_dir=str(tmp_path), test_limit=0)


def test_the_training_file_as_test_file_is_refused(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "good film\t1\nbad film\t0\n" * 2)
    dm = PromptClassificationDataModule(data_dir=str(tmp_path), test_file="train.tsv", k=1, tokenizer="builtin",
                                        label_words=["negative", "positive"])
    with pytest.raises(ValueError, match=r"The test file is the training file .*train\.tsv"):
        dm.setup()


def test_a_jsonl_label_that_is_not_a_class_index_is_refused(tmp_path):
    for split in ("train", "dev"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"sentence": "good film", "label": y}) + "\n"
                                                         for y in (0, 1, 1.0, 0.5)))
    dm = PromptClassificationDataModule(data_dir=str(tmp_path), k=1, tokenizer="builtin",
                                        label_words=["negative", "positive"])
    with pytest.raises(ValueError, match=r"the label 0\.5 is not a class index"):
        dm.setup()
