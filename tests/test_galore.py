"""GaLore core (no Lightning): parity with galore-torch, refresh methods, moments policy, NaN, bf16, lazy refresh."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_memopt.core.holder import HolderOptimizer
from lightning_memopt.galore.optim import GaLoreOptimizer, GaLoreSettings, select_targets
from lightning_memopt.galore.projector import LEFT, RIGHT, compute_bases, randomized_right_basis, side_for, sketch
from lightning_memopt.testing import tiny_model


def _tiny():
    torch.manual_seed(0)
    m = tiny_model().model
    targets = select_targets(m)
    ids = {id(p) for p in targets}
    return m, targets, [p for p in m.parameters() if id(p) not in ids]


def _train(m, step, zero, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 256, (4, 16), generator=gen)
        m(input_ids=x, labels=x).loss.backward()
        step()
        zero()


def test_select_targets_all_linear_excludes_lm_head():
    m, targets, _ = _tiny()
    names = {id(p): n for n, p in m.named_parameters()}
    got = [names[id(p)] for p in targets]
    assert len(got) == 14 and all(n.endswith("proj.weight") for n in got)
    only_q = select_targets(m, r"q_proj$")
    assert [names[id(p)] for p in only_q] == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    ]


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_exact_svd_matches_galore_torch(wd):
    """refresh='svd', moments='keep', hf_adamw=True: galore-torch's GaLoreAdamW trajectory (12 steps, 3 refreshes)."""
    from galore_torch import GaLoreAdamW as Reference

    torch.set_num_threads(1)
    kw = {"rank": 8, "update_proj_gap": 4, "scale": 0.25, "proj_type": "std"}
    m, targets, rest = _tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = Reference(
            [{"params": rest}, dict(params=targets, **kw)],
            lr=1e-3,
            eps=1e-8,
            weight_decay=wd,
            no_deprecation_warning=True,
        )
    _train(m, ref.step, ref.zero_grad, 12)
    expected = {n: p.detach().clone() for n, p in m.named_parameters()}

    m, targets, rest = _tiny()
    holder = HolderOptimizer(torch.optim.AdamW([{"params": rest}, {"params": targets}], lr=1e-3, weight_decay=wd))
    galore = GaLoreOptimizer(holder, targets, GaLoreSettings(refresh="svd", moments="keep", hf_adamw=True, **kw))
    _train(m, galore.step, holder.zero_grad, 12)
    assert galore.refreshes == 14 * 3
    for n, p in m.named_parameters():
        torch.testing.assert_close(p, expected[n], atol=1e-5, rtol=0, msg=n)
    # and the galore params actually moved in a low-rank way: the update of a 64x64 weight has rank <= 3 refreshes*8
    assert not torch.equal(
        expected["model.layers.0.self_attn.q_proj.weight"], _tiny()[0].model.layers[0].self_attn.q_proj.weight
    )


def test_side_for_matches_galore_torch_conventions():
    assert side_for((128, 64), "std") == RIGHT and side_for((64, 128), "std") == LEFT
    assert side_for((128, 64), "reverse_std") == LEFT and side_for((64, 128), "reverse_std") == RIGHT
    assert side_for((64, 128), "right") == RIGHT and side_for((128, 64), "left") == LEFT
    with pytest.raises(ValueError, match="proj_type"):
        side_for((4, 4), "full")


def test_randomized_basis_finds_the_dominant_subspace():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(96, 96))
    v, _ = torch.linalg.qr(torch.randn(48, 48))
    s = torch.cat([torch.full((6,), 10.0), torch.linspace(0.1, 0.01, 42)])
    g = (u[:, :48] * s) @ v.T  # 96x48 with a clear rank-6 head
    for side, want in ((RIGHT, v[:, :6]), (LEFT, u[:, :6])):
        basis, ok = compute_bases([g, 2 * g], 6, side, "randomized", seeds=[1, 2], oversample=4)
        assert ok == [True, True]
        for b in basis:
            torch.testing.assert_close(b.T @ b, torch.eye(6), atol=1e-5, rtol=0)
            assert (want.T @ b).square().sum() / 6 > 0.999  # same subspace
        exact, _ = compute_bases([g], 6, side, "svd")
        assert (exact[0].T @ basis[0]).square().sum() / 6 > 0.999
        low, _ = compute_bases([g], 6, side, "svd_lowrank")
        assert (exact[0].T @ low[0]).square().sum() / 6 > 0.999


def test_row_sharded_sketch_equals_whole_matrix():
    """Summing the sketches over row blocks (what FSDP2's all-reduce does) gives the whole matrix's basis, and every
    block gets the identical basis."""
    torch.manual_seed(0)
    g = torch.randn(1, 40, 24)
    omega = sketch(24, 10, 3, torch.device("cpu"))[None]
    whole = randomized_right_basis(g, 6, omega)
    torch.testing.assert_close(_sharded_basis([g[:, :17], g[:, 17:]], omega, 6), whole, atol=1e-5, rtol=0)


