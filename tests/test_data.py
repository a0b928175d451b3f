"""Prompt-classification data: TSV reading, k-shot sampling, templates, left padding, the embedded task."""

from __future__ import annotations

import pytest
import torch
from conftest import SST2, needs_sst2
from lightning.pytorch.loggers import CSVLogger

from lightning_memopt.data.prompt import PromptClassificationDataModule, k_shot, left_pad_collate, read_glue_tsv
from lightning_memopt.data.synthetic import synthetic_sentiment
from lightning_memopt.testing import tiny_datamodule, tiny_model, tiny_trainer
from lightning_memopt.tokenization import builtin_tokenizer

ROWS = [(i % 2, f"row {i}") for i in range(40)]


def test_k_shot_is_per_class_seeded_and_excludes():
    train, used = k_shot(ROWS, 5, seed=0)
    assert sorted(y for y, _ in train) == [0] * 5 + [1] * 5
    assert k_shot(ROWS, 5, seed=0)[0] == train and k_shot(ROWS, 5, seed=1)[0] != train
    val, used_val = k_shot(ROWS, 5, seed=1, exclude=used)
    assert not used & used_val
    with pytest.raises(ValueError, match="class 0 has only 15 available; lower k"):
        k_shot(ROWS, 16, seed=2, exclude=used)
    with pytest.raises(ValueError, match=r"class 2 has no example in the data.*classes are 0 to 2"):
        k_shot(ROWS, 5, seed=0, classes=3)  # a class the file lacks is not silently left out


