"""Non-finite losses: decided on the device, skipped there, learnt by the host a step later.

A method calls :meth:`SkipGuard.check` on its loss (or projected gradient, or fitness) before it writes anything.
That returns ``ok``, a 0-d bool on the device, the same on every rank; the method makes its update a no-op where
``ok`` is false (a masked kernel, ``found_inf`` of a fused optimizer), so the weights and the device state stay
bit-identical and no host sync is needed on the hot path. Host-side bookkeeping that the step changed anyway (step
counters, a history entry) is registered with :meth:`SkipGuard.on_skip` and undone when the host learns the
outcome: :meth:`SkipGuard.resolve` reads the flags of earlier steps, long finished on the GPU, from pinned memory.

Updates made inside backward (LOMO, AdaLomo, layer-wise GaLore) cannot wait for the whole gradient: a tensor whose
gradient is not finite while the loss is (a backward kernel's bug) is left out on its own. Its kernel writes 0 into its
slot of :class:`TensorFlags` and skips the tensor (AdaLomo, GaLore) or the non-finite elements (LOMO's SGD, which is
elementwise); :meth:`SkipGuard.attach` hands the flags to the step's check, and :meth:`resolve` counts such a step in
``partial_steps`` and calls the method's undo for the host state of the tensors left out.

After ``max_consecutive`` skipped or partial steps in a row, :meth:`resolve` raises :class:`NonFiniteLossError`.

Example::

    guard = SkipGuard("LOMO")
    ok = guard.check(loss, step=t)          # on the device; no sync
    ...                                     # updates masked by ok
    for step in guard.resolve():            # later (next step, or at a checkpoint): skipped steps, undone
        print("skipped", step)
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_memopt.core.fsdp import local
from lightning_memopt.core.validate import at_least


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss."""


@dataclass
class _Attached:
    flags: Tensor  # host copy, valid once the step's event completed
    event: torch.cuda.Event | None
    names: list[str]
    undo: Callable[[list[int]], None] | None
    effect: str


@dataclass
class _Pending:
    step: int
    ok: Tensor  # host (pinned) copy, valid once ``event`` completed
    event: torch.cuda.Event | None
    seq: int  # the check's number (checks are numbered from 0 in the order made)
    undo: list[Callable[[], None]] = field(default_factory=list)
    tensors: _Attached | None = None  # per-tensor flags of an in-backward step (see TensorFlags)


class TensorFlags:
    """One slot per tensor, 1 while its gradient is finite; update kernels write 0 (on the device) where it is not.

    Args:
        names: the tensors' names, for messages, in slot order.

    Example::

        flags = TensorFlags(["w", "b"])
        flags.begin(device)                    # all slots 1, before backward
        axpby_(w, w.grad, -lr, finite=flags.slot(0))   # 0 if w.grad held a NaN; those elements not applied
        guard.attach(flags, undo=None, effect="...")   # after backward
    """

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.flags: Tensor | None = None
        self._slots: list[Tensor] = []

    def begin(self, device: torch.device) -> None:
        """Set every slot to 1 (one fill kernel; the buffer is made once)."""
        if self.flags is None or self.flags.device != torch.device(device):
            self.flags = torch.ones(len(self.names), dtype=torch.int32, device=device)
            self._slots = list(self.flags.unbind(0))  # 0-d views, made once: a hook indexes a list, not the tensor
        else:
            self.flags.fill_(1)

    def slot(self, i: int) -> Tensor:
        return self._slots[i]


