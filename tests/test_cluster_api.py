"""connect(): the blocking batch API, per key and vectorized, against real shards."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import StartShards
from logics import Exactness

from psclient import Left, connect, transform


@pytest.mark.timeout(120)
def test_vectorized_pull_and_push_match_the_per_key_api(start_shards: StartShards) -> None:
    servers = start_shards(2, init="zeros:3")
    ids = np.array([4, -7, 10, 4, 3], dtype=np.int64)  # 4 twice: both deltas apply
    deltas = np.arange(15, dtype=np.float32).reshape(5, 3)

    with connect(servers) as cluster:
        cluster.push(ids, deltas)
        stacked = cluster.pull(ids)
        per_key = cluster.pull([4, -7, 10, 3])

    expected_4 = deltas[0] + deltas[3]
    assert isinstance(stacked, np.ndarray)
    assert stacked.shape == (5, 3) and stacked.dtype == np.float32
    np.testing.assert_array_equal(stacked, np.stack([expected_4, deltas[1], deltas[2], expected_4, deltas[4]]))
    for value, expected in zip(per_key, [expected_4, deltas[1], deltas[2], deltas[4]], strict=True):
        np.testing.assert_array_equal(value, expected)


@pytest.mark.timeout(120)
def test_snapshot_after_pushes_holds_every_id_once_with_its_sum(start_shards: StartShards) -> None:
    servers = start_shards(2, init="const:0")
    ids = np.arange(-500, 500, dtype=np.int64)

    with connect(servers) as cluster:
        for step in range(1, 4):
            cluster.push(ids, np.full(len(ids), step, dtype=np.int64))
        cluster.push(["a", "b"], [5, 6])
        model = dict(cluster.snapshot())

    assert model == {**{i: 6 for i in range(-500, 500)}, "a": 5, "b": 6}


@pytest.mark.timeout(120)
def test_a_50_mb_parameter_pulls_and_pushes_exactly(start_shards: StartShards) -> None:
    size = 6_553_600  # 25 MiB of float32; a float64 push of it is 50 MiB
    servers = start_shards(1, init=f"zeros:{size}")
    ones = np.ones((1, size))

    with connect(servers) as cluster:
        initial = cluster.pull(np.array([7], dtype=np.int64))
        cluster.push(np.array([7], dtype=np.int64), ones)
        cluster.push(np.array([8, 7], dtype=np.int64), np.concatenate([ones, ones]))
        after = cluster.pull(np.array([7, 8], dtype=np.int64))

    assert isinstance(initial, np.ndarray) and isinstance(after, np.ndarray)
    assert initial.shape == (1, size) and initial.dtype == np.float32 and not initial.any()
    assert after.shape == (2, size) and after.dtype == np.float32  # float64 ones added in place, as += does
    assert (after[0] == 2.0).all() and (after[1] == 1.0).all()


@pytest.mark.timeout(120)
def test_a_silent_source_ends_the_input_after_iteration_wait_time() -> None:
    release = threading.Event()

    def records() -> Iterator[int]:
        yield from range(700)  # more than one feed batch
        release.wait(60)  # then silence, as an endless stream may fall
        yield from range(700, 710)

    started = time.monotonic()
    try:
        items = list(transform(records(), Exactness(), "const:0", "add", 2, 1, iteration_wait_time=1.0))
    finally:
        release.set()

    assert sorted(item.value[1] for item in items if isinstance(item, Left)) == list(range(700))
    assert time.monotonic() - started < 50
