"""Named benchmark suites, as data: which cases run, at which sizes, and which ratio columns the table shows.

A case is either a peer case of ``anchors_gpu.py`` (``python anchors_gpu.py METHOD SIZE BATCH SEQ``) or one of ours
(``python -m benchmarks.cases.MODULE CASE SIZE BATCH SEQ``). Edit the lists below to add or drop cases; the harness
runs sizes in ascending order and stops a case at its first OOM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SIZE_ORDER = ("tiny", "small", "smol", "1b", "7b", "13b", "30b", "34b", "48b", "60b", "65b", "70b")

# What each peer case of anchors_gpu.py runs, for the table's impl column.
PEER_SOURCE = {
    "forward": "HF forward",
    "adamw": "torch AdamW",
    "adamw_ckpt": "torch AdamW",
    "mezo_official": "MeZO official",
    "perturb_only": "MeZO official",
    "lomo": "lomo-optim",
    "lomo_ckpt": "lomo-optim",
    "adalomo_ckpt": "lomo-optim",
    "galore": "galore-torch",
    "galore_layerwise": "galore-torch",
    "galore_layerwise_ckpt": "galore-torch",
    "galore_refresh": "galore-torch",
}


@dataclass(frozen=True)
class Case:
    """One benchmark case; it runs once per size, each time in a fresh process."""

    impl: str  # "peer" (anchors_gpu.py) or "ours" (benchmarks.cases.<module>)
    name: str  # the method/case name given on the command line
    sizes: tuple[str, ...] = ("1b",)
    module: str = ""  # ours only: the module under benchmarks/cases/
    batch: int = 8
    seq: int = 512
    smoke: bool = False  # also runs in --smoke mode (DEV=cpu, size tiny)
    peer_of: str = ""  # ours only: the peer library this case drives (the table's impl column says so)

    @property
    def key(self) -> str:
        return f"{self.impl}:{self.name}"


@dataclass(frozen=True)
class Ratio:
    """A ratio column: ``metric`` of the row divided by ``metric`` of the reference row at the same size/batch/seq."""

    title: str  # column header, e.g. "step / forward"
    metric: str  # "step_s" or "peak_gib"
    ref: str | None = None  # reference case key, e.g. "peer:forward"; None: the peer case of the row's own name
    invert: bool = False  # reference / row instead (a speed-up)
    rows: tuple[str, ...] = ()  # case keys that get a value; empty: every row
    pairs: tuple[tuple[str, str], ...] = ()  # (row, its reference) per row, in place of ``ref`` and ``rows``


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    cases: tuple[Case, ...]
    ratios: tuple[Ratio, ...] = field(default=())


def peer(name: str, sizes: tuple[str, ...] = ("1b",), **kw: object) -> Case:
    return Case("peer", name, tuple(sizes), **kw)  # type: ignore[arg-type]


def ours(module: str, name: str, sizes: tuple[str, ...] = ("1b",), **kw: object) -> Case:
    return Case("ours", name, tuple(sizes), module=module, **kw)  # type: ignore[arg-type]


BOTH = ("1b", "7b")
DFO = {"batch": 4, "seq": 128, "smoke": True, "sizes": ("smol", "1b")}  # few-shot classification prompts
# each method through a LightningModule under a Trainer, and the bare step of the same method and shape
THROUGH_TRAINER = (
    ("ours:galore_lightning", "ours:galore"), ("ours:galore_lightning_keepgrads", "ours:galore"),
    ("ours:adamw_lightning", "peer:adamw"), ("ours:lomo_lightning_ckpt", "ours:lomo_ckpt"),
    ("ours:adalomo_lightning_ckpt", "ours:adalomo_ckpt"), ("ours:mezo_lightning", "ours:mezo"),
    ("ours:mezo_lightning_graph", "ours:mezo"), ("ours:dfo_lightning", "ours:dfo_batched_chunk10"),
    ("ours:dfo_lightning_graph", "ours:dfo_batched_chunk10_graph"),
)

SUITES: dict[str, Suite] = {
    s.name: s
    for s in [
        Suite(
            "foundation",
            "AdamW and the peers at 1.1B side by side (issue 2 acceptance); our AdamW/forward check the timing code.",
            (
                peer("forward", smoke=True),
                peer("adamw", smoke=True),
                peer("adamw_ckpt"),
                peer("mezo_official", smoke=True),
                peer("lomo"),
                peer("galore"),
                ours("adamw", "forward", smoke=True),
                ours("adamw", "adamw", smoke=True),
                ours("adamw", "adamw_ckpt"),
            ),
            (
                Ratio("step / AdamW", "step_s", "peer:adamw"),
                Ratio("peak / AdamW", "peak_gib", "peer:adamw"),
                Ratio("step / peer", "step_s", rows=("ours:forward", "ours:adamw", "ours:adamw_ckpt")),
                Ratio("peak / peer", "peak_gib", rows=("ours:forward", "ours:adamw", "ours:adamw_ckpt")),
            ),
        ),
        Suite(
            "mezo",
            "MeZO: a zeroth-order step against the inference forward it is built from.",
            (
                peer("forward", BOTH, smoke=True),
                peer("mezo_official", BOTH, smoke=True),
                # perturbation pass alone (peer "perturb_only", ours "mezo_perturb"): add with --cases when needed
                ours("mezo", "mezo", BOTH, smoke=True),
                ours("mezo", "mezo_fastmath", BOTH),  # Gaussian z, approximate transcendentals
                ours("mezo", "mezo_rademacher", BOTH),  # ±1 z (distribution="rademacher")
            ),
            (
                Ratio("step / forward", "step_s", "peer:forward"),
                Ratio("peak / forward", "peak_gib", "peer:forward"),
                Ratio("step / MeZO official", "step_s", "peer:mezo_official",
                      rows=("ours:mezo", "ours:mezo_fastmath", "ours:mezo_rademacher")),
            ),
        ),
        Suite(
            "lomo",
            "LOMO/AdaLomo fused backward against lomo-optim and AdamW.",
            (
                peer("lomo"),
                peer("lomo_ckpt", BOTH),
                peer("adalomo_ckpt", BOTH),
                peer("adamw", smoke=True),
                ours("lomo", "lomo", smoke=True),
                ours("lomo", "lomo_ckpt", BOTH),
                ours("lomo", "adalomo_ckpt", BOTH, smoke=True),
                ours("lomo", "adalomo_torch_ckpt", BOTH),  # the torch version of the same step
                # SmolLM2's shape at SST-2's batch, no checkpointing (configs/sst2_smollm2_adalomo.yaml): host-bound
                ours("lomo", "adalomo", ("smol",), batch=16, seq=128),
                ours("lomo", "adalomo_torch", ("smol",), batch=16, seq=128),
                ours("lomo", "lomo_clip_ckpt"),  # global-norm clipping; lomo-optim has no such case
                ours("lomo", "backward_floor_ckpt", BOTH),  # forward + backward, grads dropped, no update
            ),
            (
                Ratio("step / lomo-optim", "step_s"),
                Ratio("peak / lomo-optim", "peak_gib"),
                Ratio("step / AdamW", "step_s", "peer:adamw"),
                Ratio("step / backward floor", "step_s", "ours:backward_floor_ckpt",
                      rows=("peer:lomo_ckpt", "peer:adalomo_ckpt", "ours:lomo_ckpt", "ours:adalomo_ckpt")),
                Ratio("kernels / torch version", "step_s",
                      pairs=(("ours:adalomo_ckpt", "ours:adalomo_torch_ckpt"), ("ours:adalomo", "ours:adalomo_torch"))),
                Ratio("kernels / torch version peak", "peak_gib",
                      pairs=(("ours:adalomo_ckpt", "ours:adalomo_torch_ckpt"), ("ours:adalomo", "ours:adalomo_torch"))),
            ),
        ),
        Suite(
            "galore",
            "GaLore against galore-torch (one optimizer, layer-wise, SVD refresh every step) and AdamW. galore-torch's"
            " first step runs a full SVD of every matrix (about 20 s at 1b, minutes at 7b).",
            (
                peer("galore"),
                peer("galore_layerwise"),
                peer("galore_refresh"),
                # at 7b galore-torch's first step (an exact SVD of each of 224 matrices) outlasts a device call
                peer("galore_layerwise_ckpt"),
                peer("adamw", smoke=True),
                ours("galore", "galore", smoke=True),
                ours("galore", "galore_layerwise"),
                ours("galore", "galore_layerwise_ckpt", BOTH),
                ours("galore", "galore_layerwise_ckpt_8bit_all2d", BOTH),  # 8-bit Adam moments, embeddings too
                ours("galore", "galore_refresh"),
                ours("galore", "refresh_only"),  # our randomized refresh of every matrix, alone
                ours("galore", "svd4"),  # galore-torch's exact SVD of 4 matrices, alone
                ours("galore", "adamw_fused"),  # plain AdamW through our GaLore optimizer's code path
            ),
            (
                Ratio("speed-up vs galore-torch", "step_s", invert=True),
                Ratio("peak / galore-torch", "peak_gib"),
                Ratio("step / AdamW", "step_s", "peer:adamw"),
            ),
        ),
        Suite(
            "dfo",
            "Derivative-free LoRA: one CMA-ES generation (population 20) in one batched forward against one"
            " candidate at a time; batch is per candidate. Target: peak(dfo_batched) <= 1.3 x peak(inference).",
            (
                ours("dfo", "inference", **DFO),
                ours("dfo", "inference_pop", **DFO),  # one forward of population x batch sequences
                ours("dfo", "dfo_batched", **DFO),
                ours("dfo", "dfo_batched_chunk10", **DFO),  # population_chunk=10: the memory/speed trade-off
                ours("dfo", "dfo_batched_chunk5", **DFO),
                ours("dfo", "dfo_sequential", **DFO),
                # every layer's CMA-ES state (C and its eigenvectors, 4 MB a layer) on the GPU: offload_idle=False
                ours("dfo", "dfo_batched_resident", **DFO),
                ours("dfo", "dfo_batched_chunk10_resident", **DFO),
                ours("dfo", "dfo_sequential_resident", **DFO),
                ours("dfo", "dfo_batched_cpuopt", **DFO),  # optimizer_device="cpu": CMA-ES computes on the host
                # the population forward alone, and the generation, eager and replayed from CUDA graphs
                ours("dfo", "dfo_forward_chunk10", **DFO),
                ours("dfo", "dfo_forward_chunk10_graph", **DFO),
                ours("dfo", "dfo_batched_chunk10_graph", **DFO),
            ),
            (
                Ratio("sequential / batched step", "step_s", "ours:dfo_batched", rows=("ours:dfo_sequential",)),
                Ratio("generation / its forward", "step_s", "ours:dfo_forward_chunk10", rows=("ours:dfo_batched_chunk10",)),
                Ratio("generation / its forward (graph)", "step_s", "ours:dfo_forward_chunk10_graph",
                      rows=("ours:dfo_batched_chunk10_graph",)),
                Ratio("sequential / row", "step_s", "ours:dfo_sequential", invert=True,
                      rows=("ours:dfo_batched", "ours:dfo_batched_chunk10", "ours:dfo_batched_chunk5",
                            "ours:dfo_batched_cpuopt")),
                Ratio("sequential / row (resident)", "step_s", "ours:dfo_sequential_resident", invert=True,
                      rows=("ours:dfo_batched_resident", "ours:dfo_batched_chunk10_resident")),
                Ratio("peak / inference", "peak_gib", "ours:inference"),
            ),
        ),
        Suite(
            "lightning",
            "Methods through a LightningModule under a Trainer (as users run them), beside the bare step and the peer:"
            " GaLore's peak with the gradients freed after the step and left to Lightning; LOMO and AdaLomo (with"
            " activation checkpointing) beside lomo-optim; MeZO, eager and graphed, beside the official-style step;"
            " DFO-LoRA (C-LoRA, population 20, chunk 10; batch per candidate), eager and graphed, beside its bare"
            " generation. The Trainer / bare columns set each Trainer row against its own method's bare step.",
            (
                peer("galore"),
                peer("adamw", smoke=True),
                peer("lomo_ckpt"),
                peer("adalomo_ckpt"),
                peer("mezo_official", smoke=True),
                ours("galore", "galore", smoke=True),
                ours("lightning", "galore_lightning", smoke=True),
                ours("lightning", "galore_lightning_keepgrads"),
                ours("lightning", "adamw_lightning", smoke=True),
                ours("lomo", "lomo_ckpt"),
                ours("lomo", "adalomo_ckpt"),
                ours("lightning", "lomo_lightning_ckpt"),
                ours("lightning", "adalomo_lightning_ckpt"),
                ours("mezo", "mezo", smoke=True),
                ours("lightning", "mezo_lightning", smoke=True),
                ours("lightning", "mezo_lightning_graph"),
                ours("dfo", "dfo_batched_chunk10", **{**DFO, "smoke": False}),
                ours("dfo", "dfo_batched_chunk10_graph", **{**DFO, "smoke": False}),
                ours("lightning", "dfo_lightning", **{**DFO, "smoke": False}),
                ours("lightning", "dfo_lightning_graph", **{**DFO, "smoke": False}),
            ),
            (
                Ratio("step / galore-torch", "step_s", "peer:galore",
                      rows=("ours:galore", "ours:galore_lightning", "ours:galore_lightning_keepgrads")),
                Ratio("peak / galore-torch", "peak_gib", "peer:galore",
                      rows=("ours:galore", "ours:galore_lightning", "ours:galore_lightning_keepgrads")),
                Ratio("peak / AdamW", "peak_gib", "peer:adamw", rows=("ours:adamw_lightning",)),
                Ratio("step / lomo-optim", "step_s", "peer:lomo_ckpt",
                      rows=("ours:lomo_ckpt", "ours:lomo_lightning_ckpt")),
                Ratio("peak / lomo-optim", "peak_gib", "peer:lomo_ckpt",
                      rows=("ours:lomo_ckpt", "ours:lomo_lightning_ckpt")),
                Ratio("step / lomo-optim AdaLomo", "step_s", "peer:adalomo_ckpt",
                      rows=("ours:adalomo_ckpt", "ours:adalomo_lightning_ckpt")),
                Ratio("peak / lomo-optim AdaLomo", "peak_gib", "peer:adalomo_ckpt",
                      rows=("ours:adalomo_ckpt", "ours:adalomo_lightning_ckpt")),
                Ratio("step / MeZO official", "step_s", "peer:mezo_official",
                      rows=("ours:mezo", "ours:mezo_lightning", "ours:mezo_lightning_graph")),
                Ratio("peak / MeZO official", "peak_gib", "peer:mezo_official",
                      rows=("ours:mezo", "ours:mezo_lightning", "ours:mezo_lightning_graph")),
                Ratio("Trainer / bare step", "step_s", pairs=THROUGH_TRAINER),
                Ratio("Trainer / bare peak", "peak_gib", pairs=THROUGH_TRAINER),
            ),
        ),
        Suite(
            "guard",
            "What the non-finite guard costs: MeZO and LOMO steps with the guard against the same step without it.",
            (
                ours("mezo", "mezo", smoke=True),
                ours("mezo", "mezo_nocheck", smoke=True),
                ours("lomo", "lomo", smoke=True),
                ours("lomo", "lomo_nocheck", smoke=True),
            ),
            (
                Ratio("step / unguarded", "step_s", "ours:mezo_nocheck", rows=("ours:mezo",)),
                Ratio("step / unguarded ", "step_s", "ours:lomo_nocheck", rows=("ours:lomo",)),
            ),
        ),
        Suite(
            "zero3",
            "DeepSpeed ZeRO-3 on one GPU: our LOMO/AdaLomo/MeZO on ZeRO-3 partitions (strategy='zero3') against "
            "lomo-optim's own ZeRO-3 path, same partitioning config (no DeepSpeed optimizer).",
            (
                ours("zero3", "lomo_zero3", BOTH, smoke=True),
                ours("zero3", "lomo_optim_zero3", BOTH, smoke=True, peer_of="lomo-optim ZeRO-3"),
                ours("zero3", "lomo_zero3_ckpt", BOTH),
                ours("zero3", "lomo_optim_zero3_ckpt", BOTH, peer_of="lomo-optim ZeRO-3"),
                ours("zero3", "adalomo_zero3_ckpt", BOTH),
                ours("zero3", "adalomo_optim_zero3_ckpt", BOTH, peer_of="lomo-optim ZeRO-3"),
                ours("zero3", "mezo_zero3", BOTH, smoke=True),
            ),
            (
                Ratio("step / lomo-optim", "step_s", "ours:lomo_optim_zero3", rows=("ours:lomo_zero3",)),
                Ratio("step / lomo-optim ", "step_s", "ours:lomo_optim_zero3_ckpt", rows=("ours:lomo_zero3_ckpt",)),
                Ratio("step / lomo-optim  ", "step_s", "ours:adalomo_optim_zero3_ckpt",
                      rows=("ours:adalomo_zero3_ckpt",)),
                Ratio("peak / lomo-optim", "peak_gib", "ours:lomo_optim_zero3_ckpt", rows=("ours:lomo_zero3_ckpt",)),
                Ratio("peak / lomo-optim ", "peak_gib", "ours:adalomo_optim_zero3_ckpt",
                      rows=("ours:adalomo_zero3_ckpt",)),
            ),
        ),
        Suite(
            "largest",
            "The largest model that fits: ours at increasing sizes, each method stopped at its first OOM. Models are "
            "built on the meta device and materialised on the GPU (one copy of the weights at load: load_peak_x).",
            (
                ours("mezo", "mezo", ("30b", "34b", "48b", "60b", "65b", "70b")),
                ours("lomo", "lomo_ckpt", ("30b", "34b", "48b", "60b", "65b", "70b")),
                ours("adamw", "forward", ("30b", "34b", "48b", "60b", "65b", "70b")),
            ),
            (Ratio("peak / forward", "peak_gib", "ours:forward", rows=("ours:mezo",)),),
        ),
    ]
}
