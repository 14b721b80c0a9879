"""A parameter server on Redis, as a careful Redis user would write one.

One redis-server (Debian's package) on a free 127.0.0.1 port, persistence
off. Item parameters are packed float32 bytes under `i:<id>`, written with the
same init at the start of the job. Each worker process (redis-py with the
hiredis parser) owns the users of its partition and drives its ratings in
windows of W: one MGET of the window's items, the same per-rating SGD on local
copies, and one EVALSHA of a Lua script that adds the float32 deltas server
side (atomic, so two workers never lose each other's updates). The push is
not waited on: it goes out in the same pipeline as the next window's MGET,
ahead of it, so that pull sees it and at most one window's push is ever in
flight; the last push is waited for at the end. Redis runs commands on one
thread: one server is the usual deployment for a model this size, so "2
workers" has no shard count.

Start-up (the server and the worker processes) is excluded from the timing;
loading the initial parameters is timed, as creating them is for the others.
"""

from __future__ import annotations

import multiprocessing
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from benchmarks.mf_common import PARAM_DIM, Learner, Ratings, item_deltas, item_init, rmse
from examples.mf import item_rows

# KEYS: the items; ARGV[1]: floats per vector; ARGV[1 + i]: the delta of KEYS[i], packed.
ADD_VECTORS = """
local n = tonumber(ARGV[1])
local fmt = '<' .. string.rep('f', n)
for i, key in ipairs(KEYS) do
  local value = {struct.unpack(fmt, redis.call('GET', key))}
  local delta = {struct.unpack(fmt, ARGV[i + 1])}
  for j = 1, n do
    value[j] = value[j] + delta[j]
  end
  redis.call('SET', key, struct.pack(fmt, unpack(value, 1, n)))
end
return #KEYS
"""
START_TIMEOUT_S = 10.0


def available() -> str | None:
    """None if a redis-server binary and the redis package are here, else why not."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis Python package is not installed (pip install -e '.[bench]')"
    return None


def _keys(items: np.ndarray) -> list[bytes]:
    return [b"i:%d" % item for item in items.tolist()]


def _worker(port: int, part: Ratings, window: int, ready: Any, go: Any, results: Any) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    add = client.script_load(ADD_VECTORS)
    step = Learner().step
    users, items, stars = part.users.tolist(), part.items.tolist(), part.stars.tolist()
    errors = np.empty(len(users))
    ready.wait()
    go.wait()
    pending: list[Any] = []  # the previous window's push, sent with this window's pull
    for start in range(0, len(users), window):
        end = min(start + window, len(users))
        wanted = np.unique(part.items[start:end])
        keys = _keys(wanted)
        pipe = client.pipeline(transaction=False)
        if pending:
            pipe.evalsha(add, *pending)
        pipe.mget(keys)
        values = pipe.execute()[-1]
        rows = item_rows(np.frombuffer(b"".join(values), dtype=np.float32).reshape(len(keys), PARAM_DIM))
        before = rows.copy()
        position = dict(zip(wanted.tolist(), range(len(keys)), strict=True))
        for k in range(start, end):
            errors[k] = step(users[k], stars[k], rows[position[items[k]]])
        deltas = item_deltas(rows, before)
        pending = [len(keys), *keys, PARAM_DIM, *(delta.tobytes() for delta in deltas)]
    if pending:
        client.evalsha(add, *pending)
    results.put(errors)


class RedisServer:
    """A running redis-server; `run` times one job with fresh parameters."""

    def __init__(self, port: int):
        import redis

        self.port = port
        self.client = redis.Redis(host="127.0.0.1", port=port)

    def run(self, data: Ratings, window: int, num_workers: int = 2) -> tuple[float, float]:
        """(ratings per second, prequential RMSE); starting the worker processes is not timed."""
        self.client.flushall()
        context = multiprocessing.get_context("spawn")  # no fork of a process that may run Ray's threads
        ready, go, results = context.Barrier(num_workers + 1), context.Event(), context.Queue()
        workers = [
            context.Process(target=_worker, args=(self.port, part, window, ready, go, results))
            for part in data.partition(num_workers)
        ]
        for worker in workers:
            worker.start()
        try:
            ready.wait(timeout=START_TIMEOUT_S * 3)  # every worker connected, its script loaded
            start = time.perf_counter()
            catalog = np.unique(data.items)
            self.client.mset(dict(zip(_keys(catalog), (v.tobytes() for v in item_init(catalog)), strict=True)))
            go.set()
            errors = [results.get(timeout=600) for _ in workers]
            elapsed = time.perf_counter() - start
        finally:
            for worker in workers:
                worker.join(timeout=10)
                if worker.is_alive():
                    worker.kill()
        return len(data) / elapsed, rmse(np.concatenate(errors))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server() -> Iterator[RedisServer]:
    """redis-server on a free loopback port, persistence off; stopped on exit."""
    import redis

    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        process = subprocess.Popen([*argv, "--dir", tmp], stdout=subprocess.DEVNULL)
        try:
            client = redis.Redis(host="127.0.0.1", port=port)
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise RuntimeError(f"redis-server did not serve on 127.0.0.1:{port}") from None
                    time.sleep(0.05)
            yield RedisServer(port)
        finally:
            process.terminate()
            process.wait()
