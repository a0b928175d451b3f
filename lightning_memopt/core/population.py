"""One population-forward engine: per-member deltas on a model's layers inside one batched forward.

A *population* of P members (MeZO's antithetic directions, DFO's candidates) is evaluated on one minibatch of B rows
by repeating the batch member-major (row ``j * B + i`` is example i under member j) and letting each layer add the
member's own delta to its output. Nothing parameter-sized is formed per member:

* ``nn.Linear`` with a low-rank delta ``W + U_j V_jᵀ``: ``y = x Wᵀ + (x V_j) U_jᵀ`` (:func:`add_lowrank_delta`,
  two batched matmuls of rank r);
* ``nn.Embedding`` with a low-rank row delta: ``E[t] + U_j[t] V_jᵀ``;
* anything else (norm weights, biases of other modules, weights of other module types): the module runs once per
  member on that member's rows with a temporary ``W + Δ_j`` (cheap for vectors; the correct fallback otherwise).

Two clients: :class:`PopulationEngine` (MeZO's population estimator: every trained parameter gets a delta from a
:class:`DeltaSource`) and DFO's :class:`~lightning_memopt.dfo.lora.ZLoRA` (per-candidate LoRA on its targets: it
calls :func:`repeat_rows` and :func:`add_lowrank_delta` from its own hooks).

Per-member losses (:func:`member_losses`) come one of two ways, and both methods use the same function:

* **batched**: the module defines ``per_sample_loss(batch) -> Tensor [B]``, per-example losses whose mean is the
  loss ``training_step`` returns; the batch is repeated P times (:func:`expand_batch`) and one forward gives
  ``[P, B]``;
* **per member**: ``loss_fn()`` (e.g. the module's own ``training_step``) runs once per member with that member's
  delta active: always correct, not batched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_memopt.core import perturb

PER_SAMPLE_HOOK = "per_sample_loss"


# ---------------------------------------------------------------------------------------------------------------
# rows and batches
# ---------------------------------------------------------------------------------------------------------------
def repeat_rows(
    x: Any, p: int, batch: int, memo: dict[int, tuple[Tensor, Tensor]] | None = None, min_ndim: int = 1,
    dicts: bool = True,
) -> Any:
    """Repeat member-major (``p`` times along dim 0) every tensor in ``x`` (nested tuples/lists/dicts) with at least
    ``min_ndim`` dimensions whose first is ``batch``; other values pass through. ``memo`` reuses one expansion of a
    tensor seen again (hidden states inside a model: ``min_ndim=2`` leaves 1-D position tensors alone); ``dicts=False``
    passes dicts through (inside a model they are its own structures)."""
    if isinstance(x, Tensor):
        if x.ndim >= min_ndim and x.shape[0] == batch:
            if memo is None:
                return x.repeat(p, *([1] * (x.ndim - 1)))
            hit = memo.get(id(x))
            if hit is None or hit[0] is not x:
                hit = (x, x.repeat(p, *([1] * (x.ndim - 1))))
                memo[id(x)] = hit
            return hit[1]
        return x
    if isinstance(x, tuple):
        return tuple(repeat_rows(v, p, batch, memo, min_ndim, dicts) for v in x)
    if isinstance(x, list):
        return [repeat_rows(v, p, batch, memo, min_ndim, dicts) for v in x]
    if isinstance(x, dict) and dicts:
        return {k: repeat_rows(v, p, batch, memo, min_ndim, dicts) for k, v in x.items()}
    return x


def batch_size(batch: Any) -> int:
    """The first dimension of the first tensor found in ``batch`` (dict, tuple, list or tensor)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for v in values:
        if isinstance(v, Tensor) and v.ndim >= 1:
            return int(v.shape[0])
        if isinstance(v, (dict, tuple, list)):
            try:
                return batch_size(v)
            except ValueError:
                continue
    raise ValueError(f"Cannot tell the batch size of a {type(batch).__name__}: it holds no tensor.")


