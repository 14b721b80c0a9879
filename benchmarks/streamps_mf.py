"""The streamps side of bench_mf: StreamMF on a local cluster, start-up excluded."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.mf_common import INIT_SPEC, Ratings, rmse, stream_mf
from psclient.cluster import Cluster
from psclient.either import Left
from psclient.local import LocalCluster
from psclient.plugins import ship


def run(data: Ratings, workers: int, shards: int, pull_limit: int) -> tuple[float, float]:
    """(ratings per second, prequential RMSE) of one job on a fresh cluster.

    The clock starts once every shard and worker serves, and stops when the
    workers have finished (every pull answered, every push acknowledged): when
    the first final parameter arrives. Reading the final model is not timed.
    """
    records = data.records()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(ship(stream_mf(pull_limit), Path(tmp), "logic"), INIT_SPEC, "add", workers, shards)
        with cluster, Cluster(cluster.servers, cluster.workers) as client:
            errors: list[float] = []
            start = time.perf_counter()
            finished = None
            for item in client.stream(records, partition_by=_user):
                if isinstance(item, Left):
                    errors.append(item.value)
                elif finished is None:
                    finished = time.perf_counter()
            elapsed = (finished or time.perf_counter()) - start
    if len(errors) != len(data):
        raise RuntimeError(f"streamps output {len(errors)} errors for {len(data)} ratings")
    return len(data) / elapsed, rmse(errors)


def _user(record: tuple[int, int, float]) -> int:
    return record[0]
