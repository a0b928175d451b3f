"""MeZO through Lightning on the tiny Llama: training, no autograd, exactness, accumulation, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_memopt.mezo.callback import MeZO
from lightning_memopt.mezo.core import ZeroOrder, ZOConfig
from lightning_memopt.testing import tiny_datamodule, tiny_model, tiny_trainer
from lightning_memopt.testing.tiny import full_state


def mean_loss(model, dm) -> float:
    """Unperturbed mean loss over the whole training set (eval mode, no grad)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        losses = [float(model._step(b)["loss"]) for b in dm.train_dataloader()]
    model.train(was)
    return sum(losses) / len(losses)


class Watch(pl.Callback):
    """Asserts after every batch that no parameter holds .grad; records grad-mode/train-mode seen by forwards."""

    def __init__(self) -> None:
        self.grad_enabled: set[bool] = set()
        self.training: set[bool] = set()
        self.batches = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        def hook(mod, args):
            self.grad_enabled.add(torch.is_grad_enabled())
            self.training.add(mod.training)

        pl_module.model.register_forward_pre_hook(hook)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        assert all(p.grad is None for p in pl_module.parameters()), "a parameter holds .grad"


def test_200_steps_lower_loss_without_grad():
    pl.seed_everything(0)
    model, dm = tiny_model(objective="lm"), tiny_datamodule(batch_size=16)
    watch = Watch()
    trainer = tiny_trainer(max_steps=200, callbacks=[MeZO(eps=1e-3, lr=2e-3), watch])
    trainer.fit(model, dm)
    before_model = tiny_model(objective="lm")  # same init seed: the starting weights
    before, after = mean_loss(before_model, dm), mean_loss(model, dm)
    assert trainer.global_step == 200 and watch.batches == 200
    assert after < before - 0.2, (before, after)
    assert watch.grad_enabled == {False}  # no autograd graph in any forward
    assert watch.training == {False}  # eval mode by default (dropout off)
    assert "mezo/projected_grad" in trainer.callback_metrics and "mezo/loss" in trainer.callback_metrics
    assert model.training_step.__func__ is type(model).training_step  # the instance wrapper is gone after fit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_perturb_restore_is_bit_exact(dtype):
    model = tiny_model(objective="lm").model.to(dtype).eval()
    x = torch.randint(0, 256, (4, 16))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    zo = ZeroOrder(model, ZOConfig(eps=1e-2, n_spsa=3))
    with torch.no_grad():
        base = float(model(input_ids=x, labels=x).loss)
        g, loss = zo.estimate(lambda: model(input_ids=x, labels=x).loss, zo.seeds(0))
    assert torch.all(g != 0) and float(loss) != base  # the forwards did see perturbed weights
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # bit-identical: θ is never written by the ± forwards
        assert isinstance(p, torch.nn.Parameter)
    # the official in-place scheme (θ+εz, θ−2εz, θ+εz) does not restore half precision exactly
    if dtype != torch.float32:
        w = before["model.layers.0.mlp.up_proj.weight"].clone()
        z = torch.randn(w.shape).to(dtype)
        drift = ((w + 1e-2 * z) - 2e-2 * z) + 1e-2 * z
        assert not torch.equal(drift, w)


@pytest.mark.parametrize("torch_dtype", [None, "bfloat16"])
def test_lr_zero_keeps_weights_bit_identical(torch_dtype):
    pl.seed_everything(0)
    model, dm = tiny_model(objective="lm", torch_dtype=torch_dtype), tiny_datamodule(batch_size=8)
    before = full_state(model)
    tiny_trainer(max_steps=5, callbacks=[MeZO(lr=0.0)]).fit(model, dm)
    after = full_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradient_accumulation_matches_big_batch():
    def run(batch, accum):  # classification: the loss is a per-example mean, so two halves average to the whole
        pl.seed_everything(0)
        model, dm = tiny_model(), tiny_datamodule(batch_size=batch)
        trainer = tiny_trainer(max_steps=6, accumulate_grad_batches=accum, callbacks=[MeZO(lr=2e-3)])
        trainer.fit(model, dm)
        return full_state(model), trainer.global_step

    (a, sa), (b, sb) = run(16, 1), run(8, 2)
    assert sa == sb == 6
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    init = full_state(tiny_model())
    assert any(not torch.equal(a[k], init[k]) for k in a)


