"""Resume on another number of processes with sharded (torch.distributed.checkpoint) checkpoints, every method.

Each method saves at step ``SAVE`` at 2 processes and resumes at 1, and saves at 1 and resumes at 2. The reference
is the same checkpoint step saved through the full (rank-0, gathered) path and resumed at the new world size: the
sharded resume must end at exactly its weights, optimizer state (GaLore projectors and moments, AdaLomo factors) and
method state (MeZO history, DFO CMA-ES / fireworks state). Three process launches run every method (2, 1, 2
processes), each several fits in the same processes.
"""

from __future__ import annotations

import pytest
import torch

from lightning_memopt.testing import assert_same, run_distributed

SAVE, STEPS = 2, 4
METHODS = {
    "mezo": {"class_path": "lightning_memopt.MeZO",
             "init_args": {"eps": 1e-3, "lr": 2e-3, "variant": "momentum", "window": 3, "weight_decay": 0.1}},
    "lomo": {"class_path": "lightning_memopt.LOMO", "init_args": {"lr": 0.5, "clip_grad_norm": 0.05}},
    "adalomo": {"class_path": "lightning_memopt.AdaLomo", "init_args": {"lr": 0.01, "weight_decay": 0.1}},
    "galore": {"class_path": "lightning_memopt.GaLore",
               "init_args": {"rank": 8, "update_proj_gap": 3, "proj_type": "right"}},
    "clora": {"class_path": "lightning_memopt.DFOLoRA",
              "init_args": {"d": 40, "population": 6, "budget": None, "stat_batches": 2}},
    "flora": {"class_path": "lightning_memopt.DFOLoRA",
              "init_args": {"optimizer": "fireworks", "d": 40, "population": 8, "n_fireworks": 3, "budget": None,
                            "stat_batches": 2, "init_scale": 1.0}},
}
FIT = "lightning_memopt.testing.workers:fit_resumable"


def _job(name: str, **kw) -> dict:
    kwargs = {"callback": METHODS[name], "steps": STEPS, "dm_kwargs": {"padding": "max_length"}, **kw}
    if name == "galore":
        kwargs["model_kwargs"] = {"weight_decay": 0.01}
    return {"target": FIT, "kwargs": kwargs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    names = sorted(METHODS)
    run = "lightning_memopt.testing.workers:run_jobs"
    two = run_distributed(run, world_size=2, jobs=[_job(m, save_dir=str(d / m / "2"), save_at=SAVE) for m in names])
    jobs1 = []
    for m in names:
        jobs1 += [_job(m, save_dir=str(d / m / "1"), save_at=SAVE), _job(m, ckpt_path=str(d / m / "2" / "dcp")),
                  _job(m, ckpt_path=str(d / m / "2" / "full.ckpt"))]
    one = run_distributed(run, world_size=1, jobs=jobs1)[0]
    jobs2 = []
    for m in names:
        jobs2 += [_job(m, ckpt_path=str(d / m / "1" / "dcp")), _job(m, ckpt_path=str(d / m / "1" / "full.ckpt"))]
    back = run_distributed(run, world_size=2, jobs=jobs2)
    out = {"dir": d}
    for i, m in enumerate(names):
        out[m] = {
            "straight2": two[0][i], "straight1": one[3 * i], "dcp2to1": one[3 * i + 1], "full2to1": one[3 * i + 2],
            "dcp1to2": [r[2 * i] for r in back], "full1to2": [r[2 * i + 1] for r in back],
        }
    return out


def _moved(a: dict, b: dict) -> bool:
    return any(not torch.equal(a["state"][k], b["state"][k]) for k in a["state"]) or a["method"] != b["method"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_on_another_world_size_is_exact(runs, method):
    r = runs[method]
    # the state a sharded checkpoint gives at the new world size is the saved one, bit for bit
    assert_same(r["dcp2to1"]["loaded"], r["straight2"]["saved"], "loaded at 1")
    assert_same(r["dcp1to2"][1]["loaded"], r["straight1"]["saved"], "loaded at 2")
    saved = r["straight2"]["saved"]
    assert saved["global_step"] == SAVE and _moved(saved, r["dcp2to1"])  # the runs went on from there
    if method in ("adalomo", "galore"):  # sharded moments (and GaLore's projectors) came back whole
        assert any(k.endswith((".row", ".exp_avg", ".proj")) for k in saved["opt"])
    if method in ("mezo", "clora", "flora"):
        assert saved["method"] and (method != "mezo" or len(saved["method"]["history"]) == SAVE)
    for key in ("dcp2to1", "full2to1"):
        assert r[key]["global_step"] == STEPS
    assert_same(r["dcp2to1"], r["full2to1"], "2->1")
    for rank in range(2):
        assert_same(r["dcp1to2"][rank], r["full1to2"][rank], f"1->2 rank {rank}")
    # and the continuation is the method's: within the 2-vs-1-process tolerances of the uninterrupted runs
    for resumed, straight in ((r["dcp2to1"], r["straight2"]), (r["dcp1to2"][0], r["straight1"])):
        for k, v in straight["state"].items():
            torch.testing.assert_close(resumed["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("kind", ["dcp", "full.ckpt"])
def test_consolidate_gives_a_from_pretrained_folder_with_the_same_logits(runs, tmp_path, kind):
    """A 2-process sharded checkpoint (and the full one) -> ``memopt consolidate`` -> ``from_pretrained``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_memopt.cli import main
    from lightning_memopt.testing import tiny_model

    out = tmp_path / "hf"
    main(["consolidate", str(runs["dir"] / "adalomo" / "2" / kind), str(out)])
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out)("good movie")["input_ids"]
    saved = runs["adalomo"]["straight2"]["saved"]["state"]  # the weights at the checkpoint's step
    ref = tiny_model().model
    ref.load_state_dict({k.removeprefix("model."): v for k, v in saved.items()})
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ref.eval()(ids).logits)
    assert not torch.equal(ref.model.embed_tokens.weight, tiny_model().model.model.embed_tokens.weight)


def test_consolidate_merges_dfo_adapters_of_a_sharded_checkpoint(runs, tmp_path):
    """C-LoRA's 2-process sharded checkpoint -> consolidate: its adapters (callback state in meta.pt) merged, so the
    folder's logits are the adapted module's at the checkpoint's step."""
    from transformers import AutoModelForCausalLM

    from lightning_memopt.consolidate import consolidate
    from lightning_memopt.dfo.lora import ZLoRA
    from lightning_memopt.testing import tiny_model

    consolidate(runs["dir"] / "clora" / "2" / "dcp", tmp_path / "hf", tokenizer=False)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    saved = runs["clora"]["straight2"]["saved"]
    ref = tiny_model()
    ref.load_state_dict(saved["state"])
    lora = ZLoRA(ref, d=METHODS["clora"]["init_args"]["d"])  # the callback's other settings are the defaults
    lora.install()
    lora.load_stats(saved["method"]["stats"])
    for k, z in enumerate(saved["method"]["z"]):
        lora.set_z(k, z)
    assert all(bool(z.any()) for z in saved["method"]["z"])
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref.model.eval()(ids).logits, rtol=1e-5, atol=1e-5)
