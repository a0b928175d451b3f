"""Generation: SQuAD-format QA split by article, greedy decoding, EM/F1, instruction data, MeZO on F1."""

from __future__ import annotations

import collections
import json

import pytest
import torch
from conftest import SQUAD, needs_squad

from lightning_memopt.data.generation import IGNORE, generation_collate
from lightning_memopt.data.instruct import InstructionDataModule
from lightning_memopt.data.qa import SQuADDataModule, read_squad
from lightning_memopt.metrics import AnswerEM, AnswerF1, answer_f1, exact_match, normalize_answer
from lightning_memopt.models import HFCausalLM, llama_config
from lightning_memopt.testing import tiny_model, tiny_trainer

CASES = [  # (prediction, references)
    ("The Normans", ["Normans", "the Normans"]),
    ("in the 10th and 11th centuries", ["10th and 11th centuries", "in the 10th and 11th centuries"]),
    ("Denmark, Iceland", ["Denmark, Iceland and Norway"]),
    ("Rollo", ["Richard I"]),
    ("", ["Rollo"]),
]


def test_answer_metrics_agree_with_torchmetrics_squad():
    from torchmetrics.text import SQuAD

    ref = SQuAD()
    preds = [{"prediction_text": p, "id": str(i)} for i, (p, _) in enumerate(CASES)]
    target = [{"answers": {"text": r, "answer_start": [0] * len(r)}, "id": str(i)} for i, (_, r) in enumerate(CASES)]
    want = ref(preds, target)
    em, f1 = AnswerEM(), AnswerF1()
    assert float(em([p for p, _ in CASES], [r for _, r in CASES])) == pytest.approx(float(want["exact_match"]) / 100)
    assert float(f1([p for p, _ in CASES], [r for _, r in CASES])) == pytest.approx(float(want["f1"]) / 100, abs=1e-5)
    assert normalize_answer("The  Cat, a dog!") == "cat dog"
    assert exact_match("the Normans.", "Normans") == 1.0
    assert answer_f1("Denmark, Iceland", ["Norway", "Iceland, Denmark"]) == 1.0
    assert AnswerF1.higher_is_better and AnswerF1()("Rollo", "Rollo") == 1.0


def test_greedy_generation_matches_recomputing_every_token():
    m = tiny_model(objective="generation").eval()
    prompts = [[5, 20, 31, 42, 9], [8, 25]]
    ids = torch.tensor([prompts[0], [0, 0, 0, *prompts[1]]])
    mask = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
    got = m.generate_ids(ids, mask, max_new_tokens=6)
    for p, g in zip(prompts, got):
        x, want = list(p), []
        with torch.no_grad():
            for _ in range(6):  # no cache, no padding: the definition of greedy decoding
                t = int(m.model(input_ids=torch.tensor([x])).logits[0, -1].argmax())
                want.append(t)
                x.append(t)
                if t == m.tokenizer.eos_token_id:
                    break
        assert g == want


@needs_squad
def test_squad_split_by_article_and_answer_only_loss():
    dm = SQuADDataModule(data_file=str(SQUAD), train_articles=[0, 1, "Southern_California"], test_articles=[3, 4],
                         tokenizer="builtin", val_size=16)
    dm.setup()
    arts = read_squad(str(SQUAD))
    answerable = [sum(not q["is_impossible"] for q in qs) for _, qs in arts]
    assert sum(answerable) == 705
    assert len(dm._splits["train"]) + len(dm._splits["val"]) == sum(answerable[:3])
    assert len(dm._splits["val"]) == 16 and len(dm._splits["test"]) == sum(answerable[3:])
    tok = dm.tokenizer
    item = dm._splits["train"][0]
    answer = [t for t, y in zip(item["input_ids"], item["lm_labels"]) if y != IGNORE]
    assert answer[-1] == tok.eos_token_id and item["input_ids"][: len(item["prompt_ids"])] == item["prompt_ids"]
    assert item["input_ids"][len(item["prompt_ids"]) :] == answer  # the loss covers exactly the answer
    with pytest.raises(ValueError, match=r"Articles \[3\] are both in train_articles and test_articles"):
        SQuADDataModule(data_file=str(SQUAD), train_articles=[0, 3], test_articles=[3], tokenizer="builtin").setup()
    with pytest.raises(ValueError, match=r"the articles \['Normans'\] are named more than once"):
        SQuADDataModule(data_file=str(SQUAD), train_articles=[0, "Normans"], tokenizer="builtin").setup()
    with pytest.raises(ValueError, match=r"no article titled 'Paris'; its titles are \['Normans'"):
        SQuADDataModule(data_file=str(SQUAD), test_articles=["Paris"], tokenizer="builtin").setup()
    every = SQuADDataModule(data_file=str(SQUAD), answerable_only=False, tokenizer="builtin", val_size=0)
    every.setup()
    assert len(every._splits["train"]) == sum(len(qs) for _, qs in arts[:3])  # default: last 40% of articles test