class SkipGuard:
    """Counts and undoes steps skipped for a non-finite loss; see the module docstring.

    Args:
        method: name used in messages.
        max_consecutive: skips in a row tolerated; one more raises :class:`NonFiniteLossError`.
        notify: called with a message for each skip the host learns of (default: ``warnings.warn``).
    """

    def __init__(
        self, method: str, max_consecutive: int = 10, notify: Callable[[str], None] | None = None
    ) -> None:
        self.method = method
        self.max_consecutive = at_least(max_consecutive, 0, "max_consecutive_skips")
        self.notify = notify or (lambda msg: warnings.warn(msg, stacklevel=3))
        self.skipped_steps = 0
        self.partial_steps = 0  # steps that left out tensors whose gradient was not finite (TensorFlags)
        self.skipped_tensors = 0  # tensors left out over those steps
        self.consecutive = 0
        self.checks = 0  # checks made so far: the next one's number
        self._pending: deque[_Pending] = deque()
        # what the error adds (a method callback sets it: whether the weights are still finite, and why not)
        self.diagnose: Callable[[], str] | None = None
        self.checked = "loss"  # what check() looks at, as messages name it

    def check(
        self, *values: Tensor, step: int, reduce: bool = False, group: dist.ProcessGroup | None = None
    ) -> Tensor:
        """``ok``: every element of every value is finite (and, with ``reduce``, on every rank of ``group``)."""
        ok = torch.isfinite(values[0].detach()).all()
        for v in values[1:]:
            ok = ok & torch.isfinite(v.detach()).all()
        if reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            okf = ok.to(torch.float32)
            dist.all_reduce(okf, op=dist.ReduceOp.MIN, group=group)
            ok = okf > 0
        return self.track(ok, step)

    def track(self, ok: Tensor, step: int) -> Tensor:
        """Register a step's ``ok`` flag decided by the method itself (a 0-d bool, the same on every rank), e.g.
        DFO's "some candidate's fitness is finite"; :meth:`check` ends here. Its number is ``checks - 1`` after."""
        if ok.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(ok, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = ok, None
        self._pending.append(_Pending(int(step), host, event, self.checks))
        self.checks += 1
        return ok

    def attach(
        self,
        flags: TensorFlags | Tensor,
        undo: Callable[[list[int]], None] | None,
        effect: str,
        group: dist.ProcessGroup | None = None,
        names: list[str] | None = None,
    ) -> None:
        """Hand the last checked step's :class:`TensorFlags` (written during its backward), or a vector of such
        flags with their ``names``, to the guard; where the step was not skipped as a whole and some slot is 0,
        :meth:`resolve` calls ``undo(slots)`` (host state of those tensors) and says ``effect`` (what happened to
        them). Under torch.distributed the flags are reduced (MIN) over ``group``, so every rank counts, undoes and
        raises alike."""
        if not self._pending or self._pending[-1].seq != self.checks - 1:
            raise RuntimeError("SkipGuard.attach() needs its step's check() first, unresolved.")
        if isinstance(flags, TensorFlags):
            f, names = flags.flags, flags.names
            if f is None:
                raise RuntimeError("TensorFlags.begin() was not called for this step.")
        elif names is None or len(names) != flags.numel():
            raise ValueError("SkipGuard.attach() of a flag vector needs one name per flag.")
        else:
            f = flags
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            f = f.to(torch.int32, copy=True)  # the buffer is refilled next step; NCCL reduces no bools
            dist.all_reduce(f, op=dist.ReduceOp.MIN, group=group)
        if f.device.type == "cuda":
            host = torch.empty(f.shape, dtype=f.dtype, pin_memory=True)
            host.copy_(f, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = f.clone(), None  # the buffer is refilled next step
        self._pending[-1].tensors = _Attached(host, event, list(names), undo, effect)

    def drop(self, seq: int) -> None:
        """Forget check ``seq`` unresolved (its step was taken back some other way, e.g. by an exception)."""
        self._pending = deque(p for p in self._pending if p.seq != seq)

    def on_skip(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` (host bookkeeping of the last checked step) if that step turns out skipped."""
        if not self._pending:
            raise RuntimeError("SkipGuard.on_skip() needs a check() first.")
        self._pending[-1].undo.append(undo)

    def resolve(self, wait: bool = True, upto: int | None = None, lazy: bool = False) -> list[int]:
        """Learn the outcome of the checked steps (all of them, those numbered up to ``upto``, or with
        ``wait=False`` those already finished); undo and count the skipped ones, which are returned.

        ``lazy`` (a method's next step): wait for the loss checks, and for per-tensor flags with host state to put
        back, but not for flags that only count (copied after backward: waiting for them would keep the host from
        queueing the next backward while the GPU still runs the last one); such a step stays pending until they
        arrive, and later steps behind it."""
        skipped = []
        while self._pending:
            p = self._pending[0]
            if upto is not None and p.seq > upto:
                break
            t = p.tensors
            events = [e for e in (p.event, None if t is None else t.event) if e is not None]
            if not wait and not all(e.query() for e in events):
                break
            if p.event is not None:
                p.event.synchronize()
            if t is not None and t.event is not None:
                if lazy and t.undo is None and bool(p.ok) and not t.event.query():
                    break
                t.event.synchronize()
            self._pending.popleft()
            bad: list[int] = []
            if p.tensors is not None and bool(p.ok):
                bad = (p.tensors.flags == 0).nonzero().flatten().tolist()
            if bad:
                self._partial(p.step, bad, p.tensors)
            else:
                self.record(not bool(p.ok), p.step, p.undo)
            if not bool(p.ok):
                skipped.append(p.step)
        return skipped

    def _partial(self, step: int, bad: list[int], att: _Attached) -> None:
        """A step whose loss was finite but whose gradient was not in the tensors ``bad``."""
        if att.undo is not None:
            att.undo(bad)
        self.partial_steps += 1
        self.skipped_tensors += len(bad)
        self.consecutive += 1
        self.notify(
            f"{self.method}: non-finite gradient at step {step} in {len(bad)} of {len(att.names)} tensors "
            f"({att.names[bad[0]]} first) under a finite loss; {att.effect}. partial_steps={self.partial_steps}."
        )
        self._raise_if_too_many(step)

    def record(
        self, skipped: bool, step: int, undo: list[Callable[[], None]] = (), consecutive: bool = True,
        reason: str | None = None,
    ) -> None:
        """Count one step's outcome (also for a skip the host knew at once, e.g. an fp16 overflow).

        ``consecutive=False`` counts the skip without moving toward the error and without a warning (an fp16
        overflow while the loss scaler can still lower its scale is expected; the caller reports it). ``reason``
        names the skip in the warning (default: a non-finite loss).
        """
        if not skipped:
            self.consecutive = 0
            return
        for fn in reversed(list(undo)):
            fn()
        self.skipped_steps += 1
        self.consecutive += int(consecutive)
        if consecutive:
            self.notify(
                f"{self.method}: {reason or 'non-finite ' + self.checked} at step {step}; the step was skipped "
                f"(weights and state untouched). skipped_steps={self.skipped_steps}."
            )
        self._raise_if_too_many(step)

    def _raise_if_too_many(self, step: int) -> None:
        if self.consecutive <= self.max_consecutive:
            return
        extra = self.diagnose() if self.diagnose is not None else ""
        what = self.checked + (" or some tensors' gradient" if self.partial_steps else "")
        raise NonFiniteLossError(
            f"{self.method}: the {what} was not finite for {self.consecutive} steps in a row (up to step {step}; "
            f"max_consecutive_skips={self.max_consecutive}); no update was made from a non-finite value. Likely "
            f"causes: a learning rate (or eps) too high, fp16 overflow (use bf16), or bad data (a batch whose labels "
            f"or inputs produce inf/NaN). Lower lr, check the data, or raise max_consecutive_skips."
            + (f" {extra}" if extra else "")
        )

    def state_dict(self) -> dict[str, int]:
        self.resolve()
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive,
                "partial_steps": self.partial_steps, "skipped_tensors": self.skipped_tensors}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Replace the counts (a fresh fit: ``{}``); checks still pending belong to a fit that ended (an exception
        left them) and are dropped, their steps' undo with them."""
        self._pending.clear()
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self.partial_steps = int(state.get("partial_steps", 0))
        self.skipped_tensors = int(state.get("skipped_tensors", 0))


def nonfinite_weights_note(module: torch.nn.Module) -> str:
    """What :class:`NonFiniteLossError` adds when ``module``'s weights (this rank's shards) are no longer finite: an
    earlier update wrote them from a gradient that was not finite while its loss was; "" while they are finite."""
    bad = [name for name, p in module.named_parameters()
           if not bool(torch.isfinite(local(p).detach()).all())]
    if not bad:
        return ""
    return (
        f"The weights are no longer finite ({len(bad)} tensors, {bad[0]} first), so an earlier step updated them from "
        f"a gradient that was not finite while its loss was. One known cause: on an H100 or H200, torch 2.11 and later "
        f"return NaN gradients from cuDNN attention for a masked batch of length 64 mod 128 (pytorch#196678). "
        f"HFCausalLM avoids it; in your own module, wrap the forward in "
        f"lightning_memopt.models.attention.sdpa_without_cudnn_where_unsafe(input_ids, attention_mask), or call "
        f"torch.backends.cuda.enable_cudnn_sdp(False)."
    )
