"""The training order: shuffled from (seed, epoch) alone, optionally in batches of similar length (less padding, so
less compute per forward where prompts vary a lot in length), and resumable in the middle of an epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler

from lightning_memopt import _shim


class _Resumable:
    """A sampler whose next pass over epoch ``e`` can start ``n`` indices in (:meth:`resume_at`): a run restored in
    the middle of an epoch goes on with the batches the uninterrupted run would see, since the order depends on
    the seed and the epoch only."""

    epoch: int
    _resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, start: int) -> None:
        self._resume = (int(epoch), int(start))

    def _resumed(self, indices: list[int]) -> Iterator[int]:
        if self._resume is not None and self._resume[0] == self.epoch:
            indices = indices[self._resume[1] :]
        self._resume = None
        return iter(indices)


class EpochSampler(_Resumable, DistributedSampler):
    """``DistributedSampler`` (each rank every ``num_replicas``-th index of the dataset, or of a permutation of (seed,
    epoch) with ``shuffle=True``) that can resume mid-epoch."""

    def __iter__(self) -> Iterator[int]:
        return self._resumed(list(super().__iter__()))


class LengthGroupedSampler(_Resumable, DistributedSampler):
    """Shuffled indices, sorted by length within windows of ``group`` global batches, cut into global batches whose
    order is shuffled; each rank takes every ``num_replicas``-th index of a global batch (its share, of similar
    length). The order depends on ``seed`` and the epoch only, so a resumed run sees the same batches.

    A :class:`~torch.utils.data.DistributedSampler` so that Lightning keeps it under several processes (and calls
    ``set_epoch``) instead of wrapping it in a sampler that would re-deal the indices. The last partial global batch
    is dropped, as the training loader drops it; a dataset smaller than one global batch makes one short batch.

    Example::

        sampler = LengthGroupedSampler([len(x["input_ids"]) for x in ds], batch_size=128, group=4)
        loader = DataLoader(ds, batch_size=128, sampler=sampler, collate_fn=collate)
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, group: int, num_replicas: int = 1, rank: int = 0, seed: int = 0
    ) -> None:
        if group < 1 or batch_size < 1:
            raise ValueError(f"LengthGroupedSampler needs group >= 1 and batch_size >= 1, got {group} and {batch_size}.")
        super().__init__(range(len(lengths)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.lengths, self.batch_size, self.group = list(lengths), batch_size, group

    def _global_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.batch_size * self.num_replicas
        window = size * self.group
        order = [i for s in range(0, len(order), window) for i in sorted(order[s : s + window], key=self.lengths.__getitem__)]
        batches = [order[s : s + size] for s in range(0, len(order) - size + 1, size)] or [order]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __iter__(self) -> Iterator[int]:
        return self._resumed([i for b in self._global_batches() for i in b[self.rank :: self.num_replicas]])

    def __len__(self) -> int:
        size = self.batch_size * self.num_replicas
        n = len(self.lengths)
        return (n // size) * self.batch_size if n >= size else len(range(self.rank, n, self.num_replicas))


def check_loader_args(batch_size: int, eval_batch_size: int, num_workers: int, max_length: int) -> None:
    """The loader sizes of the data modules, checked when one is built (torch's own errors come at the first
    batch, from deep in the DataLoader)."""
    for name, v, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                         ("num_workers", num_workers, 0), ("max_length", max_length, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}.")


def check_group_by_length(group: int, shuffle: bool) -> None:
    """The ``group_by_length`` option of the data modules: an integer >= 0, and it shuffles."""
    if not isinstance(group, int) or isinstance(group, bool) or group < 0:
        raise ValueError(f"group_by_length must be an integer >= 0 (0: off), got {group!r}.")
    if group and not shuffle:
        raise ValueError("group_by_length shuffles the training examples; set shuffle=True, or group_by_length=0.")


class ResumableLoader(DataLoader):
    """A training loader Lightning saves and restores with the fit (it calls ``state_dict``/``load_state_dict`` on
    loaders that have them): the state is the epoch and the batches its training has taken, read from the trainer's
    progress, not counted here (Lightning fetches a batch ahead); a restored run's next pass skips those batches."""

    def __init__(self, *args: Any, trainer: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trainer = trainer

    def state_dict(self) -> dict[str, int]:
        t = self.trainer
        if t is None:
            return {}
        return {"epoch": int(t.current_epoch), "batches": _shim.epoch_batches_taken(t)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state and isinstance(self.sampler, _Resumable):
            self.sampler.resume_at(state["epoch"], state["batches"] * int(self.batch_size or 1))


EVAL_KEEP = "eval_keep"  # a batch's [B] bool: False on the padding rows of an evaluation shard


class EvalShards(DistributedSampler):
    """Each rank's share of an evaluation set: every ``num_replicas``-th example, all shares one length (under FSDP2
    every rank must run the same forwards). Where ``len(ds)`` does not divide, the short shares end in padding rows
    that the batch marks (``EVAL_KEEP``), not in repeated examples that would count twice."""

    def __init__(self, ds: Sequence[Any], num_replicas: int, rank: int) -> None:
        super().__init__(ds, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


def eval_loader(dm: Any, ds: Sequence[dict[str, Any]], collate_fn: Any, pin_memory: bool) -> DataLoader:
    """The validation or test loader of data module ``dm``. Under several processes with Lightning's distributed
    sampler on, the shards are :class:`EvalShards` (Lightning keeps a DistributedSampler), so metrics count every
    example once; Lightning's own would pad the short shares with repeats."""
    hp, tr = dm.hparams, dm.trainer
    kw = dict(batch_size=hp.eval_batch_size, num_workers=hp.num_workers, pin_memory=pin_memory)
    shards = None if tr is None else getattr(tr.strategy, "distributed_sampler_kwargs", None)
    if not shards or shards.get("num_replicas", 1) <= 1 or not _shim.uses_distributed_sampler(tr):
        return DataLoader(ds, collate_fn=collate_fn, **kw)

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        out = collate_fn(items)
        if any(it.get("_pad") for it in items):
            out[EVAL_KEEP] = torch.tensor([not it.get("_pad") for it in items])
        return out

    sampler = EvalShards(ds, shards["num_replicas"], shards.get("rank", 0))
    pads = [{**ds[0], "_pad": True}] * (sampler.total_size - len(ds)) if len(ds) else []  # the indices past the end
    return DataLoader(ConcatDataset([ds, pads]), sampler=sampler, collate_fn=collate, **kw)


def train_loader(dm: Any, ds: Sequence[dict[str, Any]], collate_fn: Any, pin_memory: bool) -> DataLoader:
    """The training loader of data module ``dm``: with ``shuffle``, an order drawn from the module's ``seed`` and the
    epoch only; without, the dataset's order. Each rank takes every ``world_size``-th index, so a step's global batch
    is the 1-process batch, and the loader resumes in the middle of an epoch (:class:`ResumableLoader`).

    With ``group_by_length``, :class:`LengthGroupedSampler` (which deals whole batches and drops the partial global
    batch itself; lengths are those of each item's ``input_ids``). Otherwise :class:`EpochSampler` (a
    :class:`~torch.utils.data.DistributedSampler`), not a ``shuffle=True`` loader, whose ``RandomSampler`` draws
    each epoch's order from torch's global RNG, as every other loader's iterator does, so how often a fit validated
    changed its later epochs. Lightning keeps either sampler under several processes and calls ``set_epoch``.
    """
    hp, tr = dm.hparams, dm.trainer
    world, rank = (tr.world_size, tr.global_rank) if tr is not None else (1, 0)
    seed = hp.get("seed", 0)
    if hp.get("group_by_length"):
        sampler: DistributedSampler = LengthGroupedSampler([len(x["input_ids"]) for x in ds], hp.batch_size,
                                                           hp.group_by_length, world, rank, seed)
        drop_last = False
    else:
        sampler = EpochSampler(range(len(ds)), num_replicas=world, rank=rank, shuffle=bool(hp.get("shuffle", True)),
                               seed=seed, drop_last=len(ds) >= world)
        drop_last = len(sampler) >= hp.batch_size
    return ResumableLoader(ds, batch_size=hp.batch_size, sampler=sampler, collate_fn=collate_fn,
                           num_workers=hp.num_workers, pin_memory=pin_memory, drop_last=drop_last, trainer=tr)
