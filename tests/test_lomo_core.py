"""LOMO/AdaLomo core (no Lightning): update rules against references, clipping, hooks, fp16 loss scaling."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_memopt.core.nonfinite import SkipGuard
from lightning_memopt.lomo.core import DynamicLossScaler, FusedStep, LomoSettings


def tiny_llama(dtype: torch.dtype = torch.float32, **kw) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **kw,
    )
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).to(dtype)


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (4, 12), generator=g) for _ in range(n)]


def loss_of(model, x):
    return model(input_ids=x, labels=x).loss


def groups_of(model, lr: float, wd: float) -> list[dict]:
    mats = [p for p in model.parameters() if p.ndim >= 2]
    vecs = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": mats, "lr": lr, "weight_decay": wd}, {"params": vecs, "lr": lr, "weight_decay": 0.0}]


@torch.no_grad()
def rel(a, b) -> float:
    pa, pb = list(a.parameters()), list(b.parameters())
    num = sum((p - q).double().pow(2).sum() for p, q in zip(pa, pb)).sqrt()
    return float(num / sum(q.double().pow(2).sum() for q in pb).sqrt())


def moved(a, init) -> float:
    return rel(a, init)


def test_lomo_follows_torch_sgd_with_weight_decay():
    model = tiny_llama()
    ref, init = copy.deepcopy(model), copy.deepcopy(model)
    fs = FusedStep(groups_of(model, 0.1, 0.05), {}, LomoSettings(rule="sgd"))
    opt = torch.optim.SGD([{k: v for k, v in g.items()} for g in groups_of(ref, 0.1, 0.05)], lr=0.1)
    for x in batches(6):
        fs.step(loss_of(model, x))
        loss_of(ref, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert moved(model, init) > 1e-3
    assert rel(model, ref) <= 1e-6


@pytest.mark.parametrize("max_norm,tied", [(0.05, False), (100.0, False), (0.05, True)])
def test_two_pass_clipping_equals_sgd_with_clip_grad_norm(max_norm, tied):
    # tied: the embedding's hook fires once, after both contributions are accumulated, so the norm is exact
    model = tiny_llama(tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ref = copy.deepcopy(model)
    fs = FusedStep(groups_of(model, 0.1, 0.0), {}, LomoSettings(rule="sgd", clip_grad_norm=max_norm))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x in batches(4):
        info = fs.step(loss_of(model, x))
        loss_of(ref, x).backward()
        total = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(info.grad_norm, total, rtol=1e-5, atol=0)
        assert (float(total) > max_norm) == (max_norm < 1)  # the small bound really clips, the large one never
    assert rel(model, ref) <= 1e-6


def test_clip_by_value_equals_sgd_with_clip_grad_value():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    fs = FusedStep(groups_of(model, 0.1, 0.0), {}, LomoSettings(rule="sgd", clip_grad_value=1e-3))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x in batches(3):
        fs.step(loss_of(model, x))
        loss_of(ref, x).backward()
        assert max(float(p.grad.abs().max()) for p in ref.parameters()) > 1e-3
        torch.nn.utils.clip_grad_value_(ref.parameters(), 1e-3)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert rel(model, ref) <= 1e-6


@pytest.fixture
def lomo_optim_on_cpu(monkeypatch):
    """lomo-optim's AdaLomo allocates its moments with ``.cuda()``; on CPU make that a no-op."""
    pytest.importorskip("lomo_optim")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    from lomo_optim import AdaLomo

    return AdaLomo


