"""DeepSpeed ZeRO-3 for method callbacks: DeepSpeed partitions the weights, the method does its own update.

Lightning's ``DeepSpeedStrategy`` hands the module's optimizer to ``deepspeed.initialize``, which wraps it in ZeRO's
own optimizer (fp32 master partitions, moments, its gradient hooks) and steps that engine itself. LOMO, AdaLomo and
MeZO replace the optimizer, as lomo-optim's ZeRO-3 path does: :class:`ZeRO3Strategy` initialises DeepSpeed with no
optimizer (parameter partitioning only: ``DeepSpeedZeRoOffload``), keeps the module's optimizer for the method
callback to swap and steps it through the plain precision path. The module runs as it is (DeepSpeed's hooks on its
submodules gather each one's weights in forward and backward); backward is a plain ``loss.backward()``.
Registered as ``strategy="zero3"``.

* LOMO/AdaLomo: each gradient hook sees the gathered weight and this rank's whole gradient once; it averages the
  gradient over the data-parallel ranks, computes the update on whole tensors (AdaLomo's factored moments are
  replicated, like the column moments under FSDP2) and writes this rank's partition only.
* MeZO: the partitions are perturbed in place (θ ± εz, then restored), with z keyed by global element offset, so
  the directions equal a 1-process run's; the update writes the partitions.
* GaLore and DFOLoRA are refused (use ``strategy="fsdp2"``), and so is a fit without one of the three methods.
* Checkpoints are one full file written by rank 0 (the weights gathered module by module, the method's state), which
  resumes on any number of processes.

DeepSpeed must be installed (``pip install 'lightning_memopt[deepspeed]'``). Lightning refuses DeepSpeed on CPU; this
strategy allows DeepSpeed's CPU accelerator (gloo), which the CPU tests use.

Example::

    Trainer(accelerator="cuda", devices=8, strategy="zero3", precision="bf16-true", callbacks=[AdaLomo(lr=1e-3)])
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Optional

from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy, StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException


class ZeRO3Strategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO stage 3 partitioning for LOMO, AdaLomo and MeZO (see the module docstring).

    Args:
        offload_parameters: keep the partitions in host memory (DeepSpeed's parameter offload).
        param_persistence_threshold: parameters with fewer elements stay whole on every rank (DeepSpeed's
            ``stage3_param_persistence_threshold``); 0 (the default) partitions every parameter, the layout the
            methods write to.
        max_reuse_distance: DeepSpeed keeps a gathered parameter whose next use is this close (``stage3_max_reuse_
            distance``); 0 releases each one after its module, so in-place writes to partitions are always seen.
        allgather_bucket_size, reduce_bucket_size: DeepSpeed's communication bucket sizes (elements).
        config: a DeepSpeed config (dict or JSON path) instead of the settings above (its ``zero_optimization`` must
            have ``stage: 3`` and no ``optimizer`` section).
        process_group_backend: e.g. ``"gloo"`` on CPU (the default there) or ``"nccl"``.

    Example::

        Trainer(devices=2, strategy=ZeRO3Strategy(offload_parameters=True), callbacks=[LOMO(lr=1e-2)])
    """

    strategy_name = "zero3"

    def __init__(
        self,
        offload_parameters: bool = False,
        param_persistence_threshold: int = 0,
        max_reuse_distance: int = 0,
        allgather_bucket_size: int = 200_000_000,
        reduce_bucket_size: int = 200_000_000,
        config: Optional[Any] = None,
        process_group_backend: Optional[str] = None,
        accelerator: Optional[Any] = None,
        parallel_devices: Optional[list[Any]] = None,
        cluster_environment: Optional[Any] = None,
        precision_plugin: Optional[Any] = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator, stage=3, offload_parameters=offload_parameters,
            allgather_bucket_size=allgather_bucket_size, reduce_bucket_size=reduce_bucket_size, config=config,
            parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            precision_plugin=precision_plugin, process_group_backend=process_group_backend,
        )
        self.param_persistence_threshold = int(param_persistence_threshold)
        self.max_reuse_distance = int(max_reuse_distance)

    def setup_environment(self) -> None:
        from lightning.pytorch.accelerators import CPUAccelerator

        cpu = isinstance(self.accelerator, CPUAccelerator)
        _deepspeed_accelerator(cpu)
        if cpu:  # DeepSpeed's CPU accelerator: Lightning refuses it
            DDPStrategy.setup_environment(self)
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed
        from lightning.pytorch.accelerators import CPUAccelerator

        if not isinstance(self.accelerator, CPUAccelerator):
            return super().setup_distributed()
        reset_seed()  # as DeepSpeedStrategy, without its check of CUDA device indices
        self.set_world_ranks()
        self._init_deepspeed_distributed()
        return None

    def _init_config_if_needed(self) -> None:
        super()._init_config_if_needed()
        zero = self.config.setdefault("zero_optimization", {})
        if zero.get("stage") != 3:
            raise MisconfigurationException(f"ZeRO3Strategy runs ZeRO stage 3; the config has stage {zero.get('stage')}.")
        if "optimizer" in self.config:
            raise MisconfigurationException(
                "ZeRO3Strategy leaves the update to the method callback: remove the DeepSpeed config's 'optimizer' "
                "section (or use strategy='deepspeed_stage_3' to train with DeepSpeed's optimizer)."
            )
        zero.setdefault("stage3_param_persistence_threshold", self.param_persistence_threshold)
        zero.setdefault("stage3_max_reuse_distance", self.max_reuse_distance)

    def setup(self, trainer: Any) -> None:
        from lightning_memopt.callbacks import _checks
        from lightning_memopt.callbacks.method import MethodCallback

        methods = [c for c in trainer.callbacks if isinstance(c, MethodCallback) and _checks.ZERO3 in c.strategies]
        if trainer.state.fn == "fit" and not methods:
            raise MisconfigurationException(
                "ZeRO3Strategy partitions the weights and leaves the update to a method callback: add LOMO, AdaLomo "
                "or MeZO to Trainer(callbacks=[...]). To train with AdamW use strategy='deepspeed_stage_3' (DeepSpeed's "
                "own optimizer) or strategy='fsdp2'."
            )
        super().setup(trainer)

    def _initialize_deepspeed_train(self, model: Any) -> None:
        import deepspeed

        optimizer, lr_scheduler = self._init_optimizers()  # the module's own: the method callback swaps it
        engine, _, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.root_device.index if self.root_device.index is not None else -1),
            config=self.config, model=model,
            dist_init_required=False,
        )
        self._set_deepspeed_activation_checkpointing()
        self.optimizers = [optimizer]
        self.lr_scheduler_configs = [lr_scheduler] if lr_scheduler is not None else []
        # The engine has partitioned the weights and hooked every submodule to gather them; its own forward and
        # backward would also drive ZeRO's optimizer, which there is none of. The module runs as it is (its
        # submodules' hooks still gather), and backward is a plain one.
        self.engine = engine
        self.model = model
        from lightning_memopt.core.zero3 import RELEASE_ATTR

        # what core.fsdp.reshard_all calls before the methods write partitions (no gc.collect, unlike the engine's)
        model.__dict__[RELEASE_ATTR] = engine.optimizer.partition_all_parameters

    # ---- checkpoints: one full file written by rank 0 (weights gathered module by module), as any single-device
    # checkpoint; resumed on any number of processes. DeepSpeed's own sharded format needs its engine's optimizer.
    def lightning_module_state_dict(self) -> dict[str, Any]:
        import deepspeed

        out: dict[str, Any] = {}
        for name, module in self.lightning_module.named_modules():
            prefix = f"{name}." if name else ""
            before = set(out)
            with deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=None):
                if self.is_global_zero:
                    module._save_to_state_dict(out, prefix, False)
                    for k in set(out) - before:
                        out[k] = out[k].detach().to("cpu", copy=True)
        return out

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return Strategy.optimizer_state(self, optimizer)  # the holder's: AdaLomo's moments are whole on every rank

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        filepath = self.broadcast(filepath)
        Strategy.save_checkpoint(self, checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        return Strategy.load_checkpoint(self, self.broadcast(checkpoint_path), weights_only)

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        self._restore_zero_state(checkpoint, strict=strict)  # rank 0 loads each gathered module; DeepSpeed broadcasts

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        Strategy.load_optimizer_state_dict(self, checkpoint)

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        # the method callback's holder steps (Lightning's DeepSpeed precision would call the engine's step instead)
        model = model or self.lightning_module
        return Precision.optimizer_step(self.precision_plugin, optimizer, model, closure, **kwargs)


def register_zero3(registry: Any = StrategyRegistry) -> None:
    """Register ``"zero3"``; safe to call any number of times."""
    if "zero3" not in registry:
        registry.register("zero3", ZeRO3Strategy, description="DeepSpeed ZeRO-3 partitioning for LOMO, AdaLomo, MeZO")


def _deepspeed_accelerator(cpu: bool) -> None:
    """DeepSpeed picks its accelerator once per process by what the machine has, CUDA first; its engine places and
    communicates through it. A CPU Trainer on a GPU machine needs the CPU one (and a CUDA Trainer after a CPU fit in
    the same process, the CUDA one)."""
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if (get_accelerator().device_name() == "cpu") == cpu:
        return
    if cpu:
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())
    else:
        from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

        set_accelerator(CUDA_Accelerator())
