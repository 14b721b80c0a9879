"""A parameter server on Redis, as a careful Redis user would write one.

Fairness: one redis-server (Debian's package) started on a free loopback port
with persistence off. Item vectors are float32 bytes under `item:<id>`, created
with the same init. Each of `num_workers` worker processes owns the users of
its partition and works in batches of PEER_BATCH ratings: one pipelined MGET of
the batch's items, the same per-rating SGD step on local copies, and one
EVALSHA of a Lua script that adds the float32 deltas server-side (atomic, so
two workers never lose each other's updates). Redis is single-threaded: there
is one "shard", the usual deployment for a model this size.
"""

from __future__ import annotations

import multiprocessing
import shutil
import socket
import subprocess
import tempfile
import time

import numpy as np

from benchmarks.mf_common import PEER_BATCH, RANK, Learner, Rating, item_init, partition_by_user, tail_rmse
from examples.synthetic_ratings import ITEMS

ADD_VECTORS = """
for i, key in ipairs(KEYS) do
  local cur = redis.call('GET', key)
  local delta = ARGV[i]
  local out = {}
  for j = 0, #delta / 4 - 1 do
    out[j + 1] = struct.pack('<f', struct.unpack('<f', cur, j * 4 + 1) + struct.unpack('<f', delta, j * 4 + 1))
  end
  redis.call('SET', key, table.concat(out))
end
return #KEYS
"""


def available() -> str | None:
    """None if a redis-server binary and the redis package are here, else why not."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis Python package is not installed"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(port: int, ratings: list[Rating], results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    add = client.register_script(ADD_VECTORS)
    learner = Learner()
    out: list[tuple[float, float]] = []
    for start in range(0, len(ratings), PEER_BATCH):
        batch = ratings[start : start + PEER_BATCH]
        items = list(dict.fromkeys(r[1] for r in batch))
        keys = [f"item:{i}" for i in items]
        raw = client.mget(keys)
        local = {i: np.frombuffer(b, dtype=np.float32).copy() for i, b in zip(items, raw, strict=True)}
        before = {i: v.copy() for i, v in local.items()}
        out.extend(learner.run_batch(batch, local))
        add(keys=keys, args=[(local[i] - before[i]).astype(np.float32).tobytes() for i in items])
    results.put(out)


def run(data: list[Rating], num_workers: int = 2) -> tuple[float, float]:
    import redis

    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(host="127.0.0.1", port=port)
            for _ in range(100):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            parts = partition_by_user(data, num_workers)
            start = time.perf_counter()
            values = np.asarray(item_init()(list(range(ITEMS))), dtype=np.float32).reshape(ITEMS, RANK)
            client.mset({f"item:{i}": values[i].tobytes() for i in range(ITEMS)})
            context = multiprocessing.get_context("fork")
            results: multiprocessing.Queue = context.Queue()  # type: ignore[type-arg]
            procs = [context.Process(target=_worker, args=(port, part, results)) for part in parts]
            for proc in procs:
                proc.start()
            predictions = [p for _ in procs for p in results.get()]
            for proc in procs:
                proc.join()
            elapsed = time.perf_counter() - start
            return len(data) / elapsed, tail_rmse(predictions)
        finally:
            server.terminate()
            server.wait()
