"""Data order: disjoint ranks, the same global batch whatever the split, reshuffled epochs, exact resume."""

from __future__ import annotations

import pytest

from pipeline.sampler import GlobalBatchSampler, epoch_permutation, eval_shard


def _step_samples(n, micro, accum, world, seed, steps):
    """Per step: the list of per-rank sample lists (all micro-batches of a rank concatenated)."""
    samplers = [GlobalBatchSampler(n, micro, accum, world, r, seed) for r in range(world)]
    out = []
    for _ in range(steps):
        out.append([sum(s.next_step(), []) for s in samplers])
    return out


def test_ranks_disjoint_and_cover_global_batch():
    n, micro, accum, world = 48, 3, 2, 4  # two global batches of 24 per epoch
    for per_rank in _step_samples(n, micro, accum, world, seed=7, steps=5):
        flat = sum(per_rank, [])
        assert all(len(r) == micro * accum for r in per_rank)
        assert len(set(flat)) == micro * accum * world  # the ranks' samples are disjoint


def test_global_batch_same_set_for_any_split():
    """micro x accum x world = 12 in three ways: each optimizer step sees the same 12 samples."""
    splits = [(12, 1, 1), (6, 2, 1), (3, 2, 2), (1, 4, 3)]
    seen = []
    for micro, accum, world in splits:
        steps = _step_samples(40, micro, accum, world, seed=3, steps=6)
        seen.append([sorted(sum(per_rank, [])) for per_rank in steps])
    for other in seen[1:]:
        assert other == seen[0]


def test_epochs_cover_everything_and_reshuffle():
    n = 24
    s = GlobalBatchSampler(n, 4, 1, 2, 0, seed=1)
    epoch0 = [s.next_global_batch() for _ in range(3)]  # 3 x 8 = one epoch
    assert s.epoch == 1 and s.offset == 0
    epoch1 = [s.next_global_batch() for _ in range(3)]
    assert sorted(sum(epoch0, [])) == list(range(n))
    assert sorted(sum(epoch1, [])) == list(range(n))
    assert sum(epoch0, []) != sum(epoch1, [])
    assert epoch_permutation(n, 1, 0).tolist() == sum(epoch0, [])
    assert epoch_permutation(n, 2, 0).tolist() != sum(epoch0, [])


def test_resume_neither_repeats_nor_skips():
    n = 37  # not a multiple of the global batch: the stream crosses epoch boundaries mid-batch
    straight = GlobalBatchSampler(n, 2, 3, 2, 1, seed=5)
    ref = [straight.next_step() for _ in range(20)]
    first = GlobalBatchSampler(n, 2, 3, 2, 1, seed=5)
    got = [first.next_step() for _ in range(9)]
    state = first.state_dict()
    resumed = GlobalBatchSampler(n, 2, 3, 2, 1, seed=5)
    resumed.load_state_dict(state)
    got += [resumed.next_step() for _ in range(11)]
    assert got == ref
    assert resumed.samples_seen == 20 * 12


def test_resume_refuses_other_stream():
    s = GlobalBatchSampler(30, 2, 1, 1, 0, seed=5)
    with pytest.raises(ValueError, match="seed 5 over 30 blocks"):
        GlobalBatchSampler(30, 2, 1, 1, 0, seed=6).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="same --seed"):
        GlobalBatchSampler(31, 2, 1, 1, 0, seed=5).load_state_dict(s.state_dict())


def test_too_little_data_names_the_factors():
    with pytest.raises(ValueError, match=r"fewer than one global batch of 16 \(micro_batch_size 4 x grad_accum 2 x "
                                         r"world_size 2\)"):
        GlobalBatchSampler(10, 4, 2, 2, 0, seed=0)


@pytest.mark.parametrize("n,world,bs", [(38, 2, 4), (7, 3, 2), (5, 4, 8), (16, 2, 8), (1, 2, 1)])
def test_eval_shard_counts_every_sample_once(n, world, bs):
    shards = [eval_shard(n, world, r, bs) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of batches on every rank (ZeRO-3 collectives)
    flat = [i for s in shards for b in s for i in b if i >= 0]
    assert sorted(flat) == list(range(n))
    assert all(len(b) == bs for s in shards for b in s)