def expand_batch(batch: Any, p: int) -> Any:
    """The batch repeated member-major ``p`` times (every tensor whose first dimension is the batch size)."""
    return repeat_rows(batch, p, batch_size(batch)) if p > 1 else batch


def add_lowrank_delta(out: Tensor, x: Tensor, left: Tensor, right: Tensor, stacked: Tensor | None = None) -> Tensor:
    """``out_j + (x_j · left_j) · right_j`` for each member j of the member-major rows of ``x`` (``[P·n, ..., in]``)
    and ``out`` (``[P·n, ..., out]``), in ``out``'s dtype: the add fused into the second matmul, so the sum is rounded
    once. ``left``: ``[P, in, r]``, ``right``: ``[P, r, out]``.

    ``stacked`` (``[in, P'·r]``, P' >= P): every member's left factor side by side, in place of ``left``. ``x·stacked``
    is then one matmul for all rows (P' times the few FLOPs of the per-member products, in a well-shaped GEMM instead
    of a batch of r-column ones), and member j's ``x_j·left_j`` is a strided view of its diagonal block."""
    p = right.shape[0]
    if stacked is None:
        xv = torch.bmm(x.reshape(p, -1, x.shape[-1]), left.to(x.dtype))
    else:
        r, x2 = right.shape[1], x.reshape(-1, x.shape[-1])
        full = x2 @ stacked.to(x.dtype)
        rows, w = x2.shape[0] // p, full.shape[1]
        xv = full.as_strided((p, rows, r), (rows * w + r, w, 1))  # [j, t, k] = full[j·rows + t, j·r + k]
    o = out.reshape(p, -1, out.shape[-1])
    return torch.baddbmm(o, xv.to(o.dtype), right.to(o.dtype)).reshape(out.shape)


def token_losses(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Per-token cross-entropy ``[B, T]`` (float32) of ``logits [B, T, V]`` against ``targets [B, T]``: the piece a
    causal LM's ``per_sample_loss`` sums per row.

    Rows of V, as Hugging Face's causal-LM loss flattens them: the same per-token values as its loss (bit for bit on
    a CPU). ``cross_entropy`` on the ``[B, V, T]`` transpose copies the logits into that layout and takes a strided
    log-softmax: 3x slower on a CPU at SmolLM2's 49k vocabulary, and a rounding away from Hugging Face's values.
    """
    b, t, v = logits.shape
    flat = F.cross_entropy(logits.float().reshape(b * t, v), targets.reshape(b * t), ignore_index=ignore_index,
                           reduction="none")
    return flat.view(b, t)


def per_sample_fn(module: Any) -> Callable[[Any], Tensor] | None:
    """The module's ``per_sample_loss(batch)`` hook, if it defines one."""
    fn = getattr(module, PER_SAMPLE_HOOK, None)
    return fn if callable(fn) else None


def member_losses(
    members: Sequence[Any],
    activate: Callable[[Sequence[Any]], Any],
    chunk: int | None,
    loss_fn: Callable[[], Tensor] | None = None,
    per_sample: Callable[[Any], Tensor] | None = None,
    batch: Any = None,
) -> Tensor:
    """Per-member losses ``[P, B]`` (batched, ``per_sample`` on ``batch``) or ``[P, 1]`` (``loss_fn`` per member).

    ``activate(members)`` is a context manager making the next forward see those members' deltas on member-major
    rows. Batched evaluation runs ``chunk`` members per forward (None: all at once).
    """
    out: list[Tensor] = []
    if per_sample is not None:
        b = batch_size(batch)
        step = chunk or len(members)
        for i in range(0, len(members), step):
            part = members[i : i + step]
            with activate(part):
                losses = per_sample(expand_batch(batch, len(part)))
            if losses.numel() != len(part) * b:
                raise ValueError(
                    f"per_sample_loss returned {tuple(losses.shape)} for a batch of {len(part)}x{b} rows; it must "
                    f"return one loss per example ([batch])."
                )
            out.append(losses.float().reshape(len(part), b))
        return torch.cat(out)
    if loss_fn is None:
        raise ValueError("member_losses needs loss_fn or per_sample.")
    for m in members:
        with activate([m]):
            out.append(torch.as_tensor(loss_fn()).float().reshape(1, 1))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# the engine: per-member deltas of trained parameters
