"""The benchmark's streamps logics compute what the loop computes.

benchmarks/ is measured, not tested for speed; but its logics must be right
for its numbers to mean anything, and its modules must import (a broken
import shows only when `make bench` runs).
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from benchmarks import streamps_mf
from benchmarks.mf_common import Ratings
from benchmarks.peers import loop
from examples.synthetic_ratings import synthetic_ratings

MODULES = [
    "benchmarks.run",
    "benchmarks.bench_raw",
    "benchmarks.bench_logic",
    "benchmarks.bench_mf",
    "benchmarks.bench_sparse",
    "benchmarks.bench_memory",
    "benchmarks.cpu_per_record",
    "benchmarks.bench_durability",
    "benchmarks.bench_recovery",
    "benchmarks.peers.loop",
    "benchmarks.peers.ray_ps",
    "benchmarks.peers.redis_ps",
]


@pytest.mark.parametrize("module", MODULES)
def test_benchmark_modules_import(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the bench extra, as CI runs: its packages are imported where they are used.
    for extra in ("psutil", "ray", "redis"):
        monkeypatch.setitem(sys.modules, extra, None)
    monkeypatch.delitem(sys.modules, module, raising=False)
    importlib.import_module(module)


def _ratings(count: int) -> Ratings:
    rows = np.array(list(synthetic_ratings(count, users=50, items=80, seed=3)), dtype=np.int64)
    return Ratings(rows[:, 0], rows[:, 1], rows[:, 2].astype(np.float64))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batched", [False, True], ids=["per key, pull limit 1", "windows of 1"])
def test_streamps_logics_without_staleness_reproduce_the_loop(batched: bool) -> None:
    # At a pull limit of 1, or in windows of one rating, every rating is trained on
    # the item as every earlier rating left it: the loop's errors, but for the
    # rounding of items to float32 on the shards (the loop keeps float64 rows).
    data = _ratings(600)

    _, streamps_rmse = streamps_mf.run(data, 1, 1, 1, batched=batched)
    _, loop_rmse = loop.run(data)

    assert streamps_rmse == pytest.approx(loop_rmse, abs=1e-7)


@pytest.mark.timeout(120)
def test_windowed_logic_learns_every_rating_once_on_two_workers_and_two_shards() -> None:
    data = _ratings(3_000)

    _, windowed = streamps_mf.run(data, 2, 2, 64, batched=True)
    _, looped = loop.run(data)

    # Stale by at most one window of 64 ratings: close to the loop, not equal.
    assert abs(windowed - looped) < 0.02
