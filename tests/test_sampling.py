from itertools import islice

import pytest

from semiseg.data.sampling import ResumableSampler, ShardSampler


def test_each_epoch_is_a_permutation():
    sampler = ResumableSampler(7, seed=3)
    items = list(islice(iter(sampler), 21))
    for epoch in range(3):
        assert sorted(i for i, _ in items[7 * epoch : 7 * (epoch + 1)]) == list(range(7))
    assert [i for i, _ in items[:7]] != [i for i, _ in items[7:14]]


def test_starting_at_a_position_continues_the_same_stream():
    full = list(islice(iter(ResumableSampler(10, seed=1)), 35))
    resumed = list(islice(iter(ResumableSampler(10, seed=1, start=13)), 22))
    assert resumed == full[13:]


def test_ranks_partition_each_epoch():
    shards = [list(islice(iter(ResumableSampler(9, seed=0, rank=r, world=2)), 5)) for r in range(2)]
    indices = [i for shard in shards for i, _ in shard]
    # 9 samples padded to 10 by wrapping: every sample appears, one twice.
    assert set(indices) == set(range(9)) and len(indices) == 10
    seeds = [s for shard in shards for _, s in shard]
    assert len(set(seeds)) == 10


def test_seed_changes_order():
    a = [i for i, _ in islice(iter(ResumableSampler(20, seed=0)), 20)]
    b = [i for i, _ in islice(iter(ResumableSampler(20, seed=1)), 20)]
    assert a != b


def test_shard_sampler_counts_each_sample_once():
    parts = [list(ShardSampler(7, r, 3)) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(7))


def test_empty_dataset_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        ResumableSampler(0, seed=0)