@needs_squad
def test_squad_generation_fit_then_em_f1(no_unexpected_warnings):
    dm = SQuADDataModule(data_file=str(SQUAD), train_articles=[0, 1, 2], test_articles=[3, 4], batch_size=4,
                         eval_batch_size=8, max_length=256, test_limit=16, val_size=8)
    m = tiny_model(objective="generation", max_new_tokens=4)
    trainer = tiny_trainer(max_steps=2, limit_val_batches=1, val_check_interval=2)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainer.fit(m, dm)
    assert trainer.global_step == 2 and any(not torch.equal(before[n], p) for n, p in m.named_parameters())
    assert {"val_em", "val_f1", "val_loss"} <= set(trainer.callback_metrics)
    res = trainer.test(m, dm, verbose=False)[0]
    assert 0.0 <= res["test_em"] <= res["test_f1"] + 1e-6 <= 1.0 + 1e-6 and res["test_loss"] > 0


def test_train_generate_returns_preds_and_targets_for_a_metric():
    m = tiny_model(objective="generation", train_generate=True, max_new_tokens=3)
    tok = m.tokenizer
    prompt, answer = tok("review : good answer :")["input_ids"], tok("positive")["input_ids"]
    items = [{"input_ids": prompt + answer, "lm_labels": [IGNORE] * len(prompt) + answer, "prompt_ids": prompt,
              "answers": ["positive", "good"]}]
    batch = generation_collate(tok.pad_token_id)(items * 2)
    out = m.training_step(batch, 0)
    assert out["loss"].requires_grad and out["target"] == [["positive", "good"]] * 2
    assert len(out["preds"]) == 2 and all(isinstance(p, str) for p in out["preds"])
    assert out["preds"] == m.generate_text(batch["prompt_ids"], batch["prompt_mask"])
    assert 0.0 <= float(AnswerF1()(out["preds"], out["target"])) <= 1.0
    with pytest.raises(ValueError, match="train_generate=True generates answers for objective='generation'"):
        tiny_model(train_generate=True)


def _toy_prompts() -> list[str]:
    from lightning_memopt.data.synthetic import NEGATIVE, NEUTRAL, POSITIVE

    return [f"review: {w} {n} . sentiment :" for w in POSITIVE + NEGATIVE for n in NEUTRAL[:4]]


def test_mezo_on_the_f1_objective_raises_f1(tmp_path):
    from lightning_memopt.mezo.callback import MeZO

    # vocabulary = the builtin tokenizer's, so every generated token is a word
    m = HFCausalLM(model_config=llama_config("tiny", vocab_size=98), tokenizer="builtin", objective="generation",
                   train_generate=True, max_new_tokens=1, lr=1e-4)
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": "x"}) + "\n" for p in _toy_prompts()))
    probe = InstructionDataModule(train_file=str(path), tokenizer="builtin")
    probe.setup()
    batch = generation_collate(0)(probe._splits["train"].items)
    words = collections.Counter(m.generate_text(batch["prompt_ids"], batch["prompt_mask"])).most_common()
    # the toy answer: a word the untrained model gives for a minority of the prompts (F1 well below 1, above 0)
    answer = next(w for w, c in words if 0 < c < len(batch["answers"]) / 2 and w)
    path.write_text("".join(json.dumps({"prompt": p, "response": answer}) + "\n" for p in _toy_prompts()))
    dm = InstructionDataModule(train_file=str(path), val_file=str(path), batch_size=32, eval_batch_size=256)

    def f1() -> float:
        return float(tiny_trainer(limit_val_batches=1).validate(m, dm, verbose=False)[0]["val_f1"])

    before = f1()
    trainer = tiny_trainer(max_steps=40, callbacks=[MeZO(eps=1e-2, seed=0, metric="lightning_memopt.metrics.AnswerF1")])
    trainer.fit(m, dm)
    after = f1()
    assert before < 0.5 and after > before + 0.3