@pytest.mark.parametrize("clip", [None, 0.5])
def test_adalomo_matches_lomo_optim(lomo_optim_on_cpu, clip):
    model = tiny_llama()
    ref, init = copy.deepcopy(model), copy.deepcopy(model)
    state: dict = {}
    fs = FusedStep(
        [{"params": list(model.parameters()), "lr": 0.02, "weight_decay": 0.1}],
        state,
        LomoSettings(rule="adalomo", clip_grad_norm=clip),
    )
    opt = lomo_optim_on_cpu(ref, lr=0.02, loss_scale=None, weight_decay=0.1, clip_grad_norm=clip)
    for x in batches(6):
        fs.step(loss_of(model, x))
        if clip is not None:
            opt.grad_norm(loss_of(ref, x))
        opt.fused_backward(loss_of(ref, x), 0.02)
    assert moved(model, init) > 1e-3
    assert rel(model, ref) <= 1e-5
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in state.items():
        n = names[id(p)]
        assert st["step"] == 6
        if p.ndim == 2:
            torch.testing.assert_close(st["row"], opt.exp_avg_sq_row[n], rtol=1e-4, atol=1e-12)
            torch.testing.assert_close(st["col"], opt.exp_avg_sq_col[n], rtol=1e-4, atol=1e-12)
        else:
            torch.testing.assert_close(st["sq"], opt.exp_avg_sq[n], rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("rule,clip,tied", [("sgd", None, False), ("sgd", 0.1, False), ("adalomo", None, True)])
def test_no_gradient_survives_its_hook(rule, clip, tied):
    model = tiny_llama(tie_word_embeddings=tied)
    params = list(model.parameters())
    fs = FusedStep(groups_of(model, 0.01, 0.0), {}, LomoSettings(rule=rule, clip_grad_norm=clip))
    live: list[int] = []
    calls: list[int] = []
    for attr in ("update", "measure"):
        inner = getattr(fs.fused, attr)

        def wrapped(p, inner=inner):
            live.append(sum(q.grad is not None for q in params))
            calls.append(id(p))
            inner(p)

        setattr(fs.fused, attr, wrapped)
    for x in batches(2):
        calls.clear()
        fs.step(loss_of(model, x))
        assert all(p.grad is None for p in params)
        passes = 2 if clip else 1
        assert sorted(calls) == sorted([id(p) for p in params] * passes)  # each hook fires once per pass
    assert max(live) == 1  # only the gradient being applied is ever alive


@pytest.mark.parametrize("clip", [None, 0.1])
def test_hf_activation_checkpointing_gives_the_same_step(clip):
    model = tiny_llama()
    ref = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ref.train()
    fs = FusedStep(groups_of(model, 0.1, 0.0), {}, LomoSettings(rule="sgd", clip_grad_norm=clip))
    fr = FusedStep(groups_of(ref, 0.1, 0.0), {}, LomoSettings(rule="sgd", clip_grad_norm=clip))
    for x in batches(3):
        fs.step(loss_of(model, x))
        fr.step(loss_of(ref, x))
    assert all(p.grad is None for p in model.parameters())
    assert rel(model, ref) <= 1e-6


def test_fp16_overflow_skips_step_and_lowers_scale():
    model = tiny_llama(torch.float16)
    before = copy.deepcopy(model)
    scaler = DynamicLossScaler(init_scale=2.0**40)  # fp16 gradients overflow at this scale
    fs = FusedStep(groups_of(model, 0.1, 0.0), {}, LomoSettings(rule="sgd"), scaler=scaler)
    x = batches(1)[0]
    info = fs.step(loss_of(model, x))
    assert info.skipped and info.loss_scale == 2.0**40
    assert scaler.scale == 2.0**39
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))
    assert all(p.grad is None for p in model.parameters())
    for _ in range(40):  # the scale keeps dropping until a step fits, then the weights move
        info = fs.step(loss_of(model, x))
        if not info.skipped:
            break
    assert not info.skipped and scaler.scale < 2.0**39
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_overflow_at_the_lowest_scale_is_named_and_counts_toward_the_error():
    model = tiny_llama(torch.float16)
    notes = []
    guard = SkipGuard("LOMO", max_consecutive=1, notify=notes.append)
    scaler = DynamicLossScaler(init_scale=2.0**40, min_scale=2.0**39)
    fs = FusedStep(groups_of(model, 0.1, 0.0), {}, LomoSettings(rule="sgd"), scaler=scaler, guard=guard)
    x = batches(1)[0]
    fs.step(loss_of(model, x))  # 2**40 overflows, and the scale can still go down: no warning
    assert notes == [] and guard.consecutive == 0
    fs.step(loss_of(model, x), step=1)  # 2**39, the lowest: overflowing there is a warning, named as such
    assert len(notes) == 1 and "fp16 overflow" in notes[0] and "non-finite loss" not in notes[0]
    assert guard.consecutive == 1


def test_fp16_non_finite_loss_is_warned_and_keeps_the_scale():
    # a NaN from the forward (bad batch, diverged model) is no overflow: no lower scale helps, and it counts at once
    model = tiny_llama(torch.float16)
    notes = []
    guard = SkipGuard("LOMO", max_consecutive=3, notify=notes.append)
    scaler = DynamicLossScaler(init_scale=2.0**8)
    fs = FusedStep(groups_of(model, 0.1, 0.0), {}, LomoSettings(rule="sgd"), scaler=scaler, guard=guard)
    x = batches(1)[0]
    info = fs.step(loss_of(model, x) * float("nan"), step=0)
    assert info.skipped and not info.overflow and scaler.scale == 2.0**8
    assert len(notes) == 1 and "non-finite loss at step 0" in notes[0] and guard.consecutive == 1


