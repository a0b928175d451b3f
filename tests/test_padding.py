"""Fixed-length and bucketed padding: the shapes a captured CUDA graph needs, with the predictions of dynamic padding."""

from __future__ import annotations

import pytest
import torch

from conftest import SQUAD, needs_squad

from lightning_memopt.data.prompt import default_buckets, padded_length
from lightning_memopt.testing import tiny_datamodule, tiny_model


def _logits(padding: str) -> tuple[torch.Tensor, set[int]]:
    torch.manual_seed(0)
    model = tiny_model()
    dm = tiny_datamodule(k=16, padding=padding)
    dm.tokenizer = model.tokenizer
    dm.setup("fit")
    model.set_label_token_ids(dm.label_token_ids)
    model.eval()
    out, lengths = [], set()
    with torch.no_grad():
        for b in dm.test_dataloader():
            lengths.add(b["input_ids"].shape[1])
            out.append(model(b["input_ids"], b["attention_mask"]))
    return torch.cat(out), lengths


def test_fixed_and_bucketed_padding_give_the_predictions_of_dynamic_padding():
    dynamic, dyn_lengths = _logits("longest")
    fixed, fixed_lengths = _logits("max_length")
    bucket, bucket_lengths = _logits("bucket")
    assert fixed_lengths == {32}  # tiny_datamodule's max_length: one shape
    assert bucket_lengths <= set(default_buckets(32)) and len(dyn_lengths) >= len(bucket_lengths)
    torch.testing.assert_close(fixed, dynamic, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bucket, dynamic, atol=1e-5, rtol=1e-5)
    assert torch.equal(fixed.argmax(1), dynamic.argmax(1)) and torch.equal(bucket.argmax(1), dynamic.argmax(1))


def test_padded_length_and_bad_values():
    assert padded_length(7, "longest", 128) == 7
    assert padded_length(7, "max_length", 128) == 128
    assert padded_length(17, "bucket", 128) == 32 and default_buckets(128) == [16, 32, 64, 128]
    assert padded_length(40, "bucket", 128, [24, 48]) == 48
    with pytest.raises(ValueError, match="padding must be"):
        tiny_datamodule(padding="fixed")