def _sharded_basis(blocks, omega, rank):
    """randomized_right_basis on row blocks in lock-step, the reduce summing over blocks (a 2-rank all-reduce)."""
    import threading

    n = len(blocks)
    barrier = threading.Barrier(n)
    slots: list = [None] * n
    out: list = [None] * n

    def worker(i):
        def reduce(t):
            slots[i] = t
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            return total

        out[i] = randomized_right_basis(blocks[i], rank, omega, reduce=reduce)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(out[0], out[1], atol=0, rtol=0)
    return out[0]


def _one_param_setup(moments, shape=(12, 8), rank=3, **kw):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(*shape))
    holder = HolderOptimizer(torch.optim.AdamW([w], lr=1e-2, weight_decay=0.0))
    galore = GaLoreOptimizer(holder, [w], GaLoreSettings(rank=rank, update_proj_gap=2, moments=moments, **kw))
    return w, holder, galore


@pytest.mark.parametrize("side", ["right", "left"])
def test_reproject_is_invariant_to_a_rotated_basis_keep_is_not(side, monkeypatch):
    """If a refresh returns the same subspace in other coordinates (columns permuted, signs flipped), re-projected
    moments give exactly the update an unchanged basis gives; galore-torch's 'keep' does not."""
    import lightning_memopt.galore.optim as optim_mod

    torch.manual_seed(1)
    g = torch.randn(12, 8)
    real = optim_mod.compute_bases
    results = {}
    for moments in ("reproject", "keep", "unchanged"):
        w, holder, galore = _one_param_setup("keep" if moments == "unchanged" else moments, proj_type=side)
        if moments == "unchanged":
            galore.settings.update_proj_gap = 100
        for step in range(4):
            w.grad = g + 0.3 * step * torch.randn_like(g)
            if step == 2 and moments != "unchanged":
                old = holder.state[w]["proj"].clone()
                rotated = old[:, [2, 0, 1]] * torch.tensor([-1.0, 1.0, -1.0])
                monkeypatch.setattr(optim_mod, "compute_bases", lambda *a, r=rotated, **k: (r[None], [True]))
            galore.step()
            monkeypatch.setattr(optim_mod, "compute_bases", real)
            w.grad = None
        results[moments] = w.detach().clone()
    assert galore.refreshes == 1
    torch.testing.assert_close(results["reproject"], results["unchanged"], atol=1e-6, rtol=0)
    assert (results["keep"] - results["unchanged"]).abs().max() > 1e-4


def test_reset_zeroes_moments_and_bias_correction():
    w, holder, galore = _one_param_setup("reset")
    for _ in range(3):
        w.grad = torch.randn(12, 8)
        galore.step()
    st = holder.state[w]  # refreshed at n=2, then one more update
    assert float(st["step"]) == 1.0


def test_nan_gradient_skips_the_refresh_and_retries():
    w, holder, galore = _one_param_setup("reproject", rank=3)
    w.grad = torch.randn(12, 8)
    galore.step()
    proj = holder.state[w]["proj"].clone()
    w.grad = None
    galore.step()  # no grad: nothing happens
    w.grad = torch.randn(12, 8)
    galore.step()  # n=1 -> no refresh yet
    bad = torch.randn(12, 8)
    bad[3, 2] = float("nan")
    bad[0, 0] = float("inf")
    w.grad = bad
    galore.step()  # n=2: due, non-finite -> skipped, old basis kept
    st = holder.state[w]
    assert galore.skipped_refreshes == 1 and torch.equal(st["proj"], proj)
    assert st["next_refresh"] == st["n"]  # due again on the next step
    w.grad = torch.randn(12, 8)
    galore.step()  # retried and done
    assert galore.refreshes == 2 and not torch.equal(holder.state[w]["proj"], proj)
    assert holder.state[w]["next_refresh"] == holder.state[w]["n"] + 1  # refreshed one step ago, gap 2


def test_first_refresh_with_nan_still_gives_a_basis():
    w, holder, galore = _one_param_setup("reproject")
    w.grad = torch.full((12, 8), float("nan"))
    galore.step()
    st = holder.state[w]
    assert torch.isfinite(st["proj"]).all() and st["next_refresh"] == 1 and galore.skipped_refreshes == 1


