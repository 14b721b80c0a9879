"""A parameter server on Ray actors, as a careful Ray user would write one.

Fairness: item vectors are sharded over `num_shards` actors by the same rule
(item % shards), each holding one numpy table with vectorized gather and
scatter-add. Each of `num_workers` worker actors owns the users of its
partition (same partition as streamps) and works in batches of PEER_BATCH
ratings: one batched pull per shard (issued concurrently), the same per-rating
SGD step on local copies, one batched push of summed deltas per shard. Ray's
object store moves the numpy arrays without pickling their bytes one by one.
The cluster start-up is excluded from the timing; actor creation is included,
as streamps' own process start is.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from benchmarks.mf_common import PEER_BATCH, Learner, Rating, item_init, partition_by_user, tail_rmse


def run(data: list[Rating], num_workers: int = 2, num_shards: int = 2) -> tuple[float, float]:
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Loopback only: the benchmark never talks to any other address.
    ray.init(
        num_cpus=os.cpu_count() or 2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    try:

        @ray.remote
        class Shard:
            def __init__(self, shard: int, num_shards: int):
                self.shard, self.num_shards = shard, num_shards
                self.init = item_init()
                self.rows: dict[int, int] = {}
                self.table = np.zeros((0, 0), dtype=np.float32)

            def _rows(self, ids: np.ndarray) -> np.ndarray:
                missing = [i for i in dict.fromkeys(ids.tolist()) if i not in self.rows]
                if missing:
                    values = np.asarray(self.init(missing), dtype=np.float32)
                    start = len(self.rows)
                    self.table = values if not self.rows else np.concatenate([self.table, values])
                    self.rows.update((i, start + k) for k, i in enumerate(missing))
                return np.fromiter((self.rows[i] for i in ids.tolist()), dtype=np.int64, count=len(ids))

            def pull(self, ids: np.ndarray) -> np.ndarray:
                rows = self._rows(ids)  # may grow the table: look it up after
                return self.table[rows]

            def push(self, ids: np.ndarray, deltas: np.ndarray) -> None:
                rows = self._rows(ids)
                np.add.at(self.table, rows, deltas)

        @ray.remote
        class Worker:
            def __init__(self, shards: list[Any]):
                self.shards = shards
                self.learner = Learner()

            def run(self, ratings: list[Rating]) -> list[tuple[float, float]]:
                out: list[tuple[float, float]] = []
                shards = self.shards
                for start in range(0, len(ratings), PEER_BATCH):
                    batch = ratings[start : start + PEER_BATCH]
                    items = np.unique(np.fromiter((r[1] for r in batch), dtype=np.int64))
                    owned = [items[items % len(shards) == s] for s in range(len(shards))]
                    pulled = ray.get([shard.pull.remote(ids) for shard, ids in zip(shards, owned, strict=True)])
                    local = {
                        int(i): v.copy()
                        for ids, vals in zip(owned, pulled, strict=True)
                        for i, v in zip(ids, vals, strict=True)
                    }
                    before = {i: v.copy() for i, v in local.items()}
                    out.extend(self.learner.run_batch(batch, local))
                    pushes = []
                    for shard, ids in zip(shards, owned, strict=True):
                        if len(ids):
                            deltas = np.stack([local[int(i)] - before[int(i)] for i in ids])
                            pushes.append(shard.push.remote(ids, deltas))
                    ray.get(pushes)
                return out

        parts = partition_by_user(data, num_workers)
        start = time.perf_counter()
        shards = [Shard.remote(s, num_shards) for s in range(num_shards)]
        workers = [Worker.remote(shards) for _ in range(num_workers)]
        results = ray.get([w.run.remote(part) for w, part in zip(workers, parts, strict=True)])
        elapsed = time.perf_counter() - start
        predictions = [p for result in results for p in result]
        return len(data) / elapsed, tail_rmse(predictions)
    finally:
        ray.shutdown()
