"""ServerLogic classes the tests run, importable as `server_logics:Name` by psserver children."""

from __future__ import annotations

import contextlib
from typing import Any

from examples.lock_server import LockServer
from psserver import ServerHandle, ServerLogic

Handle = ServerHandle[Any, Any]


class Counting(ServerLogic[Any, Any]):
    """Sums the deltas per id, answers pulls at once; outputs how often each callback ran."""

    def __init__(self) -> None:
        self.values: dict[Any, Any] = {}
        self.calls = {"open": 0, "on_pull_recv": 0, "on_push_recv": 0}

    def open(self, ps: Handle) -> None:
        self.calls["open"] += 1

    def on_pull_recv(self, param_id: Any, worker_index: int, ps: Handle) -> None:
        self.calls["on_pull_recv"] += 1
        ps.answer_pull(param_id, self.values.get(param_id, ps.init(param_id)), worker_index)

    def on_push_recv(self, param_id: Any, delta: Any, ps: Handle) -> None:
        self.calls["on_push_recv"] += 1
        self.values[param_id] = self.values.get(param_id, ps.init(param_id)) + delta

    def close(self, ps: Handle) -> None:
        ps.output(("calls", self.calls))
        for param_id, value in self.values.items():
            ps.output((param_id, value))


class FailingPush(Counting):
    def on_push_recv(self, param_id: Any, delta: Any, ps: Handle) -> None:
        if delta < 0:
            raise ValueError(f"negative delta {delta}")
        super().on_push_recv(param_id, delta, ps)


class FailingClose(Counting):
    def close(self, ps: Handle) -> None:
        raise RuntimeError("cannot close")


class FailingOpen(Counting):
    def open(self, ps: Handle) -> None:
        raise OSError("no such table")


class AnswersOnPush(ServerLogic[Any, Any]):
    """A pull of an id below 100 waits for a push of that id, whose delta picks the answer:
    0 a string, 1 a ragged list, any other the delta itself. An id of 100 or more is
    answered at once with a string."""

    def __init__(self) -> None:
        self.bad: dict[Any, Any] = {0: "text", 1: [[1, 2], [3]]}
        self.pending: dict[Any, list[int]] = {}

    def on_pull_recv(self, param_id: Any, worker_index: int, ps: Handle) -> None:
        if param_id >= 100:
            self.answer(param_id, "now", worker_index, ps)
        else:
            self.pending.setdefault(param_id, []).append(worker_index)

    def on_push_recv(self, param_id: Any, delta: Any, ps: Handle) -> None:
        for worker_index in self.pending.pop(param_id, []):
            self.answer(param_id, self.bad.get(delta, delta), worker_index, ps)

    def answer(self, param_id: Any, value: Any, worker_index: int, ps: Handle) -> None:
        ps.answer_pull(param_id, value, worker_index)


class CatchesBadAnswers(AnswersOnPush):
    """Goes on when answer_pull refuses a value."""

    def answer(self, param_id: Any, value: Any, worker_index: int, ps: Handle) -> None:
        with contextlib.suppress(TypeError):
            ps.answer_pull(param_id, value, worker_index)


class FailingLock(LockServer):
    """The lock server, failing on a negative value pushed back."""

    def on_push_recv(self, param_id: Any, delta: Any, ps: Handle) -> None:
        if delta < 0:
            raise ValueError(f"negative value {delta}")
        super().on_push_recv(param_id, delta, ps)
