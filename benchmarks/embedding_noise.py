"""How much noise on the input embedding costs zero-shot dev accuracy, on the rows a k-shot training set never
shows and on all rows: the question behind ``HFCausalLM(frozen=["model.embed_tokens.*"])`` for ZO methods.

A ZO update moves every trained element. Rows of tokens the training set never shows get that noise without any
signal pulling them back. With the population config's lr (1e-4, decayed linearly over 5,000 steps), 16 directions and
the projected gradients' E[g²] (measured here on a few batches), the per-element drift after a run is about
``lr · sqrt(T/3) · sqrt(E[g²] / n)``. This script adds Gaussian noise of given sizes to the untouched model's
embedding and scores SST-2 dev, on the CPU or a GPU.

    python -m benchmarks.embedding_noise --model SmolLM2-135M-Instruct.Q4_1.gguf --data ../shared/data/sst2 \
        --sigmas 0.01,0.02,0.04 --out benchmarks/results/sst2_embedding_noise_cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.task_results import environment


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"))
    ap.add_argument("--sigmas", default="0.01,0.02,0.04", help="noise std on the unseen rows; the first also on all")
    ap.add_argument("--g_batches", type=int, default=4, help="batches to measure the population's E[g²] on")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from lightning_memopt.data import PromptClassificationDataModule
    from lightning_memopt.mezo.core import ZeroOrder, ZOConfig
    from lightning_memopt.models.hf import HFCausalLM

    dev_t = "cuda" if torch.cuda.is_available() else "cpu"
    m = HFCausalLM(model_name_or_path=args.model, objective="classification").to(dev_t).eval()
    kw = dict(data_dir=args.data, k=512, val_k=128, seed=0, template="Review: {sentence}\nSentiment:",
              label_words=[" negative", " positive"], batch_size=16, max_length=128, eval_batch_size=64)
    train = PromptClassificationDataModule(**kw)
    dev = PromptClassificationDataModule(**kw, test_limit=None)
    for dm, stage in ((train, "fit"), (dev, "test")):
        dm.tokenizer = m.tokenizer
        dm.setup(stage)
    m.set_label_token_ids(train.label_token_ids)
    seen: set[int] = set()
    for b in train.train_dataloader():
        seen |= set(b["input_ids"][b["attention_mask"].bool()].tolist())
    emb = m.model.get_input_embeddings().weight
    unseen = torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
    unseen[list(seen)] = False
    tokens = hit = examples = 0
    for b in dev.test_dataloader():
        for ids, am in zip(b["input_ids"], b["attention_mask"]):
            u = unseen[ids[am.bool()].to(unseen.device)]
            tokens, hit, examples = tokens + u.numel(), hit + int(u.sum()), examples + int(u.any())

    def to_dev(batch: dict) -> dict:
        return {k: v.to(dev_t) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    zo = ZeroOrder(m, ZOConfig(eps=1e-3, n_spsa=16, perturbation="lowrank", perturbation_rank=4, batched=True,
                               one_sided=True))
    gs = []
    with torch.no_grad():
        for step, b in zip(range(args.g_batches), train.train_dataloader()):
            g, _ = zo.estimate(None, zo.seeds(step), per_sample=m.per_sample_loss, batch=to_dev(b))
            gs.append(g.float().cpu())
    zo.close()
    g2 = float(torch.cat(gs).pow(2).mean())
    drift = 1e-4 * (5000 / 3) ** 0.5 * (g2 / 16) ** 0.5

    def score() -> float:
        right = total = 0
        with torch.no_grad():
            for b in dev.test_dataloader():
                out = m._step(to_dev(b))
                right += int((out["logits"].argmax(-1) == out["labels"]).sum())
                total += len(out["labels"])
        return 100.0 * right / total

    base = emb.detach().clone()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    rows = []
    for sigma, where in [(0.0, "none")] + [(s, "unseen") for s in sigmas] + [(sigmas[0], "all")]:
        gen = torch.Generator().manual_seed(0)
        noise = (torch.randn(emb.shape, generator=gen) * sigma).to(emb.device, emb.dtype)
        if where == "unseen":
            noise[~unseen] = 0
        with torch.no_grad():
            emb.copy_(base + noise)
        t0 = time.perf_counter()
        rows.append({"sigma": sigma, "rows": where, "dev_acc": round(score(), 2), "s": round(time.perf_counter() - t0, 1)})
        print(f"| {sigma} | {where} | {rows[-1]['dev_acc']} |", flush=True)
    result = {"rows": rows, "embedding_std": float(base.float().std()), "unseen_dev_token_frac": hit / tokens,
              "dev_examples_with_unseen_token": examples, "dev_examples": len(dev.test_dataloader().dataset),
              "seen_tokens": len(seen), "g2_mean": g2, "predicted_drift_std": drift,
              "env": environment(sys.argv), "device": dev_t}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"embedding std {result['embedding_std']:.3f}; dev tokens unseen in training "
             f"{100 * result['unseen_dev_token_frac']:.1f}% ({examples} of {result['dev_examples']} examples have one); "
             f"E[g²] {g2:.1f} over {len(gs)} batches: predicted drift std after 5,000 steps {drift:.4f}", "",
             "| noise std | rows | dev acc |", "|---|---|---|"]
    lines += [f"| {r['sigma']} | {r['rows']} | {r['dev_acc']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
