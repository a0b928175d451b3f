"""Multi-token answers: candidates scored by their log-probability given the prompt (LM-BFF/MeZO multiple choice)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lightning_memopt.data.prompt import PromptClassificationDataModule, left_pad_collate
from lightning_memopt.models.hf import position_ids_from_mask
from lightning_memopt.testing import tiny_datamodule, tiny_model, tiny_trainer


def hand_log_prob(model, prompt: list[int], answer: list[int]) -> float:
    """log p(answer | prompt), one unpadded sequence and the full vocabulary: the definition."""
    with torch.no_grad():
        logp = model.model(input_ids=torch.tensor([prompt + answer])).logits[0].float().log_softmax(-1)
    return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(answer))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_choice_scores_match_hand_computed_log_probs(reduction):
    m = tiny_model(choice_reduction=reduction).eval()
    m.set_num_choices(3)
    tok = m.tokenizer
    prompts = [tok("review: a good film . sentiment :")["input_ids"], tok("review: dull sentiment :")["input_ids"]]
    words = ["very good", "bad", "not very good"]  # 2, 1 and 3 tokens
    cands = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
    assert [len(c) for c in cands] == [2, 1, 3]
    batch = left_pad_collate(tok.pad_token_id)(
        [{"input_ids": p, "label": y, "choices": cands} for p, y in zip(prompts, [0, 2])]
    )
    assert batch["attention_mask"][1, 0] == 0  # the second prompt is left-padded
    with torch.no_grad():
        scores = m(batch["input_ids"], batch["attention_mask"], batch["choice_ids"], batch["choice_mask"])
        out = m._step(batch)
    want = torch.tensor([[hand_log_prob(m, p, c) / (len(c) if reduction == "mean" else 1) for c in cands]
                         for p in prompts])
    torch.testing.assert_close(scores, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["loss"], F.cross_entropy(want, torch.tensor([0, 2])), atol=1e-4, rtol=1e-4)
    assert out["logits"].shape == (2, 3) and out["labels"].tolist() == [0, 2]


def test_multi_token_label_words_fit_and_evaluate():
    dm = tiny_datamodule(k=8, label_words=["very bad", "very good"], tokenizer="builtin")
    dm.setup()
    assert dm.label_token_ids is None and dm.num_choices == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["choice_ids"].shape == (8, 2, 2) and batch["labels"].shape == (8,)
    m = tiny_model()
    trainer = tiny_trainer(max_steps=2, limit_val_batches=1)
    trainer.fit(m, dm)
    assert trainer.global_step == 2 and m.num_choices == 2
    assert 0.0 <= float(trainer.callback_metrics["val_acc"]) <= 1.0
    with pytest.raises(ValueError, match="scores candidate sequences .* call it with choice_ids"):
        m(batch["input_ids"], batch["attention_mask"])  # the plain forward contract needs single-token words


def test_single_token_words_keep_the_fast_path_unless_sequence_scoring_is_asked():
    fast = tiny_datamodule(k=4, tokenizer="builtin")
    fast.setup()
    assert fast.label_token_ids is not None and "choice_ids" not in next(iter(fast.train_dataloader()))
    seq = tiny_datamodule(k=4, tokenizer="builtin", scoring="sequence")
    seq.setup()
    batch = next(iter(seq.train_dataloader()))
    m = tiny_model().eval()
    m.set_num_choices(2)
    with torch.no_grad():
        scores = m._step(batch)["logits"]
        mask = batch["attention_mask"]
        full = m.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask))
        full = full.logits[:, -1].float().log_softmax(-1)
    ids = batch["choice_ids"][0, :, 0]
    torch.testing.assert_close(scores, full[:, ids], atol=1e-4, rtol=1e-4)  # log-softmax over the vocabulary


def test_per_example_choices(tmp_path):
    # COPA-style: a premise and two alternatives per row; the label is the index or the text of the right one
    rows = [{"premise": f"the film was {a}", "c1": "good", "c2": "very bad",
             "answer": i % 2 if i < 4 else ["good", "very bad"][i % 2]} for i, a in enumerate(["good", "bad"] * 4)]
    for split in ("train", "dev"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = PromptClassificationDataModule(data_dir=str(tmp_path), template="{premise} . answer :",
                                        choices=[" {c1}", " {c2}"], columns={"label": "answer"}, tokenizer="builtin",
                                        k=2)
    dm.setup()
    assert dm.num_choices == 2 and dm.label_token_ids is None
    assert [y for y, _ in dm._rows(dm._tables()[1])] == [0, 1] * 4
    item = dm._splits["test"][0]
    assert item["choices"] == [dm.tokenizer(" good", add_special_tokens=False)["input_ids"],
                               dm.tokenizer(" very bad", add_special_tokens=False)["input_ids"]]
    trainer = tiny_trainer(max_steps=1)
    trainer.fit(tiny_model(), dm)
    assert trainer.global_step == 1
