"""Generative question answering from a SQuAD-format JSON file: context + question -> answer text.

Split by article (questions about one article never appear in both train and test), loss on the answer tokens,
evaluation by greedy generation with exact match and token F1 (``HFCausalLM(objective="generation")``).
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Literal, Optional, Union

from lightning.pytorch.utilities import rank_zero_info

from lightning_memopt.data.generation import GenerationDataModuleBase, make_item
from lightning_memopt.data.prompt import check_padding
from lightning_memopt.data.sampling import check_group_by_length, check_loader_args
from lightning_memopt.data.tables import check_template, template_fields
from lightning_memopt.tokenization import encode_prompt

ArticleRef = Union[int, str]
QA_FIELDS = ("context", "question", "title")


def read_squad(path: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """``[(title, questions)]`` per article of a SQuAD 1.1/2.0 file; a question is a dict with ``id``,
    ``context``, ``question``, ``answers`` (texts) and ``is_impossible``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Data file {path!r} does not exist.")
    with open(path, encoding="utf-8-sig") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg}); expected the SQuAD format.") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path}: expected the SQuAD format {{\"data\": [{{\"title\", \"paragraphs\": [...]}}]}}.")
    articles = []
    for a in data["data"]:
        qs = []
        for p in a.get("paragraphs", []):
            for q in p.get("qas", []):
                answers = [x["text"] for x in q.get("answers", [])]
                qs.append({"id": str(q.get("id", len(qs))), "title": a.get("title", ""), "context": p["context"],
                           "question": q["question"], "answers": list(dict.fromkeys(answers)),
                           "is_impossible": bool(q.get("is_impossible", not answers))})
        articles.append((a.get("title", ""), qs))
    return articles


def _pick(articles: list[tuple[str, Any]], refs: list[ArticleRef], path: str) -> list[int]:
    titles = [t for t, _ in articles]
    out = []
    for r in refs:
        if isinstance(r, str) and not r.lstrip("-").isdigit():
            if r not in titles:
                raise ValueError(f"{path} has no article titled {r!r}; its titles are {titles}.")
            out.append(titles.index(r))
        else:
            i = int(r)
            if not 0 <= i < len(articles):
                raise ValueError(f"Article index {i} is out of range: {path} has {len(articles)} articles {titles}.")
            out.append(i)
    twice = sorted({titles[i] for i in out if out.count(i) > 1})
    if twice:  # by title and by index, say: its questions would be counted twice, and leak into validation
        raise ValueError(f"{path}: the articles {twice} are named more than once in one list; name each once.")
    return out


