"""MeZO in a few lines: zeroth-order fine-tuning of an unchanged LightningModule, then rebuild it from its seeds.

Runs offline on a CPU in a minute or two (tiny random-init Llama, embedded synthetic task)::

    python examples/mezo_example.py

On a GPU, pass a real model, e.g. ``HFCausalLM(model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")`` with
``PromptClassificationDataModule(data_dir="data/sst2", k=512)``, and see ``configs/sst2_smollm2_mezo.yaml``.
"""

from __future__ import annotations

import os
import tempfile

import lightning.pytorch as pl
import torch

from lightning_memopt import HFCausalLM, PromptClassificationDataModule, llama_config
from lightning_memopt.mezo import MeZO, replay_trajectory


def main() -> None:
    pl.seed_everything(0)
    model = HFCausalLM(model_config=llama_config("tiny", vocab_size=256), tokenizer="builtin", objective="lm", lr=2e-3)
    data = PromptClassificationDataModule(
        k=64,
        batch_size=16,
        max_length=32,
        template="Review: {sentence} Sentiment:",
        label_words=["negative", "positive"],
    )
    path = os.path.join(tempfile.mkdtemp(), "run.mezo.json")
    mezo = MeZO(eps=1e-3, n_spsa=1, trajectory_path=path)  # the module's own lr (2e-3) and scheduler drive MeZO
    trainer = pl.Trainer(
        max_steps=200,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        callbacks=[mezo],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, data)
    print(
        f"final MeZO loss {float(trainer.callback_metrics['mezo/loss']):.3f}; no parameter holds .grad:",
        all(p.grad is None for p in model.parameters()),
    )

    # The whole run is (base model, seeds, projected gradients): rebuild the fine-tuned weights from kilobytes.
    base = HFCausalLM(model_config=llama_config("tiny", vocab_size=256), tokenizer="builtin", objective="lm", lr=2e-3)
    replay_trajectory(base, path)
    same = all(torch.equal(a, b) for a, b in zip(base.parameters(), model.parameters()))
    print(f"trajectory: {os.path.getsize(path) / 1024:.1f} KiB; replayed weights identical: {same}")


if __name__ == "__main__":
    main()