def test_length_grouped_sampler_deals_every_example_once_per_epoch_with_less_padding():
    import random

    from lightning_memopt.data.sampling import LengthGroupedSampler

    lengths = [random.Random(i).choice([5, 8, 12, 30, 60]) for i in range(203)]
    s = LengthGroupedSampler(lengths, batch_size=16, group=4, seed=3)
    first = list(s)
    assert len(first) == len(s) == 192 and len(set(first)) == 192  # 12 whole batches, each example at most once
    again = LengthGroupedSampler(lengths, batch_size=16, group=4, seed=3)
    assert list(again) == first  # the seed and epoch fix the order (a resumed run sees the same batches)
    s.set_epoch(1)
    assert list(s) != first

    def padded(order: list[int]) -> int:
        return sum(max(lengths[i] for i in order[b : b + 16]) * 16 for b in range(0, len(order), 16))

    shuffled = torch.randperm(203, generator=torch.Generator().manual_seed(0)).tolist()[:192]
    assert padded(first) < 0.8 * padded(shuffled)

    # two ranks: each takes its share of every global batch; together the one-process run's batches at 2 x 8
    ranks = [list(LengthGroupedSampler(lengths, batch_size=8, group=4, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    one = list(LengthGroupedSampler(lengths, batch_size=16, group=4, seed=3))
    for b in range(0, 96, 8):
        assert sorted(ranks[0][b : b + 8] + ranks[1][b : b + 8]) == sorted(one[2 * b : 2 * b + 16])
    small = LengthGroupedSampler(lengths[:10], batch_size=8, group=2, num_replicas=2, rank=1)
    assert len(list(small)) == len(small) == 5  # smaller than a global batch: one short batch, not none
    with pytest.raises(ValueError, match="group >= 1"):
        LengthGroupedSampler(lengths, batch_size=8, group=0)


def test_group_by_length_in_the_data_module_and_a_fit():
    from lightning_memopt import MeZO
    from lightning_memopt.testing import tiny_trainer

    model = tiny_model()
    dm = tiny_datamodule(k=32, batch_size=8, shuffle=True, padding="bucket", group_by_length=2)
    dm.tokenizer = model.tokenizer
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 8 and sum(len(b["labels"]) for b in batches) == 64
    spread = [int(b["attention_mask"].sum(1).max() - b["attention_mask"].sum(1).min()) for b in batches]
    plain = tiny_datamodule(k=32, batch_size=8, shuffle=True, padding="bucket")
    plain.tokenizer = model.tokenizer
    plain.setup("fit")
    torch.manual_seed(0)
    spread_plain = [int(b["attention_mask"].sum(1).max() - b["attention_mask"].sum(1).min()) for b in plain.train_dataloader()]
    assert sum(spread) < sum(spread_plain)  # lengths within a batch closer than in a random draw
    trainer = tiny_trainer(max_steps=3, callbacks=[MeZO(lr=1e-4)])
    trainer.fit(model, dm)
    assert trainer.global_step == 3
    with pytest.raises(ValueError, match="group_by_length must be an integer >= 0"):
        tiny_datamodule(group_by_length=-1)
    with pytest.raises(ValueError, match="set shuffle=True, or group_by_length=0"):
        tiny_datamodule(group_by_length=2, shuffle=False)


def test_shuffled_order_is_the_seed_and_epoch_s_alone():
    """The shuffled training order comes from the data module's seed and the epoch, and each rank takes every
    world_size-th example of it: validating (whose loader draws from torch's global RNG) leaves training unchanged,
    and two ranks' batches at a step make up the 1-process batch."""
    from types import SimpleNamespace

    from lightning_memopt import MeZO
    from lightning_memopt.testing import tiny_trainer

    def order(dm, epoch, world=1, rank=0):
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(123 + epoch)  # the global RNG must not matter
        return [b["input_ids"] for b in loader]

    model = tiny_model()
    dm = tiny_datamodule(k=32, batch_size=8, shuffle=True)
    dm.tokenizer = model.tokenizer
    dm.setup("fit")
    a, again, b = order(dm, 0), order(dm, 0), order(dm, 1)
    assert len(a) == 8 and all(torch.equal(x, y) for x, y in zip(a, again))
    assert not all(torch.equal(x, y) for x, y in zip(a, b))  # a new order each epoch
    other = tiny_datamodule(k=32, batch_size=8, shuffle=True, seed=1)
    other.tokenizer = model.tokenizer
    other._splits = dm._splits  # the same examples, another seed: another order
    assert not all(torch.equal(x, y) for x, y in zip(a, order(other, 0)))
    # two ranks of batch 4: step s's two batches are the rows of the 1-process batch s of 8
    dm.hparams.batch_size = 4
    r0, r1 = order(dm, 1, 2, 0), order(dm, 1, 2, 1)
    dm.hparams.batch_size = 8
    one = order(dm, 1)
    def rows(*batches: torch.Tensor, width: int) -> list:  # left-padded (as the collate pads) to one width
        return sorted(tuple(torch.nn.functional.pad(t, (width - t.shape[1], 0))[i].tolist())
                      for t in batches for i in range(len(t)))

    assert len(r0) == len(r1) == len(one)
    for x, y, z in zip(r0, r1, one):
        assert rows(x, y, width=z.shape[1]) == rows(z, width=z.shape[1])

    def fit(validate: bool) -> dict:
        torch.manual_seed(0)
        m = tiny_model(lr=1e-2)
        d = tiny_datamodule(k=32, batch_size=8, shuffle=True, val_k=8)
        kw = {"limit_val_batches": 1.0, "val_check_interval": 3, "check_val_every_n_epoch": None} if validate else {}
        tiny_trainer(max_steps=20, callbacks=[MeZO(eps=1e-3)], **kw).fit(m, d)  # 8 steps an epoch
        return {k: v.clone() for k, v in m.state_dict().items()}

    plain, validated = fit(False), fit(True)
    assert all(torch.equal(plain[k], validated[k]) for k in plain)


@pytest.mark.parametrize(("shuffle", "group"), [(True, 0), (True, 2), (False, 0)])
def test_resume_in_the_middle_of_an_epoch_sees_the_same_batches(tmp_path, shuffle, group, recwarn):
    """The training loader is resumable, shuffled or not (Lightning saves and restores its state with the fit): a run
    restored from a checkpoint taken in the middle of an epoch skips the batches the epoch already took and ends at
    the weights of the uninterrupted run; Lightning's warning about a loader that is not resumable does not come."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_memopt import MeZO
    from lightning_memopt.testing import tiny_trainer

    def fit(ckpt_dir=None, resume=None) -> dict:
        torch.manual_seed(0)
        m = tiny_model(lr=1e-2)
        dm = tiny_datamodule(k=32, batch_size=8, shuffle=shuffle, padding="bucket", group_by_length=group)  # 8 batches
        cbs = [MeZO(eps=1e-3)]
        if ckpt_dir is not None:
            cbs.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=5, save_top_k=-1))
        tiny_trainer(max_steps=14, callbacks=cbs, enable_checkpointing=ckpt_dir is not None).fit(m, dm, ckpt_path=resume)
        return {k: v.clone() for k, v in m.state_dict().items()}

    straight = fit(tmp_path)
    resumed = fit(resume=str(next(tmp_path.glob("*step=5.ckpt"))))  # step 5 of an 8-batch epoch
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


@needs_squad
@pytest.mark.parametrize("padding", ["bucket", "max_length"])
def test_squad_padding_gives_the_losses_and_answers_of_dynamic_padding(padding):
    # the generation path (SQuAD, instruction data) pads to a few shapes too, for MeZO(cuda_graph=True)
    from lightning_memopt.data.qa import SQuADDataModule

    def run(pad: str) -> tuple[torch.Tensor, list[str], set[int]]:
        torch.manual_seed(0)
        model = tiny_model(objective="generation", max_new_tokens=4)
        dm = SQuADDataModule(data_file=str(SQUAD), train_articles=[0], test_articles=[3], batch_size=4,
                             eval_batch_size=4, test_limit=8, val_size=0, max_length=256, shuffle=False,
                             padding=pad)
        dm.tokenizer = model.tokenizer
        dm.setup("fit")
        model.eval()
        losses, answers, lengths = [], [], set()
        with torch.no_grad():
            for i, b in enumerate(dm.train_dataloader()):
                if i == 3:
                    break
                lengths.add(b["input_ids"].shape[1])
                losses.append(model.per_sample_loss(b))
            for b in dm.test_dataloader():
                answers += model.generate_text(b["prompt_ids"], b["prompt_mask"])
        return torch.cat(losses), answers, lengths

    dynamic, dyn_answers, _ = run("longest")
    padded, pad_answers, lengths = run(padding)
    assert lengths <= ({256} if padding == "max_length" else set(default_buckets(256)))
    torch.testing.assert_close(padded, dynamic, atol=1e-5, rtol=1e-5)
    assert pad_answers == dyn_answers
    with pytest.raises(ValueError, match="padding must be"):
        SQuADDataModule(data_file=str(SQUAD), padding="fixed")
