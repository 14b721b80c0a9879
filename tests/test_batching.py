"""The runtime batches per shard: a worker blocked at its pull limit still sends many keys per request."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from conftest import StartShards

from psclient import connect
from psworker import WorkerLogic
from psworker.runtime import WorkerRuntime

RECORDS = 20_000
KEYS = 1_000


class PullThenPush(WorkerLogic):
    def on_recv(self, data: Any, ps: Any) -> None:
        ps.pull(data % KEYS)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        ps.push(param_id, 1)


@pytest.mark.timeout(120)
def test_a_worker_at_its_pull_limit_coalesces_pulls_to_every_shard(start_shards: StartShards) -> None:
    servers = start_shards(2, init="const:0")
    runtime = WorkerRuntime(PullThenPush(), servers, 0, 1, emit=lambda _: None, pull_limit=64)
    runtime.connect()

    def feed() -> None:
        for start in range(0, RECORDS, 500):
            runtime.feed(list(range(start, start + 500)))
        runtime.end_input()

    threading.Thread(target=feed, daemon=True).start()
    runtime.run()
    with connect(servers) as cluster:
        infos = cluster.info()
        model = dict(cluster.snapshot())

    assert model == {key: RECORDS // KEYS for key in range(KEYS)}
    pull_requests = sum(info.pull_requests for info in infos)  # type: ignore[union-attr]
    pulled_keys = sum(info.pulled_keys for info in infos)  # type: ignore[union-attr]
    assert pulled_keys == RECORDS
    # One key per request would be 20,000 requests; batching keeps it a small fraction.
    assert pull_requests <= RECORDS // 5, f"{pull_requests} pull requests for {RECORDS} keys"


@pytest.mark.timeout(120)
def test_a_worker_runs_its_shard_streams_without_a_thread_per_stream(start_shards: StartShards) -> None:
    servers = start_shards(4, init="const:0")
    before = threading.active_count()
    runtime = WorkerRuntime(PullThenPush(), servers, 0, 1, emit=lambda _: None, pull_limit=64)
    runtime.connect()
    during = threading.active_count()
    runtime.feed(list(range(2_000)))
    runtime.end_input()
    runtime.run()
    with connect(servers) as cluster:
        model = dict(cluster.snapshot())

    assert model == {key: 2 for key in range(KEYS)}
    # One event loop carries every stream (gRPC may add a poller thread of its own);
    # a thread or two per stream would be 8 or more for 4 shards.
    assert during - before <= 2, f"{during - before} threads for the streams to 4 shards"
