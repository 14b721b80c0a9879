"""The shard's vectorized int-id index: exact lookups through growth, collisions and negatives."""

from __future__ import annotations

import numpy as np

from psserver.index import IntIndex


def test_lookup_finds_every_inserted_key_and_only_those() -> None:
    rng = np.random.default_rng(7)
    keys = np.unique(rng.integers(-(2**63), 2**63 - 1, 50_000, dtype=np.int64))
    rng.shuffle(keys)
    inserted, absent = keys[:30_000], keys[30_000:]
    index = IntIndex()

    index.insert(inserted[:1_000], np.arange(1_000))  # then grow several times
    index.insert(inserted[1_000:], np.arange(1_000, 30_000))

    assert len(index) == 30_000
    np.testing.assert_array_equal(index.lookup(inserted), np.arange(30_000))
    np.testing.assert_array_equal(index.lookup(absent), np.full(len(absent), -1))


def test_keys_that_share_a_home_slot_probe_to_distinct_slots() -> None:
    # Multiples of a large power of two share their high hash bits less than
    # random keys do; sequential ids are the common case. Both must be exact.
    for keys in (np.arange(0, 2**40, 2**28, dtype=np.int64), np.arange(-5_000, 5_000, dtype=np.int64)):
        index = IntIndex()

        index.insert(keys, np.arange(len(keys)))

        np.testing.assert_array_equal(index.lookup(keys[::-1]), np.arange(len(keys))[::-1])


def test_items_return_every_entry() -> None:
    index = IntIndex()
    keys = np.array([5, -1, 2**62, 0], dtype=np.int64)

    index.insert(keys, np.array([3, 1, 0, 2]))
    got_keys, got_rows = index.items()

    assert dict(zip(got_keys.tolist(), got_rows.tolist(), strict=True)) == {5: 3, -1: 1, 2**62: 0, 0: 2}


def test_duplicate_lookups_and_empty_batches() -> None:
    index = IntIndex()
    index.insert(np.array([9], dtype=np.int64), np.array([0]))

    assert index.lookup(np.array([9, 9, 8], dtype=np.int64)).tolist() == [0, 0, -1]
    assert index.lookup(np.array([], dtype=np.int64)).tolist() == []


def test_small_batches_agree_with_a_dict_however_long_the_probe() -> None:
    # Batches below the vectorized passes' threshold are probed key by key;
    # a table just under half full has long runs to walk through.
    rng = np.random.default_rng(3)
    keys = np.unique(rng.integers(-(2**40), 2**40, 2_000, dtype=np.int64))
    index = IntIndex()
    index.insert(keys, np.arange(len(keys)))
    expected = dict(zip(keys.tolist(), range(len(keys)), strict=True))
    probes = np.concatenate([keys, rng.integers(-(2**40), 2**40, 2_000, dtype=np.int64)])
    rng.shuffle(probes)

    for start in range(0, len(probes), 7):
        batch = probes[start : start + 7]
        assert index.lookup(batch).tolist() == [expected.get(k, -1) for k in batch.tolist()]
