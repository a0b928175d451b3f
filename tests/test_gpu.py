"""On a CUDA GPU (skipped without one): the Triton perturbation kernels against the torch reference, and a few bf16
steps of every method through a Trainer. `python -m pytest -q -n auto tests` runs these on a GPU machine.

Only the public callback constructors are used here, so that the methods' internals can change freely.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from lightning_memopt import LOMO, AdaLomo, DFOLoRA, GaLore, MeZO
from lightning_memopt.testing import tiny_datamodule, tiny_model, tiny_trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

ROOT = Path(__file__).resolve().parents[1]


# kernel distribution: (id, dtypes checked). Fewer dtypes for the variants: each (kernel, dtype) is a Triton compile.
DISTS = {0: ("normal", (torch.float32, torch.bfloat16)), 1: ("normal_fast_math", (torch.bfloat16,)),
         2: ("rademacher", (torch.bfloat16,))}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
@pytest.mark.parametrize("dist", list(DISTS), ids=[v[0] for v in DISTS.values()])
def test_triton_kernels_match_torch_reference(dist, capsys, monkeypatch):
    """benchmarks/gpu_check_perturb.py's comparisons of the compiled kernels with the torch emulation.

    Fast-math normals (dist 1, opt-in) use approximate log/cos: where ln(u) is near 0 its absolute error is large
    against z itself, so a few elements in 10^4 may miss the check's slack (seen on the H200: 2 of 64,000). Those
    are allowed for dist 1 only; every other comparison must agree element for element.
    """
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ is not part of the installed package
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from benchmarks import gpu_check_perturb

    ok = gpu_check_perturb.check(quick=True, dists=(dist,), dtypes=DISTS[dist][1])
    out = capsys.readouterr().out
    records = [json.loads(ln[len("CHECK "):]) for ln in out.splitlines() if ln.startswith("CHECK ")]
    assert records, out[-3000:]
    errors = [r for r in records if "error" in r]
    assert not errors or dist == 1, errors  # the check tolerates fast math failing to compile, as here

    def allowed(r: dict) -> int:
        return int(1e-4 * math.prod(r["shape"])) + 1 if dist == 1 and "shape" in r else 0

    bad = [r for r in records if r.get("bad", 0) > allowed(r)]
    assert not bad, bad
    assert ok or dist == 1


# name: (callback factory, Trainer precision)
METHODS = {
    "mezo": (lambda: MeZO(eps=1e-3, lr=1e-3), "bf16-true"),
    "lomo": (lambda: LOMO(lr=1e-2), "bf16-true"),
    "adalomo": (lambda: AdaLomo(lr=1e-3), "bf16-true"),
    "galore": (lambda: GaLore(rank=8, update_proj_gap=2), "bf16-true"),
    "galore_layerwise": (lambda: GaLore(rank=8, update_proj_gap=2, layerwise=True), "bf16-true"),
    "dfo_clora": (lambda: DFOLoRA(optimizer="cmaes", d=40, population=6, budget=None, stat_batches=2), "bf16-true"),
    "dfo_clora_mixed": (
        lambda: DFOLoRA(optimizer="cmaes", d=40, population=6, budget=None, stat_batches=2), "bf16-mixed"
    ),
}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        out = model.model(input_ids=ids.to(next(model.parameters()).device)).logits
    return out.float().cpu()


@pytest.mark.parametrize("name", list(METHODS))
def test_bf16_steps_on_cuda(name):
    """Three bf16 steps on the GPU: the loss is finite and the model changed (its weights, or DFO's adapters)."""
    make, precision = METHODS[name]
    torch.manual_seed(0)
    model, dm = tiny_model(), tiny_datamodule(k=16, batch_size=8)
    # what the run starts from: bf16-true converts the fp32 module with module.to(torch.bfloat16)
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    start = copy.deepcopy(model).to("cuda", dtype)
    before = {n: p.detach().float().cpu() for n, p in start.named_parameters()}
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    logits_before = _logits(start, ids)
    del start
    trainer = tiny_trainer(accelerator="cuda", precision=precision, max_steps=3, callbacks=[make()])
    trainer.fit(model, dm)

    assert trainer.global_step == 3
    assert trainer.strategy.root_device.type == "cuda"  # (Lightning moves the module back to the CPU after fit)
    assert next(model.parameters()).dtype == dtype
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if "loss" in k or "fitness" in k}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    after = {n: p.detach().float().cpu() for n, p in model.named_parameters()}
    if name.startswith("dfo"):  # the base weights stay; the adapters live in hooks and change the outputs
        assert all(torch.equal(before[n], after[n]) for n in before)
        assert not torch.equal(_logits(model.to("cuda"), ids), logits_before)
    else:
        assert any(not torch.equal(before[n], after[n]) for n in before), "no weight changed"
        assert all(torch.isfinite(w).all() for w in after.values())
    print(name, precision, losses, file=sys.stderr)


