"""Durable shards: push throughput without --data-dir, with --no-durable and with --durable.

Push throughput: one shard, 1,024-key batches of 16 float32 deltas (random ids
of 100,000), keys acknowledged per second. "pipelined" keeps 8 pushes in flight
on one Exchange stream, as a worker does; "blocking" is the SDK's push_array,
one push at a time. Without --data-dir a push is acknowledged once applied;
--no-durable adds the log write; --durable adds an fsync before the ack,
shared by every push that arrived while the previous fsync ran (group commit).
The data dir is on the benchmark machine's disk (a temp dir). The three shards
run side by side; each figure is the median of 3 alternating 1-second runs.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np

from benchmarks.common import addresses, shard_processes, si
from psclient import connect
from psclient.wire.codec import encode_id_array
from psclient.wire.proto import shard_pb2, shard_pb2_grpc

KEYSPACE = 100_000
BATCH = 1024
DIM = 16
WINDOW = 8
SECONDS = 1.0
ROUNDS = 3
TARGET_RATIO = 2.0
_ratio: dict[str, float] = {}


def _requests(count: int, worker_id: str) -> Iterator[shard_pb2.ExchangeRequest]:
    """`count` pushes, seq 1 on, over 64 distinct batches of keys (built as they are sent)."""
    rng = np.random.default_rng(3)
    deltas = np.full((BATCH, DIM), 0.5, dtype=np.float32)
    batches = [encode_id_array(rng.integers(0, KEYSPACE, BATCH, dtype=np.int64), deltas) for _ in range(64)]
    for seq in range(1, count + 1):
        push = shard_pb2.PushRequest(worker_id=worker_id, seq=seq, batches=[batches[seq % len(batches)]])
        yield shard_pb2.ExchangeRequest(push=push)


def _pipelined(address: str, worker_id: str) -> float:
    """Keys acknowledged per second with WINDOW pushes in flight, for SECONDS."""
    slots = threading.Semaphore(WINDOW)
    stop = threading.Event()

    def feed() -> Iterator[shard_pb2.ExchangeRequest]:
        for request in _requests(1_000_000, worker_id):
            slots.acquire()
            if stop.is_set():
                return
            yield request

    with grpc.insecure_channel(address) as channel:
        answers = shard_pb2_grpc.ParameterShardStub(channel).Exchange(feed())
        acked = 0
        started = time.perf_counter()
        for _ in answers:
            acked += 1
            slots.release()
            if time.perf_counter() - started >= SECONDS:
                break
        elapsed = time.perf_counter() - started
        stop.set()
        slots.release()
        answers.cancel()
    return acked * BATCH / elapsed


def _blocking(address: str) -> float:
    rng = np.random.default_rng(4)
    keys = [rng.integers(0, KEYSPACE, BATCH, dtype=np.int64) for _ in range(64)]
    deltas = np.full((BATCH, DIM), 0.5, dtype=np.float32)
    with connect([address]) as cluster:
        pushes = 0
        started = time.perf_counter()
        while time.perf_counter() - started < SECONDS:
            cluster.push(keys[pushes % len(keys)], deltas)
            pushes += 1
        return pushes * BATCH / (time.perf_counter() - started)


def _throughput(modes: dict[str, list[str]]) -> list[list[str]]:
    measured: dict[tuple[str, str], list[float]] = {}
    with contextlib.ExitStack() as stack:
        servers = {}
        for name, flags in modes.items():
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-wal-"))
            extra = [arg.replace("DIR", tmp) for arg in flags]
            (servers[name],) = addresses(stack.enter_context(shard_processes(1, f"zeros:{DIM}", "add", *extra)))
        # Alternating rounds: the machine's noise hits every mode alike.
        for round_number in range(ROUNDS):
            for name, address in servers.items():
                measured.setdefault((name, "pipelined"), []).append(_pipelined(address, f"bench-{round_number}"))
                measured.setdefault((name, "blocking"), []).append(_blocking(address))
    median = {key: statistics.median(values) for key, values in measured.items()}
    base = "no --data-dir"
    rows = []
    for name in modes:
        for client in ("pipelined", "blocking"):
            keys = median[name, client]
            ratio = median[base, client] / keys
            rows.append([name, client, f"{BATCH:,}", str(DIM), si(keys), f"{ratio:.2f}x"])
    _ratio["pipelined"] = median[base, "pipelined"] / median["--durable", "pipelined"]
    _ratio["blocking"] = median[base, "blocking"] / median["--durable", "blocking"]
    return rows


def run() -> list[list[str]]:
    modes = {
        "no --data-dir": [],
        "--no-durable": ["--data-dir", "DIR", "--no-durable"],
        "--durable": ["--data-dir", "DIR", "--durable"],
    }
    return _throughput(modes)


def targets() -> list[tuple[str, str, str, bool | None]]:
    rows: list[tuple[str, str, str, bool | None]] = []
    for client in ("pipelined", "blocking"):
        what = f"push, 1,024 keys x 16 float32, {client}: no --data-dir / --durable"
        ratio = _ratio.get(client)
        if ratio is None:
            rows.append((what, "not measured", f"<= {TARGET_RATIO}x", None))
        else:
            rows.append((what, f"{ratio:.2f}x", f"<= {TARGET_RATIO}x", ratio <= TARGET_RATIO))
    return rows


HEADERS = ["shard", "client", "batch", "dim", "keys/s acked", "slowdown vs no --data-dir"]

if __name__ == "__main__":
    from benchmarks.common import format_table

    print(format_table(HEADERS, run()))