class SQuADDataModule(GenerationDataModuleBase):
    """Context + question -> answer from a SQuAD-format file, split by article.

    Args:
        data_file: a SQuAD 1.1/2.0 JSON file (e.g. ``../shared/data/squad/dev-subset.json``).
        test_file: another SQuAD file to test on; ``None`` tests on articles of ``data_file``.
        train_articles, test_articles: articles by index (file order) or title. Defaults: with no ``test_file``,
            the last 40% of the articles (at least one) are tested on and the others trained on; with
            ``test_file``, every article of each file. Train and test articles of one file must not overlap.
        answerable_only: drop SQuAD 2.0 questions without an answer. With ``False`` their answer is
            ``no_answer_text``.
        template: the prompt, with ``{context}``, ``{question}`` and optionally ``{title}``.
        answer_prefix: text between the prompt and the answer (a space after ``Answer:``).
        k: training questions sampled from the training articles (``None``: all but the validation ones).
        val_size: questions of the training articles held out for validation (never trained on).
        test_limit: use only the first N test questions.
        max_length: prompt + answer tokens; longer prompts lose their oldest tokens.
        max_answer_tokens: training answers are cut to this many tokens.
        append_eos: end each training answer with the EOS token, so that generation learns to stop.
        group_by_length: training batches of similar length (0: off): the shuffled examples sorted by length within
            windows of this many batches, the batches' order shuffled (less padding; see
            :class:`~lightning_memopt.data.sampling.LengthGroupedSampler`).
        padding: ``"longest"`` pads each batch to its longest example; ``"max_length"`` to ``max_length`` (one
            shape); ``"bucket"`` to the smallest of ``pad_buckets`` that fits (a few shapes: what
            ``MeZO(cuda_graph=True)`` needs, one graph per shape). Left padding: results do not change.
        pad_buckets: the bucket lengths (default: powers of two from 16 up to ``max_length``).
        seed: the seed of the question sample and of the training order (shuffled per epoch from it).

    Example::

        dm = SQuADDataModule(data_file="../shared/data/squad/dev-subset.json", train_articles=[0, 1, 2],
                             test_articles=[3, 4])
        trainer.fit(HFCausalLM(model_name_or_path=..., objective="generation"), dm)  # val_em, val_f1
    """

    def __init__(
        self,
        data_file: str,
        test_file: Optional[str] = None,
        train_articles: Optional[list[ArticleRef]] = None,
        test_articles: Optional[list[ArticleRef]] = None,
        answerable_only: bool = True,
        no_answer_text: str = "unanswerable",
        template: str = "{context}\nQuestion: {question}\nAnswer:",
        answer_prefix: str = " ",
        k: Optional[int] = None,
        val_size: int = 32,
        test_limit: Optional[int] = None,
        seed: int = 0,
        max_length: int = 512,
        max_answer_tokens: int = 32,
        append_eos: bool = True,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        tokenizer: Optional[str] = None,
        shuffle: bool = True,
        group_by_length: int = 0,
        padding: Literal["longest", "max_length", "bucket"] = "longest",
        pad_buckets: Optional[list[int]] = None,
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, eval_batch_size, num_workers, max_length)
        check_group_by_length(group_by_length, shuffle)
        check_padding(padding, max_length, pad_buckets)
        fields = template_fields(template)
        unknown = [f for f in fields if f not in QA_FIELDS]
        if unknown or "question" not in fields:
            raise ValueError(
                f"The template {template!r} must use {{question}} (and usually {{context}}); its fields may be "
                f"{list(QA_FIELDS)}, not {unknown}."
            )
        check_template(template)
        for p in (data_file, test_file):
            if p is not None and not os.path.isfile(p):
                raise FileNotFoundError(f"Data file {p!r} does not exist; point data_file at a SQuAD-format JSON file.")
        if k is not None and k < 1:
            raise ValueError(f"k must be at least 1 (or None for all), got {k}.")
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}.")
        if test_limit is not None and test_limit < 1:
            raise ValueError(f"test_limit must be at least 1 (or None: every test question), got {test_limit}.")
        self.save_hyperparameters(ignore=["tokenizer"])  # see PromptClassificationDataModule
        self.tokenizer_name = tokenizer

    def _split_articles(self):
        hp = self.hparams
        arts = read_squad(hp.data_file)
        if hp.test_file is not None:
            test_arts = read_squad(hp.test_file)
            tr = _pick(arts, hp.train_articles, hp.data_file) if hp.train_articles is not None else range(len(arts))
            te = _pick(test_arts, hp.test_articles, hp.test_file) if hp.test_articles is not None else range(
                len(test_arts))
            seen = {q["context"] for i in tr for q in arts[i][1]}
            both = sorted({t for t, qs in (test_arts[i] for i in te) if any(q["context"] in seen for q in qs)})
            if both:  # e.g. test_file naming the training file: the test would be on trained text
                raise ValueError(f"Test articles {both} of {hp.test_file} share passages with the training articles "
                                 f"of {hp.data_file}; test on articles the training does not read.")
            return [arts[i] for i in tr], [test_arts[i] for i in te]
        tr = _pick(arts, hp.train_articles, hp.data_file) if hp.train_articles is not None else None
        te = _pick(arts, hp.test_articles, hp.data_file) if hp.test_articles is not None else None
        if te is None:
            te = [i for i in range(len(arts)) if tr is None or i not in tr]
            if tr is None:
                te = te[len(te) - max(1, round(0.4 * len(arts))) :]
        if tr is None:
            tr = [i for i in range(len(arts)) if i not in te]
        if set(tr) & set(te):
            raise ValueError(f"Articles {sorted(set(tr) & set(te))} are both in train_articles and test_articles; "
                             f"split by article so that test questions are about unseen text.")
        if not tr or not te:
            raise ValueError(f"{hp.data_file} has {len(arts)} articles: not enough for a train and a test split.")
        return [arts[i] for i in tr], [arts[i] for i in te]

    def _questions(self, articles) -> list[dict[str, Any]]:
        hp = self.hparams
        qs = [q for _, a in articles for q in a]
        if hp.answerable_only:
            return [q for q in qs if not q["is_impossible"] and q["answers"]]
        return [dict(q, answers=[hp.no_answer_text]) if q["is_impossible"] or not q["answers"] else q for q in qs]

    def _no_test_hint(self) -> str:
        keep = " answerable" if self.hparams.answerable_only else ""
        return (f"its test articles hold no{keep} question (answerable_only=True drops the impossible ones); set "
                f"answerable_only=False or pick other test_articles.")

    def _loss_window(self) -> int | None:
        # the answer is the example's last segment: at most max_answer_tokens, and the EOS
        return self.hparams.max_answer_tokens + int(self.hparams.append_eos)

    def _encode(self, q: dict[str, Any], tok) -> dict[str, Any]:
        hp = self.hparams
        prompt, head = encode_prompt(tok, hp.template.format(**{f: q[f] for f in QA_FIELDS}))
        answer = tok(hp.answer_prefix + q["answers"][0], add_special_tokens=False)["input_ids"][: hp.max_answer_tokens]
        if hp.append_eos and tok.eos_token_id is not None:
            answer = answer + [tok.eos_token_id]
        return make_item([(prompt, False), (answer, True)], q["answers"], hp.max_length, head)

    def _build(self, tok) -> dict[str, list[dict[str, Any]]]:
        hp = self.hparams
        train_arts, test_arts = self._split_articles()
        pool, test = self._questions(train_arts), self._questions(test_arts)
        rng = random.Random(hp.seed)
        order = rng.sample(range(len(pool)), len(pool))
        if hp.val_size >= len(pool):
            raise ValueError(f"val_size={hp.val_size} leaves no training question ({len(pool)} in the training "
                             f"articles); lower val_size.")
        val = [pool[i] for i in order[: hp.val_size]]
        train = [pool[i] for i in order[hp.val_size :]]
        if hp.k is not None:
            if hp.k > len(train):
                raise ValueError(f"k={hp.k} training questions were asked for, but the training articles have "
                                 f"{len(train)} (after {hp.val_size} for validation); lower k.")
            train = train[: hp.k]
        if hp.test_limit is not None:
            test = test[: hp.test_limit]
        rank_zero_info(
            f"SQuADDataModule: train {len(train)} / val {len(val)} questions from "
            f"{[t for t, _ in train_arts]}, test {len(test)} from {[t for t, _ in test_arts]}."
        )
        return {"train": [self._encode(q, tok) for q in train], "val": [self._encode(q, tok) for q in val],
                "test": [self._encode(q, tok) for q in test]}