def test_instruction_data_fit_plain_format(tmp_path, no_unexpected_warnings):
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"review: {w} film", "response": "positive" if i % 2 else "negative"}
            for i, w in enumerate(["good", "bad", "great", "dull"] * 3)]
    rows.append({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "review: fun"},
                              {"role": "assistant", "content": "positive"}, {"role": "user", "content": "sure ?"},
                              {"role": "assistant", "content": "yes"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = InstructionDataModule(train_file=str(path), test_file=str(path), val_size=4, batch_size=4)
    m = tiny_model(objective="lm")
    trainer = tiny_trainer(max_steps=2, limit_val_batches=1)
    trainer.fit(m, dm)
    assert trainer.global_step == 2 and len(dm._splits["val"]) == 4 and len(dm._splits["train"]) == 9
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    tok = dm.tokenizer
    last = dm._splits["test"][-1]  # two assistant turns: both in the loss, each ending with EOS
    learned = [t for t, y in zip(last["input_ids"], last["lm_labels"]) if y != IGNORE]
    assert learned == tok("positive yes", add_special_tokens=False)["input_ids"][:1] + [tok.eos_token_id] + \
        tok("yes", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert last["answers"] == ["yes"] and last["input_ids"][: len(last["prompt_ids"])] == last["prompt_ids"]


def test_instruction_data_uses_the_chat_template(tmp_path):
    m = tiny_model(objective="generation", max_new_tokens=2)
    m.tokenizer.chat_template = (
        "{% for m in messages %}{{ 'input' if m['role'] == 'user' else 'answer' }} : {{ m['content'] }} [EOS]"
        "{% endfor %}{% if add_generation_prompt %}answer :{% endif %}"
    )
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"review: {w}", "response": w}) + "\n" for w in ["good", "bad"] * 4))
    dm = InstructionDataModule(train_file=str(path), val_file=str(path), batch_size=4, eval_batch_size=8)
    trainer = tiny_trainer(max_steps=1, limit_val_batches=1, val_check_interval=1)
    trainer.fit(m, dm)
    tok = m.tokenizer
    item = dm._splits["train"][0]
    assert tok.decode(item["prompt_ids"]) == "input : review : good [EOS] answer :"
    learned = [t for t, y in zip(item["input_ids"], item["lm_labels"]) if y != IGNORE]
    assert tok.decode(learned) == "good [EOS]"  # the response and its end-of-turn token
    assert {"val_em", "val_f1"} <= set(trainer.callback_metrics)
    with pytest.raises(ValueError, match=r"line 1 has neither 'messages' nor 'prompt' and 'response'; its keys are "
                                         r"\['q', 'r'\]\. Name yours with"):
        path.write_text(json.dumps({"q": 1, "r": 2}) + "\n")
        InstructionDataModule(train_file=str(path), tokenizer="builtin").setup()


@needs_squad
def test_squad_group_by_length_pads_less_and_fits():
    """Contexts vary a lot in length: grouped batches pad fewer tokens than shuffled ones, and a fit runs on them."""

    def padded(dm) -> tuple[int, int]:
        dm.setup()
        dm.trainer = None
        batches = list(dm.train_dataloader())
        return sum(b["input_ids"].numel() for b in batches), sum(len(b["answers"]) for b in batches)

    kw = {"data_file": str(SQUAD), "train_articles": [0, 1, 2], "test_articles": [3], "tokenizer": "builtin",
          "batch_size": 8, "max_length": 256, "val_size": 0}
    torch.manual_seed(0)
    plain, n_plain = padded(SQuADDataModule(**kw))
    grouped, n_grouped = padded(SQuADDataModule(group_by_length=4, **kw))
    assert n_grouped == n_plain and grouped < 0.9 * plain
    dm = SQuADDataModule(group_by_length=4, **{**kw, "val_size": 4, "test_limit": 4})
    trainer = tiny_trainer(max_steps=2, limit_val_batches=1)
    trainer.fit(tiny_model(objective="generation", max_new_tokens=2), dm)
    assert trainer.global_step == 2
    with pytest.raises(ValueError, match="set shuffle=True, or group_by_length=0"):
        InstructionDataModule(train_file=str(SQUAD), group_by_length=2, shuffle=False)


