"""ServerLogic classes the tests run, importable as `server_logics:Name` by psserver children."""

from __future__ import annotations

from typing import Any

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