def test_lr_scheduler_drives_lr_and_lr_override():
    pl.seed_everything(0)
    model, dm = tiny_model(objective="lm", lr_schedule="linear", lr=5.0), tiny_datamodule(batch_size=8)
    seen = []

    class LR(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    tiny_trainer(max_steps=4, callbacks=[MeZO(lr=1e-3), LR()]).fit(model, dm)
    assert seen[0] == pytest.approx(1e-3) and seen[-1] < seen[0]  # override sets the base, schedule keeps its shape


class ManualModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=4)


def test_clear_errors():
    dm = tiny_datamodule(batch_size=8)
    with pytest.raises(MisconfigurationException, match="gradient_clip_val"):
        tiny_trainer(max_steps=1, gradient_clip_val=1.0, callbacks=[MeZO()]).fit(tiny_model(objective="lm"), dm)
    with pytest.raises(MisconfigurationException, match="automatic_optimization"):
        tiny_trainer(max_steps=1, callbacks=[MeZO()]).fit(ManualModule())
    with pytest.raises(MisconfigurationException, match="'logits' and 'labels'"):
        cb = MeZO(metric="torchmetrics.classification.MulticlassAccuracy", metric_kwargs={"num_classes": 2})
        tiny_trainer(max_steps=1, callbacks=[cb]).fit(tiny_model(objective="lm"), dm)
    with pytest.raises(MisconfigurationException, match="cannot import"):
        tiny_trainer(max_steps=1, callbacks=[MeZO(metric="torchmetrics.NoSuchMetric")]).fit(tiny_model(), dm)
    with pytest.raises(ValueError, match="n_spsa"):
        MeZO(n_spsa=0)


def test_numbers_given_as_strings_are_read_as_numbers():
    assert MeZO(eps="1e-3", n_spsa=2.0).config.eps == 1e-3  # YAML keeps "1e-3" a string


