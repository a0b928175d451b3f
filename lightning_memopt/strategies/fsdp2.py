"""FSDP2 for existing LightningModules: shard every Hugging Face transformer block, then the root, no
``configure_model`` needed. Registered as ``strategy="fsdp2"``.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_memopt import _shim
from lightning_memopt.core.fsdp import fsdp_modules, reshard_all


def _hf_roots(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Top-most ``transformers.PreTrainedModel`` submodules."""
    from transformers import PreTrainedModel

    roots: list[torch.nn.Module] = []
    seen: set[int] = set()
    for m in module.modules():
        if id(m) in seen:
            continue
        if isinstance(m, PreTrainedModel):
            roots.append(m)
            seen.update(id(x) for x in m.modules())
    return roots


def transformer_blocks(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of an HF model, by its ``_no_split_modules`` class names."""
    names = set(getattr(root, "_no_split_modules", None) or [])
    blocks = [m for m in root.modules() if type(m).__name__ in names and m is not root]
    if not blocks:
        raise MisconfigurationException(
            f"Could not find the transformer blocks of {type(root).__name__} (no _no_split_modules). Write a "
            f"configure_model() that calls fully_shard yourself and use ModelParallelStrategy."
        )
    return blocks


def shard_hf_module(
    pl_module: torch.nn.Module, mesh: Any, reshard_after_forward: bool = True, mp_policy: Any = None
) -> list[torch.nn.Module]:
    """``fully_shard`` each transformer block, then each HF model root. Returns the roots."""
    from torch.distributed.fsdp import fully_shard

    roots = _hf_roots(pl_module)
    if not roots:
        raise MisconfigurationException(
            f"FSDP2Strategy found no Hugging Face model inside {type(pl_module).__name__}. Write a configure_model() "
            f"that applies fully_shard and use ModelParallelStrategy."
        )
    covered = {id(p) for r in roots for p in r.parameters()}
    stray = [n for n, p in pl_module.named_parameters() if id(p) not in covered]
    if stray:
        raise MisconfigurationException(
            f"FSDP2Strategy shards the Hugging Face model only, but {type(pl_module).__name__} has other parameters "
            f"{stray[:4]}. Write a configure_model() that shards them too and use ModelParallelStrategy."
        )
    kw: dict[str, Any] = dict(mesh=mesh)
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for root in roots:
        for block in transformer_blocks(root):
            fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
        fully_shard(root, **kw)
    return roots


@contextmanager
def _configure_model_marked(pl_module: Any):
    """ModelParallelStrategy.setup insists on an overridden configure_model; we sharded already."""
    if is_overridden("configure_model", pl_module):
        yield
        return
    pl_module.configure_model = types.MethodType(lambda self: None, pl_module)
    try:
        yield
    finally:
        del pl_module.configure_model


class FSDP2Strategy(ModelParallelStrategy):
    """Data-parallel FSDP2 (``fully_shard``) for an unchanged LightningModule that wraps an HF model.

    If the module defines ``configure_model``, that is used as with ``ModelParallelStrategy``. Otherwise each
    transformer block (``_no_split_modules``) is sharded, then the model root.

    Args:
        data_parallel_size: defaults to every process (pure data parallel, no tensor parallel).
        reshard_after_forward: free all-gathered block weights after forward (less memory, one more all-gather
            in backward).
        save_distributed_checkpoint: one shard file per rank (True) or a full checkpoint on rank 0 (False). Sharded
            checkpoints resume on any number of processes (torch.distributed.checkpoint reshards weights, optimizer
            and method state); ``memopt consolidate`` turns one into a Hugging Face folder.
        hsdp: hybrid sharding on a 2-D device mesh: each parameter is sharded within groups of ``shard_size``
            processes and replicated across the groups (gradients are reduce-scattered within a group, then
            all-reduced across groups). Across nodes this keeps the all-gathers on the fast intra-node links.
        shard_size: processes per shard group with ``hsdp=True``; default: the processes of one node (``devices``).

    Example::

        Trainer(accelerator="cuda", devices=2, strategy="fsdp2", callbacks=[LOMO(lr=1e-3)])
    """

    strategy_name = "fsdp2"

    def __init__(
        self,
        data_parallel_size: Union[Literal["auto"], int] = "auto",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: Optional[str] = None,
        hsdp: bool = False,
        shard_size: Optional[int] = None,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size, tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint, process_group_backend=process_group_backend,
        )
        self.reshard_after_forward = reshard_after_forward
        if shard_size is not None and (not hsdp or shard_size < 1):
            raise MisconfigurationException(
                f"FSDP2Strategy(shard_size={shard_size}) sets the shard group size of hybrid sharding: use it with "
                f"hsdp=True and a size of at least 1."
            )
        self.hsdp = hsdp
        self.shard_size = shard_size
        self._hsdp_mesh: Any = None

    @property
    def shard_mesh(self) -> Any:
        """The mesh parameters are sharded on: 1-D (``"data_parallel"``), or 2-D (``"replicate"``, ``"shard"``)
        with ``hsdp=True``."""
        if not self.hsdp:
            return self.device_mesh["data_parallel"]
        if self._hsdp_mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            world = self.world_size
            shard = self.shard_size or self.num_processes
            if world % shard:
                raise MisconfigurationException(
                    f"FSDP2Strategy(hsdp=True): {world} processes cannot be split into shard groups of {shard}; set "
                    f"shard_size to a divisor of the world size (default: the processes of one node)."
                )
            self._hsdp_mesh = init_device_mesh(
                self.root_device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard")
            )
        return self._hsdp_mesh

    def setup_environment(self) -> None:
        _shim.resolve_data_parallel_size(self)
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        module = self.lightning_module
        # A second trainer call (test after fit) gets the module already sharded: fully_shard it only once.
        if not is_overridden("configure_model", module) and not fsdp_modules(module):
            shard_hf_module(module, self.shard_mesh, self.reshard_after_forward)
        with _configure_model_marked(module):
            super().setup(trainer)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        # After a forward without backward (MeZO's last evaluation, DFO's generations) the root group stays unsharded:
        # its registered parameters are then plain tensors that neither the optimizer nor a checkpoint knows.
        reshard_all(self.model)
        return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        reshard_all(self.model)
        return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():  # a sharded (torch.distributed.checkpoint) folder: resharded by DCP on load
            return super().load_checkpoint(path, weights_only=weights_only)
        # as Lightning reads its own checkpoints: weights_only=False unless asked (mmap: only what is looked at)
        saved = torch.load(path, mmap=True, map_location="cpu", weights_only=bool(weights_only))
        states = saved.get("optimizer_states") or []
        optimizers = self.optimizers
        if not states or not optimizers:
            return super().load_checkpoint(path, weights_only=weights_only)
        if len(states) != len(optimizers):
            raise MisconfigurationException(
                f"{path} holds {len(states)} optimizer states and configure_optimizers returned {len(optimizers)} "
                f"optimizers: resume with the same optimizers, or load only the weights (memopt test/validate)."
            )
        # The optimizers are loaded here rather than by Lightning: its loader fails on a state without entries
        # (DFOLoRA freezes every weight) and maps index keys to the module's parameter order, which is wrong for a
        # checkpoint written without FSDP2 when the groups are not in that order (weight decay / no decay).
        self.optimizers = []
        try:
            out = super().load_checkpoint(path, weights_only=weights_only)
        finally:
            self.optimizers = optimizers
        for opt, state in zip(optimizers, states):
            if not state.get("state"):
                for group, saved_group in zip(opt.param_groups, state.get("param_groups", [])):
                    group.update({k: v for k, v in saved_group.items() if k != "params"})
                continue
            _load_full_optimizer_state(self.model, opt, state, strict=self.lightning_module.strict_loading)
        return out


def _load_full_optimizer_state(module: torch.nn.Module, optimizer: Any, state: dict[str, Any], strict: bool) -> None:
    """Load a full (unsharded) optimizer state into a sharded module's optimizer.

    Index keys are matched to parameters by their place in the groups, as ``Optimizer.load_state_dict`` does. That
    covers both kinds of index: ``Optimizer.state_dict`` numbers the groups' parameters in order, Lightning's full FSDP
    checkpoints by the module's parameter order. Then they are renamed as Lightning's loader does.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import OptimStateKeyType

    if any(isinstance(k, int) for k in state["state"]):
        saved_sizes = [len(g["params"]) for g in state["param_groups"]]
        sizes = [len(g["params"]) for g in optimizer.param_groups]
        if saved_sizes != sizes:
            raise MisconfigurationException(
                f"The checkpoint's optimizer has parameter groups of sizes {saved_sizes} and this run's has {sizes}: "
                f"resume with the same model and configure_optimizers."
            )
        order = {p: i for i, p in enumerate(module.parameters())}
        place = {}
        for saved_group, group in zip(state["param_groups"], optimizer.param_groups):
            place.update(zip(saved_group["params"], (order[p] for p in group["params"])))
        state = {
            "state": {place[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [place[i] for i in g["params"]]} for g in state["param_groups"]],
        }
        state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, module)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
    set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=options)


def register_strategies(registry: Any = StrategyRegistry) -> None:
    """Register ``"fsdp2"`` and ``"zero3"``; safe to call any number of times."""
    if "fsdp2" not in registry:
        registry.register("fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard) for unchanged HF LightningModules")
    from lightning_memopt.strategies.zero3 import register_zero3

    register_zero3(registry)
