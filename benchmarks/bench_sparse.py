"""Sparse logistic regression, 50 hashed features per record, through `push_many`.

Each record is 50 (bucket, value) pairs in 2**16 hashed buckets (half from
1,000 hot buckets, half uniform) and a label in {-1, +1} drawn from a hidden
linear model. The learner takes one SGD step on the log loss per record, with
L2 on the record's buckets (eta 0.05, alpha 1e-5):

    p = w[ids] . x;   w[ids] += eta y / (1 + exp(y p)) x - eta alpha w[ids]

The baseline is that loop in one process on a dense numpy array. On streamps
each worker takes its records in windows of W (64, 256, 1,024: the staleness
bound, as the peers' windows in the MF benchmark): one `pull_many` of the
window's distinct buckets, the same per-record loop on a local copy when they
are answered (`on_pull_recv_many`), one `push_many` of the window's change, and
outputs its prequential hits. Timed from the first record fed to the last
worker finished (process start-up and the final snapshot excluded), and net of
the job's start and end: from the first window's output to the last one's.
Accuracy is prequential (each record predicted before it is learned).
"""

from __future__ import annotations

import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from psclient.cluster import Cluster
from psclient.either import Left, Right
from psclient.local import LocalCluster
from psclient.plugins import ship
from psworker import WorkerLogic

RECORDS = 60_000
FEATURES = 50
BITS = 16
HOT = 1_000
ETA = 0.05
ALPHA = 1e-5
# Records per pull: the staleness bound, as the peers' windows in the MF benchmark.
WINDOWS = (64, 256, 1_024)
SEED = 7

Record = tuple[np.ndarray, np.ndarray, int]


def make_records(count: int = RECORDS, seed: int = SEED) -> list[Record]:
    """(bucket ids as int64, values as float64, label) per record: arrays travel as raw bytes in a Feed."""
    rng = np.random.default_rng(seed)
    buckets = 1 << BITS
    truth = rng.normal(size=buckets)
    hot = rng.integers(0, buckets, size=HOT)
    half = FEATURES // 2
    ids = np.concatenate(
        [hot[rng.integers(0, HOT, size=(count, half))], rng.integers(0, buckets, size=(count, FEATURES - half))],
        axis=1,
    )
    x = rng.normal(size=(count, FEATURES)) / np.sqrt(FEATURES)
    margin = np.einsum("ij,ij->i", truth[ids], x)
    labels = np.where(rng.random(count) < 1.0 / (1.0 + np.exp(-3.0 * margin)), 1, -1)
    return list(zip(list(ids), list(x), labels.tolist(), strict=True))


def sgd_step(w: np.ndarray, ids: np.ndarray, x: np.ndarray, y: int) -> bool:
    """One SGD step on w (dense, in place); returns whether the prediction before it was right."""
    weights = w[ids]
    p = float(weights @ x)
    z = y * p
    g = ETA * y * (np.exp(-z) / (1.0 + np.exp(-z)) if z > 0 else 1.0 / (1.0 + np.exp(z)))
    w[ids] = weights + g * x - ETA * ALPHA * weights
    return (p > 0.0) == (y > 0)


def numpy_loop(records: list[Record]) -> tuple[float, float]:
    """(records per second, prequential accuracy) of the loop in this process."""
    w = np.zeros(1 << BITS)
    start = time.perf_counter()
    hits = sum(sgd_step(w, ids, x, y) for ids, x, y in records)
    return len(records) / (time.perf_counter() - start), hits / len(records)