def _mezo_fit(cuda_graph: bool, precision: str, padding: str = "max_length", steps: int = 12, **kw):
    torch.manual_seed(0)
    model = tiny_model()
    dm = tiny_datamodule(k=16, batch_size=8, padding=padding)
    mezo = MeZO(lr=1e-3, eps=1e-2, cuda_graph=cuda_graph, seed=3, **kw)
    trainer = tiny_trainer(accelerator="cuda", precision=precision, max_steps=steps, callbacks=[mezo])
    trainer.fit(model, dm)
    weights = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    return weights, mezo, {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_mezo_cuda_graph_equals_eager(precision, recwarn):
    """The replayed step runs the same kernels on the same seeds: bit-identical weights after 12 steps, in fp32 and
    bf16; one graph per batch shape (fixed padding: one), replayed every step; the module's own logging goes on."""
    eager, _, _ = _mezo_fit(False, precision)
    graphed, mezo, metrics = _mezo_fit(True, precision)
    assert not [w for w in recwarn if "cuda_graph" in str(w.message)], [str(w.message) for w in recwarn]
    assert "train_loss" in metrics and math.isfinite(metrics["train_loss"])
    for n in eager:
        assert torch.equal(eager[n], graphed[n]), n


class _SyncWatch(pl.Callback):
    """Turns on torch's sync debug mode for steps [start, stop): every host sync warns there."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.start:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        elif trainer.global_step == self.stop:
            torch.cuda.set_sync_debug_mode(0)


def test_graphed_mezo_steps_make_no_host_sync_between_logging_steps():
    """As a fit runs them, with the module logging its loss to the progress bar and a bar drawn every step, graphed
    MeZO steps make no host sync between logging steps (a sync idles the GPU while the host runs Lightning's loop:
    2.8 ms of a profiled 54.5 ms step at 1.1B on the H200). Lightning itself would read every prog_bar tensor each
    step. Eager steps run the module's own forward, which may sync: transformers' mask code checks masks on the host
    (seen on an H100 at 45a1bf1); the capture leaves that out of the replayed step."""
    import warnings

    from lightning.pytorch.callbacks import TQDMProgressBar

    torch.manual_seed(0)
    model, watch = tiny_model(), _SyncWatch(3, 9)
    trainer = tiny_trainer(accelerator="cuda", precision="bf16-true", max_steps=10, log_every_n_steps=100,
                           enable_progress_bar=True,
                           callbacks=[MeZO(lr=1e-3, eps=1e-2, cuda_graph=True, seed=3), watch,
                                      TQDMProgressBar(refresh_rate=1)])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, tiny_datamodule(k=16, batch_size=8, padding="max_length"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # the sync warnings' own text (switching the mode on warns once too, with "synchronizing" in it)
    syncs = [f"{w.filename}:{w.lineno} {w.message}" for w in caught
             if "synchronizing CUDA operation" in str(w.message)]
    assert syncs == [], syncs
    assert isinstance(trainer.progress_bar_metrics["mezo/loss"], float)
    assert math.isfinite(trainer.progress_bar_metrics["train_loss"])


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_mezo_overlap_equals_the_serial_copies(cuda_graph, recwarn):
    """overlap=True makes each group's copies one ahead on a side stream, the forward waiting per group: the same
    kernels on the same inputs, so bit-identical weights to the eager step without it, eager or captured (a race
    between the streams would show here). The copies made ahead were used (at capture, for the graph)."""
    # a cap of 128 KiB makes each of the tiny model's decoder layers (74 KB in bf16) a group, as a real model's
    # are at the default 64 MiB; the default would make the whole tiny model one group, with nothing to make ahead
    serial, _, _ = _mezo_fit(False, "bf16-true", group_bytes=1 << 17)
    overlapped, mezo, _ = _mezo_fit(cuda_graph, "bf16-true", overlap=True, group_bytes=1 << 17)
    assert len(mezo.zo.perturber._group_roots) == 2
    assert not [w for w in recwarn if "overlap" in str(w.message)], [str(w.message) for w in recwarn]
    assert mezo.zo.perturber.ahead_used > 0  # internal: the one way to see that the side stream ran
    for n in serial:
        assert torch.equal(serial[n], overlapped[n]), n


def test_mezo_cuda_graph_replays_and_falls_back_with_a_reason():
    """Counted replays (one capture for a fixed shape); a metric objective warns with its reason and trains."""
    torch.manual_seed(0)
    model, dm = tiny_model(), tiny_datamodule(k=16, batch_size=8, padding="max_length")
    mezo = MeZO(lr=1e-3, cuda_graph=True)
    counts = {}

    class Peek(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            counts.update(captures=mezo._graph.captures, replays=mezo._graph.replays)

    trainer = tiny_trainer(accelerator="cuda", precision="bf16-true", max_steps=6, callbacks=[mezo, Peek()])
    trainer.fit(model, dm)
    assert counts == {"captures": 1, "replays": 6}
    with pytest.warns(UserWarning, match="metric objective is computed on the host; running the eager step"):
        _mezo_fit(True, "bf16-true", steps=2, metric="torchmetrics.classification.MulticlassAccuracy",
                  metric_kwargs={"num_classes": 2})


def _syncs_in_steps_3_to_9(method: pl.Callback) -> list[tuple[str, int]]:
    """(file, line) of every synchronising call in steps 3-9 of a 10-step bf16 fit of the tiny model with ``method``
    (no logging step among them): torch's sync debug mode warns at each, naming the Python line that made it."""
    import warnings

    class SyncWatch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                torch.cuda.set_sync_debug_mode("warn")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 9:
                torch.cuda.set_sync_debug_mode("default")

    torch.manual_seed(0)
    model, dm = tiny_model(), tiny_datamodule(k=16, batch_size=8, padding="max_length")
    trainer = tiny_trainer(accelerator="cuda", precision="bf16-true", max_steps=10, log_every_n_steps=50,
                           callbacks=[method, SyncWatch()])
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            trainer.fit(model, dm)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [(w.filename, w.lineno) for w in seen if "synchronizing" in str(w.message)]
    print("syncs in steps 3-9:", len(syncs), sorted(set(syncs)), file=sys.stderr)
    return syncs


def test_mezo_graph_step_makes_no_host_sync_of_its_own():
    """Between logging steps a fit with cuda_graph=True syncs nowhere in lightning_memopt."""
    ours = [f"{f}:{n}" for f, n in _syncs_in_steps_3_to_9(MeZO(lr=1e-3, cuda_graph=True)) if "lightning_memopt" in f]
    assert not ours, ours


def test_dfo_generation_makes_no_host_sync_of_its_own_but_the_lazy_eigh():
    """DFOLoRA(cuda_graph=True) with CMA-ES: the skip check is a device flag and nothing else reads the device, so
    between logging steps lightning_memopt syncs only in CMA-ES's lazy eigendecomposition (torch's sync debug mode
    names the Python line of every synchronising call)."""
    import inspect

    from lightning_memopt.dfo.cmaes import CMAES

    syncs = _syncs_in_steps_3_to_9(DFOLoRA(d=16, population=6, budget=None, stat_batches=1, cuda_graph=True, seed=1))
    lines, first = inspect.getsourcelines(CMAES._eigen)
    eigh = range(first, first + len(lines))
    ours = [f"{f}:{n}" for f, n in syncs if "lightning_memopt" in f and not (f.endswith("cmaes.py") and n in eigh)]
    assert not ours, ours
def test_graph_replay_warms_up_once_where_asked():
    """warmup_once: eager warm-up calls before the first capture only (DFO's many per-layer, per-shape captures)."""
    from lightning_memopt.core.graphs import GraphReplay

    for once, calls_expected in ((False, 2 * 3 + 3), (True, 2 + 3)):
        calls = []
        replay = GraphReplay(lambda x, calls=calls: calls.append(1) or x * 2 + 1, "demo", warmup=2, warmup_once=once)
        for n in (4, 8, 16, 8, 4):
            x = torch.arange(n, dtype=torch.float32, device="cuda")
            assert torch.equal(replay(x), x * 2 + 1)
        assert len(calls) == calls_expected and replay.captures == 3 and replay.replays == 5


def test_dfo_cuda_graph_equals_eager(recwarn):
    """DFOLoRA's population forward replayed from a graph per layer, and the module's training_step after each
    generation from one graph: the same candidates' fitness, so the same adapters after 6 generations (fp32), and
    the same train_loss each step; one capture per layer and a replay per generation, one capture of the step."""
    res = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        model = tiny_model()
        cb = DFOLoRA(d=16, population=6, budget=None, stat_batches=1, cuda_graph=graphed, seed=1)
        counts, losses = {}, []

        class Peek(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses.append(trainer.callback_metrics["train_loss"].item())

            def on_train_end(self, trainer, pl_module):
                if cb.dfo.graph is not None:
                    step = cb._graphed_step.graph
                    counts.update(captures=cb.dfo.graph.captures, replays=cb.dfo.graph.replays,
                                  step_captures=step.captures, step_replays=step.replays)

        tiny_trainer(accelerator="cuda", precision="32-true", max_steps=6, callbacks=[cb, Peek()]).fit(
            model, tiny_datamodule(k=16, batch_size=8, padding="max_length"))
        res[graphed] = ([z.detach().cpu().clone() for z in cb.lora.z], counts, losses)
        assert "training_step" not in model.__dict__  # the wrapper is gone after fit
    assert not [w for w in recwarn if "cuda_graph" in str(w.message)], [str(w.message) for w in recwarn]
    assert res[True][1] == {"captures": 2, "replays": 6, "step_captures": 1, "step_replays": 6}  # 2 layers
    assert all(torch.equal(a, b) for a, b in zip(res[False][0], res[True][0]))
    assert len(res[False][2]) == 6 and res[True][2] == res[False][2]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_population_factors_in_one_launch_equal_per_tensor_streams():
    """On CUDA a step's low-rank factors and small dense z come from one multi-tensor launch per seed; they equal the
    per-tensor Philox streams (what a cache miss and the update regenerate)."""
    from lightning_memopt.mezo.core import make_params
    from lightning_memopt.mezo.population import Directions

    params = make_params(tiny_model().model.to("cuda"))
    d = Directions(params, 1e-3, "lowrank", 4)
    seeds = [11, 12345]
    d.retain(seeds)
    for s in seeds:
        for zp in params:
            i = zp.index
            if not d.cached(s, i):
                continue
            got = d.uv(s, i) if d.lowrank(i) else (d.z(s, i),)
            flat = d._stream(s, i, d._numel(i))
            assert torch.equal(torch.cat([t.reshape(-1) for t in got]), flat), zp.name


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_axpby_many_kernel_equals_the_torch_version():
    """One launch for tensors of one shape (the population update's) gives what the torch version gives, bit for
    bit, and leaves every tensor as it was where the step is skipped."""
    from lightning_memopt.core import axpby

    torch.manual_seed(0)
    ds = [torch.randn(37, 129, device="cuda").to(torch.bfloat16) for _ in range(3)]
    u = torch.randn(3, 37, 129, device="cuda")
    want = [d.clone() for d in ds]
    for d, ui in zip(want, u):
        old = d.float()
        d.copy_(old * 0.999 + (-1e-3) * ui)
    axpby.axpby_many_(ds, u, -1e-3, 0.999)
    for d, w in zip(ds, want):
        assert torch.equal(d, w)
    before = [d.clone() for d in ds]
    axpby.axpby_many_(ds, u, -1e-3, 0.999, ok=torch.zeros((), dtype=torch.bool, device="cuda"))
    assert all(torch.equal(d, b) for d, b in zip(ds, before))


@pytest.mark.parametrize("clamp", [None, 0.5])
def test_axpby_kernel_leaves_out_non_finite_elements_as_the_torch_version(clamp):
    """LOMO's update with a tensor flag: the kernel leaves out NaN and inf elements (NaN also through the clamp,
    which a plain min/max would turn into the bound on the GPU), flags the tensor, and otherwise computes the torch
    version's numbers."""
    from lightning_memopt.core import axpby

    torch.manual_seed(0)
    d0 = torch.randn(5000, device="cuda").to(torch.bfloat16)
    u = torch.randn(5000, device="cuda")
    u[7], u[4000], u[10] = math.nan, math.inf, -math.inf
    d, flag = d0.clone(), torch.ones((), dtype=torch.int32, device="cuda")
    axpby.axpby_(d, u, -0.1, 0.99, None, clamp, finite=flag)
    ref, ref_flag = d0.cpu(), torch.ones((), dtype=torch.int32)
    axpby.axpby_(ref, u.cpu(), -0.1, 0.99, None, clamp, finite=ref_flag)  # the torch version
    assert int(flag) == int(ref_flag) == 0
    left_out = [7] if clamp is not None else [7, 4000, 10]
    assert all(torch.equal(d[i], d0[i]) for i in left_out)
    assert torch.isfinite(d).all()
    torch.testing.assert_close(d.cpu().float(), ref.float(), rtol=2**-7, atol=0)  # CPU and GPU: one bf16 ulp
    flag.fill_(1)
    axpby.axpby_(d, torch.randn(5000, device="cuda"), -0.1, 0.99, None, clamp, finite=flag)
    assert int(flag) == 1


def test_population_mezo_cuda_graph_equals_eager(recwarn):
    """The population estimator (low-rank, batched through per_sample_loss) replayed from a graph: the factors come
    from the device seeds inside the replay and the update reads them; the weights equal the eager path's."""
    kw = dict(n_spsa=4, perturbation="lowrank", perturbation_rank=2, batched=True, population_chunk=4)
    eager, _, _ = _mezo_fit(False, "32-true", **kw)
    graphed, _, _ = _mezo_fit(True, "32-true", **kw)
    assert not [w for w in recwarn if "cuda_graph" in str(w.message)], [str(w.message) for w in recwarn]
    for n in eager:
        assert torch.equal(eager[n], graphed[n]), n


def test_best_weights_with_graphed_mezo_on_cuda():
    """BestWeights' pinned, non-blocking copies on a GPU: fit ends at the weights the best validation saw, while the
    graphed MeZO step kept writing the same storage in place."""
    from lightning_memopt import BestWeights
    from lightning_memopt.testing.tiny import full_state
    from lightning_memopt.testing.workers import ScriptedScore

    pl.seed_everything(0)
    model = tiny_model()
    probe = ScriptedScore([0.2, 0.8, 0.1, 0.3])
    best = BestWeights(monitor="score")
    trainer = tiny_trainer(accelerator="cuda", max_steps=12, val_check_interval=3, limit_val_batches=1,
                           callbacks=[MeZO(lr=1e-3, eps=1e-2, cuda_graph=True, seed=3), probe, best])
    trainer.fit(model, tiny_datamodule(batch_size=8, padding="max_length"))
    assert best.best_step == 6 and all(w.is_pinned() for w in best.best_weights.values())
    final = full_state(model)
    assert all(torch.equal(probe.seen[6][n], final[n]) for n in final)
    assert not all(torch.equal(probe.seen[12][n], final[n]) for n in final)


def test_ema_weight_averaging_with_graphed_mezo_on_cuda():
    """Lightning's EMAWeightAveraging beside the graphed population step: the average is copied in and out of the
    storage the graphs read (never rebound), and the fit ends on it."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from lightning_memopt.testing.tiny import full_state

    pl.seed_everything(0)
    model = tiny_model()
    ema = EMAWeightAveraging(decay=0.5)
    zo = MeZO(lr=1e-3, eps=1e-2, cuda_graph=True, seed=3, n_spsa=4, perturbation="lowrank", batched=True,
              one_sided=True)
    replays = []

    class Peek(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            replays.append(zo._graph.replays)

    trainer = tiny_trainer(accelerator="cuda", max_steps=8, val_check_interval=4, limit_val_batches=1,
                           callbacks=[zo, ema, Peek()])
    trainer.fit(model, tiny_datamodule(batch_size=8, padding="max_length"))
    assert trainer.global_step == 8 and replays == [8]
    final, average = full_state(model), full_state(ema._average_model.module)
    assert all(torch.equal(final[n], average[n].to(final[n].device)) for n in final)


GRAPHED_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*_smollm2_*.yaml")
                         if "cuda_graph: true" in p.read_text())


@pytest.mark.parametrize("config", GRAPHED_CONFIGS)
def test_graphed_task_configs_capture_on_the_tiny_model(config, tmp_path, in_repo, monkeypatch, recwarn):
    """Each shipped config with ``cuda_graph: true`` (its data, padding, objective and precision; the tiny model):
    4 steps on the GPU capture and replay graphs, with no fallback to the eager step."""
    from conftest import MRPC, SQUAD, SST2
    from test_cli import TINY_MODEL, short

    from lightning_memopt.cli import run_cli
    from lightning_memopt.core import graphs

    needs = {"sst2": SST2 / "train.tsv", "mrpc": MRPC / "train.tsv", "squad": SQUAD}[config.split("_")[0]]
    if not needs.is_file():
        pytest.skip(f"{needs} not found")
    made: list[graphs.GraphReplay] = []
    init = graphs.GraphReplay.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(graphs.GraphReplay, "__init__", record)
    precision = yaml.safe_load((ROOT / "configs" / config).read_text())["trainer"]["precision"]  # TINY_MODEL's is fp32
    cli = run_cli(["fit", "--config", f"configs/{config}", *TINY_MODEL, *short(tmp_path, steps=4),
                   "--trainer.accelerator=cuda", f"--trainer.precision={precision}"])
    assert cli.trainer.global_step == 4
    fallbacks = [str(w.message) for w in recwarn if "cuda_graph" in str(w.message)]
    assert not fallbacks, fallbacks  # the fallback's own text (the reason), not every warning of the run
    assert made and sum(g.captures for g in made) >= 1 and sum(g.replays for g in made) >= 4, [
        (g.captures, g.replays) for g in made]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_adalomo_triton_kernels_equal_the_torch_version(monkeypatch):
    """AdaLomo's compiled kernels against its torch version in the same FusedStep runs (tests/_adalomo_check.py):
    fp32 within 1e-6 with clipping by norm and by value and a skipped step, bf16 within one ulp after a step."""
    from _adalomo_check import check

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert check("cuda") == []


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("n", [64, 192])
def test_left_padded_training_forward_gives_the_math_backends_gradient(n, checkpointing, capsys):
    """A left-padded batch of length 64 (mod 128) gets cuDNN attention's NaN query gradient on torch >= 2.11 on
    Hopper (models/attention.py); HFCausalLM's forward gives finite gradients equal to the math backend's, also when
    activation checkpointing recomputes the forward during backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lightning_memopt.models.configs import llama_config
    from lightning_memopt.models.hf import HFCausalLM, position_ids_from_mask

    torch.manual_seed(0)
    cfg = llama_config("tiny", vocab_size=256, hidden_size=128, num_attention_heads=2, num_key_value_heads=2)
    model = HFCausalLM(model_config=cfg, tokenizer="builtin", gradient_checkpointing=checkpointing).cuda()
    model.set_label_token_ids([5, 6])
    ids = torch.randint(8, 200, (8, n), device="cuda")
    mask = torch.ones_like(ids)
    for r in range(0, 8, 2):
        mask[r, : n - 5 - r] = 0  # left padding: fully masked query rows

    def grads(call):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            logits = call()
        torch.nn.functional.cross_entropy(logits.float(), torch.arange(8, device="cuda") % 2).backward()
        return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])

    ours = grads(lambda: model(ids, mask))
    with sdpa_kernel([SDPBackend.MATH]):
        ref = grads(lambda: model(ids, mask))

    def unguarded():
        with model._label_only():
            out = model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                              use_cache=False, logits_to_keep=1)
        return out.logits[:, -1, :]

    bare = grads(unguarded)
    with capsys.disabled():
        print(f"\nlength {n} (checkpointing {checkpointing}): the default backend's gradient is finite: "
              f"{bool(torch.isfinite(bare).all())}")
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