def test_fp16_scaled_step_equals_unscaled_update():
    """A finite scaled step applies the same update as fp32 maths on the unscaled gradient."""
    model = tiny_llama(torch.float16)
    ref = copy.deepcopy(model)
    x = batches(1)[0]
    FusedStep(groups_of(model, 0.1, 0.0), {}, LomoSettings(rule="sgd"), scaler=DynamicLossScaler(init_scale=2.0**8)).step(
        loss_of(model, x)
    )
    loss_of(ref, x).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(p.grad, alpha=-0.1)
    assert rel(model, ref) <= 2e-3  # fp16 rounding of the grads at a different scale


def test_loss_scaler_growth_and_floor():
    s = DynamicLossScaler(init_scale=4.0, growth_interval=2, min_scale=1.0)
    s.update(False)
    assert s.scale == 4.0
    s.update(False)
    assert s.scale == 8.0
    for _ in range(5):
        s.update(True)
    assert s.scale == 1.0
    s2 = DynamicLossScaler()
    s2.load_state_dict(s.state_dict())
    assert (s2.scale, s2.good_steps) == (s.scale, s.good_steps)


def test_adalomo_bf16_keeps_fp32_moments_and_remove_restores_plain_backward():
    model = tiny_llama(torch.bfloat16)
    state: dict = {}
    fs = FusedStep(groups_of(model, 0.01, 0.0), state, LomoSettings(rule="adalomo"))
    fs.step(loss_of(model, batches(1)[0]))
    assert state and all(v.dtype == torch.float32 for st in state.values() for k, v in st.items() if k != "step")
    fs.remove()
    loss_of(model, batches(1)[0]).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_invalid_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="rule"):
        LomoSettings(rule="adam")
    with pytest.raises(ValueError, match="clip_grad_norm"):
        LomoSettings(clip_grad_norm=0.0)
    with pytest.raises(ValueError, match="clip_grad_value"):
        LomoSettings(clip_grad_value=-1.0)


_RUNTIME_LOOP_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def k(x_ptr, n):
    acc = tl.zeros([4], dtype=tl.float32)
    for i in range(0, n):
        acc += tl.load(x_ptr + i * 4 + tl.arange(0, 4))
    tl.store(x_ptr + tl.arange(0, 4), acc)
x = torch.ones(12)
k[(1,)](x, 3)
assert x[:4].tolist() == [3.0] * 4
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (GPU wheels)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, tests/test_gpu.py runs the compiled kernels")
def test_adalomo_triton_kernels_equal_the_torch_version_interpreted():
    """AdaLomo's Triton kernels under Triton's interpreter against the torch version (tests/_adalomo_check.py):
    fp32 steps with clipping by norm and by value, a skipped step, a tall lone matrix, fp16 unscaling."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    probe = subprocess.run([sys.executable, "-c", _RUNTIME_LOOP_PROBE], env=env, capture_output=True, timeout=120)
    if probe.returncode != 0:  # Triton 3.6's interpreter under numpy 2; the GPU runs them compiled (tests/test_gpu.py)
        pytest.skip("this Triton's interpreter cannot run a loop with runtime bounds, as the kernels have")
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("_adalomo_check.py"))], capture_output=True,
                       text=True, timeout=900, check=False, env=env)
    assert r.stdout.strip().endswith("ALL_OK"), r.stdout[-3000:] + r.stderr[-3000:]


_AXPBY_NONFINITE = """
import torch
from lightning_memopt.core import _axpby_triton as K
from lightning_memopt.core.axpby import axpby_
torch.manual_seed(0)
for clamp in (None, 0.5):
    for ok in (None, torch.tensor(True), torch.tensor(False)):
        d = torch.randn(5000)
        u = torch.randn(5000)
        u[7], u[4000], u[10] = float("nan"), float("inf"), -float("inf")
        got, want = d.clone(), d.clone()
        f_got, f_want = torch.ones((), dtype=torch.int32), torch.ones((), dtype=torch.int32)
        K.axpby_(got, u, -0.1, 0.99, ok, clamp, f_got)  # the kernel, interpreted
        axpby_(want, u, -0.1, 0.99, ok, clamp, finite=f_want)  # the torch version (CPU tensors)
        assert int(f_got) == int(f_want) == 0 and torch.equal(got, want), (clamp, ok)
        clean = torch.ones((), dtype=torch.int32)
        K.axpby_(d.clone(), torch.randn(5000), -0.1, 0.99, ok, clamp, clean)
        assert int(clean) == 1
