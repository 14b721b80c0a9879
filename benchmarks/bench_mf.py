"""Row (c): end-to-end online matrix factorization, streamps against the in-process loop and peers.

Every implementation runs the same 100,000-rating synthetic stream (943 users,
1,682 items) through the same per-rating SGD step (benchmarks.mf_common) with
rank 16, and reports ratings per second and the RMSE of its last 10% of
(prequential) predictions. Cluster start-up (processes, Ray runtime, Redis
server) is excluded for everyone; the job itself, including actor or worker
start where the peer needs it, is timed.
"""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path

from benchmarks.mf_common import INIT_SPEC, Rating, new_logic, ratings, tail_rmse
from benchmarks.peers import loop, ray_ps, redis_ps
from psclient.cluster import Cluster
from psclient.either import Left
from psclient.local import LocalCluster
from psclient.plugins import ship

# Items in flight per worker. It bounds staleness the way the peers' batch of
# PEER_BATCH ratings does (a batch of 256 ratings touches ~200 items; 1,024
# keeps the pipeline full on loopback). Without a limit (65,536) the stream runs
# ~8% faster but its RMSE drifts up by ~0.03 on this short stream.
STREAMPS_PULL_LIMIT = 1_024


def run_streamps(
    data: list[Rating], workers: int = 2, shards: int = 2, pull_limit: int | None = STREAMPS_PULL_LIMIT
) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        logic = ship(functools.partial(new_logic), Path(tmp), "logic")
        cluster = LocalCluster(logic, INIT_SPEC, "add", workers, shards, pull_limit=pull_limit)
        with cluster, Cluster(cluster.servers, cluster.workers) as client:
            start = time.perf_counter()
            predictions = [
                item.value for item in client.stream(data, partition_by=lambda r: r[0]) if isinstance(item, Left)
            ]
            elapsed = time.perf_counter() - start
    return len(data) / elapsed, tail_rmse(predictions)


def run() -> list[list[str]]:
    data = ratings()
    results: dict[str, tuple[float, float] | str] = {}
    results["streamps, 2 workers x 2 shards"] = run_streamps(data)
    results["single-process numpy loop (the limit)"] = loop.run(data)
    try:
        results["Ray actors, 2 workers x 2 shards"] = ray_ps.run(data)
    except ImportError:
        results["Ray actors, 2 workers x 2 shards"] = "ray is not installed"
    reason = redis_ps.available()
    results["Redis + Lua, 2 workers x 1 server"] = reason or redis_ps.run(data)
    ours = results["streamps, 2 workers x 2 shards"]
    assert isinstance(ours, tuple)
    rows = []
    for name, result in results.items():
        if isinstance(result, str):
            rows.append([name, "skipped: " + result, "", ""])
            continue
        speed, error = result
        rows.append([name, f"{speed:,.0f}", f"{error:.4f}", f"{ours[0] / speed:.2f}x"])
    return rows


HEADERS = ["implementation", "ratings/s", "RMSE last 10%", "streamps speed / this"]

if __name__ == "__main__":
    from benchmarks.common import format_table

    print(format_table(HEADERS, run()))
