"""Instruction data from JSONL: prompt/response pairs or chat ``messages``, loss on the responses only.

With a tokenizer that has a chat template, conversations are rendered with it; otherwise as plain text:
``### Instruction:\\n{prompt}\\n\\n### Response:\\n{response}<eos>``.
"""

from __future__ import annotations

import os
import random
from typing import Any, Literal, Optional

from lightning.pytorch.utilities import rank_zero_info

from lightning_memopt.data.generation import GenerationDataModuleBase, make_item
from lightning_memopt.data.prompt import check_padding
from lightning_memopt.data.sampling import check_group_by_length, check_loader_args
from lightning_memopt.data.tables import read_table
from lightning_memopt.tokenization import encode_prompt

USER, RESPONSE = "### Instruction:\n", "### Response:\n"
ROLES = ("system", "user", "assistant")


class InstructionDataModule(GenerationDataModuleBase):
    """Supervised fine-tuning on a JSONL file of instructions: ``{"prompt": ..., "response": ...}`` or
    ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}`` per line.

    Every assistant turn is in the loss, nothing else. Use it with ``HFCausalLM(objective="lm")`` (loss only) or
    ``objective="generation"`` (also greedy answers to the last turn, scored against its response by EM/F1).

    Args:
        train_file: the training JSONL.
        val_file, test_file: JSONL files for validation and test. Without ``val_file``, ``val_size`` training
            examples are held out for validation (0: no validation).
        prompt_field, response_field, messages_field: the JSON keys (a line has messages or prompt and response).
        system_prompt: a system message put first in every conversation that has none.
        use_chat_template: render with the tokenizer's chat template when it has one; ``False``: always the plain
            ``### Instruction:`` / ``### Response:`` format.
        max_length: tokens per conversation; longer ones lose their oldest tokens.
        seed: the seed of the validation hold-out and of the training order (shuffled per epoch from it).
        group_by_length: training batches of similar length (0: off): the shuffled examples sorted by length within
            windows of this many batches, the batches' order shuffled (less padding; see
            :class:`~lightning_memopt.data.sampling.LengthGroupedSampler`).
        padding: ``"longest"`` pads each batch to its longest example; ``"max_length"`` to ``max_length`` (one
            shape); ``"bucket"`` to the smallest of ``pad_buckets`` that fits (a few shapes: what
            ``MeZO(cuda_graph=True)`` needs, one graph per shape). Left padding: results do not change.
        pad_buckets: the bucket lengths (default: powers of two from 16 up to ``max_length``).

    Example::

        dm = InstructionDataModule(train_file="data/alpaca_1k.jsonl", val_size=64)
        trainer.fit(HFCausalLM(model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", objective="lm"), dm)
    """

    def __init__(
        self,
        train_file: str,
        val_file: Optional[str] = None,
        test_file: Optional[str] = None,
        val_size: int = 0,
        prompt_field: str = "prompt",
        response_field: str = "response",
        messages_field: str = "messages",
        system_prompt: Optional[str] = None,
        use_chat_template: bool = True,
        max_length: int = 512,
        seed: int = 0,
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
        for p in (train_file, val_file, test_file):
            if p is not None and not os.path.isfile(p):
                raise FileNotFoundError(f"Data file {p!r} does not exist; give a JSONL file of instructions.")
            if p is not None and not p.endswith((".jsonl", ".ndjson")):
                raise ValueError(f"{p}: instruction data is read from JSONL (one JSON object per line, .jsonl).")
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}.")
        self.save_hyperparameters(ignore=["tokenizer"])  # see PromptClassificationDataModule
        self.tokenizer_name = tokenizer

    # ---- conversations -------------------------------------------------------------------------------------
    def _messages(self, row: dict[str, Any], where: str) -> list[dict[str, str]]:
        hp = self.hparams
        if hp.messages_field in row:
            msgs = row[hp.messages_field]
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in msgs):
                raise ValueError(f"{where}: '{hp.messages_field}' must be a list of {{\"role\", \"content\"}} objects.")
            msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
        elif hp.prompt_field in row and hp.response_field in row:
            msgs = [{"role": "user", "content": str(row[hp.prompt_field])},
                    {"role": "assistant", "content": str(row[hp.response_field])}]
        else:
            raise ValueError(
                f"{where} has neither '{hp.messages_field}' nor '{hp.prompt_field}' and '{hp.response_field}'; its "
                f"keys are {sorted(row)}. Name yours with messages_field=... or prompt_field=... and "
                f"response_field=...."
            )
        bad = sorted({m["role"] for m in msgs} - set(ROLES))
        if bad:
            raise ValueError(f"{where}: unknown roles {bad}; use {list(ROLES)}.")
        if not any(m["role"] == "assistant" for m in msgs[1:]):
            raise ValueError(f"{where}: no assistant turn after the first message, so nothing to learn.")
        if hp.system_prompt and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": hp.system_prompt}, *msgs]
        return msgs

    def _chat_segments(self, msgs: list[dict[str, str]], tok, where: str) -> list[tuple[str, bool]]:
        """Texts ``(piece, is_response)`` from the chat template, by rendering growing prefixes of the conversation."""
        segs, done = [], ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant" or i == 0:
                continue
            prefix = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise ValueError(
                    f"{where}: the tokenizer's chat template does not render the start of a conversation as the "
                    f"start of the whole one, so the response tokens cannot be told apart; set "
                    f"use_chat_template=False for the plain format."
                )
            segs += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
            done = full
        return segs

    def _plain_segments(self, msgs: list[dict[str, str]]) -> list[tuple[str, bool]]:
        segs, text = [], ""
        for m in msgs:
            if m["role"] == "system":
                text += m["content"] + "\n\n"
            elif m["role"] == "user":
                text += USER + m["content"] + "\n\n" + RESPONSE
            else:
                if text:
                    segs.append((text, False))
                segs.append((m["content"], True))
                text = "\n\n"
        return segs

    def _encode(self, row: dict[str, Any], tok, where: str) -> dict[str, Any]:
        msgs = self._messages(row, where)
        chat = self.hparams.use_chat_template and getattr(tok, "chat_template", None)
        segs = self._chat_segments(msgs, tok, where) if chat else self._plain_segments(msgs)
        # the chat template writes BOS and end-of-turn tokens as text; the plain format lets the tokenizer add its
        # specials once, and ends each response with EOS so that generation learns to stop
        eos = [tok.eos_token_id] if not chat and tok.eos_token_id is not None else []
        ids, head = [], 0
        for j, (text, is_resp) in enumerate(segs):
            if j == 0 and not chat:
                seg, head = encode_prompt(tok, text)
            else:
                seg = tok(text, add_special_tokens=False)["input_ids"]
                if j == 0 and seg and seg[0] == tok.bos_token_id:  # a BOS the chat template writes as text
                    head = 1
            ids.append((seg + (eos if is_resp else []), is_resp))
        last = [m["content"] for m in msgs if m["role"] == "assistant"][-1]
        return make_item(ids, [last], self.hparams.max_length, head)

    def _no_test_hint(self) -> str:
        if self.hparams.test_file is None:
            return "give test_file=... (a JSONL file of conversations)."
        return f"{self.hparams.test_file} holds no conversation; check the file."

    def _read(self, path: str, tok) -> list[dict[str, Any]]:
        table = read_table(path)
        return [self._encode(r, tok, f"{path}, line {n}") for n, r in enumerate(table.rows, 1)]

    def _build(self, tok) -> dict[str, list[dict[str, Any]]]:
        hp = self.hparams
        train = self._read(hp.train_file, tok)
        if hp.val_file is not None:
            val = self._read(hp.val_file, tok)
        else:
            if hp.val_size >= len(train):
                raise ValueError(f"val_size={hp.val_size} leaves no training example of {len(train)}; lower it.")
            order = random.Random(hp.seed).sample(range(len(train)), len(train))
            held = set(order[: hp.val_size])
            val = [train[i] for i in sorted(held)]
            train = [it for i, it in enumerate(train) if i not in held]
        test = self._read(hp.test_file, tok) if hp.test_file is not None else []
        chat = hp.use_chat_template and getattr(tok, "chat_template", None)
        rank_zero_info(f"InstructionDataModule: {len(train)} train / {len(val)} val / {len(test)} test conversations, "
                       f"{'chat template' if chat else 'plain ### Instruction/### Response format'}.")
        return {"train": train, "val": val, "test": test}
