"""The raw shard path through the SDK's batch API, against an in-process numpy table.

For each shard count (1, 2), value size (1, 16, 128 float32) and batch size
(1, 64, 1024, 16384): keys per second of a blocking pull, a blocking push
(scatter-add), and a pull followed by a push of the same keys. The baseline
does the same gathers and scatter-adds on a numpy table in this process: the
limit any parameter server on this machine is measured against. The row of
pull+push, 1 shard, batch 1024, dim 16 (a target) is the median of 3
alternating measurements of each side.
"""

from __future__ import annotations

import statistics

import numpy as np

from benchmarks.common import addresses, rate, shard_processes, si
from psclient import connect

KEYSPACE = 100_000
BATCHES = (1, 64, 1024, 16_384)
DIMS = (1, 16, 128)
SHARDS = (1, 2)


def _batches(batch: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, KEYSPACE, batch, dtype=np.int64) for _ in range(count)]


def _baseline(dim: int, batch: int, min_seconds: float) -> dict[str, float]:
    table = np.zeros((KEYSPACE, dim), dtype=np.float32)
    keys = _batches(batch, 64, seed=1)
    delta = np.full((batch, dim), 0.5, dtype=np.float32)
    state = {"i": 0}

    def next_keys() -> np.ndarray:
        state["i"] += 1
        return keys[state["i"] % len(keys)]

    def pull() -> int:
        table[next_keys()].sum()  # touch what was gathered, as a caller would
        return batch

    def push() -> int:
        np.add.at(table, next_keys(), delta)
        return batch

    def pull_push() -> int:
        ids = next_keys()
        table[ids].sum()
        np.add.at(table, ids, delta)
        return batch

    return {name: rate(fn, min_seconds) for name, fn in (("pull", pull), ("push", push), ("pull+push", pull_push))}


_ratios: dict[tuple[str, int, int, int], float] = {}
# (op, shards, batch, dim) of the row a target is judged on, and the target
TARGET = ("pull+push", 1, 1024, 16)
TARGET_RATIO = 0.3
TARGET_REPEATS = 3


def run(min_seconds: float = 0.25) -> list[list[str]]:
    rows = []
    for dim in DIMS:
        baselines = {batch: _baseline(dim, batch, min_seconds) for batch in BATCHES}
        for num_shards in SHARDS:
            with shard_processes(num_shards, f"zeros:{dim}") as shards, connect(addresses(shards)) as cluster:
                cluster.pull(np.arange(KEYSPACE, dtype=np.int64))  # create every parameter up front
                for batch in BATCHES:
                    keys = _batches(batch, 64, seed=1)
                    delta = np.full((batch, dim), 0.5, dtype=np.float32)
                    state = {"i": 0}

                    def next_keys(keys: list[np.ndarray] = keys, state: dict[str, int] = state) -> np.ndarray:
                        state["i"] += 1
                        return keys[state["i"] % len(keys)]

                    def pull(batch: int = batch, next_keys=next_keys) -> int:  # type: ignore[no-untyped-def]
                        cluster.pull(next_keys())
                        return batch

                    def push(batch: int = batch, delta: np.ndarray = delta, next_keys=next_keys) -> int:  # type: ignore[no-untyped-def]
                        cluster.push(next_keys(), delta)
                        return batch

                    def pull_push(batch: int = batch, delta: np.ndarray = delta, next_keys=next_keys) -> int:  # type: ignore[no-untyped-def]
                        ids = next_keys()
                        cluster.pull(ids)
                        cluster.push(ids, delta)
                        return batch

                    for name, fn in (("pull", pull), ("push", push), ("pull+push", pull_push)):
                        ours = rate(fn, min_seconds)
                        base = baselines[batch][name]
                        if (name, num_shards, batch, dim) == TARGET:
                            # The row a target is judged on: both sides alternately, medians.
                            ours_runs, base_runs = [ours], [base]
                            for _ in range(TARGET_REPEATS - 1):
                                base_runs.append(_baseline(dim, batch, min_seconds)[name])
                                ours_runs.append(rate(fn, min_seconds))
                            ours, base = statistics.median(ours_runs), statistics.median(base_runs)
                        rows.append(
                            [name, str(num_shards), str(batch), str(dim), si(ours), si(base), f"{ours / base:.3f}"]
                        )
                        _ratios[(name, num_shards, batch, dim)] = ours / base
    return rows


def targets() -> list[tuple[str, str, str, bool | None]]:
    """The issue's target on this section (after run()): (what, measured, goal, met)."""
    ratio = _ratios.get(TARGET)
    what = "raw pull+push, 1,024 keys x 16 float32, 1 shard / in-process numpy table"
    if ratio is None:
        return [(what, "not measured", f">= {TARGET_RATIO}x", None)]
    return [(what, f"{ratio:.3f}x", f">= {TARGET_RATIO}x", ratio >= TARGET_RATIO)]


HEADERS = ["op", "shards", "batch", "dim", "streamps keys/s", "numpy table keys/s", "ratio"]


if __name__ == "__main__":
    from benchmarks.common import format_table

    print(format_table(HEADERS, run()))
