"""DeepSpeed ZeRO-3 (``strategy="zero3"``, :class:`ZeRO3Strategy`) for LOMO, AdaLomo and MeZO on 2 CPU processes
(DeepSpeed's CPU accelerator, gloo) equals one process without DeepSpeed; GaLore, DFOLoRA, Lightning's own
DeepSpeedStrategy and two-backward LOMO settings are refused with the fix. Skipped without DeepSpeed
(``pip install 'lightning_memopt[deepspeed]'``)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (pip install 'lightning_memopt[deepspeed]'); it runs here on CPU processes",
)

FIT = "lightning_memopt.testing.workers:fit_tiny"
CASES = {
    "lomo": {"class_path": "lightning_memopt.LOMO", "init_args": {"lr": 0.5, "clip_grad_value": 0.05}},
    "adalomo": {"class_path": "lightning_memopt.AdaLomo", "init_args": {"lr": 0.01, "weight_decay": 0.1}},
    "mezo": {"class_path": "lightning_memopt.MeZO",
             "init_args": {"eps": 1e-3, "lr": 2e-3, "variant": "momentum", "window": 3, "weight_decay": 0.1}},
}
KW = {"steps": 3, "global_batch": 16}


def test_zero3_two_processes_equal_one_process_without_deepspeed():
    from lightning_memopt.testing import run_distributed
    from lightning_memopt.testing.workers import fit_tiny

    jobs = [{"target": FIT, "kwargs": {**KW, "callback": spec, "strategy": "zero3"}} for spec in CASES.values()]
    ranks = run_distributed("lightning_memopt.testing.workers:run_jobs", world_size=2, jobs=jobs)
    init = fit_tiny(1, steps=0, global_batch=16)["state"]
    for i, (name, spec) in enumerate(CASES.items()):
        one = fit_tiny(1, callback=spec, **KW)
        for r in ranks:
            got = r[i]
            assert got["global_step"] == 3, name
            for k, v in one["state"].items():  # the weights gathered from both ranks' partitions
                torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
        assert all(not torch.equal(one["state"][k], init[k]) for k in init), name  # every weight moved


def test_zero3_a_nan_gradient_is_left_out_alike_on_both_ranks():
    """Step 1's gradient is NaN in down_proj's first rows and in every tensor before it (testing.workers.NaNGradAt):
    each rank's partition of those is left out (LOMO: the NaN elements; AdaLomo: the tensors), both ranks count
    the same tensors, and the result equals one process."""
    from lightning_memopt.testing import run_distributed
    from lightning_memopt.testing.workers import fit_tiny

    nan = {"class_path": "lightning_memopt.testing.workers.NaNGradAt",
           "init_args": {"module": "model.model.layers.1.mlp.down_proj", "step": 1}}
    specs = [{"class_path": "lightning_memopt.LOMO", "init_args": {"lr": 0.5}}, CASES["adalomo"]]
    kw = {**KW, "callbacks": [nan], "inspect": "lightning_memopt.testing.workers:skip_counts"}
    jobs = [{"target": FIT, "kwargs": {**kw, "callback": spec, "strategy": "zero3"}} for spec in specs]
    ranks = run_distributed("lightning_memopt.testing.workers:run_jobs", world_size=2, jobs=jobs)
    for i, spec in enumerate(specs):
        one = fit_tiny(1, callback=spec, **kw)
        assert one["skips"][:2] == (0, 1) and one["skips"][2] > 10
        for r in ranks:
            assert r[i]["skips"] == one["skips"]
            for k, v in one["state"].items():
                torch.testing.assert_close(r[i]["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_zero3_on_a_cpu_trainer_uses_deepspeeds_cpu_accelerator_where_it_picked_cuda():
    """On a GPU machine DeepSpeed picks its CUDA accelerator; a ZeRO-3 fit on a CPU Trainer there switches it to the
    CPU one and trains as on a CPU-only machine."""
    from lightning_memopt.testing import run_distributed

    kw = {**KW, "callback": CASES["lomo"], "strategy": "zero3"}
    (got,) = run_distributed("lightning_memopt.testing.workers:fit_tiny_deepspeed_picked_cuda", world_size=1, **kw)
    (ref,) = run_distributed(FIT, world_size=1, **kw)
    assert got["deepspeed_accelerator"] == "cpu" and got["global_step"] == 3
    for k, v in ref["state"].items():
        assert torch.equal(got["state"][k], v), k


def test_zero3_checkpoint_resumes_exactly_on_another_world_size(tmp_path):
    """A ZeRO-3 checkpoint (one full file: gathered weights, AdaLomo's moments, MeZO's history) saved at 2 processes
    resumes at 1 process at exactly the saved state, and continues like the uninterrupted run within tolerance."""
    from lightning_memopt.testing import assert_same, run_distributed

    target, names = "lightning_memopt.testing.workers:fit_resumable", ("adalomo", "mezo")
    kw = {"steps": 4, "strategy_name": "zero3", "dm_kwargs": {"padding": "max_length"}}
    jobs = [{"target": target, "kwargs": {**kw, "callback": CASES[n], "save_dir": str(tmp_path / n), "save_at": 2}}
            for n in names]
    straight = run_distributed("lightning_memopt.testing.workers:run_jobs", world_size=2, jobs=jobs)[0]
    jobs = [{"target": target, "kwargs": {**kw, "callback": CASES[n], "ckpt_path": str(tmp_path / n / "full.ckpt")}}
            for n in names]
    resumed = run_distributed("lightning_memopt.testing.workers:run_jobs", world_size=1, jobs=jobs)[0]
    for name, a, b in zip(names, straight, resumed):
        saved, loaded = a["saved"], b["loaded"]
        for k, v in saved["state"].items():
            assert torch.equal(loaded["state"][k], v), f"{name} {k}"
        assert_same(loaded["opt"], saved["opt"], f"{name} opt")
        assert_same(loaded["method"], saved["method"], name)  # MeZO's history (AdaLomo keeps none here)
        assert b["global_step"] == 4
        for k, v in a["state"].items():
            torch.testing.assert_close(b["state"][k], v, rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
    assert any(k.endswith(".row") for k in straight[0]["saved"]["opt"])  # AdaLomo's moments came back


def _setup(cb, strategy, precision="32-true", clip=None):
    from lightning_memopt.testing import tiny_model

    model = tiny_model()
    strategy.optimizers = [torch.optim.AdamW(model.parameters())]
    trainer = SimpleNamespace(
        strategy=strategy, precision=precision, precision_plugin=SimpleNamespace(), accumulate_grad_batches=1,
        gradient_clip_val=clip, gradient_clip_algorithm="norm", callbacks=[cb],
    )
    cb.setup(trainer, model, "fit")


@pytest.mark.parametrize(
    ("method", "strategy", "match"),
    [
        ("GaLore", "zero3", "strategy='fsdp2'"),
        ("DFOLoRA", "zero3", "strategy='fsdp2'"),
        ("LOMO", "deepspeed", "strategy='zero3'"),
        ("MeZO", "deepspeed", "strategy='zero3'"),
    ],
)
def test_refusals_name_the_fix(method, strategy, match):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    import lightning_memopt
    from lightning_memopt.strategies import ZeRO3Strategy

    s = ZeRO3Strategy() if strategy == "zero3" else DeepSpeedStrategy(stage=3)
    with pytest.raises(MisconfigurationException, match=match):
        _setup(getattr(lightning_memopt, method)(), s)


def test_lomo_two_backward_settings_are_refused_under_zero3():
    from lightning_memopt import LOMO
    from lightning_memopt.strategies import ZeRO3Strategy

    with pytest.raises(MisconfigurationException, match="clip_grad_norm=1.0 needs a second backward"):
        _setup(LOMO(clip_grad_norm=1.0), ZeRO3Strategy())
    with pytest.raises(MisconfigurationException, match="second backward"):
        _setup(LOMO(), ZeRO3Strategy(), clip=0.5)  # Trainer(gradient_clip_val) becomes clip_grad_norm
    _setup(LOMO(clip_grad_value=0.1), ZeRO3Strategy())  # one pass: fine


def test_zero3_strategy_needs_a_method_and_no_deepspeed_optimizer():
    from lightning_memopt.strategies import ZeRO3Strategy

    trainer = SimpleNamespace(callbacks=[], state=SimpleNamespace(fn="fit"))
    with pytest.raises(MisconfigurationException, match="add LOMO, AdaLomo or MeZO"):
        ZeRO3Strategy().setup(trainer)
    s = ZeRO3Strategy(config={"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}})
    with pytest.raises(MisconfigurationException, match="'optimizer' section"):
        s._init_config_if_needed()
    s = ZeRO3Strategy()
    s._init_config_if_needed()
    z = s.config["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_param_persistence_threshold"] == 0 and z["stage3_max_reuse_distance"] == 0