def test_an_unwritable_trajectory_path_is_refused_at_setup(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for path, problem in [(blocker / "traj.json", "cannot create"), (tmp_path, "is a directory")]:
        seen = []

        class Count(pl.Callback):
            def on_train_batch_start(self, *args):
                seen.append(1)

        trainer = tiny_trainer(max_steps=2, callbacks=[MeZO(trajectory_path=str(path)), Count()])
        with pytest.raises(MisconfigurationException, match=rf"trajectory_path=.*{problem}.*writable directory"):
            trainer.fit(tiny_model(objective="lm"), tiny_datamodule(k=8))
        assert not seen  # before any step


def test_a_trajectory_file_of_another_run_is_not_overwritten_and_log_dir_names_the_version(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    def fit(steps, ckpt_path=None, **kw):
        cb = MeZO(**kw)
        trainer = tiny_trainer(max_steps=steps, callbacks=[cb, ModelCheckpoint(tmp_path / "ckpt", save_last=True)],
                               logger=CSVLogger(tmp_path / "logs"), enable_checkpointing=True)
        trainer.fit(tiny_model(objective="lm"), tiny_datamodule(k=8), ckpt_path=ckpt_path)
        return trainer

    path = tmp_path / "run.json"
    fit(2, trajectory_path=str(path))
    before = path.read_text()
    with pytest.raises(MisconfigurationException, match=r"run\.json already exists, and this fresh fit would"):
        fit(2, trajectory_path=str(path))
    assert path.read_text() == before
    fit(3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), trajectory_path=str(path))  # a resume writes it again
    assert len(json.loads(path.read_text())["steps"]) == 3
    trainer = fit(2, trajectory_path="{log_dir}/trajectory.json")  # a new version folder each fit: no clash
    fit(2, trajectory_path="{log_dir}/trajectory.json")
    assert sorted(p.parent.name for p in (tmp_path / "logs").rglob("trajectory.json")) == ["version_3", "version_4"]
    traj = Path(trainer.log_dir) / "trajectory.json"
    trainer.fit_loop.epoch_loop.max_steps = 4  # fit() again on the same Trainer goes on, and so does its trajectory
    trainer.fit(tiny_model(objective="lm"), tiny_datamodule(k=8))
    assert [s["step"] for s in json.loads(traj.read_text())["steps"]] == [0, 1, 2, 3]
    for _ in range(2):  # fast_dev_run writes no file (nor Lightning a checkpoint); a second one is no clash
        cb = MeZO(trajectory_path="{log_dir}/t.json")
        tiny_trainer(fast_dev_run=2, callbacks=[cb]).fit(tiny_model(objective="lm"), tiny_datamodule(k=8))
        assert len(cb.trajectory["steps"]) == 2
    assert not list(tmp_path.rglob("t.json")) and not Path("None").exists()


@pytest.mark.parametrize("kw", [{}, {"perturbation": "lowrank", "n_spsa": 2}], ids=["perturber", "population"])
def test_a_weight_no_submodule_forward_uses_is_named_in_a_warning(kw):
    from lightning_memopt.testing.tiny import TinyLM

    class Offset(TinyLM):
        def __init__(self):
            super().__init__()
            self.offset = torch.nn.Parameter(torch.zeros(()))  # the module's own, read in training_step

        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) + self.offset.square()

    model = Offset()
    with pytest.warns(UserWarning, match=r"1 trained parameters were not perturbed .*\(offset\).*moves by noise alone"
                                         r".*freeze it"):
        tiny_trainer(max_steps=2, callbacks=[MeZO(lr=1e-3, **kw)]).fit(model)
    assert float(model.offset) != 0.0  # as the warning says (it said the weight never moves)


def test_float64_weights_are_refused():
    trainer = tiny_trainer(max_steps=1, precision="64-true", callbacks=[MeZO()])
    with pytest.raises(MisconfigurationException, match="float64 weights would be rounded.*32-true"):
        trainer.fit(tiny_model(objective="lm"), tiny_datamodule(k=8))


def test_refuses_grad_scaler_ddp_and_fsdp1():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from lightning_memopt.callbacks import _checks

    cb = MeZO()

    class FakeTrainer:
        def __init__(self, strategy, precision="32-true"):
            self.strategy, self.precision = strategy, precision
            self.precision_plugin = object()
            self.gradient_clip_val = None
            self.callbacks = [cb]

    model = tiny_model(objective="lm")
    with pytest.raises(MisconfigurationException, match="bf16-mixed"):
        cb.setup(FakeTrainer(pl.strategies.SingleDeviceStrategy("cpu"), "16-mixed"), model, "fit")
    with pytest.raises(MisconfigurationException, match="fsdp2"):
        cb.setup(FakeTrainer(DDPStrategy()), model, "fit")
    fsdp1 = FSDPStrategy.__new__(FSDPStrategy)  # Lightning refuses FSDP1 on CPU before any callback runs
    assert _checks.strategy_kind(FakeTrainer(fsdp1)) == _checks.FSDP1
    with pytest.raises(MisconfigurationException, match="FSDP2"):
        cb.setup(FakeTrainer(fsdp1), model, "fit")


