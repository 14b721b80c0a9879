"""Restartable jobs: what durable shards and worker checkpoints cost a whole job.

Online matrix factorization on MovieLens 100K (WindowMF: windows of 256 ratings,
2 workers x 2 shards, ratings routed by user), through a local cluster of
processes. "plain": shards without --data-dir, workers without checkpoints.
"durable": `LocalCluster(durable=True)`, what `transform(durable=True)` runs:
each shard with --data-dir (--durable: an fsync before each ack, shared by
group commit), each worker with --checkpoint-dir (a checkpoint every 10,000
records; every push named by its record and held until the record finishes).
The two run alternately, 3 times each; the figures are medians. The same
ratings in the same order, so the RMSE shows both learned the same way.
"""

from __future__ import annotations

import statistics

from benchmarks import streamps_mf
from benchmarks.mf_common import Ratings, movielens_by_time

WORKERS = 2
SHARDS = 2
WINDOW = 256
ROUNDS = 3
_ratio: list[float] = []


def _measure(data: Ratings) -> dict[str, list[tuple[float, float]]]:
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "durable": []}
    for _ in range(ROUNDS):
        for mode in runs:
            runs[mode].append(streamps_mf.run(data, WORKERS, SHARDS, WINDOW, batched=True, durable=mode == "durable"))
    return runs


def run() -> list[list[str]]:
    runs = _measure(movielens_by_time())
    rates = {mode: statistics.median(rate for rate, _ in results) for mode, results in runs.items()}
    _ratio[:] = [rates["plain"] / rates["durable"]]
    rows = []
    for mode, results in runs.items():
        rmse = statistics.median(error for _, error in results)
        slowdown = "1.00x" if mode == "plain" else f"{_ratio[0]:.2f}x"
        rows.append([mode, f"{WORKERS}x{SHARDS}", str(WINDOW), f"{rates[mode]:,.0f}", f"{rmse:.4f}", slowdown])
    return rows


def targets() -> list[tuple[str, str, str, bool | None]]:
    what = "MF 2x2 WindowMF W=256: plain / durable shards + worker checkpoints (ratings/s)"
    if not _ratio:
        return [(what, "not measured", "reported", None)]
    return [(what, f"{_ratio[0]:.2f}x", "reported", None)]


HEADERS = ["job", "workers x shards", "window", "ratings/s", "RMSE", "slowdown vs plain"]

if __name__ == "__main__":
    from benchmarks.common import format_table

    print(format_table(HEADERS, run()))
