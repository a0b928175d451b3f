"""LoRA driven by low-dimensional vectors z, installed by hooks on any HF decoder or encoder.

Per layer (transformer block), the targets (query and key projections by default) each get ``delta = B A x`` with
``A: [r, in]`` and ``B: [out, r]``. The block's z (dimension d) is cut into 2 chunks per target, and each factor is a
fixed random linear map of its chunk (BBTv2-style). Both factors are linear in z, so z = 0 gives delta = 0.

Map scale (BBTv2: std = alpha * observed_std / (sqrt(d) * sigma)), from hidden-state statistics collected on a
few training batches: with z ~ N(0, sigma^2 I), A's entries get std ``1 / (sqrt(in) * rms(x))`` (so ``A x`` has unit
scale) and B's entries get ``init_scale * std(W x) / sqrt(r)``, so ``B A x`` is about ``init_scale`` times the
projection output's std. The maps are regenerated from a seed when needed (never stored), by core.perturb's keyed
generator: the same numbers on any device, so a checkpoint's adapters can be rebuilt (and merged) anywhere.

Population evaluation: in ``population`` mode the current block's targets add a different delta per candidate.
The batch is expanded by the population size ``P`` (candidate-major: row ``p * b + i``) only at the current block's
input, by a forward pre-hook that repeats every tensor argument whose first dimension is the batch size (hidden
states, masks, rotary tables) for this block and the blocks above. The blocks below run once, on the plain batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_memopt.core.fsdp import is_dtensor
from lightning_memopt.core.memory import walk_tensors
from lightning_memopt.core.perturb import key, perturbed
from lightning_memopt.core.population import add_lowrank_delta, repeat_rows

DEFAULT_PATTERN = r"(^|\.)(q_proj|k_proj|query|key|q_lin|k_lin)$"


@dataclass
class _Target:
    name: str
    module: nn.Module
    block: int
    in_features: int
    out_features: int
    in_rms: float = 1.0
    out_std: float = 1.0


@dataclass
class _Block:
    name: str
    module: nn.Module
    targets: list[_Target] = field(default_factory=list)


def _linear_shape(m: nn.Module) -> tuple[int, int] | None:
    w = getattr(m, "weight", None)
    if isinstance(m, nn.Linear) or (w is not None and getattr(w, "ndim", 0) == 2 and hasattr(m, "in_features")):
        return int(m.in_features), int(m.out_features)
    return None


def find_targets(root: nn.Module, pattern: str = DEFAULT_PATTERN) -> list[_Block]:
    """Blocks (children of a ModuleList) holding Linear modules whose name matches ``pattern`` (``re.search``).

    Raises:
        ValueError: naming the pattern and the Linear modules that exist, when nothing usable matches.
    """
    rx = re.compile(pattern)
    lists = {n: m for n, m in root.named_modules() if isinstance(m, nn.ModuleList)}
    blocks: dict[str, _Block] = {}
    matched_not_linear = []
    for name, mod in root.named_modules():
        if not name or not rx.search(name):
            continue
        shape = _linear_shape(mod)
        if shape is None:
            matched_not_linear.append(f"{name} ({type(mod).__name__})")
            continue
        parts = name.split(".")
        owner = None
        for i in range(len(parts) - 1, 0, -1):  # the deepest ModuleList ancestor: its child is the block
            prefix = ".".join(parts[:i])
            if prefix in lists and parts[i].isdigit():
                owner = (prefix, int(parts[i]))
                break
        if owner is None:
            matched_not_linear.append(f"{name} (not inside a ModuleList of blocks)")
            continue
        bname = f"{owner[0]}.{owner[1]}"
        blk = blocks.setdefault(bname, _Block(bname, lists[owner[0]][owner[1]]))
        blk.targets.append(_Target(name, mod, -1, *shape))
    if not blocks:
        linears = sorted({n.split(".")[-1] for n, m in root.named_modules() if _linear_shape(m) is not None})
        extra = f" Matched but unusable: {matched_not_linear[:10]}." if matched_not_linear else ""
        raise ValueError(
            f"DFOLoRA found no Linear module inside a block list whose name matches target_pattern={pattern!r}."
            f"{extra} The model's Linear modules are named: {linears}. Set target_pattern to match the query/key "
            f"projections, e.g. r'(q_proj|k_proj)$'."
        )
    out = sorted(blocks.values(), key=lambda b: (b.name.rsplit(".", 1)[0], int(b.name.rsplit(".", 1)[1])))
    for i, b in enumerate(out):
        for t in b.targets:
            t.block = i
    return out


class ZLoRA:
    """Hooks that add z-driven LoRA deltas to the targets, with a per-candidate population mode.

    Args:
        root: the module to adapt (its parameters are not touched).
        rank: LoRA rank r.
        d: dimension of each block's z.
        pattern: regex for target module names.
        seed: seed of the random maps.
        sigma: the optimizer's initial step size (enters the map's std, as in BBTv2).
        init_scale: ``B A x`` is about this times the target output's std when z ~ N(0, sigma^2 I).

    Example::

        lora = ZLoRA(model, rank=4, d=500)
        lora.install()
        lora.collect_stats(lambda b: model(**b), [batch])
        lora.set_z(0, torch.randn(500))
    """

    def __init__(
        self, root: nn.Module, rank: int = 4, d: int = 500, pattern: str = DEFAULT_PATTERN, seed: int = 0,
        sigma: float = 1.0, init_scale: float = 0.05,
    ) -> None:
        self.root, self.rank, self.d, self.seed = root, int(rank), int(d), int(seed)
        self.sigma, self.init_scale = float(sigma), float(init_scale)
        self.blocks = find_targets(root, pattern)
        for b in self.blocks:
            if self.d < 2 * len(b.targets):
                raise ValueError(f"d={d} is too small: block {b.name} needs at least {2 * len(b.targets)}.")
        p = next(iter(root.parameters()))
        self.device = p.device
        self.z = [torch.zeros(self.d, dtype=torch.float32, device=self.device) for _ in self.blocks]
        self._fixed: list[list[tuple[Tensor, Tensor]] | None] = [None] * len(self.blocks)
        self._pop: tuple[int, int, list[tuple[Tensor, Tensor]]] | None = None  # (block, P, factors)
        self._expand_from: int | None = None  # blocks >= this expand the batch by P
        self._batch = 0
        self._memo: dict[int, tuple[Tensor, Tensor]] = {}
        self._handles: list[Any] = []
        # None: the random maps are regenerated at each use (no memory); a dict keeps every block's (what a CUDA
        # graph of the population forward needs: it reads them at fixed addresses, and a seeded generator cannot
        # run inside a capture). About 3 MB a block at SmolLM2's shape, 13 MB at 1.1B's.
        self.maps_cache: dict[int, list[tuple[Tensor, Tensor]]] | None = None
        # True under a CUDA graph: each block's point and fixed factors stay at their addresses (set_z writes in
        # place, a zero point keeps its zero factors), since a captured forward reads them there
        self.static_fixed = False
        self.stats_ready = False
        # How the random maps are drawn: "philox", from core.perturb's keyed generator (the same numbers on every
        # device, up to float rounding, so a checkpoint's adapters can be rebuilt anywhere: memopt consolidate merges
        # them on a CPU); "device", the device's own torch generator, as checkpoints from before kept them (CUDA and
        # CPU draw different numbers from one seed).
        self.maps = "philox"

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    # ---- hooks ----------------------------------------------------------------------------------------------
    def install(self) -> None:
        if self._handles:
            return
        for b in self.blocks:
            other = getattr(b.module, "_memopt_zlora", None)
            if other is not None and other is not self and other._handles:
                # two sets of adapters would add up, and a checkpoint holds only the newer one's
                raise ValueError(
                    f"{b.name} already carries the adapters of an earlier DFOLoRA fit of this module. Fold them into "
                    f"the weights first with that callback's merge() (or drop them with its lora.remove()), or fit "
                    f"a fresh module; to go on training them, fit again with the same DFOLoRA callback."
                )
        for b in self.blocks:
            b.module._memopt_zlora = self
            idx = b.targets[0].block
            self._handles.append(b.module.register_forward_pre_hook(self._make_expand(idx), with_kwargs=True))
            for j, t in enumerate(b.targets):
                self._handles.append(t.module.register_forward_hook(self._make_delta(idx, j)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for b in self.blocks:
            if getattr(b.module, "_memopt_zlora", None) is self:
                del b.module._memopt_zlora

    def _expand(self, x: Any, p: int) -> Any:
        return repeat_rows(x, p, self._batch, self._memo, min_ndim=2, dicts=False)

    def _make_expand(self, idx: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            if self._pop is None or self._expand_from is None or idx < self._expand_from:
                return None
            p = self._pop[1]
            return self._expand(args, p), {k: self._expand(v, p) for k, v in kwargs.items()}

        return hook

    def _make_delta(self, idx: int, j: int) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
            x = args[0] if args else None
            if x is None:
                return None
            if self._pop is not None and self._pop[0] == idx:
                p = self._pop[1]
                a, b = self._pop[2][j]  # [P, r, in], [P, out, r]
                if x.shape[0] % p:
                    raise RuntimeError(f"DFOLoRA: {x.shape[0]} rows at a target, not a multiple of {p} candidates.")
                return add_lowrank_delta(out, x, a.transpose(1, 2), b.transpose(1, 2))
            fixed = self._fixed[idx]
            if fixed is None:
                return None
            a, b = fixed[j]
            return out + ((x @ a.to(x.dtype).T) @ b.to(x.dtype).T).to(out.dtype)

        return hook

    # ---- statistics and maps -------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect_stats(
        self, run: Callable[[Any], Any], batches: list[Any],
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Run ``run(batch)`` (a forward) on a few training batches and record each target's input rms and output
        std over the real (unpadded) tokens; ``reduce`` sums the accumulators over data-parallel ranks."""
        targets = [t for b in self.blocks for t in b.targets]
        acc = torch.zeros(len(targets), 5, dtype=torch.float64, device=self.device)
        handles = []
        mask: list[Tensor | None] = [None]

        def make(i: int) -> Callable:
            def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
                x, y = args[0].detach().double(), out.detach().double()
                m = mask[0]
                if m is not None and x.ndim == 3 and tuple(m.shape) == tuple(x.shape[:2]):
                    w = m.to(x.device, torch.float64)[..., None]
                else:
                    w = torch.ones(*x.shape[:-1], 1, dtype=torch.float64, device=x.device)
                acc[i, 0] += (x.pow(2) * w).sum()
                acc[i, 1] += w.sum() * x.shape[-1]
                acc[i, 2] += (y * w).sum()
                acc[i, 3] += (y.pow(2) * w).sum()
                acc[i, 4] += w.sum() * y.shape[-1]

            return hook

        for i, t in enumerate(targets):
            handles.append(t.module.register_forward_hook(make(i)))
        saved = self._fixed
        self._fixed = [None] * self.n_blocks  # statistics of the base model
        try:
            for batch in batches:
                mask[0] = batch.get("attention_mask") if isinstance(batch, dict) else None
                run(batch)
        finally:
            self._fixed = saved
            for h in handles:
                h.remove()
        if reduce is not None:
            acc = reduce(acc)
        if float(acc[:, 1].min()) == 0:
            raise RuntimeError("DFOLoRA statistics: some target module did not run during the statistics forwards.")
        for i, t in enumerate(targets):
            t.in_rms = max(math.sqrt(float(acc[i, 0] / acc[i, 1])), 1e-6)
            mean = float(acc[i, 2] / acc[i, 4])
            t.out_std = max(math.sqrt(max(float(acc[i, 3] / acc[i, 4]) - mean * mean, 0.0)), 1e-6)
        self.stats_ready = True
        if self.maps_cache is not None:
            self.maps_cache.clear()  # the maps scale with the statistics
        for k in range(self.n_blocks):
            self.set_z(k, self.z[k])

    def tensors(self) -> list[Tensor]:
        """The points, their factors and any cached maps (what memory accounting counts)."""
        return list(walk_tensors([self.z, self._fixed, self._pop, self._memo, self.maps_cache]))

    def stats(self) -> list[tuple[float, float]]:
        return [(t.in_rms, t.out_std) for b in self.blocks for t in b.targets]

    def load_stats(self, stats: Iterable[tuple[float, float]]) -> None:
        targets = [t for b in self.blocks for t in b.targets]
        stats = list(stats)
        if len(stats) != len(targets):
            raise ValueError(f"Statistics for {len(stats)} targets, the model has {len(targets)}.")
        for t, (a, b) in zip(targets, stats):
            t.in_rms, t.out_std = float(a), float(b)
        self.stats_ready = True
        if self.maps_cache is not None:
            self.maps_cache.clear()  # the maps scale with the statistics

    def restore(self, state: dict[str, Any]) -> None:
        """The adapters of a saved DFO state (its ``maps``, ``stats``, ``stats_ready`` and ``z``): what a resume and
        ``memopt consolidate`` rebuild. A state without ``maps`` predates the keyed maps: the device generator."""
        if len(state["z"]) != self.n_blocks:
            raise ValueError(f"The checkpoint's DFOLoRA has {len(state['z'])} layers, this model {self.n_blocks}.")
        self.maps = state.get("maps", "device")
        if self.maps_cache is not None:
            self.maps_cache.clear()
        if state["stats_ready"]:
            self.load_stats(state["stats"])
        for k, z in enumerate(state["z"]):
            self.set_z(k, z)

    def _maps(self, idx: int) -> list[tuple[Tensor, Tensor]]:
        """The fixed random maps of block ``idx``: per target ``(M_A [r*in, dA], M_B [out*r, dB])``."""
        if self.maps_cache is not None:
            hit = self.maps_cache.get(idx)
            if hit is None:
                hit = self.maps_cache[idx] = self._make_maps(idx)
            return hit
        return self._make_maps(idx)

    def _make_maps(self, idx: int) -> list[tuple[Tensor, Tensor]]:
        blk = self.blocks[idx]
        sizes = [c.numel() for c in torch.arange(self.d).tensor_split(2 * len(blk.targets))]
        gen = torch.Generator(device=self.device) if self.maps == "device" else None
        out = []
        for j, t in enumerate(blk.targets):
            da, db = sizes[2 * j], sizes[2 * j + 1]
            seed = self.seed * 1_000_003 + idx * 1009 + j
            std_a = 1.0 / (math.sqrt(t.in_features) * t.in_rms) / (math.sqrt(da) * self.sigma)
            std_b = self.init_scale * t.out_std / math.sqrt(self.rank) / (math.sqrt(db) * self.sigma)
            shape_a, shape_b = (self.rank * t.in_features, da), (t.out_features * self.rank, db)
            if gen is None:
                out.append((self._normal(seed, 0, shape_a) * std_a, self._normal(seed, 1, shape_b) * std_b))
                continue
            gen.manual_seed(seed)
            # float32 explicitly: under precision="bf16-true" Lightning makes bf16 the default dtype
            ma = torch.randn(*shape_a, generator=gen, device=self.device, dtype=torch.float32) * std_a
            mb = torch.randn(*shape_b, generator=gen, device=self.device, dtype=torch.float32) * std_b
            out.append((ma, mb))
        return out

    def _normal(self, seed: int, which: int, shape: tuple[int, int]) -> Tensor:
        """Standard normals keyed by ``(seed, which)`` (core.perturb: one kernel launch on a GPU, its torch
        emulation elsewhere), float32."""
        zeros = torch.zeros(shape[0] * shape[1], dtype=torch.float32, device=self.device)
        return perturbed(zeros, key(seed & 0xFFFFFFFF, which), 1.0).view(shape)

    def factors(self, idx: int, z: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per target ``(A [P, r, in], B [P, out, r])`` for candidates ``z [P, d]`` of block ``idx``."""
        blk = self.blocks[idx]
        z = z.to(self.device, torch.float32)
        chunks = z.tensor_split(2 * len(blk.targets), dim=1)
        out = []
        for j, (t, (ma, mb)) in enumerate(zip(blk.targets, self._maps(idx))):
            a = (chunks[2 * j] @ ma.T).reshape(-1, self.rank, t.in_features)
            b = (chunks[2 * j + 1] @ mb.T).reshape(-1, t.out_features, self.rank)
            out.append((a, b))
        return out

    def set_z(self, idx: int, z: Tensor) -> None:
        """Fix block ``idx``'s z (the point used outside population evaluation)."""
        if self.static_fixed:
            self.z[idx].copy_(z.detach())
        else:
            self.z[idx] = z.detach().to(self.device, torch.float32).clone()
            # zero z is exactly the base model (no delta to add); checked only on a host tensor: on the GPU the read
            # would sync every generation, and a z from the optimizer after a tell is not zero anyway
            if z.device.type == "cpu" and not bool(z.any()):
                self._fixed[idx] = None
                return
        new = [(a[0], b[0]) for a, b in self.factors(idx, self.z[idx][None])]
        if self.static_fixed and self._fixed[idx] is not None:
            for (a, b), (na, nb) in zip(self._fixed[idx], new):  # type: ignore[union-attr]
                a.copy_(na)
                b.copy_(nb)
        else:
            self._fixed[idx] = new

    def point(self, idx: int) -> tuple[Tensor, list[tuple[Tensor, Tensor]] | None]:
        """Block ``idx``'s fixed point as :meth:`set_z` left it, for :meth:`restore_point`. Static buffers (graph
        mode: written in place) are cloned; otherwise ``set_z`` replaces the tensors, so references do."""
        z, fixed = self.z[idx], self._fixed[idx]
        if self.static_fixed:
            return z.clone(), None if fixed is None else [(a.clone(), b.clone()) for a, b in fixed]
        return z, fixed

    def restore_point(self, idx: int, saved: tuple[Tensor, list[tuple[Tensor, Tensor]] | None]) -> None:
        z, fixed = saved
        if self.static_fixed and fixed is not None and self._fixed[idx] is not None:
            self.z[idx].copy_(z)
            for (a, b), (sa, sb) in zip(self._fixed[idx], fixed):  # type: ignore[arg-type]
                a.copy_(sa)
                b.copy_(sb)
        else:
            self.z[idx], self._fixed[idx] = z, fixed

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every block's current LoRA delta into the target weights (``W += B A``) and remove the hooks, so the
        module works (and saves) without this object. Not for FSDP2-sharded (DTensor) weights."""
        for b in self.blocks:
            fixed = self._fixed[b.targets[0].block]
            for j, t in enumerate(b.targets):
                w = t.module.weight
                if is_dtensor(w):
                    raise NotImplementedError("merge() needs unsharded weights; gather the model first.")
                if fixed is not None:
                    a, bb = fixed[j]
                    w.add_((bb @ a).to(w.dtype))
        self.remove()
        self._fixed = [None] * self.n_blocks

    # ---- population mode -----------------------------------------------------------------------------------------
    def begin_population(self, idx: int, z: Tensor, batch: int, expand: bool) -> None:
        """Candidates ``z [P, d]`` for block ``idx``; with ``expand`` the batch of ``batch`` rows is repeated P
        times at block ``idx``'s input (otherwise the caller feeds an already expanded batch)."""
        self._pop = (idx, z.shape[0], self.factors(idx, z))
        self._expand_from = idx if expand and z.shape[0] > 1 else None
        self._batch = int(batch)
        self._memo = {}

    def end_population(self) -> None:
        self._pop, self._expand_from, self._memo = None, None, {}
