"""Recovery of a durable shard holding 1,000,000 parameters of 16 float32.

The shard (--data-dir, --durable) is filled by 16,384-key pushes, killed with
SIGKILL and restarted on its data dir: once with everything still in the log
(no snapshot yet: 62 pushes to replay), once from a snapshot (--snapshot-interval
1, the log truncated after it). "recover" is the shard's own measure of loading
and replaying (its log line); "restart to serving" is from the new process's
start to its `listening on` line, interpreter and imports included.
"""

from __future__ import annotations

import signal
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import addresses
from psclient import connect
from psclient.children import START_TIMEOUT_S, ChildProcess, child_env, shard_argv

PARAMS = 1_000_000
DIM = 16
FILL_BATCH = 16_384


def _start(data_dir: str, *extra: str) -> tuple[ChildProcess, float]:
    argv = shard_argv(0, 1, f"zeros:{DIM}", "add", "INFO", "--data-dir", data_dir, *extra)
    started = time.perf_counter()
    child = ChildProcess("shard 0", argv, child_env())
    child.bound_address = child.address(START_TIMEOUT_S)  # type: ignore[attr-defined]
    return child, time.perf_counter() - started


def _recovered_seconds(child: ChildProcess) -> str:
    for line in child.stderr_tail:
        if " recovered " in line:
            return line.rsplit(" in ", 1)[1]
    return "?"


def _recovery(from_snapshot: bool) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="bench-wal-") as tmp:
        interval = ["--snapshot-interval", "1"] if from_snapshot else []
        child, _ = _start(tmp, *interval)
        try:
            with connect(addresses([child])) as cluster:
                deltas = np.full((FILL_BATCH, DIM), 0.5, dtype=np.float32)
                for start in range(0, PARAMS, FILL_BATCH):
                    ids = np.arange(start, min(start + FILL_BATCH, PARAMS), dtype=np.int64)
                    cluster.push(ids, deltas[: len(ids)])
            log_bytes = lambda: sum(p.stat().st_size for p in Path(tmp).glob("wal-*.log"))  # noqa: E731
            deadline = time.monotonic() + 60
            while from_snapshot and log_bytes() > 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            snapshot = Path(tmp, "snapshot.bin")
            size = log_bytes() + (snapshot.stat().st_size if snapshot.exists() else 0)
        finally:
            child.process.send_signal(signal.SIGKILL)
            child.process.wait()
        restarted, seconds = _start(tmp)
        try:
            time.sleep(0.2)  # let the log line arrive
            recovered = _recovered_seconds(restarted)
        finally:
            restarted.stop()
    source = "snapshot" if from_snapshot else "log only (no snapshot)"
    return [f"{PARAMS:,}", source, f"{size / 1e6:.0f}", recovered, f"{seconds:.2f} s"]


def run() -> list[list[str]]:
    return [_recovery(from_snapshot=False), _recovery(from_snapshot=True)]


HEADERS = ["parameters", "recovered from", "data dir MB", "recover", "restart to serving"]

if __name__ == "__main__":
    from benchmarks.common import format_table

    print(format_table(HEADERS, run()))