@needs_squad
def test_greedy_answers_under_fsdp2_equal_one_process():
    """Two FSDP2 processes decode their rows in lockstep (each forward all-gathers) and stop together, with rows
    ending at other steps (the stop word is one the model generates mid-answer in some rows): the answers of one
    process, split over the two."""
    from lightning_memopt.testing import run_distributed
    from lightning_memopt.testing.workers import squad_test_metrics
    from lightning_memopt.tokenization import builtin_tokenizer

    free = squad_test_metrics(1, str(SQUAD))["ids"]
    mid = collections.Counter(t for ids in free for t in set(ids[1:-1]))
    word = builtin_tokenizer().decode([next(t for t, n in mid.most_common() if n < len(free))])
    one = squad_test_metrics(1, str(SQUAD), stop_text=word)
    assert 1 < min(map(len, one["ids"])) < max(map(len, one["ids"])) == 6  # some rows stop early, others do not
    two = run_distributed("lightning_memopt.testing.workers:squad_test_metrics", world_size=2, data_file=str(SQUAD),
                          stop_text=word)
    assert sorted(two[0]["ids"] + two[1]["ids"]) == sorted(one["ids"])
    assert two[0]["em"] == two[1]["em"] == one["em"] and two[0]["f1"] == pytest.approx(one["f1"], abs=1e-6)


@needs_squad
@pytest.mark.parametrize("eval_batch_size", [4, 1])
def test_test_metrics_over_two_processes_count_every_question_once(eval_batch_size):
    """7 questions over 2 ranks: the short share's padding row is counted nowhere, so EM and F1 are one process's.
    In batches of 1 it is a batch of its own, still decoded (the ranks decode in lockstep under FSDP2)."""
    from lightning_memopt.testing import run_distributed
    from lightning_memopt.testing.workers import squad_test_metrics

    one = squad_test_metrics(1, str(SQUAD), test_limit=7)
    two = run_distributed("lightning_memopt.testing.workers:squad_test_metrics", world_size=2, data_file=str(SQUAD),
                          test_limit=7, eval_batch_size=eval_batch_size)
    made = sorted(two[0]["ids"] + two[1]["ids"])
    if eval_batch_size == 1:  # the padding batch (question 0 again) was decoded, and not counted
        made.remove(two[1]["ids"][-1])
    assert made == sorted(one["ids"])
    for rank in two:
        assert rank["em"] == one["em"] and rank["f1"] == pytest.approx(one["f1"], abs=1e-6)
        # the loss is the token mean over the set, whatever the batches (rows weighted alike it was not)
        assert rank["loss"] == pytest.approx(one["loss"], rel=1e-6)


@needs_squad
def test_graph_batch_drops_the_answers_training_does_not_read():
    """A captured step's graph is specific to the batch's non-tensor values: HFCausalLM.graph_batch sets a generation
    batch's answers to None (training reads them only with train_generate), so batches of one padded shape share a
    signature, with the same loss."""
    from lightning_memopt.core.graphs import graph_batch, signature

    dm = SQuADDataModule(data_file=str(SQUAD), train_articles=[0, 1, 2], test_articles=[3, 4], batch_size=4,
                         max_length=256, padding="max_length", val_size=8)
    m = tiny_model(objective="generation", max_new_tokens=4)
    dm.trainer = None
    dm.tokenizer = m.tokenizer
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    a, b = next(it), next(it)
    assert signature(a) != signature(b) and a["input_ids"].shape == b["input_ids"].shape
    assert signature(graph_batch(m, a)) == signature(graph_batch(m, b))
    torch.testing.assert_close(m.lm_loss(graph_batch(m, a)), m.lm_loss(a))
    assert m.graph_batch(a)["answers"] is None and graph_batch(torch.nn.Linear(1, 1), a) is a
    m2 = tiny_model(objective="generation", max_new_tokens=4, train_generate=True)
    assert m2.graph_batch(a) is a  # its training step generates and scores answers


