"""An ordinary automatic-optimization LightningModule around any Hugging Face causal LM.

This is deliberately plain: AdamW in ``configure_optimizers``, loss from ``training_step``. Every callback in this
library must adapt to a module like this one without changing it.
"""

from __future__ import annotations

import fnmatch
import math
import os
import types
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_memopt import _shim
from lightning_memopt.core.holder import no_decay
from lightning_memopt.core.population import token_losses
from lightning_memopt.models.attention import recompute_with_forward_sdpa_backends, sdpa_without_cudnn_where_unsafe
from lightning_memopt.tokenization import load_tokenizer, require_gguf, split_gguf

Objective = Literal["classification", "lm", "generation"]
Schedule = Literal["constant", "linear", "cosine"]
Reduction = Literal["sum", "mean"]


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that start at 0 on the first real token, so left padding does not shift positions."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_(min=0)


def dtype_named(name: str, option: str = "torch_dtype") -> torch.dtype:
    """``torch.<name>`` as a dtype (``"bfloat16"``), or a ValueError naming ``option`` and the usual names."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{option}={name!r} is not a torch dtype; use bfloat16, float16 or float32.")
    if not dtype.is_floating_point:
        raise ValueError(f"{option}={name!r} is not a floating-point dtype for weights; use bfloat16, float16 or "
                         f"float32.")
    return dtype


def load_hf_model(
    model_name_or_path: Optional[str] = None,
    model_config: Optional[dict[str, Any]] = None,
    gguf_file: Optional[str] = None,
    torch_dtype: Optional[str] = None,
    attn_implementation: Optional[str] = "sdpa",
    seed: int = 0,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Load a causal LM by hub name, local path or GGUF file, or build one from a config dict (random init)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = dtype_named(torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
    if model_config is not None and model_name_or_path:
        raise ValueError(
            f"Both model_name_or_path={model_name_or_path!r} and model_config were given: load a pretrained model "
            f"with model_name_or_path and model_config=null (--model.init_args.model_config=null on the command "
            f"line), or build a random-init model with model_config and no model_name_or_path."
        )
    if model_config is not None:
        cfg = dict(model_config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ValueError("model_config needs a 'model_type' key, e.g. {'model_type': 'llama', ...}.")
        try:
            config = AutoConfig.for_model(model_type, **cfg)
        except ValueError as err:
            raise ValueError(f"Unknown model_type {model_type!r} in model_config: {err}") from None
        if attn_implementation:
            config._attn_implementation = attn_implementation
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype) if dtype else AutoModelForCausalLM.from_config(
            config
        )
    if not model_name_or_path:
        raise ValueError("Give either model_name_or_path (hub name, local folder or .gguf file) or model_config.")
    path, gguf_file = split_gguf(model_name_or_path, gguf_file)
    # float32 unless asked: transformers 5 keeps a folder's own dtype (often bfloat16), which Lightning's "32-true" and
    # "bf16-mixed" do not cast, so in-place updates smaller than bf16's spacing were lost
    kwargs: dict[str, Any] = dict(trust_remote_code=trust_remote_code, dtype=torch.float32 if dtype is None else dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
        if not os.path.exists(os.path.join(path, gguf_file)):
            raise FileNotFoundError(
                f"GGUF file {os.path.join(path, gguf_file)!r} does not exist. Point model_name_or_path at it "
                f"(--model.model_name_or_path=PATH), or get SmolLM2's with `memopt download-smollm2 --dest DIR`."
            )
        require_gguf()
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ValueError(
            f"Could not load model {model_name_or_path!r}: it is neither a local folder/GGUF file nor a reachable hub "
            f"model ({str(err).splitlines()[0]}). Check the name, or pass model_config for a random-init model."
        ) from None


EVAL_KEEP = "eval_keep"  # data.sampling.EVAL_KEEP, by name: the model does not import the data modules


def _rows(batch: dict[str, Any], keep: Tensor) -> dict[str, Any]:
    """The rows ``keep`` marks, of every per-example entry of ``batch`` (tensors and lists of its length)."""
    n, host = keep.shape[0], keep.tolist()
    out = {}
    for k, v in batch.items():
        if k == EVAL_KEEP:
            continue
        if isinstance(v, Tensor) and v.dim() and v.shape[0] == n:
            v = v[keep.to(v.device)]
        elif isinstance(v, list) and len(v) == n:
            v = [x for x, h in zip(v, host) if h]
        out[k] = v
    return out


def _label_head_forward(self: torch.nn.Linear, x: Tensor) -> Tensor:
    """lm_head forward that projects only onto the label words while ``_memopt_label_ids`` is set."""
    ids = getattr(self, "_memopt_label_ids", None)
    if ids is None:
        return F.linear(x, self.weight, self.bias)
    w = self.weight.index_select(0, ids.to(self.weight.device))
    b = None if self.bias is None else self.bias.index_select(0, ids.to(self.weight.device))
    return F.linear(x, w, b)


def lora_target_list(targets: Union[str, Sequence[str]]) -> Union[str, list[str]]:
    """``lora_targets`` as peft takes it: one name is a list of one (``list("q_proj")`` would be its letters);
    peft's ``"all-linear"`` stays a string."""
    if isinstance(targets, str):
        return targets if targets == "all-linear" else [targets]
    return list(targets)