class _Bypass(torch.nn.Module):
    """A parent whose forward calls its child's submodules directly: the child (a group root) never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 6))
        self.head = torch.nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inner[1](torch.tanh(self.inner[0](x)))).square().mean()


def _model_and_loss(build: str):
    """The tiny Llama's backbone with an LM loss on a fixed batch, or one of the small odd-shaped models above/below."""
    if build == "llama":
        model, x = tiny_model().model.eval(), torch.randint(0, 64, (2, 8))
        return model, lambda: model(input_ids=x, labels=x).loss
    model = {"bypass": _Bypass, "skipping": _Skipping}[build]()
    x = torch.randn(4, 6)
    return model, lambda: model(x)


@pytest.mark.parametrize("build", ["llama", "bypass"])
def test_grouped_perturbation_equals_per_module(build):
    """One launch per submodule group sees exactly what per-module perturbation sees, also when a model skips the
    group root's forward; afterwards every original Parameter is back in place."""
    torch.manual_seed(0)
    model, loss = _model_and_loss(build)
    before = {n: p for n, p in model.named_parameters()}
    out = {}
    for gb in (0, 64 << 20):
        zo = ZeroOrder(model, ZOConfig(), cache_z=False, group_bytes=gb)
        if gb:
            assert zo.perturber._group_roots, "expected at least one grouped submodule"
        with torch.no_grad(), zo.perturber.active(11, 1e-2):
            out[gb] = loss()
        zo.close()
        assert all(p is before[n] for n, p in model.named_parameters())
    with torch.no_grad():
        plain = loss()
    assert out[0] == out[64 << 20] and out[0] != plain


