"""Derivative-free LoRA cases: one generation (ask, evaluate the population, tell) per timed step.

- ``dfo_batched``: the population in one forward (batch expanded by the population from the current layer's input;
  the layers below run once): ``population_chunk=None``. ``dfo_batched_chunk10`` is DFOLoRA's default (two forwards
  of 10 candidates), ``dfo_batched_chunk5`` four of 5.
- ``dfo_sequential``: one forward per candidate (the public C-LoRA code's way).
- ``inference``: one no-grad forward of the per-candidate batch (the memory reference: the target is
  peak(dfo_batched) <= 1.3 x peak(inference)).
- ``inference_pop``: one no-grad forward of the population-sized batch (population x batch), for context.
- ``*_graph``: the same with ``cuda_graph=True`` (each layer's population forward replayed from a CUDA graph; the
  warm-up cycles through every layer once, so the timed steps replay); ``dfo_forward_chunk10`` and
  ``dfo_forward_chunk10_graph`` time the population forward alone (no ask/tell, no bookkeeping): a generation's
  cost over its batched forward is ``dfo_batched_chunk10_graph / dfo_forward_chunk10_graph``.

The model is a random-init Llama of ``benchmarks.common.build`` (``1b`` etc.), or SmolLM2 from a GGUF file with
size ``smollm2`` and ``SMOL_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf``. The fitness is cross-entropy over two
"label words" at the last position, as in prompt classification. A timed step cycles through the layers (one
generation per layer), so ``reps`` defaults to the number of layers (at most 16).

Usage: ``python -m benchmarks.cases.dfo CASE SIZE [BATCH] [SEQ]`` (BATCH is the per-candidate batch; POP=20 sets the
population, CHUNK=5 evaluates it 5 candidates per forward, OPTDEV=cpu keeps and updates the CMA-ES state on the
host as ``*_cpuopt`` does; ``*_resident`` keeps every layer's CMA-ES state on the GPU, ``offload_idle=False``); ``DEV=cpu python -m benchmarks.cases.dfo dfo_batched tiny 2 16`` is the CPU smoke run.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from benchmarks.common import DEV, build, report, timed, parse_case_args
from lightning_memopt.dfo.core import DFOSettings, LayerwiseDFO

CASES = ("dfo_batched", "dfo_batched_chunk10", "dfo_batched_chunk5", "dfo_sequential", "dfo_batched_resident",
         "dfo_batched_chunk10_resident", "dfo_sequential_resident", "dfo_batched_cpuopt", "inference", "inference_pop",
         "dfo_batched_chunk10_graph", "dfo_forward_chunk10", "dfo_forward_chunk10_graph")


class LabelLM(torch.nn.Module):
    """``module(input_ids, attention_mask)`` -> label-word logits at the last position (HFCausalLM's contract)."""

    def __init__(self, model: torch.nn.Module, label_ids: tuple[int, int] = (3, 5)) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("label_ids", torch.tensor(label_ids), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1, self.label_ids].float()


def load(size: str) -> torch.nn.Module:
    if size == "smollm2":
        path = os.environ.get("SMOL_GGUF")
        if not path:
            raise SystemExit("size smollm2 needs SMOL_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf")
        from lightning_memopt.models.hf import load_hf_model

        return load_hf_model(path, torch_dtype="bfloat16").to(DEV)
    return build(size)


def main(argv: list[str]) -> None:
    case, size, batch, seq = parse_case_args("dfo", CASES, argv, batch=4, seq=128)
    pop = int(os.environ.get("POP", "20"))
    chunk = int(os.environ["CHUNK"]) if os.environ.get("CHUNK") else None
    if "_chunk10" in case:  # population_chunk=10: two forwards of 10 candidates, less activation memory
        chunk = 10
    elif "_chunk5" in case:
        chunk = 5
    opt_dev = "cpu" if case.endswith("_cpuopt") else os.environ.get("OPTDEV") or None  # CMA-ES state on the host
    offload = not case.endswith("_resident")  # _resident: every layer's CMA-ES state stays on the GPU
    if DEV == "cpu":
        torch.set_num_threads(1)  # smoke mode on a shared CPU: threads only oversubscribe
    res: dict[str, Any] = {"method": case, "size": size, "batch": batch, "seq": seq, "population": pop,
                           "chunk": chunk, "optimizer_device": opt_dev, "offload_idle": offload, "impl": "lightning_memopt"}
    try:
        model = load(size)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        res["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
        vocab = model.config.vocab_size
        module = LabelLM(model).to(DEV)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(DEV)
        mask = torch.ones_like(ids)
        labels = torch.randint(0, 2, (batch,), generator=gen).to(DEV)
        data = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        n_layers = model.config.num_hidden_layers
        reps = min(n_layers, 16)
        warm = n_layers if case.endswith("_graph") else 2  # graph cases: capture every layer before timing
        if case in ("inference", "inference_pop"):
            rep = pop if case == "inference_pop" else 1
            x, m = ids.repeat(rep, 1), mask.repeat(rep, 1)

            def step() -> None:
                with torch.no_grad():
                    module(x, m).sum().item()
        else:
            settings = DFOSettings(optimizer="cmaes", population=pop, budget=None,
                                   batched=not case.startswith("dfo_sequential"), population_chunk=chunk,
                                   optimizer_device=opt_dev, offload_idle=offload, cuda_graph=case.endswith("_graph"))
            dfo = LayerwiseDFO(module, settings)
            dfo.collect_stats([data])
            res["split"] = dfo.split
            if case.startswith("dfo_forward"):
                z = torch.randn(pop, settings.d, generator=gen, dtype=torch.float64).to(DEV) * 0.1
                layer = {"k": 0}

                def step() -> None:  # the population forward of one layer alone, layers in turn
                    with torch.no_grad():
                        dfo._fitness(data, layer["k"], z).sum().item()
                    layer["k"] = (layer["k"] + 1) % dfo.lora.n_blocks
            else:

                def step() -> None:
                    dfo.generation_step(data)  # one host read per generation: the all-non-finite check

        t, mem = timed(step, warm=warm, reps=reps)
        res.update(step_s=round(t, 4), peak_gib=round(mem, 3), candidates_per_s=round(pop / t, 1)
                   if case.startswith("dfo") else None, tok_per_s=round(batch * seq / t, 1))
    except torch.OutOfMemoryError:
        res.update(step_s=None, peak_gib="OOM")
    report(res)


if __name__ == "__main__":
    main(sys.argv[1:])
