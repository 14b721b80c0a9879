"""A parameter server on Ray actors, as a careful Ray user would write one.

Item parameters are sharded over shard actors by the same rule as streamps
(item % shards); each shard holds one dense numpy table indexed by item //
shards and creates rows on first touch with the same init, gather and
scatter-add vectorized. Each worker actor owns the users of its partition and
drives its ratings in windows of W: one batched pull per shard (all issued
before any is awaited), the same per-rating SGD step on local copies, and one
batched push per shard that is not waited on. Calls from one caller run in
order on an actor, so the next window's pull sees this window's push, and the
push refs of one window are collected only before the next window's push:
at most one window's pushes are ever in flight. Outstanding pushes are waited
for once, at the end.

Small arrays go as plain arguments (Ray inlines them; no `ray.put`). The
runtime is bound to 127.0.0.1 with the dashboard and usage reporting off; 2
CPUs, shared by the actors at 0.5 each so that all four run at once on 2
cores. Start-up (the runtime and the actor processes) is excluded from the
timing; the data reaching the workers is timed, as streamps' feed is.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from benchmarks.mf_common import PARAM_DIM, Learner, Ratings, item_deltas, item_init, rmse
from examples.mf import item_rows


class _Shard:
    def __init__(self, shard: int, num_shards: int):
        self.shard, self.num_shards = shard, num_shards
        self.table = np.zeros((0, PARAM_DIM), dtype=np.float32)
        self.made = np.zeros(0, dtype=bool)

    def ready(self) -> bool:
        return True

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        rows = ids // self.num_shards
        if len(rows) and rows.max() >= len(self.made):
            size = max(int(rows.max()) + 1, 2 * len(self.made))
            self.table = np.concatenate([self.table, np.zeros((size - len(self.made), PARAM_DIM), np.float32)])
            self.made = np.concatenate([self.made, np.zeros(size - len(self.made), dtype=bool)])
        fresh = ~self.made[rows]
        if fresh.any():
            self.table[rows[fresh]] = item_init(ids[fresh])
            self.made[rows[fresh]] = True
        return rows

    def pull(self, ids: np.ndarray) -> np.ndarray:
        rows = self._rows(ids)  # may grow the table: index it after
        return self.table[rows]

    def push(self, ids: np.ndarray, deltas: np.ndarray) -> None:
        rows = self._rows(ids)
        np.add.at(self.table, rows, deltas)


class _Worker:
    def __init__(self, shards: list[Any]):
        self.shards = shards
        self.learner = Learner()

    def ready(self) -> bool:
        return True

    def run(self, users: np.ndarray, items: np.ndarray, stars: np.ndarray, window: int) -> np.ndarray:
        import ray

        shards, num_shards, step = self.shards, len(self.shards), self.learner.step
        errors = np.empty(len(users))
        pushes: list[Any] = []
        user_list, item_list, star_list = users.tolist(), items.tolist(), stars.tolist()
        for start in range(0, len(users), window):
            end = min(start + window, len(users))
            wanted = np.unique(items[start:end])
            owned = [wanted[wanted % num_shards == s] for s in range(num_shards)]
            asked = [s for s in range(num_shards) if len(owned[s])]
            answers = ray.get([shards[s].pull.remote(owned[s]) for s in asked])
            ids = np.concatenate([owned[s] for s in asked])
            rows = item_rows(np.concatenate(answers))
            before = rows.copy()
            position = dict(zip(ids.tolist(), range(len(ids)), strict=True))
            for k in range(start, end):
                errors[k] = step(user_list[k], star_list[k], rows[position[item_list[k]]])
            deltas = item_deltas(rows, before)
            ray.get(pushes)  # the previous window's: done by now, as this window's pulls came after them
            pushes, at = [], 0
            for s in asked:
                pushes.append(shards[s].push.remote(owned[s], deltas[at : at + len(owned[s])]))
                at += len(owned[s])
        ray.get(pushes)
        return errors


# The CPUs Ray may schedule on: the machine the benchmark is sized for.
CPUS = 2


class RayCluster:
    """A running Ray runtime; `run` times one job on fresh actors."""

    def __init__(self, ray: Any, num_workers: int, num_shards: int):
        self.ray, self.num_workers, self.num_shards = ray, num_workers, num_shards
        share = CPUS / (num_workers + num_shards)
        self.shard_class = ray.remote(num_cpus=share)(_Shard)
        self.worker_class = ray.remote(num_cpus=share)(_Worker)

    def run(self, data: Ratings, window: int) -> tuple[float, float]:
        """(ratings per second, prequential RMSE); actor start-up is not timed."""
        ray = self.ray
        shards = [self.shard_class.remote(s, self.num_shards) for s in range(self.num_shards)]
        workers = [self.worker_class.remote(shards) for _ in range(self.num_workers)]
        ray.get([actor.ready.remote() for actor in shards + workers])
        parts = data.partition(self.num_workers)
        start = time.perf_counter()
        results = ray.get(
            [w.run.remote(p.users, p.items, p.stars, window) for w, p in zip(workers, parts, strict=True)]
        )
        elapsed = time.perf_counter() - start
        for actor in shards + workers:
            ray.kill(actor)
        return len(data) / elapsed, rmse(np.concatenate(results))


@contextmanager
def cluster(num_workers: int = 2, num_shards: int = 2) -> Iterator[RayCluster]:
    """The Ray runtime on loopback, shut down on exit."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no reporting home from a benchmark
    # A single-node runtime on the loopback address, as Ray runs on macOS and Windows.
    # Read when ray is imported, and by every Ray process, which inherits it.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    ray.init(
        num_cpus=CPUS,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        object_store_memory=256 * 1024 * 1024,
        _node_ip_address="127.0.0.1",
        # the actors import this package the way the driver does
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}},
    )
    try:
        yield RayCluster(ray, num_workers, num_shards)
    finally:
        ray.shutdown()