class _Skipping(torch.nn.Module):
    """Three blocks; every other forward skips the middle one, so the order recorded first is not always run."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()) for _ in range(3))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        for i, b in enumerate(self.blocks):
            if not (i == 1 and self.calls % 3 == 0):
                x = b(x)
        return x.square().mean()


@pytest.mark.parametrize("build", ["llama", "skipping"])
@pytest.mark.parametrize("group_bytes", [0, 64 << 20])
def test_overlap_makes_copies_ahead_and_the_same_weights(build, group_bytes):
    """overlap=True (copies one unit ahead; inline on CPU) gives bit-identical steps, also where a forward skips a
    unit of the recorded order (its copies made ahead go unused), and uses the copies it made ahead."""
    weights, used = [], []
    for overlap in (False, True):
        torch.manual_seed(0)
        model, loss = _model_and_loss(build)
        zo = ZeroOrder(model, ZOConfig(eps=1e-2, n_spsa=2), cache_z=False, group_bytes=group_bytes, overlap=overlap)
        with torch.no_grad():
            for t in range(4):
                zo.step(loss, t, lr=1e-2)
        used.append(zo.perturber.ahead_used)
        zo.close()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert used[0] == 0 < used[1]


def test_overlap_is_for_the_plain_estimator():
    model = tiny_model().model
    with pytest.raises(ValueError, match="population estimator"):
        ZeroOrder(model, ZOConfig(n_spsa=4, perturbation="lowrank"), overlap=True)
    with pytest.raises(MisconfigurationException, match="Drop overlap=True"):
        MeZO(overlap=True, n_spsa=4, perturbation="lowrank")


def test_callback_overlap_on_cpu_warns_and_trains_as_without():
    weights = []
    for overlap in (False, True):
        torch.manual_seed(0)
        model, cb = tiny_model(), MeZO(lr=1e-3, eps=1e-2, overlap=overlap)
        if overlap:
            with pytest.warns(UserWarning, match=r"overlap=True\): it needs CUDA streams \(this run is on cpu\)"):
                tiny_trainer(max_steps=3, callbacks=[cb]).fit(model, tiny_datamodule(batch_size=4))
            assert cb.zo.perturber.overlap is False and cb.settings()["overlap"] is True
        else:
            tiny_trainer(max_steps=3, callbacks=[cb]).fit(model, tiny_datamodule(batch_size=4))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_callback_group_bytes_reaches_the_perturber_and_leaves_the_weights_alone():
    # the launch grouping is a speed knob: the same z and weights with every grouping
    weights, roots = [], []
    for gb in (0, 64 << 20):
        torch.manual_seed(0)
        model, cb = tiny_model(), MeZO(lr=1e-3, eps=1e-2, group_bytes=gb)
        tiny_trainer(max_steps=3, callbacks=[cb]).fit(model, tiny_datamodule(batch_size=4))
        roots.append(len(cb.zo.perturber._group_roots))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.manual_seed(0)
    init = torch.cat([p.detach().flatten() for p in tiny_model().parameters()])
    assert roots[0] == 0 < roots[1]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], init)
    with pytest.raises(ValueError, match="group_bytes must be an integer >= 0"):
        MeZO(group_bytes=-1)


@pytest.mark.parametrize(("precision", "lr", "warns"), [("bf16-true", 1e-6, True), ("32-true", 1e-6, False),
                                                         ("bf16-true", 0.5, False)])
def test_warns_when_updates_round_away_in_low_precision_weights(precision, lr, warns, recwarn):
    # MeZO's lr·g·z (≈ 1e-6 here) is below a bf16 weight's resolution: the fit would run and learn nothing
    model, dm = tiny_model(), tiny_datamodule(batch_size=4)
    tiny_trainer(max_steps=3, precision=precision, callbacks=[MeZO(lr=lr, eps=1e-2)]).fit(model, dm)
    hits = [w for w in recwarn if "round away" in str(w.message)]
    assert len(hits) == (1 if warns else 0), [str(w.message) for w in recwarn]
    if warns:
        assert "precision='bf16-mixed'" in str(hits[0].message)


def test_training_step_outputs_and_epoch_logs_count_each_step_once():
    """training_step runs once per perturbed forward: its outputs reach on_train_batch_end (loss replaced by the
    estimate's), its self.log calls count once per step, and a torchmetrics state it updates is named in a warning."""
    from torchmetrics.aggregation import SumMetric

    from lightning_memopt.testing.tiny import TinyLM

    class Rows(TinyLM):
        def __init__(self):
            super().__init__()
            self.rows = SumMetric()

        def training_step(self, batch, batch_idx):
            out = self.model(input_ids=batch, labels=batch)
            self.rows.update(torch.tensor(float(batch.shape[0])))
            self.log("rows_sum", float(batch.shape[0]), on_step=False, on_epoch=True, reduce_fx="sum")
            return {"loss": out.loss, "preds": out.logits.argmax(-1)}

    class Outputs(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.keys, self.loss = sorted(outputs), outputs["loss"]

    outs, cb = Outputs(), MeZO(lr=1e-3, n_spsa=2)
    trainer = tiny_trainer(max_steps=-1, max_epochs=1, callbacks=[cb, outs])
    with pytest.warns(UserWarning, match=r"4 per step\), so the metric\(s\) \['rows'\] it updates count every"):
        trainer.fit(Rows())
    assert trainer.callback_metrics["rows_sum"] == 64  # the epoch's 64 rows once (4 forwards a step counted 256)
    assert outs.keys == ["loss", "preds"]
    assert outs.loss.ndim == 0 and torch.isfinite(outs.loss)


def test_an_lr_override_over_per_group_lrs_says_it_flattens_them():
    from lightning_memopt.testing.tiny import TinyLM

    class TwoGroups(TinyLM):
        def configure_optimizers(self):
            emb = self.model.get_input_embeddings().weight
            rest = [p for p in self.parameters() if p is not emb]
            return torch.optim.SGD([{"params": rest}, {"params": [emb], "lr": 1e-4}], lr=1e-3)

    model = TwoGroups()
    with pytest.warns(UserWarning, match=r"sets every parameter group's lr to 1e-05.*\(0\.0001, 0\.001\).*lr=None"):
        tiny_trainer(max_steps=1, callbacks=[MeZO(lr=1e-5)]).fit(model)
    assert [g["lr"] for g in model.trainer.optimizers[0].param_groups] == [1e-5, 1e-5]
