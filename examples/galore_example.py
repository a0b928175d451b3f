"""GaLore in a few lines: low-rank gradient projection for an unchanged LightningModule, then the same step without
Lightning.

Runs offline on a CPU in well under a minute (tiny random-init Llama, embedded synthetic task)::

    python examples/galore_example.py

On a GPU, pass a real model, e.g. ``HFCausalLM(model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")`` with
``PromptClassificationDataModule(data_dir="data/sst2", k=512)``, and see ``configs/sst2_smollm2_galore.yaml``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_memopt import GaLore, HFCausalLM, PromptClassificationDataModule, llama_config
from lightning_memopt.core.holder import HolderOptimizer
from lightning_memopt.galore.optim import GaLoreOptimizer, GaLoreSettings, select_targets


def state_numel(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def fit(layerwise: bool) -> None:
    pl.seed_everything(0)
    model = HFCausalLM(
        model_config=llama_config("tiny", vocab_size=256),
        tokenizer="builtin",
        lr=3e-3,
        lr_schedule="cosine",
        warmup_steps=10,
    )
    data = PromptClassificationDataModule(
        k=64,
        batch_size=16,
        max_length=32,
        template="Review: {sentence} Sentiment:",
        label_words=["negative", "positive"],
        test_limit=256,
    )
    # The module keeps its AdamW (lr, betas, weight decay, cosine schedule); GaLore turns it into GaLore-AdamW.
    galore = GaLore(rank=16, update_proj_gap=25, scale=0.25, layerwise=layerwise)
    trainer = pl.Trainer(
        max_steps=100,
        callbacks=[galore],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, data)
    acc = trainer.test(model, data, verbose=False)[0]["test_acc"]
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"layerwise={layerwise}: test accuracy {acc:.3f}, {galore.refreshes} subspace refreshes, optimizer state "
        f"{state_numel(trainer.strategy.optimizers[0]) / 1e3:.1f}k numbers (AdamW: {2 * n_params / 1e3:.1f}k)"
    )


def plain_pytorch() -> None:
    """The same step in a plain training loop: the holder shares the AdamW's param_groups, GaLoreOptimizer updates."""
    torch.manual_seed(0)
    model = HFCausalLM(model_config=llama_config("tiny", vocab_size=256), tokenizer="builtin").model
    holder = HolderOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    galore = GaLoreOptimizer(holder, select_targets(model), GaLoreSettings(rank=8, update_proj_gap=50))
    x = torch.randint(0, 256, (4, 32))
    for _ in range(20):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        galore.step()
        holder.zero_grad()
    print(f"plain PyTorch loop: LM loss on a fixed batch after 20 steps {loss.item():.3f}")


if __name__ == "__main__":
    fit(layerwise=False)
    fit(layerwise=True)
    plain_pytorch()