@needs_squad
def test_per_sample_loss_projects_only_the_answer_window():
    """SQuAD bounds an answer's tokens, so its batches carry ``loss_window``: the population's per-example losses
    project only the last window + 1 hidden states to the vocabulary (a 33-member population's full logits at 512
    tokens are 12 GiB), with the losses of the full projection and a mean equal to the training loss."""
    m = tiny_model(objective="generation", max_new_tokens=4)
    dm = SQuADDataModule(data_file=str(SQUAD), train_articles=[0], test_articles=[3], batch_size=4, max_length=256,
                         max_answer_tokens=8, val_size=0, shuffle=False)
    dm.tokenizer = m.tokenizer
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["loss_window"] == 9  # 8 answer tokens and the EOS
    rows = []
    hook = m.model.get_output_embeddings().register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[1]))
    m.eval()
    with torch.no_grad():
        windowed = m.per_sample_loss(batch)
        full = m.per_sample_loss({**batch, "loss_window": None})
        loss = m.lm_loss(batch)
    hook.remove()
    assert rows[:2] == [10, batch["input_ids"].shape[1]]  # then lm_loss projects every position
    torch.testing.assert_close(windowed, full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(windowed.mean(), loss, atol=1e-5, rtol=1e-5)

    # a batch whose targets reach past the bound says so, and is projected whole
    collate = generation_collate(0, loss_window=2)
    items = [{"input_ids": [5, 6, 7, 8], "lm_labels": [IGNORE, 6, 7, 8], "prompt_ids": [5], "answers": ["x"]},
             {"input_ids": [5, 6], "lm_labels": [IGNORE, 6], "prompt_ids": [5], "answers": ["y"]}]
    assert collate(items)["loss_window"] is None and collate(items[1:])["loss_window"] is None  # 2 < its length
    assert generation_collate(0, loss_window=3)(items)["loss_window"] == 3
    assert "loss_window" not in generation_collate(0)(items)


def test_a_generation_data_module_without_test_examples_says_so(tmp_path):
    import json

    from lightning_memopt.data.instruct import InstructionDataModule

    def article(title, impossible):
        qa = {"id": title, "question": "who?", "is_impossible": impossible,
              "answers": [] if impossible else [{"text": "the film", "answer_start": 0}]}
        return {"title": title, "paragraphs": [{"context": "the film is good", "qas": [qa] * 3}]}

    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"data": [article("a", False), article("b", True)]}))
    dm = SQuADDataModule(data_file=str(path), train_articles=["a"], test_articles=["b"], tokenizer="builtin",
                         val_size=1)
    dm.setup()
    with pytest.raises(ValueError, match="has no test examples: its test articles hold no answerable question"):
        dm.test_dataloader()
    with pytest.raises(ValueError, match="test_limit must be at least 1"):
        SQuADDataModule(data_file=str(path), test_limit=0)
    conv = tmp_path / "train.jsonl"
    conv.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "good"}]}) + "\n")
    dm = InstructionDataModule(train_file=str(conv), tokenizer="builtin", val_size=0)
    dm.setup()
    with pytest.raises(ValueError, match=r"has no test examples: give test_file="):
        dm.test_dataloader()


@needs_squad
def test_squad_test_file_with_the_training_articles_is_refused():
    dm = SQuADDataModule(data_file=str(SQUAD), test_file=str(SQUAD), train_articles=[0, 1], test_articles=[1, 2],
                         tokenizer="builtin")
    with pytest.raises(ValueError, match=r"Test articles \['.*'\] of .* share passages with the training articles"):
        dm.setup()
    SQuADDataModule(data_file=str(SQUAD), test_file=str(SQUAD), train_articles=[0, 1], test_articles=[2, 3],
                    tokenizer="builtin", val_size=4).setup()  # other articles of the same file: fine


def test_squad_files_without_titles_are_told_apart_by_their_passages(tmp_path):
    import json

    def squad(context):
        qa = {"id": context, "question": "who?", "answers": [{"text": "the film", "answer_start": 0}]}
        return {"data": [{"paragraphs": [{"context": context, "qas": [qa] * 4}]}]}  # no title

    (tmp_path / "tr.json").write_text(json.dumps(squad("the film is good")))
    (tmp_path / "te.json").write_text(json.dumps(squad("the film is bad")))
    dm = SQuADDataModule(data_file=str(tmp_path / "tr.json"), test_file=str(tmp_path / "te.json"),
                         tokenizer="builtin", val_size=1)
    dm.setup()
    assert len(dm._splits["test"]) == 4