def test_read_glue_tsv(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\na fine film\t1\na dull one\t0\n")
    assert read_glue_tsv(str(path)) == [(1, "a fine film"), (0, "a dull one")]
    (tmp_path / "bad.tsv").write_text("sentence\tscore\nx\t1\n")
    with pytest.raises(ValueError, match="no 'label' column"):
        read_glue_tsv(str(tmp_path / "bad.tsv"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_glue_tsv(str(tmp_path / "none.tsv"))
    (tmp_path / "idx.tsv").write_text("idx\tsentence\tlabel\n7\ta fine film\t1\n")  # the text, not the row number
    assert read_glue_tsv(str(tmp_path / "idx.tsv")) == [(1, "a fine film")]
    (tmp_path / "two.tsv").write_text("a\tb\tlabel\nx\ty\t1\n")
    with pytest.raises(ValueError, match=r"which of the columns \['a', 'b'\] is the text"):
        read_glue_tsv(str(tmp_path / "two.tsv"))
    (tmp_path / "glue.txt").write_text("sentence\tlabel\na fine film\t1\n")  # tab-separated whatever its name
    assert read_glue_tsv(str(tmp_path / "glue.txt")) == [(1, "a fine film")]
    (tmp_path / "short.tsv").write_text("sentence\tlabel\na fine film\t1\n0\ngood\t1\n")
    with pytest.warns(UserWarning, match="1 rows have fewer fields"):
        assert read_glue_tsv(str(tmp_path / "short.tsv")) == [(1, "a fine film"), (1, "good")]


@needs_sst2
def test_read_sst2():
    rows = read_glue_tsv(str(SST2 / "dev.tsv"))
    assert len(rows) == 872 and {y for y, _ in rows} == {0, 1}


def test_left_pad_collate():
    batch = left_pad_collate(0)([{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8], "label": 0}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [1, 0]


def test_builtin_tokenizer_covers_the_synthetic_task():
    tok = builtin_tokenizer()
    for _, text in synthetic_sentiment(200, seed=0):
        assert tok.unk_token_id not in tok(text)["input_ids"]
    assert len(tok("negative")["input_ids"]) == 1 and len(tok("positive")["input_ids"]) == 1


def test_synthetic_label_is_the_majority_sentiment():
    from lightning_memopt.data.synthetic import NEGATIVE, POSITIVE

    for y, text in synthetic_sentiment(300, seed=3):
        words = text.split()
        pos, neg = sum(w in POSITIVE for w in words), sum(w in NEGATIVE for w in words)
        assert (pos > neg) == bool(y)


def test_datamodule_splits_template_and_label_ids():
    dm = PromptClassificationDataModule(k=8, val_k=4, tokenizer="builtin", test_limit=50, max_length=12,
                                        template="Review: {sentence} Sentiment:", label_words=["negative", "positive"])
    dm.setup("fit")
    tok = dm.tokenizer
    assert len(dm._splits["train"]) == 16 and len(dm._splits["val"]) == 8 and len(dm._splits["test"]) == 50
    assert dm.label_token_ids == [tok.convert_tokens_to_ids("negative"), tok.convert_tokens_to_ids("positive")]
    item = dm._splits["train"][0]
    assert len(item["input_ids"]) <= 12
    assert tok.convert_ids_to_tokens(item["input_ids"][-2:]) == ["sentiment", ":"]  # truncation keeps the tail
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 16 and batch["attention_mask"][:, -1].all()


def test_deterministic_order_without_shuffle():
    a, b = tiny_datamodule(k=8, tokenizer="builtin"), tiny_datamodule(k=8, tokenizer="builtin")
    a.setup("fit"), b.setup("fit")
    assert torch.equal(next(iter(a.train_dataloader()))["input_ids"], next(iter(b.train_dataloader()))["input_ids"])


def test_fit_with_a_logger_merges_module_and_datamodule_hparams(tmp_path):
    # HFCausalLM(tokenizer="builtin") and the datamodule's default tokenizer=None must not clash when logged
    dm = tiny_datamodule(k=8)
    assert "tokenizer" not in dm.hparams
    trainer = tiny_trainer(max_steps=1, logger=CSVLogger(str(tmp_path)))
    trainer.fit(tiny_model(), dm)
    assert trainer.global_step == 1


def _bos_tokenizer():
    """The builtin vocabulary with a tokenizer that adds a BOS, as Llama's, Mistral's and Gemma's do."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from lightning_memopt.tokenization import _vocab

    vocab = dict(_vocab())
    vocab["<s>"] = len(vocab)
    t = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    t.normalizer, t.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]")


def test_a_prompt_cut_to_max_length_keeps_its_bos_and_its_tail():
    from lightning_memopt.data.generation import make_item
    from lightning_memopt.tokenization import cut_left, encode_prompt

    tok = _bos_tokenizer()
    ids, head = encode_prompt(tok, "the film was good sentiment :")
    assert head == 1 and ids[0] == tok.bos_token_id
    assert cut_left(ids, 4, head) == [tok.bos_token_id, *ids[-3:]] and cut_left(ids, 99, head) == ids
    assert encode_prompt(builtin_tokenizer(), "the film")[1] == 0  # no specials added: a plain tail
    dm = PromptClassificationDataModule(k=2, max_length=8, template="Review: {sentence} Sentiment:", test_limit=8)
    dm.tokenizer = tok
    dm.setup()
    for item in dm._splits["test"].items:
        toks = tok.convert_ids_to_tokens(item["input_ids"])
        assert len(toks) <= 8 and toks[0] == "<s>" and toks[-2:] == ["sentiment", ":"]
    # generation: the cut input and the generation prompt both keep the BOS; the answer stays whole
    item = make_item([([1, *range(10, 20)], False), ([50, 51, 2], True)], ["x"], 11, head=1)
    assert item["input_ids"] == [1, *range(13, 20), 50, 51, 2] and item["prompt_ids"] == [1, *range(10, 20)]
    assert item["lm_labels"][-3:] == [50, 51, 2]


def test_a_long_chat_keeps_the_bos_its_template_writes(tmp_path):
    import json

    from lightning_memopt.data.instruct import InstructionDataModule

    tok = _bos_tokenizer()
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
                         "{% endfor %}")
    conv = {"messages": [{"role": "user", "content": "the film was good and the cast was good"},
                         {"role": "assistant", "content": "good"}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(conv) + "\n")
    dm = InstructionDataModule(train_file=str(tmp_path / "train.jsonl"), val_size=0, max_length=8)
    dm.tokenizer = tok
    dm.setup()
    item = dm._splits["train"][0]
    assert len(item["input_ids"]) == 8 and item["input_ids"][0] == tok.bos_token_id
