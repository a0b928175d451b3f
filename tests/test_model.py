"""HFCausalLM: left padding, label-word-only classification head, GGUF path errors, LM objective, peft LoRA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_memopt.models.hf import HFCausalLM, position_ids_from_mask
from lightning_memopt.testing import tiny_datamodule, tiny_model, tiny_trainer
from lightning_memopt.testing.tiny import full_state

LABELS = [7, 11]


def classifier(**kw) -> HFCausalLM:
    m = tiny_model(**kw)
    m.set_label_token_ids(LABELS)
    return m.eval()


def test_position_ids_start_at_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_left_padding_gives_the_same_logits_as_unpadded():
    m = classifier()
    a = torch.tensor([[5, 20, 31, 42, 9, 17]])
    b = torch.tensor([[8, 25, 40]])
    with torch.no_grad():
        la = m(a, torch.ones_like(a))
        lb = m(b, torch.ones_like(b))
        batch = torch.tensor([[5, 20, 31, 42, 9, 17], [0, 0, 0, 8, 25, 40]])
        mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
        lab = m(batch, mask)
    torch.testing.assert_close(lab[0], la[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lab[1], lb[0], atol=1e-5, rtol=1e-4)


def test_classification_uses_only_label_word_logits_at_the_last_position():
    m = classifier()
    ids = torch.tensor([[5, 20, 31, 42], [0, 8, 25, 40]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    head_out = []
    hook = m.model.get_output_embeddings().register_forward_hook(lambda mod, i, o: head_out.append(o.shape))
    with torch.no_grad():
        logits = m(ids, mask)
    hook.remove()
    assert logits.shape == (2, 2)
    assert head_out == [torch.Size([2, 1, 2])]  # the head never projects onto the whole vocabulary
    with torch.no_grad():  # reference: full-vocabulary logits, then pick the label words
        full = m.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    torch.testing.assert_close(logits, full[:, -1, LABELS].float(), atol=1e-5, rtol=1e-4)
    labels = torch.tensor([1, 0])
    out = m._step({"input_ids": ids, "attention_mask": mask, "labels": labels})
    torch.testing.assert_close(out["loss"], F.cross_entropy(full[:, -1, LABELS], labels), atol=1e-5, rtol=1e-4)


def test_missing_gguf_file_names_the_path(tmp_path):
    fix = r"Point model_name_or_path at it.*memopt download-smollm2"
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*missing\.gguf.* does not exist\. " + fix):
        HFCausalLM(model_name_or_path=str(tmp_path / "missing.gguf"))


def test_model_config_needs_model_type():
    with pytest.raises(ValueError, match="model_type"):
        HFCausalLM(model_config={"hidden_size": 8}, tokenizer="builtin")


def test_lm_objective_fits():
    m = tiny_model(objective="lm")
    trainer = tiny_trainer(max_steps=3)
    before = full_state(m)
    trainer.fit(m, tiny_datamodule(k=16))
    loss = float(trainer.callback_metrics["train_loss"])
    assert trainer.global_step == 3 and 0 < loss < 2 * torch.log(torch.tensor(256.0))
    after = full_state(m)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_peft_lora_wrapped_model_trains_only_the_adapters():
    peft = pytest.importorskip("peft")
    m = tiny_model()
    m.model = peft.get_peft_model(m.model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = full_state(m)
    trainer = tiny_trainer(max_steps=2)
    trainer.fit(m, tiny_datamodule())
    after = full_state(m)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert trainer.global_step == 2
    assert changed and all("lora_" in n for n in changed)
    assert changed == {n for n, p in m.named_parameters() if p.requires_grad}


def test_lora_rank_option_trains_only_the_adapters_under_mezo():
    pytest.importorskip("peft")
    from lightning_memopt.mezo.callback import MeZO

    m = tiny_model(lora_rank=4, lora_alpha=8.0)
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    before = full_state(m)
    trainer = tiny_trainer(max_steps=3, callbacks=[MeZO(lr=1e-2, seed=0)])
    trainer.fit(m, tiny_datamodule())
    after = full_state(m)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert trainer.global_step == 3 and changed and changed <= trained
    assert all(p.grad is None for p in m.parameters())


def test_lora_targets_that_match_nothing_name_the_fix():
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match="lora_targets=.*Name modules of this model"):
        tiny_model(lora_rank=4, lora_targets=("query_proj",))
    with pytest.raises(ValueError, match="lora_rank must be >= 0"):
        tiny_model(lora_rank=-1)


@pytest.mark.parametrize("method", ["adamw", "mezo_population"])
def test_frozen_parameters_stay_as_they_were(method):
    # the input embedding frozen by pattern: no method perturbs or updates it, the rest trains
    from lightning_memopt.mezo.callback import MeZO

    m = tiny_model(frozen=["model.embed_tokens.*"])
    assert [n for n, p in m.named_parameters() if not p.requires_grad] == ["model.model.embed_tokens.weight"]
    cbs = [] if method == "adamw" else [MeZO(lr=1e-2, seed=0, n_spsa=4, batched=True, perturbation="lowrank")]
    before = full_state(m)
    tiny_trainer(max_steps=3, callbacks=cbs).fit(m, tiny_datamodule())
    after = full_state(m)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert "model.model.embed_tokens.weight" not in changed and len(changed) > len(before) // 2


def test_frozen_patterns_that_match_nothing_or_everything_are_errors():
    with pytest.raises(ValueError, match=r"'embed_tokens' matches no parameter.*'model.embed_tokens.\*'"):
        tiny_model(frozen=["embed_tokens"])
    with pytest.raises(ValueError, match="freezes every trained parameter"):
        tiny_model(frozen=["*"])


def test_frozen_patterns_under_lora_use_the_hugging_face_names():
    # peft puts "base_model.model." before every name; a pattern of the model's own names matched nothing
    pytest.importorskip("peft")
    m = tiny_model(lora_rank=2, frozen=["model.layers.0.*"])
    trained = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and ".layers.0." not in n for n in trained)
    assert any(".layers.0." in n and "lora_" in n for n, p in m.named_parameters() if not p.requires_grad)
    with pytest.raises(ValueError, match=r"matches no parameter.*trained now: \['model.layers.0.self_attn"):
        tiny_model(lora_rank=2, frozen=["model.layer.0.*"])
    # the base weights do not train under LoRA: freezing them would do nothing, and silently
    with pytest.raises(ValueError, match="matches only parameters that do not train anyway"):
        tiny_model(lora_rank=2, frozen=["model.embed_tokens.*"])


def test_a_frozen_tied_head_freezes_its_embedding():
    from lightning_memopt.models import llama_config

    m = HFCausalLM(model_config={**llama_config("tiny"), "tie_word_embeddings": True}, frozen=["lm_head.weight"])
    assert m.model.lm_head.weight is m.model.model.embed_tokens.weight and not m.model.lm_head.weight.requires_grad


def test_model_name_or_path_with_model_config_is_an_error(tmp_path):
    # it used to build the random-init model and ignore the (even missing) path without a word
    from lightning_memopt.models import llama_config

    with pytest.raises(ValueError, match=r"Both model_name_or_path=.*no_such_model.* and model_config were given: "
                                         r"load a pretrained model with model_name_or_path and model_config=null"):
        HFCausalLM(model_name_or_path=str(tmp_path / "no_such_model"), model_config=llama_config("tiny"),
                   tokenizer="builtin")


def test_a_bfloat16_folder_loads_in_float32_unless_asked(tmp_path):
    """transformers 5 keeps a folder's own dtype; under precision "32-true" or "bf16-mixed" nothing casts it, and
    LOMO/AdaLomo/GaLore lost most in-place updates to bf16 rounding. float32 unless torch_dtype says otherwise."""
    tiny_model().model.to(torch.bfloat16).save_pretrained(tmp_path)
    assert {p.dtype for p in HFCausalLM(model_name_or_path=str(tmp_path), tokenizer="builtin").parameters()} == {
        torch.float32}
    assert {p.dtype for p in HFCausalLM(model_name_or_path=str(tmp_path), tokenizer="builtin",
                                        torch_dtype="bfloat16").parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(("targets", "names"),
                         [("q_proj", {"q_proj"}), ("all-linear", {"q_proj", "v_proj", "up_proj"})])
def test_lora_targets_as_one_string(targets, names):
    # one name is not a list of its letters; peft's "all-linear" shorthand passes through
    pytest.importorskip("peft")
    m = tiny_model(lora_rank=2, lora_targets=targets)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, p in m.named_parameters() if "lora_A" in n}
    assert names <= adapted and (targets != "q_proj" or adapted == {"q_proj"})


@pytest.mark.parametrize("targets", ["q_proj", "all-linear"])
def test_consolidate_a_lora_fit_with_one_target_name_and_run_what_it_returns(targets, tmp_path):
    """lora_targets as one name (or peft's "all-linear") consolidates as the fit built it, and the returned model
    runs (its rotary frequencies are real, not meta) with the trained, merged model's logits."""
    from lightning_memopt import LOMO
    from lightning_memopt.consolidate import consolidate

    torch.manual_seed(0)
    model = tiny_model(lora_rank=4, lora_targets=targets)
    trainer = tiny_trainer(max_steps=2, callbacks=[LOMO(lr=0.05)])
    trainer.fit(model, tiny_datamodule(k=8))
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    hf = consolidate(tmp_path / "lora.ckpt", tmp_path / "hf", tokenizer=False)
    ids = torch.randint(1, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.model.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    assert consolidate(tmp_path / "lora.ckpt", tmp_path / "hf2", tokenizer=False, return_model=False) is None