@pytest.mark.parametrize("refresh", ["randomized", "svd"])
def test_bf16_gradients_factorised_in_fp32(refresh):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 24, dtype=torch.bfloat16))
    holder = HolderOptimizer(torch.optim.AdamW([w], lr=1e-2))
    galore = GaLoreOptimizer(holder, [w], GaLoreSettings(rank=4, update_proj_gap=1, refresh=refresh))
    before = w.detach().clone()
    for _ in range(3):
        w.grad = torch.randn(16, 24, dtype=torch.bfloat16)
        galore.step()
    st = holder.state[w]
    assert st["proj"].dtype == torch.bfloat16 and st["exp_avg"].dtype == torch.bfloat16
    p = st["proj"].float()
    torch.testing.assert_close(p.T @ p, torch.eye(4), atol=2e-2, rtol=0)
    assert torch.isfinite(w).all() and not torch.equal(w, before)


def test_lazy_refresh_doubles_the_gap_while_stable():
    w, holder, galore = _one_param_setup("reproject", rank=2, lazy_refresh=True, lazy_threshold=0.9, lazy_max_gap=8)
    g = torch.randn(12, 8)
    refresh_steps = []
    for step in range(24):
        before = galore.refreshes
        w.grad = g.clone()  # a constant gradient: its subspace never changes
        galore.step()
        if galore.refreshes > before:
            refresh_steps.append(step)
    assert refresh_steps == [0, 2, 6, 14, 22]  # gaps 2, 4, 8, 8 (capped at lazy_max_gap)

    w, holder, galore = _one_param_setup("reproject", rank=2, lazy_refresh=True, lazy_threshold=0.9)
    for step in range(7):
        w.grad = torch.randn(12, 8)  # unrelated directions: the gap stays at update_proj_gap
        galore.step()
    assert galore.refreshes == 4 and holder.state[w]["gap"] == 2


@pytest.mark.parametrize(("name", "gap"), [("adafactor", 4), ("adamw8bit", 100)])
def test_adafactor_and_8bit_match_galore_torch(name, gap, monkeypatch):
    """optimizer='adafactor' / 'adamw8bit' (moments 'keep', exact SVD) follow galore-torch's GaLoreAdafactor
    (relative_step=False, scale_parameter=False) and GaLoreAdamW8bit (bitsandbytes' blockwise kernel). The 8-bit
    case stays within one subspace: a 1e-8 difference can flip an SVD vector's sign, which 'keep' does not absorb."""
    import galore_torch

    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)  # galore-torch calls it on CPU too
    torch.set_num_threads(1)
    kw = {"rank": 8, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
    m, targets, rest = _tiny()
    groups = [{"params": rest}, {"params": targets, **kw}]
    if name == "adafactor":
        ref = galore_torch.GaLoreAdafactor(
            groups, lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=0.01
        )
    else:
        ref = galore_torch.GaLoreAdamW8bit(groups, lr=1e-3, eps=1e-8, weight_decay=0.01, min_8bit_size=0)
    _train(m, ref.step, ref.zero_grad, 8)
    expected = {n: p.detach().clone() for n, p in m.named_parameters()}

    m, targets, rest = _tiny()
    base = torch.optim.AdamW([{"params": rest}, {"params": targets}], lr=1e-3, eps=1e-8, weight_decay=0.01)
    holder = HolderOptimizer(base)
    galore = GaLoreOptimizer(holder, targets, GaLoreSettings(refresh="svd", moments="keep", optimizer=name, **kw))
    _train(m, galore.step, holder.zero_grad, 8)
    start = dict(_tiny()[0].named_parameters())
    moved = max((p - start[n]).abs().max().item() for n, p in m.named_parameters())
    assert moved > 5e-3
    atol = 1e-5
    if name == "adamw8bit":
        # Both sides run the same bitsandbytes kernel on the low-rank gradient, but that gradient differs in its last
        # float32 bits (matmul order, CPU kernels), and such a difference can round one moment to the neighbouring
        # 8-bit code. The widest step of bitsandbytes' signed dynamic map is 0.014 (of the block's absmax), so a flip
        # moves that element's Adam step by about 0.014 and the weight by lr·scale·0.014 = 3.5e-6 per step, spread
        # back over a row by the orthonormal projector. Allow 4 such flips on every one of the 8 steps: 1.1e-4 (seen:
        # 3.7e-5 with bitsandbytes 0.50.2 on a fresh install, 1.6e-6 on another machine), 45x below the 5e-3 that
        # `moved` must exceed.
        import bitsandbytes.functional as bnbf

        q = bnbf.create_dynamic_map(signed=True).sort().values
        atol = 4 * 8 * 1e-3 * kw["scale"] * float(q.diff().max())
    diffs = {n: (p - expected[n]).abs().max().item() for n, p in m.named_parameters()}
    worst = max(diffs, key=diffs.get)
    print(f"{name}: max |ours - galore-torch| {diffs[worst]:.3g} at {worst} (atol {atol:.3g}, moved {moved:.3g})")
    assert diffs[worst] <= atol, f"{name}: max diff {diffs[worst]:.3g} at {worst} > atol {atol:.3g}"


def test_rotating_moments_needs_adamw():
    w = torch.nn.Parameter(torch.randn(4, 4))
    holder = HolderOptimizer(torch.optim.AdamW([w]))
    with pytest.raises(ValueError, match="moments='keep'"):
        GaLoreOptimizer(holder, [w], GaLoreSettings(optimizer="adafactor", moments="reproject"))
    with pytest.raises(ValueError, match="optimizer must be"):
        GaLoreOptimizer(holder, [w], GaLoreSettings(optimizer="sgd"))


def test_eager_state_equals_lazy_state():
    """init_state() (FSDP2's checkpoint template: zero moments, a zero basis due at once) trains exactly like lazy
    creation."""
    results = []
    for eager in (False, True):
        m, targets, rest = _tiny()
        holder = HolderOptimizer(torch.optim.AdamW([{"params": rest}, {"params": targets}], lr=1e-3))
        galore = GaLoreOptimizer(holder, targets, GaLoreSettings(rank=8, update_proj_gap=3))
        if eager:
            galore.init_state()
            assert all(holder.state[p]["next_refresh"] == 0 for p in targets)
        _train(m, galore.step, holder.zero_grad, 5)
        results.append({n: p.detach().clone() for n, p in m.named_parameters()})
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], atol=1e-7, rtol=0, msg=n)


