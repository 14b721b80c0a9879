"""A lock server: a pull of a parameter waits until the previous puller pushed it back.

The server logic (psserver.ServerLogic) of the original's LockPSLogic. A pull
takes the parameter's lock and is answered with its value; every other pull
of it waits, in arrival order, until the holder pushes the parameter's new
value back (the push replaces the value and frees the lock for the next
waiting puller). So a read-modify-write through pull-then-push never loses an
update, whatever the number of workers.

Each worker must hold one lock at a time: a pull's answer waits until every id
in it is answered, so two locks asked for in one batch could each wait for the
other's holder. `with_pull_limit(logic, 1)` makes every pull ask for one id.

As a script, several workers count records into a few counters, each
increment a pull of the counter then a push of its value + 1:

    python examples/lock_server.py [--records N] [--workers W] [--shards S]

As plugins: `psserver --logic examples.lock_server:LockServer ...` and
`psworker --logic examples.lock_server:locked_counter ...`.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from psclient import Left, Right, transform
from psserver import ServerHandle, ServerLogic
from psworker import ParameterServerClient, WorkerLogic, with_pull_limit

Handle = ServerHandle[Any, Any]


class LockServer(ServerLogic[Any, Any]):
    """Values with one lock each; its outputs are the final (id, value) pairs."""

    def __init__(self) -> None:
        self.values: dict[Any, Any] = {}
        self.holder: dict[Any, int] = {}  # id -> the worker holding its lock
        self.waiting: dict[Any, deque[int]] = {}  # id -> workers waiting for it, oldest first

    def _value(self, param_id: Any, ps: Handle) -> Any:
        if param_id not in self.values:
            self.values[param_id] = ps.init(param_id)
        return self.values[param_id]

    def _grant(self, param_id: Any, worker_index: int, ps: Handle) -> None:
        self.holder[param_id] = worker_index
        ps.answer_pull(param_id, self._value(param_id, ps), worker_index)

    def on_pull_recv(self, param_id: Any, worker_index: int, ps: Handle) -> None:
        if param_id in self.holder:
            self.waiting.setdefault(param_id, deque()).append(worker_index)
        else:
            self._grant(param_id, worker_index, ps)

    def on_push_recv(self, param_id: Any, delta: Any, ps: Handle) -> None:
        # The holder pushes the new value back: it replaces the old one, and the lock passes on.
        self.values[param_id] = delta
        self.holder.pop(param_id, None)
        queue = self.waiting.get(param_id)
        if queue:
            self._grant(param_id, queue.popleft(), ps)
            if not queue:
                del self.waiting[param_id]

    def close(self, ps: Handle) -> None:
        for param_id, value in self.values.items():
            ps.output((param_id, value))


class LockedCounter(WorkerLogic[Any, Any, Any]):
    """Each record names a counter: pull it, push it back plus one, output the value seen."""

    def on_recv(self, data: Any, ps: ParameterServerClient[Any, Any]) -> None:
        ps.pull(data)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: ParameterServerClient[Any, Any]) -> None:
        ps.output((param_id, param_value))
        ps.push(param_id, param_value + 1)


def locked_counter() -> WorkerLogic[Any, Any, Any]:
    """The counter with one pull (so one lock) out at a time."""
    return with_pull_limit(LockedCounter(), 1)


def count(records: list[Any], workers: int, shards: int) -> tuple[list[Any], dict[Any, Any]]:
    """Run the counters: (every value a worker saw, the final counts)."""
    seen: list[Any] = []
    counts: dict[Any, Any] = {}
    for item in transform(records, locked_counter, "const:0", "replace", workers, shards, ps_logic=LockServer):
        match item:
            case Left(value):
                seen.append(tuple(value))
            case Right((param_id, value)):
                counts[param_id] = value
    return seen, counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args(argv)
    records = [i % 3 for i in range(args.records)]
    _, counts = count(records, args.workers, args.shards)
    for param_id in sorted(counts):
        print(f"counter {param_id}: {counts[param_id]} (records naming it: {records.count(param_id)})")


if __name__ == "__main__":
    main()
