"""Derivative-free LoRA in a few lines: C-LoRA (CMA-ES) and F-LoRA (fireworks) on an unchanged LightningModule.

Runs offline on a CPU in about a minute (tiny random-init Llama, embedded synthetic task)::

    python examples/dfo_lora_example.py

No backward pass: the model is frozen, rank-4 LoRA on every q_proj/k_proj is driven by a small z per layer, and
each training step is one generation of the layer's optimizer, its whole population evaluated in one forward.
On a GPU, see ``configs/sst2_smollm2_clora.yaml`` (SmolLM2-135M-Instruct on SST-2).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_memopt import DFOLoRA, HFCausalLM, PromptClassificationDataModule, llama_config


def train_loss(model: HFCausalLM, data: PromptClassificationDataModule) -> float:
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for b in data.train_dataloader():
            logits = model(b["input_ids"], b["attention_mask"])
            total += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
            n += len(b["labels"])
    model.train()
    return total / n


def main() -> None:
    for optimizer in ("cmaes", "fireworks"):
        pl.seed_everything(0)
        model = HFCausalLM(model_config=llama_config("tiny", vocab_size=256), tokenizer="builtin")
        data = PromptClassificationDataModule(k=32, batch_size=32, max_length=32, shuffle=False,
                                              template="Review: {sentence} Sentiment:",
                                              label_words=["negative", "positive"])
        # init_scale 1.0: a random-init model has no pretrained behaviour to protect (pretrained models: 0.05)
        dfo = DFOLoRA(optimizer=optimizer, d=100, population=10, budget=600, init_scale=1.0)  # 600 forwards
        trainer = pl.Trainer(max_steps=1000, accelerator="cpu", callbacks=[dfo], logger=False, enable_checkpointing=False,
                             limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False)
        data.tokenizer = model.tokenizer
        data.setup("fit")
        model.set_label_token_ids(data.label_token_ids)
        before = train_loss(model, data)
        trainer.fit(model, data)  # stops when the budget is spent
        after = train_loss(model, data)
        print(f"{optimizer}: {trainer.global_step} generations, {dfo.evaluations} forwards; train loss "
              f"{before:.4f} -> {after:.4f}; no .grad anywhere: {all(p.grad is None for p in model.parameters())}")


if __name__ == "__main__":
    main()