def _with_lora(model: torch.nn.Module, rank: int, alpha: float, targets: Union[str, list[str]]) -> torch.nn.Module:
    try:
        import peft
    except ImportError:
        raise ImportError("lora_rank > 0 needs peft: pip install 'lightning_memopt[peft]'.") from None
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    try:
        return peft.get_peft_model(model, cfg)  # freezes every weight but the adapters
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"lora_targets={targets}: {err} Name modules of this model, e.g. q_proj, v_proj.") from None


_PEFT_PREFIX = "base_model.model."  # what peft's get_peft_model puts before the wrapped model's names


def _freeze(module: torch.nn.Module, patterns: Sequence[str]) -> None:
    """``requires_grad=False`` on the parameters whose names match a pattern; a pattern matching nothing, or
    patterns leaving nothing to train, is an error (a typo would otherwise train the whole model)."""
    if isinstance(patterns, str):
        patterns = [patterns]

    def matches(name: str, pat: str) -> bool:  # under peft, the wrapped model's own names match too
        return fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(name.removeprefix(_PEFT_PREFIX), pat)

    named = list(module.named_parameters(remove_duplicate=False))
    for pat in patterns:
        if not any(matches(n, pat) and p.requires_grad for n, p in named):
            trained = [n.removeprefix(_PEFT_PREFIX) for n, p in module.named_parameters() if p.requires_grad]
            what = ("matches only parameters that do not train anyway (under lora_rank only the adapters do)"
                    if any(matches(n, pat) for n, _ in named) else "matches no parameter")
            raise ValueError(
                f"frozen={list(patterns)}: {pat!r} {what}. Patterns are fnmatch patterns of the Hugging Face model's "
                f"named_parameters(), e.g. 'model.embed_tokens.*'; trained now: "
                f"{trained[:3]}{' ...' if len(trained) > 3 else ''}."
            )
    for n, p in module.named_parameters(remove_duplicate=False):
        if any(matches(n, pat) for pat in patterns):
            p.requires_grad_(False)
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError(f"frozen={list(patterns)} freezes every trained parameter; nothing would train.")