def _layerwise_run(poison: bool, inf_loss: bool = False):
    """Layer-wise GaLore (updates from the gradient hooks) for 4 steps; with ``poison``, step 3's gradient of one
    target and one plain parameter is NaN under a finite loss; with ``inf_loss``, step 3's loss is inf while its
    gradient is finite (an inf constant added). Returns the parameters after each step, the state of the poisoned
    ones and the guard."""
    from lightning_memopt.core.fused_backward import FusedBackward
    from lightning_memopt.core.nonfinite import SkipGuard

    m, targets, _ = _tiny()
    holder = HolderOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1))
    names = {id(p): n for n, p in m.named_parameters()}
    guard = SkipGuard("GaLore", notify=lambda msg: None)
    galore = GaLoreOptimizer(holder, targets, GaLoreSettings(rank=2, update_proj_gap=2), guard=guard, names=names)
    group = holder.param_groups[0]
    fused = FusedBackward([p for p in m.parameters()], update=lambda p: galore.step_param(p, group))
    bad = [targets[3], m.model.norm.weight]
    at = {"step": -1}
    for b in bad:
        b.register_hook(lambda g: g * float("nan") if poison and at["step"] == 3 else g)
    gen = torch.Generator().manual_seed(1)
    after, states = [], []
    for i in range(4):
        at["step"] = i
        x = torch.randint(0, 256, (4, 16), generator=gen)
        loss = m(input_ids=x, labels=x).loss
        if inf_loss and i == 3:
            loss = loss + torch.tensor(float("inf"))
        guard.resolve()
        galore.begin(guard.check(loss, step=i), per_tensor=True, loss=loss)
        loss.backward()
        galore.end()
        guard.resolve()  # the host learns of a left-out tensor here (a step later, on a GPU) and puts its n back
        after.append({n: p.detach().clone() for n, p in m.named_parameters()})
        states.append([{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in holder.state[b].items()}
                       for b in bad])
    fused.remove()
    return after, states, guard, [names[id(b)] for b in bad]


def test_layerwise_leaves_out_a_parameter_whose_gradient_is_not_finite():
    clean, _, _, _ = _layerwise_run(False)
    after, states, guard, bad = _layerwise_run(True)
    assert (guard.skipped_steps, guard.partial_steps, guard.skipped_tensors) == (0, 1, 2)
    assert [n for n in clean[3] if not torch.equal(clean[3][n], after[3][n])] == sorted(bad, key=list(clean[3]).index)
    assert all(torch.equal(after[3][n], after[2][n]) for n in bad)  # left as step 2 made them
    for s2, s3 in zip(states[2], states[3]):  # moments, device step counts and the host's n as well
        assert s2.keys() == s3.keys()
        assert all(torch.equal(s2[k], s3[k]) if isinstance(s2[k], torch.Tensor) else s2[k] == s3[k] for k in s2)


def test_layerwise_skips_a_step_whose_loss_is_not_finite_even_with_finite_gradients():
    """Layer-wise, each parameter checks only its own gradient: the loss's check reaches it through a hook that
    makes the loss's gradient NaN. An inf loss whose gradient is finite still leaves every parameter as it was."""
    after, _, guard, _ = _layerwise_run(False, inf_loss=True)
    assert (guard.skipped_steps, guard.partial_steps) == (1, 0)
    assert all(torch.equal(after[3][n], after[2][n]) for n in after[3])