# ---------------------------------------------------------------------------------------------------------------
class DeltaSource(Protocol):
    """What :class:`PopulationEngine` asks for each parameter (by index) and list of members."""

    def lowrank(self, index: int) -> bool:
        """Whether the parameter (2-D) takes low-rank deltas ``U Vᵀ``; else dense deltas of its shape."""

    def factors(self, index: int, members: Sequence[Any], dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``(U [P, m, r], V [P, n, r])`` float32 (or ``dtype``, when the source can give it without a cast per
        call), the member's scale folded into U: delta_j = U_j V_jᵀ."""

    def dense(self, index: int, members: Sequence[Any]) -> Tensor:
        """``[P, *shape]`` float32 deltas (scale folded in)."""

    def begin(self, members: Sequence[Any]) -> None:
        """These members' forward starts (a source may prepare all their deltas at once here)."""

    def end(self) -> None:
        """That forward is over."""


class PopulationEngine:
    """Forward hooks on every module owning a trained parameter: while :meth:`active` with members ``m_0..m_{P-1}``,
    the member-major rows of member j see each trained ``W_i + Δ_ij`` (from ``source``).

    Args:
        module: the model.
        params: ``(name, parameter, index)`` of each trained parameter; the index keys ``source``.
        source: the :class:`DeltaSource` giving factors or dense deltas.

    ``nn.Linear`` weights and ``nn.Embedding`` tables with low-rank deltas are computed analytically (no dense
    delta); every other owner runs once per member on its rows with temporary parameters. A Linear projecting onto a
    subset of its rows (``HFCausalLM``'s label-word head sets ``_memopt_label_ids``) takes those rows of U.
    """

    def __init__(self, module: nn.Module, params: Sequence[tuple[str, Tensor, int]], source: DeltaSource) -> None:
        self.source = source
        self.members: list[Any] | None = None
        self._handles: list[Any] = []
        by_id = {id(p): (n, i) for n, p, i in params}
        self._unseen: dict[int, str] | None = {i: n for n, _, i in params}  # until the first activation ends
        owners: list[tuple[nn.Module, list[tuple[str, int]]]] = []
        seen: set[int] = set()
        for mod in module.modules():
            entries = [(n, by_id[id(p)][1]) for n, p in mod._parameters.items() if p is not None and id(p) in by_id]
            if entries:
                owners.append((mod, entries))
                seen.update(i for _, i in entries)
        if len(seen) != len({i for _, _, i in params}):
            raise ValueError("Some trained parameters belong to no submodule of the given module.")
        self._stash: dict[int, tuple] = {}
        for mod, entries in owners:
            names = dict(entries)
            if set(names) == {"weight"} and not self.source.lowrank(names["weight"]) and _is_llama_rmsnorm(mod):
                self._handles += self._rmsnorm_hooks(mod, names)
            else:
                self._handles.append(mod.register_forward_hook(self._make_hook(mod, entries), with_kwargs=True))
        self._nested = {id(m) for m, _ in owners if any(id(c) in {id(o) for o, _ in owners} for c in m.modules()
                                                           if c is not m)}

    def _make_hook(self, mod: nn.Module, entries: list[tuple[str, int]]) -> Callable:
        names = dict(entries)
        fast = None
        if isinstance(mod, nn.Linear) and (names.get("weight") is None or self.source.lowrank(names["weight"])):
            fast = self._linear
        elif isinstance(mod, nn.Embedding) and set(names) == {"weight"} and self.source.lowrank(names["weight"]):
            fast = self._embedding

        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            if self.members is None:
                return None
            self._seen(entries)
            if fast is not None:
                return fast(module, names, args, kwargs, out)
            return self._per_member(module, names, args, kwargs, out)

        return hook

    def _rmsnorm_hooks(self, mod: nn.Module, names: dict) -> list[Any]:
        """LlamaRMSNorm, while members are active: the module's own forward runs on no rows (no kernels: its input is
        stashed and swapped for an empty slice) and :meth:`_rmsnorm` gives the output; a plain forward hook would
        compute the plain output first only to replace it. (Not a replaced ``forward``: Hugging Face's kernel
        layers drop an instance ``forward`` when the model changes mode.)"""

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if self.members is None:
                return None
            self._stash[id(module)] = (args, kwargs)
            if args:
                return (args[0][:0], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"][:0]}

        def post(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            stashed = self._stash.pop(id(module), None)
            if self.members is None or stashed is None:
                return None
            self._seen(list(names.items()))
            return self._rmsnorm(module, names, *stashed)

        return [mod.register_forward_pre_hook(pre, with_kwargs=True),
                mod.register_forward_hook(post, with_kwargs=True)]

    def _rows(self, x: Tensor, module: nn.Module) -> int:
        p = len(self.members)  # type: ignore[arg-type]
        if x.shape[0] % p:
            raise RuntimeError(
                f"Population evaluation: {type(module).__name__} got {x.shape[0]} rows, not a multiple of the "
                f"{p} members; the model must keep the (member-major) batch dimension first. Use batched=False."
            )
        return x.shape[0] // p

    def _linear(self, module: nn.Module, names: dict, args: tuple, kwargs: dict, out: Tensor) -> Tensor:
        x = args[0] if args else kwargs["input"]
        self._rows(x, module)
        members = self.members
        rows = getattr(module, "_memopt_label_ids", None)
        if "weight" in names:
            u, v = self.source.factors(names["weight"], members, x.dtype)  # [P, out, r], [P, in, r]
            # One GEMM against every member's V computes P'·r columns per row where the batch of bmms computes r:
            # taken while those extra FLOPs stay within the layer's own matmul (SmolLM2, 17 members of rank 4:
            # 36.7 -> 26.4 ms a step on an H200), batched beyond that, where nothing was measured.
            stacked = getattr(self.source, "stacked_v", None)
            wide = (len(members) + len(members) % 2) * u.shape[2] > u.shape[1]  # type: ignore[arg-type]
            vcat = stacked(names["weight"], members, x.dtype) if stacked is not None and not wide else None
            if rows is not None:
                u = u.index_select(1, rows.to(u.device))
            out = add_lowrank_delta(out, x, v, u.transpose(1, 2), stacked=vcat)
        if "bias" in names:
            b = self.source.dense(names["bias"], members)  # [P, out]
            if rows is not None:
                b = b.index_select(1, rows.to(b.device))
            p = b.shape[0]
            shape = (p, -1, out.shape[-1])
            out = (out.reshape(shape) + b[:, None, :].to(out.dtype)).reshape(out.shape)
        return out

    def _embedding(self, module: nn.Module, names: dict, args: tuple, kwargs: dict, out: Tensor) -> Tensor:
        ids = args[0] if args else kwargs["input"]
        self._rows(ids, module)
        u, v = self.source.factors(names["weight"], self.members)  # [P, V, r], [P, d, r]
        p = u.shape[0]
        idv = ids.reshape(p, -1)
        picked = torch.stack([u[j].index_select(0, idv[j]) for j in range(p)])  # [P, n, r]
        delta = torch.bmm(picked, v.transpose(1, 2))  # [P, n, d]
        return out + delta.reshape(out.shape).to(out.dtype)

    def _rmsnorm(self, module: nn.Module, names: dict, args: tuple, kwargs: dict) -> Tensor:
        """LlamaRMSNorm's forward for all members at once, each row block scaled by its member's weight (formed as
        the per-member fallback forms it): a few kernels instead of a forward per member."""
        x = args[0] if args else kwargs["hidden_states"]
        n = self._rows(x, module)
        w = module.weight
        ws = (w.detach().float() + self.source.dense(names["weight"], self.members)).to(w.dtype)  # [P, d]
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        h = h.to(x.dtype).reshape(ws.shape[0], n, *x.shape[1:])
        return (ws.reshape(ws.shape[0], *([1] * (x.ndim - 1)), -1) * h).reshape(x.shape)

    def _per_member(self, module: nn.Module, names: dict, args: tuple, kwargs: dict, out: Any) -> Any:
        members = self.members
        p = len(members)  # type: ignore[arg-type]
        if p > 1 and id(module) in self._nested:
            raise RuntimeError(
                f"Population evaluation: {type(module).__name__} owns trained parameters and has submodules that own "
                f"others; batched evaluation cannot split it per member. Use batched=False."
            )
        if not isinstance(out, Tensor):
            raise TypeError(
                f"Population evaluation: {type(module).__name__} returns {type(out).__name__}; the per-member "
                f"fallback needs modules that return one tensor. Use batched=False."
            )
        deltas = {}
        for name, idx in names.items():
            w = module._parameters[name]
            if self.source.lowrank(idx):
                u, v = self.source.factors(idx, members)
                deltas[name] = torch.bmm(u, v.transpose(1, 2))
            else:
                deltas[name] = self.source.dense(idx, members).reshape(p, *w.shape)
        n = self._rows(out, module)
        batch = n * p
        parts = []
        saved = {name: module._parameters[name] for name in names}
        try:
            for j in range(p):
                sl = slice(j * n, (j + 1) * n)
                a = _take_rows(args, batch, sl)
                kw = _take_rows(kwargs, batch, sl)
                for name in names:
                    w = saved[name]
                    module._parameters[name] = (w.detach().float() + deltas[name][j]).to(w.dtype)
                parts.append(module.forward(*a, **kw))
        finally:
            for name, w in saved.items():
                module._parameters[name] = w
        return torch.cat(parts) if p > 1 else parts[0]

    @contextmanager
    def active(self, members: Sequence[Any]) -> Iterator[None]:
        """Forwards inside see member j's deltas on their rows ``[j·n, (j+1)·n)`` (n = rows / P)."""
        self.members = list(members)
        self.source.begin(self.members)
        try:
            yield
            if self._unseen is not None:
                unseen, self._unseen = self._unseen, None
                perturb.warn_unperturbed(unseen.values())
        finally:
            self.members = None
            self.source.end()

    def _seen(self, entries: list[tuple[str, int]]) -> None:
        if self._unseen is not None:
            for _, i in entries:
                self._unseen.pop(i, None)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _is_llama_rmsnorm(mod: nn.Module) -> bool:
    """Whether ``mod`` runs LlamaRMSNorm's forward: the class, or a copy of its code (Qwen2, Mistral and others copy
    it); anything else (Gemma's ``1 + w``, other versions) takes the per-member fallback."""
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    f, ref = getattr(type(mod).forward, "__code__", None), LlamaRMSNorm.forward.__code__
    same = f is not None and (f is ref or (f.co_code, f.co_consts, f.co_names) == (ref.co_code, ref.co_consts,
                                                                                      ref.co_names))
    return same and hasattr(mod, "variance_epsilon")


def _take_rows(x: Any, batch: int, sl: slice) -> Any:
    if isinstance(x, Tensor):
        return x[sl] if x.ndim >= 1 and x.shape[0] == batch else x
    if isinstance(x, tuple):
        return tuple(_take_rows(v, batch, sl) for v in x)
    if isinstance(x, list):
        return [_take_rows(v, batch, sl) for v in x]
    if isinstance(x, dict):
        return {k: _take_rows(v, batch, sl) for k, v in x.items()}
    return x
