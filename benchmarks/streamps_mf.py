"""The streamps side of bench_mf: the MF job on a local cluster, start-up excluded.

Two logics run the same per-rating step. `StreamMF` (benchmarks/mf_common.py)
is the job written per key, the natural way, under a pull limit. `WindowMF`
is the peers' algorithm written for streamps' batch API: windows of W
ratings, one `pull_many` of a window's distinct items, the steps on local
copies when they are answered, one `push_many` of the window's change, and
the window's errors as one output. The next window's pull leaves with this
window's push, in one message per shard, so it sees that push: the staleness
is the peers' (at most W ratings trained on copies of one pull).
"""

from __future__ import annotations

import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.mf_common import INIT_SPEC, Learner, Ratings, item_deltas, rmse, stream_mf
from examples.mf import item_rows
from psclient.cluster import Cluster
from psclient.either import Left
from psclient.local import LocalCluster
from psclient.plugins import ship
from psworker import WorkerLogic

Rating = tuple[int, int, float]


class WindowMF(WorkerLogic[Rating, np.ndarray, list[float]]):
    """Windows of `window` ratings: one pull_many, the steps on local copies, one push_many."""

    def __init__(self, window: int):
        self.window = window

    def open(self) -> None:
        self.learner = Learner()
        self.waiting: deque[Rating] = deque()  # ratings not yet in a window
        self.ratings: list[Rating] = []  # the window whose items are being pulled
        self.items = np.empty(0, dtype=np.int64)
        self.values: np.ndarray | None = None
        self.missing = 0
        self.input_ended = False

    def on_recv(self, data: Rating, ps: Any) -> None:
        self.waiting.append(data)
        if not self.ratings and len(self.waiting) >= self.window:
            self._start(ps)

    def on_input_end(self, ps: Any) -> None:
        self.input_ended = True
        if not self.ratings and self.waiting:
            self._start(ps)

    def _start(self, ps: Any) -> None:
        take = min(self.window, len(self.waiting))
        self.ratings = [self.waiting.popleft() for _ in range(take)]
        self.items = np.unique(np.fromiter((rating[1] for rating in self.ratings), np.int64, len(self.ratings)))
        self.values = None
        self.missing = len(self.items)
        ps.pull_many(self.items)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("answers arrive in on_pull_recv_many")

    def on_pull_recv_many(self, ids: Any, values: np.ndarray, ps: Any) -> None:
        # One call per shard's answer: place each in the window's item order.
        if self.values is None:
            self.values = np.empty((len(self.items), values.shape[1]), dtype=values.dtype)
        self.values[np.searchsorted(self.items, ids)] = values
        self.missing -= len(ids)
        if self.missing:
            return
        rows = item_rows(self.values)
        before = rows.copy()
        position = dict(zip(self.items.tolist(), range(len(self.items)), strict=True))
        step = self.learner.step
        errors = [step(user, stars, rows[position[item]]) for user, item, stars in self.ratings]
        ps.push_many(self.items, item_deltas(rows, before))
        ps.output(errors)
        self.ratings = []
        if len(self.waiting) >= self.window or (self.input_ended and self.waiting):
            self._start(ps)


def run(
    data: Ratings, workers: int, shards: int, window: int, *, batched: bool = False, durable: bool = False
) -> tuple[float, float]:
    """(ratings per second, prequential RMSE) of one job on a fresh cluster.

    `batched` runs WindowMF with windows of `window` ratings, else StreamMF at
    pull limit `window`. The clock starts once every shard and worker serves,
    and stops when the workers have finished (every pull answered, every push
    acknowledged): when the first final parameter arrives. Reading the final
    model is not timed. `durable` gives the shards data dirs and the workers
    checkpoints (`LocalCluster(durable=True)`).
    """
    records = data.records()
    logic = WindowMF(window) if batched else stream_mf(window)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(ship(logic, Path(tmp), "logic"), INIT_SPEC, "add", workers, shards, durable=durable)
        with cluster, Cluster(cluster.servers, cluster.workers) as client:
            errors: list[float] = []
            start = time.perf_counter()
            finished = None
            for item in client.stream(records, partition_by=_user):
                if isinstance(item, Left):
                    if batched:
                        errors.extend(item.value)
                    else:
                        errors.append(item.value)
                elif finished is None:
                    finished = time.perf_counter()
            elapsed = (finished or time.perf_counter()) - start
    if len(errors) != len(data):
        raise RuntimeError(f"streamps output {len(errors)} errors for {len(data)} ratings")
    return len(data) / elapsed, rmse(errors)


def _user(record: tuple[int, int, float]) -> int:
    return record[0]
