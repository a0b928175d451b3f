"""``Perturber``: forward hooks that make a model see ``W + scale·z`` for one forward, without writing ``W``.

The mechanism behind MeZO's functional perturbation (see :mod:`lightning_memopt.mezo.core`): z is regenerated
from ``(seed, parameter index, element offset)`` by :mod:`lightning_memopt.core.perturb` at each use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_memopt.core import perturb
from lightning_memopt.core.fsdp import is_dtensor, is_fsdp2

if TYPE_CHECKING:
    from lightning_memopt.mezo.core import ZOParam


class Perturber:
    """Forward hooks that make each module see ``W + scale·z`` instead of ``W`` while :meth:`active`.

    A pre-hook swaps in temporary perturbed copies; the forward hook puts the original Parameters back, so only the
    copies of the module running now exist. Modules are hooked in *groups*: a submodule whose trained parameters
    total at most ``group_bytes`` (e.g. a whole decoder layer of a small model) is perturbed in one kernel launch at
    its own pre-hook; larger ones fall back to each parameter-owning module. For small models the per-tensor
    launches, not the memory traffic, are the cost, so grouping is the speed-up there; the cap bounds the extra
    memory (the default is well under 2% of the forward peak of a 1B model).

    Every owning module also keeps a cheap hook of its own: if it runs outside its group's forward (a model that
    calls a submodule directly), it is perturbed there, alone, so no module ever sees unperturbed weights. Under
    FSDP2 the module holds the all-gathered full parameter only inside its FSDP unit's forward, so grouping is off
    and each owner builds its copy from the unsharded parameter (offset 0), leaving FSDP2's bookkeeping untouched.
    z is keyed by the parameter's index, so tied weights get the same z at every use.

    A parameter that a module reads outside its own ``forward`` (e.g. ``F.linear(x, other.weight)``) would be seen
    unperturbed; Hugging Face models do not do that. One whose owner never runs a forward (a parameter of the
    LightningModule itself, used in ``training_step``) is never perturbed: the first activation warns, naming it.

    ``overlap=True`` makes each unit's copies (a group's, or an ungrouped owner's) one unit ahead, on a side CUDA
    stream, while the unit before runs its forward: the Gaussian pass is compute-bound and the forward's GEMMs run on
    the tensor cores, so the two can share the GPU. The first :meth:`active` forward records the order the units
    run in, and later ones follow it. A copy is used only by its own unit, in the same activation, with every member
    still unswapped; otherwise the unit makes its copies as without overlap. So the numbers are the same either way.
    One more unit's copies are alive at a time. On CPU the copies are made one unit early, inline.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        params: Sequence[ZOParam],
        z_for: Callable[[int, int], Any] | None = None,
        distribution: str = "normal",
        group_bytes: int = 64 << 20,
        overlap: bool = False,
    ) -> None:
        self.distribution = distribution
        self.overlap = bool(overlap)
        self._units: list[list[tuple[torch.nn.Module, list[tuple[str, int]]]]] = []  # per pre-hook, its members
        self._order: list[int] | None = None  # units in the order they made copies (the first activation's)
        self._trace: list[int] = []
        self._next: dict[int, int] = {}
        self._ahead: dict[int, tuple[dict[int, Tensor], Any]] = {}  # unit -> (its copies, the side stream's event)
        self._side: Any = None
        self.ahead_used = 0  # units that used copies made ahead (what the tests read)
        self.z_for = z_for  # optional cache: (seed, index) -> full-tensor z, or None to generate
        self.seed: int | None = None
        self.scale = 0.0
        self._seed_t: Tensor | None = None
        self._device_seed = False
        self._stack: list[tuple[torch.nn.Module, list[tuple[torch.nn.Module, str, Any]]]] = []
        self._live: set[int] = set()  # owners whose parameters are swapped now (by their group or themselves)
        self._handles: list[Any] = []
        by_id = {id(zp.param): zp.index for zp in params}
        names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
        self._unseen: dict[int, str] | None = {i: names.get(pid, f"#{i}") for pid, i in by_id.items()}
        owners: dict[int, tuple[torch.nn.Module, list[tuple[str, int]]]] = {}
        for mod in module.modules():
            entries = [(n, by_id[id(p)]) for n, p in mod._parameters.items() if p is not None and id(p) in by_id]
            if entries:
                owners[id(mod)] = (mod, entries)
        if len({i for _, es in owners.values() for _, i in es}) != len(by_id):
            raise ValueError("Some trained parameters belong to no submodule of the given module.")
        cap = 0 if is_fsdp2(module) else int(group_bytes)
        self._group_roots: list[tuple[torch.nn.Module, list[tuple[torch.nn.Module, list[tuple[str, int]]]]]] = []
        self._plan(module, owners, cap, True, set())
        for group_root, members in self._group_roots:
            self._handles.append(group_root.register_forward_pre_hook(self._make_pre(members)))
            self._handles.append(group_root.register_forward_hook(self._post, always_call=True))
        for mod, entries in owners.values():  # the safety net (and the only hooks of ungrouped owners)
            self._handles.append(mod.register_forward_pre_hook(self._make_pre([(mod, entries)])))
            self._handles.append(mod.register_forward_hook(self._post, always_call=True))

    def _plan(self, mod: torch.nn.Module, owners: dict, cap: int, is_root: bool, seen: set[int]) -> None:
        """Choose group roots: the highest non-root submodules with a forward whose parameters fit in ``cap``."""
        if id(mod) in seen:
            return
        seen.add(id(mod))
        members = [owners[id(m)] for m in mod.modules() if id(m) in owners]
        size: dict[int, int] = {}
        for m, entries in members:
            for name, idx in entries:
                p = m._parameters[name]
                size[idx] = p.numel() * p.element_size()
        callable_ = type(mod).forward is not torch.nn.Module.forward  # ModuleList/ModuleDict are never called
        if not is_root and cap and callable_ and len(members) > 1 and 0 < sum(size.values()) <= cap:
            self._group_roots.append((mod, members))
            seen.update(id(m) for m in mod.modules())
            return
        for child in mod.children():
            self._plan(child, owners, cap, False, seen)

    def _make_pre(self, members: list[tuple[torch.nn.Module, list[tuple[str, int]]]]) -> Callable:
        unit = len(self._units)
        self._units.append(members)

        def pre(mod: torch.nn.Module, args: Any) -> None:
            if self.seed is None:
                return
            todo = [(m, es) for m, es in members if id(m) not in self._live]
            if not todo:
                return
            saved: list[tuple[torch.nn.Module, str, Any]] = []
            tensors: dict[int, Tensor] = {}
            for m, es in todo:
                for name, idx in es:
                    p = m._parameters[name]
                    if is_dtensor(p):
                        raise RuntimeError(
                            f"MeZO: parameter {name!r} of {type(m).__name__} is still sharded during its forward; "
                            f"every sharded module must be under fully_shard (FSDP2 all-gathers it)."
                        )
                    saved.append((m, name, p))
                    tensors.setdefault(idx, p)
            ahead = self._ahead.pop(unit, None)
            if ahead is not None and len(todo) == len(members):
                new, event = ahead
                if event is not None:  # made on the side stream: this unit's forward waits for it
                    torch.cuda.current_stream(next(iter(new.values())).device).wait_event(event)
                self.ahead_used += 1
            else:
                new = self._perturbed(tensors)
            if self.overlap:
                if self._order is None:
                    self._trace.append(unit)
                elif unit in self._next:
                    self._make_ahead(self._next[unit])
            for m, es in todo:
                for name, idx in es:
                    m._parameters[name] = new[idx]
                    if self._unseen is not None:
                        self._unseen.pop(idx, None)
                self._live.add(id(m))
            self._stack.append((mod, saved))

        return pre

    def _perturbed(self, tensors: dict[int, Tensor]) -> dict[int, Tensor]:
        seed = int(self.seed)  # type: ignore[arg-type]
        if self.z_for is not None or (len(tensors) == 1 and not self._device_seed):
            return {
                i: perturb.perturbed(
                    p,
                    perturb.key(seed, i),
                    self.scale,
                    z=None if self.z_for is None else self.z_for(seed, i),
                    dist=self.distribution,
                )
                for i, p in tensors.items()
            }
        out: dict[int, Tensor] = {}
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in tensors.items():
            by_dtype.setdefault(p.dtype, []).append(i)
        for idx in by_dtype.values():
            ws = [tensors[i] for i in idx]
            if self._seed_t is None and ws[0].is_cuda:
                self._seed_t = perturb.seed_tensor(seed, ws[0].device)
            seed_t = self._seed_t if self._seed_t is not None and self._seed_t.device == ws[0].device else None
            if self._device_seed and seed_t is None:
                raise RuntimeError("MeZO: the device seed is on another device than the weights it perturbs.")
            out.update(zip(idx, perturb.perturbed_many(ws, idx, seed, self.scale, self.distribution, seed_t)))
        return out

    def _make_ahead(self, unit: int) -> None:
        """Start ``unit``'s copies now: on the side stream after everything queued so far on the current one."""
        members = self._units[unit]
        if unit in self._ahead or any(id(m) in self._live for m, _ in members):
            return
        tensors: dict[int, Tensor] = {}
        for m, es in members:
            for name, idx in es:
                p = m._parameters[name]
                if is_dtensor(p):  # sharded until its own forward: nothing to copy ahead
                    return
                tensors.setdefault(idx, p)
        dev = next(iter(tensors.values())).device
        if dev.type != "cuda":
            self._ahead[unit] = (self._perturbed(tensors), None)
            return
        if self._seed_t is None:  # made on the current stream, which the side stream waits for
            self._seed_t = perturb.seed_tensor(int(self.seed), dev)  # type: ignore[arg-type]
        if self._side is None:
            self._side = torch.cuda.Stream(dev)
        # The copies come from the side stream's pool. Every side launch first waits for all work queued on the
        # current stream, so a block the side reuses was last read by work that has finished.
        self._side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(self._side):
            new = self._perturbed(tensors)
            event = torch.cuda.Event()
            event.record(self._side)
        self._ahead[unit] = (new, event)

    def _post(self, mod: torch.nn.Module, args: Any, out: Any) -> None:
        if self.seed is None:
            return
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] is mod:
                _, saved = self._stack.pop(i)
                self._restore(saved)
                return

    def _restore(self, saved: list[tuple[torch.nn.Module, str, Any]]) -> None:
        for m, name, p in saved:
            m._parameters[name] = p
            self._live.discard(id(m))

    @contextmanager
    def active(self, seed: int, scale: float, seed_t: Tensor | None = None) -> Iterator[None]:
        """Forwards inside see every trained weight perturbed by ``scale·z(seed)``.

        ``seed_t`` (a device int64 scalar holding ``seed``) makes every kernel read the seed from the device, so a
        CUDA graph captured here draws the direction its replay finds in ``seed_t``, not the capture's.
        """
        self.seed, self.scale, self._seed_t = int(seed), float(scale), seed_t
        self._device_seed = seed_t is not None
        self._trace = []
        done = False
        try:
            yield
            done = True
        finally:
            while self._stack:  # a forward that raised midway: put every original back
                self._restore(self._stack.pop()[1])
            self._live.clear()
            if self._side is not None:  # the side stream joins back (a CUDA graph's capture needs it too)
                torch.cuda.current_stream(self._side.device).wait_stream(self._side)
            self._ahead.clear()  # copies made ahead and not used
            if done and self._unseen is not None:
                self._warn_unseen()
            if self.overlap and self._order is None and done and self._trace:
                self._order = list(self._trace)
                self._next = {u: v for u, v in zip(self._order, self._order[1:])}
            self.seed, self._seed_t, self._device_seed = None, None, False

    def _warn_unseen(self) -> None:
        unseen, self._unseen = self._unseen, None  # the first activation only
        perturb.warn_unperturbed(unseen.values())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class InPlacePerturber:
    """``W ← W + scale·z`` written into each parameter's local partition while :meth:`active`, then
    ``W ← W − scale·z`` on exit: MeZO's original in-place perturbation, for DeepSpeed ZeRO-3, where a module's weights
    exist whole only inside DeepSpeed's own gather (so :class:`Perturber`'s hooks cannot see them). z is keyed by the
    global element offset of each partition, so it equals the unpartitioned run's. The restore subtracts, so it is
    exact up to one rounding of ``W + scale·z`` per perturbation (MeZO's own behaviour; in bf16 that is MeZO's
    issue #42, which :class:`Perturber` avoids).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        params: Sequence[ZOParam],
        z_for: Callable[[int, int], Any] | None = None,
        distribution: str = "normal",
    ) -> None:
        from lightning_memopt.core.fsdp import global_offset, local

        self.module = module
        self.z_for = z_for
        self.distribution = distribution
        self._parts = [(zp.index, local(zp.param), global_offset(zp.param)[0]) for zp in params]

    def _add(self, seed: int, scale: float) -> None:
        from lightning_memopt.core.fsdp import reshard_all

        reshard_all(self.module)  # no gathered copy may outlive the write: the next forward gathers the partitions
        with torch.no_grad():
            for index, part, start in self._parts:
                if part.numel() == 0:
                    continue
                z = None if self.z_for is None else self.z_for(seed, index)[start : start + part.numel()]
                part.copy_(perturb.perturbed(part, perturb.key(seed, index), scale, start, z, self.distribution))

    @contextmanager
    def active(self, seed: int, scale: float, seed_t: Tensor | None = None) -> Iterator[None]:
        """Forwards inside see every trained weight perturbed by ``scale·z(seed)`` (written in place, then undone).
        A device seed (a CUDA graph's) is not taken here: MeZO's ``cuda_graph`` runs eagerly under ZeRO-3."""
        if seed_t is not None:
            raise ValueError("The ZeRO-3 perturber takes host seeds only (MeZO(cuda_graph=True) runs eagerly there).")
        self._add(int(seed), float(scale))
        try:
            yield
        finally:
            self._add(int(seed), -float(scale))

    def remove(self) -> None:
        """Nothing to remove: no hooks."""
