"""One measurement of the default path, run in a child whose PYTHONPATH names the tree measured.

`python benchmarks/default_path_job.py raw|mf DATA_DIR` prints one JSON line:
{"rate": units per second}. It imports `psclient`, `psserver`, `psworker` and
`benchmarks` from whatever tree PYTHONPATH names first, so section j can run
the same job on this tree and on an older checkout, and it uses only what both
trees have: the SDK's batch pull and push, LocalCluster, Cluster.stream and
the per-key MF logic.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KEYSPACE = 100_000
RAW_BATCH = 1_024
RAW_DIM = 16
RAW_SECONDS = 1.0
MF_RATINGS = 30_000
MF_PULL_LIMIT = 256
MF_WORKERS = 2
MF_SHARDS = 2


def raw_pull_push() -> float:
    """Keys per second of a blocking pull then push of 1,024 keys x 16 float32, 1 shard."""
    from benchmarks.common import addresses, rate, shard_processes
    from psclient import connect

    rng = np.random.default_rng(1)
    batches = [rng.integers(0, KEYSPACE, RAW_BATCH, dtype=np.int64) for _ in range(64)]
    delta = np.full((RAW_BATCH, RAW_DIM), 0.5, dtype=np.float32)
    turn = iter(range(10**9))
    with shard_processes(1, f"zeros:{RAW_DIM}") as shards, connect(addresses(shards)) as cluster:
        cluster.pull(np.arange(KEYSPACE, dtype=np.int64))  # create every parameter up front

        def pull_push() -> int:
            ids = batches[next(turn) % len(batches)]
            cluster.pull(ids)
            cluster.push(ids, delta)
            return RAW_BATCH

        return rate(pull_push, RAW_SECONDS)


def mf_per_key(data_dir: Path) -> float:
    """Ratings per second of the per-key MF job, 2 workers x 2 shards, start-up excluded."""
    from benchmarks.mf_common import INIT_SPEC, movielens_by_time, stream_mf
    from psclient.cluster import Cluster
    from psclient.either import Left
    from psclient.local import LocalCluster
    from psclient.plugins import ship

    data = movielens_by_time(data_dir).head(MF_RATINGS)
    records = data.records()
    with tempfile.TemporaryDirectory() as tmp:
        logic = ship(stream_mf(MF_PULL_LIMIT), Path(tmp), "logic")
        cluster = LocalCluster(logic, INIT_SPEC, "add", MF_WORKERS, MF_SHARDS)
        with cluster, Cluster(cluster.servers, cluster.workers) as client:
            outputs = 0
            start = time.perf_counter()
            finished = None
            for item in client.stream(records, partition_by=lambda record: record[0]):
                if isinstance(item, Left):
                    outputs += 1
                elif finished is None:
                    finished = time.perf_counter()
            elapsed = (finished or time.perf_counter()) - start
    if outputs != len(data):
        raise RuntimeError(f"{outputs} outputs for {len(data)} ratings")
    return len(data) / elapsed


def main() -> None:
    job, data_dir = sys.argv[1], Path(sys.argv[2])
    measured = raw_pull_push() if job == "raw" else mf_per_key(data_dir)
    print(json.dumps({"rate": measured}))


if __name__ == "__main__":
    main()
