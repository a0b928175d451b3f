"""Prompt-classification data: k-shot sampling per class, a template, and one label word per class."""

from __future__ import annotations

import csv
import os
import random
from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lightning_memopt.data.synthetic import synthetic_sentiment
from lightning_memopt.tokenization import load_tokenizer

Rows = list[tuple[int, str]]


def read_glue_tsv(path: str) -> Rows:
    """Read a GLUE-style TSV with a header: a ``label`` column and one text column (``sentence``/``content``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Data file {path!r} does not exist.")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if "label" not in header:
            raise ValueError(f"{path}: the header {header} has no 'label' column.")
        li = header.index("label")
        ti = next(i for i in range(len(header)) if i != li)
        return [(int(r[li]), r[ti]) for r in reader if len(r) > max(li, ti)]


def k_shot(rows: Rows, k: int, seed: int, exclude: Optional[set[int]] = None) -> tuple[Rows, set[int]]:
    """Sample ``k`` rows per class with ``seed`` (LM-BFF/MeZO convention); returns rows and their indices."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, (y, _) in enumerate(rows):
        if exclude is None or i not in exclude:
            by_class.setdefault(y, []).append(i)
    picked: list[int] = []
    for y in sorted(by_class):
        idx = by_class[y]
        if k > len(idx):
            raise ValueError(
                f"k={k} examples per class were asked for, but class {y} has only {len(idx)} available; lower k."
            )
        picked += rng.sample(idx, k)
    rng.shuffle(picked)
    return [rows[i] for i in picked], set(picked)


class _Encoded(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def left_pad_collate(pad_id: int):
    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for j, it in enumerate(items):
            L = len(it["input_ids"])
            ids[j, n - L :] = torch.tensor(it["input_ids"])
            mask[j, n - L :] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([it["label"] for it in items])}

    return collate


