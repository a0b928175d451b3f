"""AdaLomo's Triton kernels against its torch version, in the same FusedStep runs.

Run on a GPU (tests/test_gpu.py calls :func:`check` with ``"cuda"``) or on the CPU under ``TRITON_INTERPRET=1``
(tests/test_lomo_core.py runs ``python tests/_adalomo_check.py`` so). Prints ALL_OK when every case agrees.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_memopt.core._triton import kernels
from lightning_memopt.lomo.core import _ADALOMO_KERNELS, FusedStep, LomoSettings

MODULE = "lightning_memopt.lomo._adalomo_triton"


def _llama(device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    # vocab 300 and intermediate 160: matrices of several row tiles and two column blocks, vectors of 40
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=40, intermediate_size=160, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def _fit(fused: bool, device: str, dtype: torch.dtype, nan_step: int | None = None, steps: int = 4,
         nan_grad_step: int | None = None, **settings):
    """``nan_step``: that step's loss is NaN; ``nan_grad_step``: that step's gradient of one matrix and one vector
    is NaN under a finite loss (the step must leave out those two tensors only)."""
    os.environ["MEMOPT_ADALOMO"] = "auto" if fused else "torch"
    model = _llama(device, dtype)
    at = {"step": -1}
    bad = [model.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].input_layernorm.weight]
    for b in bad:
        b.register_hook(lambda g: g * float("nan") if at["step"] == nan_grad_step else g)
    mats = [p for p in model.parameters() if p.ndim == 2]
    vecs = [p for p in model.parameters() if p.ndim == 1]
    state: dict = {}
    groups = [{"params": mats, "lr": 0.02, "weight_decay": 0.1}, {"params": vecs, "lr": 0.02, "weight_decay": 0.0}]
    fs = FusedStep(groups, state, LomoSettings(rule="adalomo", **settings))
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        at["step"] = i
        x = torch.randint(0, 300, (2, 10), generator=gen).to(device)
        loss = model(input_ids=x, labels=x).loss
        before = [b.detach().clone() for b in bad]
        fs.step(loss * float("nan") if i == nan_step else loss)
        if i == nan_grad_step:
            assert all(torch.equal(b, c) for b, c in zip(bad, before)), "a tensor with a NaN gradient was updated"
    fs.remove()
    fs.guard.resolve()
    if nan_grad_step is not None:
        assert (fs.guard.partial_steps, fs.guard.skipped_tensors) == (1, 2), vars(fs.guard)
        assert [st["step"] for p, st in state.items() if any(p is b for b in bad)] == [steps - 1] * 2
    return [p.detach().float().cpu() for p in model.parameters()], [
        {k: v.cpu() for k, v in st.items() if k != "step"} for st in state.values()]


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum((x - y).double().pow(2).sum() for x, y in zip(a, b)).sqrt()
    return float(num / sum(y.double().pow(2).sum() for y in b).sqrt())


def _matrix(device: str, rows: int, cols: int) -> list[str]:
    """A lone weight of ``rows`` x ``cols`` (more rows than one moment block, several segments): both versions."""
    out = []
    for wd in (0.0, 0.1):
        res = []
        for fused in (False, True):
            os.environ["MEMOPT_ADALOMO"] = "auto" if fused else "torch"
            torch.manual_seed(3)
            w = torch.nn.Parameter(torch.randn(rows, cols, device=device) * 0.02)
            x = torch.randn(rows, cols, device=device)
            state: dict = {}
            fs = FusedStep([{"params": [w], "lr": 0.01, "weight_decay": wd}], state, LomoSettings(rule="adalomo"))
            for k in range(3):
                fs.step(((w * x).sum() + (w * w).sum() * (k + 1)) * 0.5)
            fs.remove()
            res.append((w.detach().cpu(), {n: v.cpu() for n, v in state[w].items() if n != "step"}))
        err = float((res[0][0] - res[1][0]).norm() / res[1][0].norm())
        if err > 1e-6 or not all(torch.allclose(res[0][1][n], res[1][1][n], rtol=1e-5, atol=0) for n in res[0][1]):
            out.append(f"{rows}x{cols} wd={wd}: weights differ by {err:.2e} or the moments differ")
    return out


def check(device: str) -> list[str]:
    """Every case's mismatch, as text (empty: all agree), and a line if the kernels never ran."""
    mod = kernels(MODULE)
    assert mod is not None, "the Triton kernels do not import"
    calls = {"matrix": 0, "vector": 0}
    mat, vec = mod.adalomo_matrix_, mod.adalomo_vector_

    def count(name, fn):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            calls[name] += 1  # after it returned: a kernel that raises makes FusedStep run the torch version
            return out
        return wrapped

    mod.adalomo_matrix_, mod.adalomo_vector_ = count("matrix", mat), count("vector", vec)
    bad: list[str] = []
    try:
        cases = {"plain": {}, "clip_grad_norm": {"clip_grad_norm": 0.5}, "clip_grad_value": {"clip_grad_value": 1e-3},
                 "skipped step": {"nan_step": 1}, "NaN gradient": {"nan_grad_step": 1},
                 "NaN gradient, clip_grad_value": {"nan_grad_step": 2, "clip_grad_value": 1e-3}}
        for name, kw in cases.items():
            ref, ref_state = _fit(False, device, torch.float32, **kw)
            got, got_state = _fit(True, device, torch.float32, **kw)
            # interpreted: weights within 3e-8, moments 3e-6 (small g² amplify the later steps' float differences)
            err = _rel(got, ref)
            same_moments = all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-12)
                               for a, b in zip(got_state, ref_state) for k in a)
            if err > 1e-6 or not same_moments:
                bad.append(f"fp32 {name}: weights differ by {err:.2e}, moments equal: {same_moments}")
        if os.environ.get("TRITON_INTERPRET") != "1":  # the interpreter truncates to bf16; GPUs round to nearest
            # one step (AdaLomo's first steps are sign-like, so later ones amplify any difference): the fp32 results
            # agree to rounding, so only an element rounded the other way may differ, by one bf16 ulp
            ref, _ = _fit(False, device, torch.bfloat16, steps=1)
            got, _ = _fit(True, device, torch.bfloat16, steps=1)
            ulps = max(float(((a - b).abs() / a.abs().clamp(min=1e-30)).max()) for a, b in zip(got, ref))
            frac = sum(int((a != b).sum()) for a, b in zip(got, ref)) / sum(a.numel() for a in ref)
            if ulps > 2.0**-7 or frac > 0.01:
                bad.append(f"bf16: {frac:.2%} of the weights differ, by up to {ulps:.2e} relative")
        bad += _matrix(device, 1100, 70)
        # gscale (fp16 unscaling) acts on the gradient as it is read: 2·g read at 0.5 is g
        torch.manual_seed(5)
        d1 = torch.randn(40, 150, device=device)
        g = torch.randn(40, 150, device=device)
        d2, row1, col1 = d1.clone(), torch.rand(40, device=device), torch.rand(150, device=device)
        row2, col2 = row1.clone(), col1.clone()
        kw = dict(beta=0.9, eps0=1e-30, lr=0.01, wd=0.1, eps_scale=1e-3, clip_threshold=1.0)
        mat(d1, g, row1, col1, **kw)
        mat(d2, 2 * g, row2, col2, gscale=0.5, **kw)
        if not (torch.equal(d1, d2) and torch.equal(row1, row2) and torch.equal(col1, col2)):
            bad.append("gscale: 2g at 0.5 differs from g")
    finally:
        mod.adalomo_matrix_, mod.adalomo_vector_ = mat, vec
        os.environ.pop("MEMOPT_ADALOMO", None)
    if not (calls["matrix"] and calls["vector"]) or _ADALOMO_KERNELS["failed"]:
        bad.append(f"the kernels did not run: {calls}, failed once: {_ADALOMO_KERNELS['failed']}")
    return bad


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    problems = check("cuda" if torch.cuda.is_available() else "cpu")
    print("\n".join(problems) or "ALL_OK")