print("AXPBY_OK")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (GPU wheels)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, tests/test_gpu.py runs the compiled kernel")
def test_axpby_kernel_leaves_out_non_finite_elements_as_the_torch_version_interpreted():
    """LOMO's update kernel with a tensor flag, under Triton's interpreter, against the torch version (fp32)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _AXPBY_NONFINITE], capture_output=True, text=True, timeout=300,
                       check=False, env=env)
    assert r.stdout.strip().endswith("AXPBY_OK"), r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (GPU wheels)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, tests/test_gpu.py runs the compiled kernels")
def test_the_update_kernels_compile_for_hopper_without_a_gpu():
    """tests/_triton_aot_check.py: LOMO's and AdaLomo's kernels, every flag combination, compiled for sm_90 by
    Triton's own ptxas; value clipping keeps NaN in the PTX."""
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("_triton_aot_check.py"))], capture_output=True,
                       text=True, timeout=900, check=False)
    assert r.stdout.strip().endswith("AOT_OK"), r.stdout[-3000:] + r.stderr[-3000:]

def _poison(p: torch.Tensor, at: dict, step: int, rows: slice = slice(None)) -> None:
    """``p``'s gradient is NaN in ``rows`` at ``step`` (a backward kernel's bug under a finite loss)."""

    def hook(g):
        if at["step"] != step:
            return g
        g = g.clone()
        g[rows] = float("nan")
        return g

    p.register_hook(hook)


def test_lomo_leaves_out_the_non_finite_elements_of_a_gradient_and_says_which_tensor():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    w = model.model.layers[1].mlp.up_proj.weight
    at = {"step": -1}
    _poison(w, at, 1, rows=slice(0, 3))
    msgs = []
    fs = FusedStep(groups_of(model, 0.05, 0.1), {}, LomoSettings(rule="sgd"), names={id(w): "up"})
    fs.guard.notify = msgs.append
    ref_opt = torch.optim.SGD(groups_of(ref, 0.05, 0.1), lr=0.05)
    for i, x in enumerate(batches(3)):
        at["step"] = i
        before = w.detach().clone()
        fs.step(loss_of(model, x), step=i)
        ref_opt.zero_grad()
        loss_of(ref, x).backward()
        ref_w = ref.model.layers[1].mlp.up_proj.weight
        kept = ref_w.detach()[:3].clone()
        ref_opt.step()
        if i == 1:  # the rows whose gradient was NaN stay as they were (no decay either); the rest take SGD's step
            ref_w.data[:3] = kept
            assert torch.equal(w[:3], before[:3]) and not torch.equal(w[3:], before[3:])
        assert rel(model, ref) < 1e-6, i
    fs.guard.resolve()
    assert (fs.guard.skipped_steps, fs.guard.partial_steps, fs.guard.skipped_tensors) == (0, 1, 1)
    assert msgs == [("LOMO: non-finite gradient at step 1 in 1 of 21 tensors (up first) under a finite loss; their "
                     "non-finite elements were not applied, the rest were. partial_steps=1.")]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_adalomo_leaves_out_a_tensor_whose_gradient_is_not_finite_with_its_moments_and_step():
    """AdaLomo's update of a tensor depends on that tensor's gradient only: the others step as in a clean run."""
    os.environ["MEMOPT_ADALOMO"] = "torch"  # the Triton kernels: tests/_adalomo_check.py (GPU, or interpreted)
    try:
        runs = []
        for poisoned in (False, True):
            model = tiny_llama()
            w = model.model.layers[0].self_attn.k_proj.weight
            at = {"step": -1}
            if poisoned:
                _poison(w, at, 1, rows=slice(5, 6))
            state: dict = {}
            fs = FusedStep(groups_of(model, 0.01, 0.1), state, LomoSettings(rule="adalomo"))
            fs.guard.notify = lambda msg: None
            snaps = []
            for i, x in enumerate(batches(3)):
                at["step"] = i
                snaps.append((w.detach().clone(), {k: v.clone() for k, v in state[w].items() if k != "step"}
                              if state.get(w) else None))
                fs.step(loss_of(model, x), step=i)
                if i == 1:
                    after_1 = {n: p.detach().clone() for n, p in model.named_parameters()}
            fs.guard.resolve()
            runs.append((after_1, w, state, fs.guard, snaps))
        (clean, _, _, _, _), (after_1, w, state, guard, snaps) = runs
        assert (guard.partial_steps, guard.skipped_tensors) == (1, 1)
        assert state[w]["step"] == 2  # three steps, one left out: its count was put back
        after = {k: v for k, v in state[w].items() if k != "step"}
        # step 1 left w and its moments as step 0 made them; step 2 moved them on
        w1 = snaps[2][0]
        assert torch.equal(w1, snaps[1][0]) and all(torch.equal(snaps[2][1][k], snaps[1][1][k]) for k in after)
        assert not torch.equal(w, w1) and all(torch.isfinite(v).all() for v in after.values())
        # after step 1, every other tensor is where the clean run put it
        assert [n for n in clean if not torch.equal(clean[n], after_1[n])] == ["model.layers.0.self_attn.k_proj.weight"]
    finally:
        os.environ.pop("MEMOPT_ADALOMO", None)


