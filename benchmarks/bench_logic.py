"""The WorkerLogic path, per-key pull -> on_pull_recv -> push round trips per second.

Each record makes the logic pull one parameter; its answer makes it push a
delta to the same parameter. The baseline runs the same WorkerLogic in this
process against a dict-backed client that answers every pull at once: what the
callbacks alone cost, with no network and no batching.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from psclient.cluster import Cluster
from psclient.either import Left
from psclient.local import LocalCluster
from psclient.plugins import ship
from psworker import WorkerLogic

RECORDS = 100_000
KEYS = 10_000
DIM = 16


class PullThenPush(WorkerLogic[int, np.ndarray, int]):
    def on_recv(self, data: int, ps: Any) -> None:
        ps.pull(data % KEYS)

    def on_pull_recv(self, param_id: Any, param_value: np.ndarray, ps: Any) -> None:
        ps.push(param_id, param_value * 0.0 + 1.0)


class _InProcessClient:
    worker_index, num_workers, num_shards = 0, 1, 1

    def __init__(self, logic: WorkerLogic) -> None:
        self.table = np.zeros((KEYS, DIM), dtype=np.float32)
        self.logic = logic

    def pull(self, param_id: int) -> None:
        self.logic.on_pull_recv(param_id, self.table[param_id].copy(), self)

    def push(self, param_id: int, delta: np.ndarray) -> None:
        self.table[param_id] += delta

    def output(self, out: Any) -> None:
        pass


def in_process() -> float:
    logic = PullThenPush()
    client = _InProcessClient(logic)
    start = time.perf_counter()
    for record in range(RECORDS):
        logic.on_recv(record, client)
    return RECORDS / (time.perf_counter() - start)


def streamps(workers: int) -> tuple[float, bool]:
    """(round trips per second, every push arrived); process start-up excluded, as in the MF section."""
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(ship(PullThenPush(), Path(tmp), "logic"), f"zeros:{DIM}", "add", workers, 2)
        with cluster, Cluster(cluster.servers, cluster.workers) as client:
            start = time.perf_counter()
            model = {}
            for item in client.stream(range(RECORDS)):
                if not isinstance(item, Left):
                    param_id, value = item.value
                    model[param_id] = value
            elapsed = time.perf_counter() - start
    exact = sum(float(v[0]) for v in model.values()) == RECORDS
    return RECORDS / elapsed, exact


def run() -> list[list[str]]:
    base = in_process()
    rows = []
    for workers in (1, 2):
        speed, exact = streamps(workers)
        rows.append(
            [str(workers), "2", f"{speed:,.0f}", f"{base:,.0f}", f"{speed / base:.3f}", "yes" if exact else "NO"]
        )
    return rows


HEADERS = ["workers", "shards", "streamps round trips/s", "in-process round trips/s", "ratio", "all pushes applied"]

if __name__ == "__main__":
    from benchmarks.common import format_table

    print(format_table(HEADERS, run()))
