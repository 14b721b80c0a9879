"""Batching knobs: the per-key MF job at several --batch-max-keys and --batch-linger-ms.

Online matrix factorization written per key (StreamMF under a pull limit of
256, as in section c) over the first 30,000 ratings of MovieLens 100K in
timestamp order (at a linger of 0 the whole set would take minutes), 2 workers
x 2 shards, ratings routed by user, through `LocalCluster(batch_max_keys=...,
batch_linger_ms=...)`, which passes each worker `--batch-max-keys` and
`--batch-linger-ms`. A worker sends a shard its buffered pulls and pushes as
one message once they hold max keys, once the oldest has waited the linger, or
when the logic has nothing to do and the shard nothing outstanding (Nagle's
rule); a linger of 0 sends what each callback buffered as soon as it returns.
"keys/request" is every key the shards got over the pull and push requests
that carried them (a message carries at most one of each), from the shards'
Info at the end. The default row is 4,096 keys and 2 ms. Settings run
interleaved, 3 rounds; figures are medians. Start-up is excluded, as in
section c.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.mf_common import INIT_SPEC, Ratings, movielens_by_time, rmse, stream_mf
from psclient.cluster import Cluster
from psclient.either import Left
from psclient.local import LocalCluster
from psclient.plugins import ship
from psclient.wire.proto import shard_pb2

WORKERS = 2
SHARDS = 2
PULL_LIMIT = 256
RATINGS = 30_000
ROUNDS = 3
DEFAULT = (4_096, 2.0)
# (max keys, linger ms): the default first, then one knob changed at a time.
SETTINGS = [DEFAULT, (64, 2.0), (4_096, 0.0), (4_096, 10.0)]
_ratios: dict[tuple[int, float], float] = {}


def _job(data: Ratings, max_keys: int, linger_ms: float) -> tuple[float, float, float]:
    """(ratings per second, prequential RMSE, keys per request) of one job on a fresh cluster."""
    records = data.records()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(
            ship(stream_mf(PULL_LIMIT), Path(tmp), "logic"), INIT_SPEC, "add", WORKERS, SHARDS,
            batch_max_keys=max_keys, batch_linger_ms=linger_ms,
        )  # fmt: skip
        with cluster, Cluster(cluster.servers, cluster.workers) as client:
            errors: list[float] = []
            start = time.perf_counter()
            finished = None
            for item in client.stream(records, partition_by=lambda record: record[0]):
                if isinstance(item, Left):
                    errors.append(item.value)
                elif finished is None:
                    finished = time.perf_counter()
            elapsed = (finished or time.perf_counter()) - start
            infos = [info for info in client.info() if isinstance(info, shard_pb2.InfoResponse)]
    if len(errors) != len(data) or len(infos) != SHARDS:
        raise RuntimeError(f"{len(errors)} errors for {len(data)} ratings, {len(infos)} shards answered Info")
    keys = sum(info.pulled_keys + info.pushed_keys for info in infos)
    requests = sum(info.pull_requests + info.push_requests for info in infos)
    return len(data) / elapsed, rmse(errors), keys / requests


def run() -> list[list[str]]:
    data = movielens_by_time().head(RATINGS)
    measured: dict[tuple[int, float], list[tuple[float, float, float]]] = {setting: [] for setting in SETTINGS}
    for _ in range(ROUNDS):
        for setting in SETTINGS:  # interleaved: the machine's noise hits every setting alike
            measured[setting].append(_job(data, *setting))
    rate = {setting: statistics.median(r for r, _, _ in runs) for setting, runs in measured.items()}
    rows = []
    for setting, runs in measured.items():
        max_keys, linger_ms = setting
        _ratios[setting] = rate[setting] / rate[DEFAULT]
        rows.append([
            f"{max_keys:,}", f"{linger_ms:g}", f"{rate[setting]:,.0f}",
            f"{statistics.median(e for _, e, _ in runs):.4f}", f"{statistics.median(k for _, _, k in runs):.1f}",
            f"{_ratios[setting]:.2f}x",
        ])  # fmt: skip
    return rows


def targets() -> list[tuple[str, str, str, bool | None]]:
    rows: list[tuple[str, str, str, bool | None]] = []
    for setting in SETTINGS[1:]:
        what = f"MF per key 2x2: --batch-max-keys {setting[0]} --batch-linger-ms {setting[1]:g} / default (ratings/s)"
        ratio = _ratios.get(setting)
        rows.append((what, "not measured" if ratio is None else f"{ratio:.2f}x", "reported", None))
    return rows


HEADERS = ["max keys", "linger ms", "ratings/s", "RMSE", "keys/request", "vs default"]

if __name__ == "__main__":
    from benchmarks.common import format_table

    started = time.time()
    print(format_table(HEADERS, run()))
    print(f"\n{time.time() - started:.0f} s")