class HFCausalLM(LightningModule):
    """A Hugging Face causal LM as a LightningModule, for prompt classification or causal-LM loss.

    Args:
        model_name_or_path: hub name, local folder, or a ``.gguf`` file path.
        model_config: a config dict with ``model_type`` for a random-init model (tests, benchmarks, quickstart).
        gguf_file: GGUF file name inside ``model_name_or_path`` (alternative to giving the file path).
        tokenizer: tokenizer name/path; defaults to ``model_name_or_path``, or ``"builtin"`` for ``model_config``.
        objective: ``"classification"`` (cross-entropy over label-word logits at the last position, without
            projecting onto the whole vocabulary; or, when the DataModule gives candidate token sequences, over
            the candidates' log-probabilities), ``"lm"`` (causal-LM loss on the text, or on the tokens a batch's
            ``lm_labels`` keep) or ``"generation"`` (loss on the answer tokens; validation and test generate
            answers greedily and log exact match and token F1 as ``val_em``/``val_f1``/``test_em``/``test_f1``).
        lr, weight_decay, betas: AdamW settings (the module's own optimizer; callbacks adapt it).
        lr_schedule, warmup_steps: a per-step LambdaLR schedule.
        torch_dtype: e.g. ``"bfloat16"`` to load weights in that dtype; None loads them in float32, whatever the
            folder stores (the Trainer's ``precision`` then decides, e.g. ``"bf16-true"`` casts to bfloat16).
        gradient_checkpointing: enable HF activation checkpointing.
        lora_rank: above 0, wrap the model with peft LoRA adapters of this rank on ``lora_targets`` and train
            only them (needs ``pip install lightning_memopt[peft]``). 0 trains every weight.
        lora_alpha, lora_targets: the adapters' scale numerator (``lora_alpha / lora_rank``) and target modules
            (module names, one name, or peft's ``"all-linear"``).
        frozen: parameters left untrained, as ``fnmatch`` patterns of their names in the Hugging Face model (e.g.
            ``["model.embed_tokens.*"]``; a tied output head is frozen with its input embedding). Every method
            trains what the optimizer's groups hold, so none of them perturbs or updates these. In YAML, quote a
            pattern with brackets (``["model.layers.[0-9].*"]``), or it reads as a nested list.
        choice_reduction: how a multi-token candidate's score combines its tokens' log-probabilities: ``"sum"``
            (the sequence log-probability) or ``"mean"`` (per token, which favours long candidates less).
        max_new_tokens: generation: the most tokens generated per answer (greedy).
        stop_text: generation: an answer ends at the first occurrence of this text (and at the EOS token);
            ``None`` stops at EOS only.
        train_generate: generation: ``training_step`` also generates answers and returns them as ``preds`` with
            the references as ``target``, so ``MeZO(metric="lightning_memopt.metrics.AnswerF1")`` optimizes F1.

    Example::

        model = HFCausalLM(model_config=llama_config("tiny"), lr=1e-3)
        trainer = Trainer(max_steps=50, callbacks=[MeZO(lr=1e-3)])
    """

    def __init__(
        self,
        model_name_or_path: Optional[str] = None,
        model_config: Optional[dict[str, Any]] = None,
        gguf_file: Optional[str] = None,
        tokenizer: Optional[str] = None,
        objective: Objective = "classification",
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_schedule: Schedule = "constant",
        warmup_steps: int = 0,
        torch_dtype: Optional[str] = None,
        gradient_checkpointing: bool = False,
        attn_implementation: Optional[str] = "sdpa",
        init_seed: int = 0,
        trust_remote_code: bool = False,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        lora_targets: Union[str, tuple[str, ...]] = ("q_proj", "v_proj"),
        frozen: tuple[str, ...] = (),
        choice_reduction: Reduction = "sum",
        max_new_tokens: int = 32,
        stop_text: Optional[str] = "\n",
        train_generate: bool = False,
    ) -> None:
        super().__init__()
        if objective not in ("classification", "lm", "generation"):
            raise ValueError(f"objective must be 'classification', 'lm' or 'generation', got {objective!r}.")
        if choice_reduction not in ("sum", "mean"):
            raise ValueError(f"choice_reduction must be 'sum' or 'mean', got {choice_reduction!r}.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        if train_generate and objective != "generation":
            raise ValueError("train_generate=True generates answers for objective='generation'; set that objective.")
        self.save_hyperparameters()
        self.model = load_hf_model(
            model_name_or_path, model_config, gguf_file, torch_dtype, attn_implementation, init_seed,
            trust_remote_code,
        )
        tok_name = tokenizer or model_name_or_path or "builtin"
        self.tokenizer = load_tokenizer(tok_name, gguf_file if tokenizer is None else None, trust_remote_code)
        vocab = self.model.get_input_embeddings().weight.shape[0]
        if len(self.tokenizer) > vocab:
            raise ValueError(
                f"The tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary is {vocab}; "
                f"raise vocab_size in model_config to at least {len(self.tokenizer)}."
            )
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 trains every weight), got {lora_rank}.")
        if lora_rank:
            self.model = _with_lora(self.model, lora_rank, lora_alpha, lora_target_list(lora_targets))
        if frozen:
            _freeze(self.model, frozen)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps modes as they are
        if gradient_checkpointing:
            # the recomputed forward keeps the forward's attention backends (models/attention.py)
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
                "use_reentrant": False, "context_fn": recompute_with_forward_sdpa_backends})
        self.label_token_ids: Optional[list[int]] = None
        self.num_choices: Optional[int] = None
        self._metrics_ready = False
        from torchmetrics import MeanMetric

        # batch-weighted in float across ranks: Lightning's own weighting syncs its integer batch count with a
        # mean, which truncates where the ranks' last batches differ in size (evaluation shards do)
        self.val_loss_mean, self.test_loss_mean = MeanMetric(), MeanMetric()
        if objective == "generation":
            from lightning_memopt.metrics import AnswerEM, AnswerF1

            self.val_em, self.val_f1, self.test_em, self.test_f1 = AnswerEM(), AnswerF1(), AnswerEM(), AnswerF1()

    # ---- label words and metrics -------------------------------------------------------------------------------
    def set_label_token_ids(self, ids: list[int]) -> None:
        """Set the label-word token ids (the DataModule calls this) and build accuracy/F1 metrics."""
        self.label_token_ids = [int(i) for i in ids]
        self.num_choices = None
        self._build_class_metrics(len(self.label_token_ids))
        head = self.model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise TypeError(f"Prompt classification needs a Linear output embedding, got {type(head).__name__}.")
        head.forward = types.MethodType(_label_head_forward, head)
        head._memopt_label_ids = None

    def set_num_choices(self, n: int) -> None:
        """Score ``n`` candidate sequences per example (multi-token label words or per-example choices): batches
        carry ``choice_ids``/``choice_mask`` ``[B, n, L]`` and the label-word fast path is off."""
        self.label_token_ids = None
        self.num_choices = int(n)
        self._build_class_metrics(self.num_choices)

    def _build_class_metrics(self, n: int) -> None:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        self.val_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.val_f1 = MulticlassF1Score(num_classes=n, average="macro")
        self.test_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.test_f1 = MulticlassF1Score(num_classes=n, average="macro")
        self._metrics_ready = True

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if _shim.attached_trainer(self) is not None else None
        ids = getattr(dm, "label_token_ids", None)
        n = getattr(dm, "num_choices", None)
        if ids is not None and self.label_token_ids != list(ids):
            self.set_label_token_ids(list(ids))
        elif ids is None and n is not None and self.num_choices != n:
            self.set_num_choices(n)
        if self.hparams.objective == "classification" and self.label_token_ids is None and self.num_choices is None:
            raise ValueError(
                "objective='classification' needs label words: use PromptClassificationDataModule (it sets them) or "
                "call model.set_label_token_ids([...]) before fit."
            )

    @contextmanager
    def _label_only(self):
        head = self.model.get_output_embeddings()
        # made on the weights' device once: a host-to-device copy per forward would sync (and break a CUDA graph)
        words, ids = self.__dict__.get("_label_ids_dev", (None, None))
        if ids is None or ids.device != head.weight.device or words != self.label_token_ids:
            with torch.inference_mode(False):  # made in trainer.validate, it must still serve a later fit's backward
                ids = torch.tensor(self.label_token_ids, dtype=torch.long, device=head.weight.device)
            self.__dict__["_label_ids_dev"] = (list(self.label_token_ids), ids)
        head._memopt_label_ids = ids
        try:
            yield
        finally:
            head._memopt_label_ids = None

    # ---- forward -----------------------------------------------------------------------------------------------
    def _lm(self, *, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Any:
        """The wrapped model's forward; one that records a backward avoids cuDNN attention where its gradient can
        be NaN (:mod:`lightning_memopt.models.attention`)."""
        with sdpa_without_cudnn_where_unsafe(input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        choice_ids: Optional[Tensor] = None,
        choice_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Label-word logits ``[B, n_labels]`` at the last position (classification), candidate scores ``[B, C]``
        when ``choice_ids`` are given, or LM logits."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if choice_ids is not None:
            return self.choice_scores(input_ids, attention_mask, choice_ids, choice_mask)
        position_ids = position_ids_from_mask(attention_mask)
        if self.hparams.objective == "classification":
            if self.label_token_ids is None:
                raise ValueError(
                    "This HFCausalLM scores candidate sequences (label words of several tokens, or per-example "
                    "choices): call it with choice_ids and choice_mask. Code that calls model(input_ids, "
                    "attention_mask), such as DFOLoRA, needs single-token label words."
                )
            with self._label_only():
                out = self._lm(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False, logits_to_keep=1,
                )
            return out.logits[:, -1, :].float()
        return self._lm(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits

    def choice_scores(
        self, input_ids: Tensor, attention_mask: Tensor, choice_ids: Tensor, choice_mask: Optional[Tensor] = None
    ) -> Tensor:
        """Each candidate's log-probability given its (left-padded) prompt: ``[B, C]``.

        Every (prompt, candidate) pair is one sequence: the prompt, then the candidate's tokens right-padded. The
        logits at the last ``L + 1`` positions are all that is projected: position ``T - 1 + j`` predicts token ``j``.
        ``choice_reduction`` sums the log-probabilities (LM-BFF, MeZO) or averages them per token.
        """
        B, T = input_ids.shape
        C, L = choice_ids.shape[1], choice_ids.shape[2]
        if choice_mask is None:
            choice_mask = torch.ones_like(choice_ids)
        ids = torch.cat([input_ids.unsqueeze(1).expand(B, C, T), choice_ids], dim=-1).reshape(B * C, T + L)
        mask = torch.cat([attention_mask.unsqueeze(1).expand(B, C, T), choice_mask], dim=-1).reshape(B * C, T + L)
        out = self._lm(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False,
            logits_to_keep=L + 1,
        )
        logp = out.logits[:, :-1].float().log_softmax(-1)
        tok = logp.gather(-1, choice_ids.reshape(B * C, L, 1)).squeeze(-1)
        m = choice_mask.reshape(B * C, L).to(tok.dtype)
        score = (tok * m).sum(-1)
        if self.hparams.choice_reduction == "mean":
            score = score / m.sum(-1).clamp(min=1)
        return score.view(B, C)

    @staticmethod
    def _lm_inputs(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(input_ids, attention_mask, labels) of a causal-LM batch: labels are ``lm_labels`` or the unpadded ids."""
        input_ids, mask = batch["input_ids"], batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        labels = batch.get("lm_labels")
        if labels is None:
            labels = input_ids.masked_fill(mask == 0, -100)
        return input_ids, mask, labels

    def lm_loss(self, batch: dict[str, Tensor]) -> Tensor:
        input_ids, mask, labels = self._lm_inputs(batch)
        out = self._lm(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), labels=labels,
            use_cache=False,
        )
        return out.loss

    # ---- generation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_ids(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                     max_new_tokens: Optional[int] = None) -> list[list[int]]:
        """Greedy continuations of left-padded prompts (a plain KV-cache loop), each up to its EOS/stop token."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        n_new = int(max_new_tokens or self.hparams.max_new_tokens)
        stop = self._stop_ids()
        B = input_ids.shape[0]
        mask = attention_mask.long()
        pos = position_ids_from_mask(mask)
        out_ids: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        was_training = self.model.training
        self.model.eval()  # HF turns the cache off in training mode under gradient checkpointing
        try:
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                             logits_to_keep=1)
            for step in range(n_new):
                nxt = out.logits[:, -1].argmax(-1)
                for b, tok in enumerate(nxt.tolist()):  # one device-to-host copy per token, not one per row
                    if not done[b]:
                        out_ids[b].append(tok)
                        done[b] = tok in stop
                if step == n_new - 1 or self._all_done(done, nxt.device):
                    break
                mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
                pos = pos[:, -1:] + 1
                # transformers 5 calls the KV cache `cache`; 4.x `past_key_values`
                kv = {"cache": out.cache} if hasattr(out, "cache") else {"past_key_values": out.past_key_values}
                out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True, **kv)
        finally:
            self.model.train(was_training)
        return out_ids

    def generate_text(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                      max_new_tokens: Optional[int] = None) -> list[str]:
        """Greedy answers as text: special tokens dropped, cut at ``stop_text``, stripped."""
        stop_text = self.hparams.stop_text
        texts = []
        for ids in self.generate_ids(input_ids, attention_mask, max_new_tokens):
            t = self.tokenizer.decode(ids, skip_special_tokens=True)
            if stop_text:
                t = t.split(stop_text, 1)[0]
            texts.append(t.strip())
        return texts

    def _stop_ids(self) -> set[int]:
        tok = self.tokenizer
        ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        if self.hparams.stop_text:
            t = tok(self.hparams.stop_text, add_special_tokens=False)["input_ids"]
            if len(t) == 1:
                ids.add(t[0])
        return ids

    @staticmethod
    def _all_done(done: list[bool], device: torch.device) -> bool:
        # Under FSDP every rank must run the same number of forwards (each all-gathers): stop together.
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return all(done)
        flag = torch.tensor(int(all(done)), dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag)

    # ---- steps -------------------------------------------------------------------------------------------------
    def _step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        objective = self.hparams.objective
        if objective == "generation" and not {"lm_labels", "prompt_ids", "answers"} <= set(batch):
            raise ValueError(
                "objective='generation' needs batches with lm_labels, prompt_ids and answers: use SQuADDataModule or "
                "InstructionDataModule (for label words use objective='classification')."
            )
        if objective in ("lm", "generation"):
            return {"loss": self.lm_loss(batch)}
        logits = self._class_logits(batch)
        loss = F.cross_entropy(logits, batch["labels"])
        return {"loss": loss, "logits": logits.detach(), "labels": batch["labels"]}

    def _class_logits(self, batch: dict[str, Tensor]) -> Tensor:
        """Label-word logits (or candidate scores) of a classification batch."""
        return self(batch["input_ids"], batch.get("attention_mask"), batch.get("choice_ids"), batch.get("choice_mask"))

    def per_sample_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Per-example losses ``[B]`` whose mean is ``training_step``'s loss on the same batch.

        Population methods (``MeZO(batched=True)``, ``DFOLoRA``) call this on the batch repeated once per member and
        read one loss per member from one forward. Causal-LM objectives weight each example by its share of the
        batch's tokens, so the mean is the token mean the loss takes.
        """
        if self.hparams.objective == "classification":
            return F.cross_entropy(self._class_logits(batch).float(), batch["labels"], reduction="none")
        input_ids, mask, labels = self._lm_inputs(batch)
        # A generation batch whose targets lie in its last W positions (SQuAD: the answer) projects only the W + 1
        # last hidden states: a population's full logits at 512 tokens are 12 GiB, and their float32 copy twice that.
        w = batch.get("loss_window")
        keep = w + 1 if isinstance(w, int) and 0 < w < input_ids.shape[1] else 0
        logits = self._lm(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False,
            **({"logits_to_keep": keep} if keep else {}),
        ).logits
        tok = token_losses(logits[:, :-1], labels[:, 1 - logits.shape[1]:] if keep else labels[:, 1:])
        n = (labels[:, 1:] != -100).sum().clamp(min=1)
        return tok.sum(1) * (input_ids.shape[0] / n)

    def graph_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch as a step captured in a CUDA graph sees it (``MeZO``/``DFOLoRA(cuda_graph=True)``). A generation
        batch's reference answers, which training reads only with ``train_generate``, become None: a graph is
        specific to its inputs' non-tensor values, so with them every batch would be a new graph."""
        if self.hparams.train_generate or not isinstance(batch, dict) or batch.get("answers") is None:
            return batch
        return {**batch, "answers": None}

    def log_train_loss(self, loss: Tensor, batch: dict[str, Tensor]) -> None:
        """Log the training loss as ``training_step`` does; a population method whose batched path calls
        ``per_sample_loss`` instead of ``training_step`` (``MeZO(batched=True)``) logs its step's loss here."""
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        out = self._step(batch)
        self.log_train_loss(out["loss"], batch)
        if self.hparams.train_generate:  # for a metric objective (MeZO(metric=...)): answers and references
            out["preds"] = self.generate_text(batch["prompt_ids"], batch.get("prompt_mask"))
            out["target"] = batch["answers"]
        return out

    def _eval_step(self, batch: dict[str, Tensor], prefix: str) -> Tensor:
        # an evaluation shard's padding rows (several processes) count nowhere; a batch of padding only still runs
        # every forward and log call the other ranks do (under FSDP2 they are collectives), weighing nothing
        keep = batch.get(EVAL_KEEP)
        pad_only = keep is not None and not bool(keep.any())
        if keep is not None and not pad_only:
            batch = _rows(batch, keep)
        out = self._step(batch)
        bs = batch["input_ids"].shape[0]
        weight: Any = 0 if pad_only else bs
        if self.hparams.objective in ("lm", "generation") and not pad_only:
            # a causal-LM loss is a token mean: weighed by its tokens, it does not depend on batching
            weight = (self._lm_inputs(batch)[2][:, 1:] != -100).sum()
        loss = getattr(self, f"{prefix}_loss_mean")
        loss.update(out["loss"].detach(), weight)
        self.log(f"{prefix}_loss", loss, prog_bar=True, batch_size=bs)
        if self.hparams.objective == "generation":
            preds = self.generate_text(batch["prompt_ids"], batch.get("prompt_mask"))
            em, f1 = getattr(self, f"{prefix}_em"), getattr(self, f"{prefix}_f1")
            if not pad_only:
                em(preds, batch["answers"])
                f1(preds, batch["answers"])
            self.log(f"{prefix}_em", em, prog_bar=True, batch_size=bs)
            self.log(f"{prefix}_f1", f1, prog_bar=True, batch_size=bs)
        elif "logits" in out and self._metrics_ready:
            acc, f1 = getattr(self, f"{prefix}_acc"), getattr(self, f"{prefix}_f1")
            if not pad_only:
                acc(out["logits"], out["labels"])
                f1(out["logits"], out["labels"])
            self.log(f"{prefix}_acc", acc, prog_bar=True, batch_size=bs)
            self.log(f"{prefix}_f1", f1, batch_size=bs)
        return out["loss"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    # ---- optimizer ---------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        decay, plain = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (plain if no_decay(name) or p.ndim < 2 else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": plain, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        opt = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas))
        warm, kind = int(self.hparams.warmup_steps), self.hparams.lr_schedule
        if kind == "constant" and warm == 0:
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches)) if _shim.attached_trainer(self) is not None else 1000

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / max(1, warm)
            if kind == "constant":
                return 1.0
            frac = min(1.0, (step - warm) / max(1, total - warm))
            return 1.0 - frac if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume a method's checkpoint without that method: its optimizer state is not AdamW's. Refuse to
        evaluate a DFOLoRA checkpoint without DFOLoRA: its adapters are callback state, the weights the base model's."""
        trainer = _shim.attached_trainer(self)
        if trainer is None:
            return
        running = {cb.state_key for cb in trainer.callbacks}
        states = checkpoint.get("callbacks") or {}
        if trainer.state.fn != "fit":
            adapters = [k for k, v in states.items() if isinstance(v, dict) and v.get("memopt_method") == "DFOLoRA"
                        and not (v.get("state") or {}).get("merged")]  # merged ones are in the weights
            if adapters and not running.intersection(adapters):
                raise MisconfigurationException(
                    "This checkpoint was written by DFOLoRA: its learned adapters are in the callback's state, not in "
                    "the weights, so without DFOLoRA the base model would be evaluated. Add DFOLoRA(...) with the "
                    "fit's settings to Trainer(callbacks=[...]) (memopt: the fit's config), or merge the adapters into "
                    "a model folder with `memopt consolidate CKPT OUT`."
                )
            return
        methods = [v["memopt_method"] for k, v in states.items() if isinstance(v, dict) and "memopt_method" in v]
        if methods and not any(isinstance(v, dict) and "memopt_method" in v for k, v in states.items() if k in running):
            if any(hasattr(cb, "state_settings") for cb in trainer.callbacks):
                return  # another method callback runs: it names both methods itself
            raise MisconfigurationException(
                f"This checkpoint was written by {methods[0]}, whose optimizer state is not the module's "
                f"{type(trainer.strategy.optimizers[0]).__name__ if trainer.strategy.optimizers else 'optimizer'}'s. "
                f"Resume with {methods[0]}(...) in Trainer(callbacks=[...]), or start from the weights only: "
                f"`model = {type(self).__name__}.load_from_checkpoint(path)`, then `trainer.fit(model, datamodule)` "
                f"without ckpt_path."
            )

    def on_fit_start(self) -> None:
        # trainer.validate/test leave the metrics reset under inference mode, and a fit's validation (no_grad) cannot
        # update such states in place: reset here, outside it
        from torchmetrics import Metric

        for m in self.modules():
            if isinstance(m, Metric):
                m.reset()
        n = sum(p.numel() for p in self.parameters())
        t = sum(p.numel() for p in self.parameters() if p.requires_grad)
        rank_zero_info(f"HFCausalLM: {n / 1e6:.2f}M parameters, {t / 1e6:.2f}M trainable.")