class PromptClassificationDataModule(LightningDataModule):
    """k-shot prompt classification from a GLUE-style TSV folder, a ``datasets`` name, or the embedded task.

    Validation is drawn from train (k per class, disjoint from the training sample); test is the dev split.

    Args:
        data_dir: folder with ``train.tsv`` and ``dev.tsv`` (e.g. GLUE SST-2). ``None`` with ``dataset=None``
            uses the embedded offline synthetic sentiment task.
        dataset: a Hugging Face ``datasets`` name such as ``"glue/sst2"`` (needs network).
        template: prompt with a ``{sentence}`` placeholder.
        label_words: one word per class, each a single token (mind the leading space for BPE tokenizers).
        k: training examples per class; ``val_k`` validation examples per class (default ``k``).
        seed: sampling seed.
        tokenizer: tokenizer name/path; default: the LightningModule's ``tokenizer``.
        test_limit: use only the first N test rows (quick checks).
        shuffle: shuffle the training set each epoch.

    Example::

        dm = PromptClassificationDataModule(data_dir="../shared/data/sst2", k=512, seed=0)
    """

    def __init__(
        self,
        data_dir: Optional[str] = None,
        dataset: Optional[str] = None,
        template: str = "Review: {sentence}\nSentiment:",
        label_words: list[str] = [" negative", " positive"],  # noqa: B006 - shown as-is by --print_config
        k: int = 16,
        val_k: Optional[int] = None,
        seed: int = 0,
        max_length: int = 128,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        tokenizer: Optional[str] = None,
        test_limit: Optional[int] = None,
        synthetic_size: int = 4000,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if "{sentence}" not in template:
            raise ValueError(f"The template {template!r} has no '{{sentence}}' placeholder; add one.")
        if data_dir is not None and dataset is not None:
            raise ValueError("Give data_dir or dataset, not both.")
        if data_dir is not None and not os.path.isdir(data_dir):
            raise FileNotFoundError(
                f"Data folder {data_dir!r} does not exist. Point data_dir at a folder with train.tsv and dev.tsv "
                f"(GLUE format), or leave it unset for the embedded synthetic task."
            )
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        # The tokenizer name stays out of hparams: Lightning refuses to log a module and a datamodule whose shared
        # hparam keys differ (HFCausalLM has tokenizer="builtin", this one usually None).
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer_name = tokenizer
        self.tokenizer = None
        self.label_token_ids: Optional[list[int]] = None
        self._splits: dict[str, _Encoded] = {}

    # ---- sources ---------------------------------------------------------------------------------------------
    def _load_rows(self) -> tuple[Rows, Rows]:
        hp = self.hparams
        if hp.data_dir is not None:
            return read_glue_tsv(os.path.join(hp.data_dir, "train.tsv")), read_glue_tsv(
                os.path.join(hp.data_dir, "dev.tsv")
            )
        if hp.dataset is not None:
            try:
                import datasets
            except ImportError:
                raise ImportError("dataset=... needs the datasets package: pip install datasets.") from None
            name, _, cfg = hp.dataset.partition("/")
            ds = datasets.load_dataset(name, cfg or None)
            text = next(c for c in ds["train"].column_names if c not in ("label", "idx"))
            conv = lambda split: [(int(r["label"]), r[text]) for r in ds[split]]  # noqa: E731
            return conv("train"), conv("validation")
        return synthetic_sentiment(hp.synthetic_size, seed=1234), synthetic_sentiment(400, seed=4321)

    def _resolve_tokenizer(self):
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_name is not None:
            self.tokenizer = load_tokenizer(self.tokenizer_name)
        else:
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.tokenizer = getattr(module, "tokenizer", None)
            if self.tokenizer is None:
                raise ValueError("No tokenizer: pass tokenizer=... or use a LightningModule with a .tokenizer.")
        return self.tokenizer

    def label_ids(self, tokenizer) -> list[int]:
        ids = []
        for w in self.hparams.label_words:
            t = tokenizer(w, add_special_tokens=False)["input_ids"]
            if len(t) != 1:
                raise ValueError(
                    f"Label word {w!r} tokenizes to {len(t)} tokens {t}; each label word must be one token. "
                    f"Pick another word, or try it with/without a leading space."
                )
            ids.append(t[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"Label words {self.hparams.label_words} map to repeated token ids {ids}.")
        return ids

    def _encode(self, rows: Rows, tokenizer) -> _Encoded:
        hp = self.hparams
        items = []
        for y, sentence in rows:
            if not 0 <= y < len(hp.label_words):
                raise ValueError(f"Label {y} has no label word (label_words={hp.label_words}).")
            text = hp.template.format(sentence=sentence.strip())
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            if len(ids) > hp.max_length:  # keep the template's tail, where the answer goes
                ids = ids[-hp.max_length :]
            items.append({"input_ids": ids, "label": y})
        return _Encoded(items)

    def setup(self, stage: Optional[str] = None) -> None:
        if self._splits:
            return
        tok = self._resolve_tokenizer()
        self.label_token_ids = self.label_ids(tok)
        train_rows, test_rows = self._load_rows()
        hp = self.hparams
        train, used = k_shot(train_rows, hp.k, hp.seed)
        val, _ = k_shot(train_rows, hp.val_k or hp.k, hp.seed + 1, exclude=used)
        if hp.test_limit is not None:
            test_rows = test_rows[: hp.test_limit]
        self._splits = {"train": self._encode(train, tok), "val": self._encode(val, tok),
                        "test": self._encode(test_rows, tok)}
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None and hasattr(module, "set_label_token_ids"):
            module.set_label_token_ids(self.label_token_ids)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return DataLoader(
            self._splits[split], batch_size=batch_size, shuffle=shuffle, collate_fn=left_pad_collate(pad),
            num_workers=self.hparams.num_workers, drop_last=split == "train" and len(self._splits[split]) >= batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", self.hparams.batch_size, self.hparams.shuffle)
        tr = self.trainer
        if not self.hparams.shuffle and tr is not None and tr.world_size > 1 and not tr._accelerator_connector.use_distributed_sampler:
            # Deterministic rank-strided shards: the global batch equals a 1-process batch of world_size x batch_size.
            ds = torch.utils.data.Subset(self._splits["train"], range(tr.global_rank, len(self._splits["train"]), tr.world_size))
            loader = DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=loader.collate_fn,
                                num_workers=self.hparams.num_workers, drop_last=True)
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, False)
