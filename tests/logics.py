"""WorkerLogic classes the tests run, importable as `logics:Name` by psworker children
(the fixtures start children with tests/ as cwd and on PYTHONPATH)."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from typing import Any

import numpy as np

from psworker import WorkerLogic


class Exactness(WorkerLogic):
    """Record r (an int) pushes r % 7 + 1 to int id r % 500 - 250 and 2 to str id f"s{r % 300}"."""

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.push(data % 500 - 250, data % 7 + 1)
        ps.push(f"s{data % 300}", 2)
        ps.output([ps.worker_index, data])

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("Exactness never pulls")


class ReadYourWrites(WorkerLogic):
    """Record k pushes 1 to this worker's own id k % 10, then pulls it.

    The answer to the n-th pull of an id must count at least the n pushes the
    worker made before it; outputs (id, value, pushes made before the pull).
    """

    def open(self) -> None:
        self.pushed: dict[str, int] = defaultdict(int)
        self.expected: dict[str, deque[int]] = defaultdict(deque)

    def on_recv(self, data: Any, ps: Any) -> None:
        param_id = f"w{ps.worker_index}-{data % 10}"
        ps.push(param_id, 1)
        self.pushed[param_id] += 1
        ps.pull(param_id)
        self.expected[param_id].append(self.pushed[param_id])

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        ps.output([param_id, param_value, self.expected[param_id].popleft()])


class PullChain(WorkerLogic):
    """Record r pulls int id r % 100; its answer pushes 1 to it and pulls str id f"s{id % 10}",
    whose answer pushes 1 to that str id and outputs the record chain's end."""

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.pull(data % 100)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        if isinstance(param_id, int):
            ps.push(param_id, 1)
            ps.pull(f"s{param_id % 10}")
        else:
            ps.push(param_id, 1)
            ps.output(param_id)


class InputEnd(WorkerLogic):
    """Sums records into "sum"; at input end pushes its record count and pulls "sum",
    whose answer pushes 1 to "after-end" and outputs ["final", worker, value]."""

    def open(self) -> None:
        self.count = 0

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.push("sum", data)
        self.count += 1

    def on_input_end(self, ps: Any) -> None:
        ps.push(f"count-{ps.worker_index}", self.count)
        ps.pull("sum")

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        ps.push("after-end", 1)
        ps.output(["final", ps.worker_index, param_value])


class WordCount(WorkerLogic):
    """One line per record: pushes 1 per word, outputs [line, number of words]."""

    def on_recv(self, data: Any, ps: Any) -> None:
        words = str(data).split()
        for word in words:
            ps.push(word, 1)
        ps.output([data, len(words)])

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("WordCount never pulls")


class JsonPush(WorkerLogic):
    """A jsonl record {"id": ..., "delta": ...} pushes delta to id and outputs the id."""

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.push(data["id"], data["delta"])
        ps.output(data["id"])

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("JsonPush never pulls")


class FailOnX(WorkerLogic):
    """Pushes 1 to "seen" per record and outputs it; raises ValueError on the record "x"
    (or a record whose "word" field is "x")."""

    def on_recv(self, data: Any, ps: Any) -> None:
        word = data["word"] if isinstance(data, dict) else data
        if word == "x":
            raise ValueError(f"bad record {word}")
        ps.push("seen", 1)
        ps.output(word)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("FailOnX never pulls")


class KeyedEcho(WorkerLogic):
    """Outputs [key, worker_index] for a (key, n) record."""

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.output([data[0], ps.worker_index])

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("KeyedEcho never pulls")


def bad_init(param_id: Any) -> Any:
    """An init that fails for id 7 (a user's bug, for error messages)."""
    return 1 / (param_id - 7)


def bad_update(old: Any, delta: Any) -> Any:
    """An update that fails for a negative delta (a user's bug, for error messages)."""
    if delta < 0:
        raise ValueError(f"negative delta {delta}")
    return old + delta


class BrokenInit(WorkerLogic):
    """A logic whose constructor raises, as one given a bad setting does."""

    def __init__(self) -> None:
        raise ValueError("rank must be positive")


def word_count() -> WordCount:
    """A factory of a logic, as `--logic logics:word_count` takes it."""
    return WordCount()


def not_a_logic() -> dict:
    """A factory of something else."""
    return {}


ANSWER = 42


class SlowExactness(Exactness):
    """Exactness at about 1 ms a record: a job that is still running when a test stops it."""

    def on_recv(self, data: Any, ps: Any) -> None:
        time.sleep(0.001)
        super().on_recv(data, ps)


class Windows(WorkerLogic):
    """Stateful, through the batch API: records gather in windows of 7. A full window
    pulls the int ids r % 100 of its records with pull_many and outputs the window; each
    answer batch pushes 1 to every id in it. So every record adds 1 to id r % 100, once
    its window is sent; on_input_end sends the last partial one. The window being gathered
    is the state a restarted worker must get back from its checkpoint."""

    pace_s = 0.0

    def open(self) -> None:
        self.window: list[int] = []

    def on_recv(self, data: Any, ps: Any) -> None:
        if self.pace_s:
            time.sleep(self.pace_s)
        self.window.append(data)
        if len(self.window) == 7:
            self._send(ps)

    def _send(self, ps: Any) -> None:
        ps.pull_many(np.array([r % 100 for r in self.window], dtype=np.int64))
        ps.output(self.window)
        self.window = []

    def on_pull_recv_many(self, ids: Any, values: Any, ps: Any) -> None:
        ps.push_many(ids, np.ones(len(ids), dtype=np.int64))

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("Windows takes its answers in on_pull_recv_many")

    def on_input_end(self, ps: Any) -> None:
        if self.window:
            self._send(ps)

    def state(self) -> Any:
        return {"window": self.window}

    def restore(self, state: Any) -> None:
        self.window = list(state["window"])


class PacedWindows(Windows):
    """Windows at about 0.5 ms a record: a job long enough to kill its processes in."""

    pace_s = 0.0005


class PacedPullChain(PullChain):
    """PullChain at about 0.5 ms a record."""

    def on_recv(self, data: Any, ps: Any) -> None:
        time.sleep(0.0005)
        super().on_recv(data, ps)


class UnplainState(Exactness):
    """A state() that is not plain data."""

    def state(self) -> Any:
        return {"lock": object()}


class PacedCountingInputEnd(InputEnd):
    """InputEnd at about 0.5 ms a record, its count kept across restarts: at input end it
    pushes the count of every record it took, in whichever run."""

    def on_recv(self, data: Any, ps: Any) -> None:
        time.sleep(0.0005)
        super().on_recv(data, ps)

    def state(self) -> Any:
        return self.count

    def restore(self, state: Any) -> None:
        self.count = state


class PushThenWait(WorkerLogic):
    """Record r pushes 1 to int id r % 10, then takes 5 ms: longer than the default 2 ms
    linger, so each record's push has waited out the linger when its callback returns."""

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.push(data % 10, 1)
        time.sleep(0.005)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("PushThenWait never pulls")