def test_a_skipped_step_is_not_also_counted_as_partial():
    """A NaN loss skips every tensor already; its per-tensor flags (all 0 too) do not count again."""
    model = tiny_llama()
    fs = FusedStep(groups_of(model, 0.05, 0.0), {}, LomoSettings(rule="sgd"))
    fs.guard.notify = lambda msg: None
    x = batches(1)[0]
    fs.step(loss_of(model, x) * float("nan"), step=0)
    fs.step(loss_of(model, x), step=1)
    fs.guard.resolve()
    assert (fs.guard.skipped_steps, fs.guard.partial_steps, fs.guard.consecutive) == (1, 0, 0)
    state = fs.guard.state_dict()
    fs.guard.load_state_dict({})
    fs.guard.load_state_dict(state)
    assert fs.guard.state_dict() == state == {"skipped_steps": 1, "consecutive": 0, "partial_steps": 0,
                                              "skipped_tensors": 0}


def test_the_guard_learns_of_left_out_tensors_only_once_their_flags_arrived():
    """resolve(wait=False) (after each batch) must not block on a step's per-tensor flags, copied after backward:
    the step stays pending until their event completed (a stand-in event here; CUDA events on a GPU)."""
    from lightning_memopt.core.nonfinite import SkipGuard, TensorFlags

    class Event:
        done = False

        def query(self):
            return self.done

        def synchronize(self):
            assert self.done, "resolve(wait=False) blocked"

    guard = SkipGuard("LOMO", notify=lambda msg: None)
    flags = TensorFlags(["a", "b", "c"])
    flags.begin(torch.device("cpu"))
    guard.check(torch.tensor(1.0), step=4)
    flags.slot(1).zero_()
    guard.attach(flags, None, "left out")
    event = guard._pending[-1].tensors.event = Event()
    assert guard.resolve(wait=False) == [] and guard.partial_steps == 0 and len(guard._pending) == 1
    event.done = True
    guard.resolve(wait=False)
    assert (guard.partial_steps, guard.skipped_tensors, guard.consecutive, len(guard._pending)) == (1, 1, 1, 0)
    with pytest.raises(RuntimeError, match="needs its step's check"):
        guard.attach(flags, None, "left out")  # its step was resolved already


def test_a_step_waits_for_earlier_flags_only_where_it_has_state_to_put_back():
    """resolve(lazy=True) (FusedStep's, at each step) blocks on an earlier step's per-tensor flags only where that
    step registered host state to put back (AdaLomo's counts); LOMO's flags only count, and wait their turn."""
    from lightning_memopt.core.nonfinite import SkipGuard, TensorFlags

    class Event:
        def __init__(self):
            self.done, self.waited = False, False

        def query(self):
            return self.done

        def synchronize(self):
            self.waited = self.done = True

    for undo in (None, lambda bad: None):
        guard = SkipGuard("LOMO", notify=lambda msg: None)
        flags = TensorFlags(["a", "b"])
        flags.begin(torch.device("cpu"))
        guard.check(torch.tensor(1.0), step=0)
        flags.slot(0).zero_()
        guard.attach(flags, undo, "left out")
        event = guard._pending[-1].tensors.event = Event()
        guard.resolve(lazy=True)
        assert event.waited == (undo is not None) and guard.partial_steps == int(undo is not None)
        guard.resolve()  # at a checkpoint or the fit's end: everything, waiting
        assert guard.partial_steps == 1 and not guard._pending
