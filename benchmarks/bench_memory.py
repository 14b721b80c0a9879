"""Shard memory holding 1,000,000 parameters of 16 float32.

The raw bytes are 64 MB of values plus 8 MB of int64 ids. The shard's resident
set is read (psutil) once it serves and again after the parameters exist; the
difference is what holding them costs. The interpreter, grpc and numpy take
the same baseline in any Python shard and are reported apart.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common import addresses, shard_processes
from psclient import connect

PARAMS = 1_000_000
DIM = 16
BATCH = 16_384


def run() -> list[list[str]]:
    import psutil

    raw = PARAMS * DIM * 4 + PARAMS * 8
    with shard_processes(1, f"zeros:{DIM}") as shards, connect(addresses(shards)) as cluster:
        process = psutil.Process(shards[0].process.pid)
        cluster.pull(np.arange(1, dtype=np.int64))
        before = process.memory_info().rss
        for start in range(0, PARAMS, BATCH):
            cluster.pull(np.arange(start, min(start + BATCH, PARAMS), dtype=np.int64))
        time.sleep(0.2)
        after = process.memory_info().rss
        held = sum(info.num_params for info in cluster.info() if not isinstance(info, Exception))
    delta = after - before
    return [
        [
            f"{held:,}",
            f"{raw / 1e6:.1f}",
            f"{before / 1e6:.1f}",
            f"{after / 1e6:.1f}",
            f"{delta / 1e6:.1f}",
            f"{delta / raw:.2f}x",
        ]
    ]


HEADERS = ["parameters", "raw MB", "shard RSS idle MB", "shard RSS holding MB", "RSS growth MB", "growth / raw"]

if __name__ == "__main__":
    from benchmarks.common import format_table

    print(format_table(HEADERS, run()))
