"""LOMO and AdaLomo in a few lines: the update fused into backward for an unchanged LightningModule, then the same
step without Lightning.

Runs offline on a CPU in a few minutes (tiny random-init Llama, embedded synthetic task)::

    python examples/lomo_example.py

On a GPU, pass a real model, e.g. ``HFCausalLM(model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")`` with
``PromptClassificationDataModule(data_dir="data/sst2", k=512)``, and see ``configs/sst2_smollm2_lomo.yaml`` and
``configs/sst2_smollm2_adalomo.yaml``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_memopt import LOMO, AdaLomo, HFCausalLM, PromptClassificationDataModule, llama_config
from lightning_memopt.lomo.core import FusedStep, LomoSettings


def fit(callback: pl.Callback) -> None:
    pl.seed_everything(0)
    # The module keeps its own configure_optimizers (AdamW + a linear schedule); the callback replaces the AdamW with
    # a holder whose lr the schedule still drives, and updates each weight inside backward.
    model = HFCausalLM(
        model_config=llama_config("tiny", vocab_size=256), tokenizer="builtin", lr_schedule="linear", warmup_steps=10
    )
    data = PromptClassificationDataModule(
        k=64,
        batch_size=16,
        max_length=32,
        template="Review: {sentence} Sentiment:",
        label_words=["negative", "positive"],
        test_limit=256,
    )
    trainer = pl.Trainer(
        max_steps=100,
        accelerator="cpu",
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, data)
    acc = trainer.test(model, data, verbose=False)[0]["test_acc"]
    holder = trainer.strategy.optimizers[0]
    state = sum(v.numel() for s in holder.state.values() for v in s.values() if torch.is_tensor(v))
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{type(callback).__name__}: test accuracy {acc:.3f}; gradients left: "
        f"{sum(p.grad is not None for p in model.parameters())}; optimizer state {state / 1e3:.1f}k numbers "
        f"(AdamW: {2 * n_params / 1e3:.1f}k)"
    )


def plain_pytorch() -> None:
    """The same step in a plain loop: FusedStep runs backward and updates every weight inside it."""
    torch.manual_seed(0)
    model = HFCausalLM(model_config=llama_config("tiny", vocab_size=256), tokenizer="builtin").model
    groups = [{"params": list(model.parameters()), "lr": 0.1, "weight_decay": 0.0}]
    step = FusedStep(groups, {}, LomoSettings(rule="sgd", clip_grad_norm=1.0))  # exact clipping: two backward passes
    x = torch.randint(0, 256, (4, 32))
    for _ in range(20):
        info = step.step(model(input_ids=x, labels=x).loss)
    print(
        f"plain PyTorch loop: gradient norm at step 20 {info.grad_norm.item():.3f}, "
        f"LM loss {model(input_ids=x, labels=x).loss.item():.3f}"
    )


if __name__ == "__main__":
    fit(LOMO(lr=0.1, clip_grad_norm=1.0))
    fit(AdaLomo(lr=1e-2))
    plain_pytorch()