class WindowedSparseLR(WorkerLogic[Record, float, list[int]]):
    """Windows of `window` records: one pull_many, the loop on a local copy, one push_many."""

    def __init__(self, window: int):
        self.window_size = window

    def open(self) -> None:
        self.local = np.zeros(1 << BITS)  # a scratch table: only the window's buckets are meaningful
        self.buffer: deque[Record] = deque()
        self.window: tuple[np.ndarray, np.ndarray, list[int]] | None = None
        self.window_ids = np.empty(0, dtype=np.int64)
        self.missing = 0
        self.input_ended = False

    def on_recv(self, data: Record, ps: Any) -> None:
        self.buffer.append(data)
        if self.window is None and len(self.buffer) >= self.window_size:
            self._start(ps)

    def on_input_end(self, ps: Any) -> None:
        self.input_ended = True
        if self.window is None and self.buffer:
            self._start(ps)

    def _start(self, ps: Any) -> None:
        records = [self.buffer.popleft() for _ in range(min(self.window_size, len(self.buffer)))]
        ids = np.stack([record[0] for record in records])
        self.window = (ids, np.stack([record[1] for record in records]), [record[2] for record in records])
        self.window_ids = np.unique(ids)
        self.missing = len(self.window_ids)
        ps.pull_many(self.window_ids)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("answers arrive in on_pull_recv_many")

    def on_pull_recv_many(self, ids: Any, values: np.ndarray, ps: Any) -> None:
        self.local[ids] = values
        self.missing -= len(ids)
        if self.missing or self.window is None:
            return
        pulled = self.local[self.window_ids]
        window_ids, xs, ys = self.window
        hits = sum(sgd_step(self.local, record_ids, x, y) for record_ids, x, y in zip(window_ids, xs, ys, strict=True))
        ps.push_many(self.window_ids, self.local[self.window_ids] - pulled)
        ps.output([len(ys), int(hits)])
        self.window = None
        if len(self.buffer) >= self.window_size or (self.input_ended and self.buffer):
            self._start(ps)


def streamps(records: list[Record], workers: int, shards: int, window: int) -> tuple[float, float, float]:
    """(records per second, the same net of start and end, prequential accuracy) on `workers` x
    `shards`, windows of `window` records. Net: records learned between the first window's
    output and the last one's, over that time."""
    with tempfile.TemporaryDirectory() as tmp:
        logic = ship(WindowedSparseLR(window), Path(tmp), "logic")
        cluster = LocalCluster(logic, "const:0.0", "add", workers, shards)
        with cluster, Cluster(cluster.servers, cluster.workers) as client:
            seen = hits = 0
            elapsed = first = last = None
            first_seen = 0
            start = time.perf_counter()
            for item in client.stream(records):
                if isinstance(item, Left):
                    last = time.perf_counter()
                    if first is None:
                        first, first_seen = last, item.value[0]
                    seen += item.value[0]
                    hits += item.value[1]
                elif isinstance(item, Right) and elapsed is None:
                    elapsed = time.perf_counter() - start
    assert seen == len(records), f"{seen} of {len(records)} records learned"
    assert elapsed is not None and first is not None and last is not None
    net = (seen - first_seen) / (last - first) if last > first else float("nan")
    return len(records) / elapsed, net, hits / seen


# The row the target is judged on: 2 workers x 2 shards at the MF headline window.
HEADLINE = (2, 2, 256)
_headline: tuple[float, float] | None = None  # (streamps records/s, loop records/s) of the last run()


def run() -> list[list[str]]:
    global _headline
    records = make_records()
    base, base_accuracy = numpy_loop(records)
    rows = []
    runs = [(1, 1, 256)] + [(2, 2, window) for window in WINDOWS]
    for workers, shards, window in runs:
        speed, net, accuracy = streamps(records, workers, shards, window)
        if (workers, shards, window) == HEADLINE:
            _headline = (speed, base)
        rows.append(
            [
                f"{workers} x {shards}",
                f"{window:,}",
                f"{speed:,.0f} ({net:,.0f} net)",
                f"{base:,.0f}",
                f"{speed / base:.2f} ({net / base:.2f} net)",
                f"{accuracy:.4f}",
                f"{base_accuracy:.4f}",
            ]
        )
    return rows


def targets() -> list[tuple[str, str, str, bool | None]]:
    """(what, measured, target, met) for the sparse target; after run()."""
    what = "sparse LR 2x2, W=256, 50 features through push_many: records/s / single-process numpy loop"
    if _headline is None:
        return [(what, "not measured", ">= 0.5x", None)]
    ratio = _headline[0] / _headline[1]
    return [(what, f"{ratio:.2f}x", ">= 0.5x", ratio >= 0.5)]


HEADERS = [
    "workers x shards",
    "window",
    "streamps records/s",
    "numpy loop records/s",
    "ratio",
    "streamps accuracy",
    "loop accuracy",
]

if __name__ == "__main__":
    from benchmarks.common import format_table

    print(format_table(HEADERS, run()))
