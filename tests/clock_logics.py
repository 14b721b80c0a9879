"""WorkerLogic classes of the consistency tests, importable as `clock_logics:Name` by psworker children."""

from __future__ import annotations

import time
from typing import Any

from psworker import WorkerLogic

# How long worker 0 takes per record: the slow worker the others run ahead of.
SLOW_RECORD_S = 0.01


class Epochs(WorkerLogic):
    """Records are {"w": partition, "e": epoch, "k": key}: push 1 to key, then pull it; one clock per epoch.

    The clock advances in on_recv when a record of a later epoch arrives: it
    never waits for an answer. Worker 0 is slow.
    """

    def open(self) -> None:
        self.epoch = 0

    def on_recv(self, data: Any, ps: Any) -> None:
        epoch, key = data["e"], data["k"]
        while self.epoch < epoch:
            ps.advance_clock()
            self.epoch += 1
        if ps.worker_index == 0:
            time.sleep(SLOW_RECORD_S)
        ps.push(key, 1.0)
        ps.pull(key)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        pass


class FailsInEpoch1(Epochs):
    """Epochs, but fails at its first record of epoch 1 (after advancing its clock, before pushing)."""

    def on_recv(self, data: Any, ps: Any) -> None:
        if data["e"] >= 1:
            while self.epoch < data["e"]:
                ps.advance_clock()
                self.epoch += 1
            raise ValueError("boom")
        super().on_recv(data, ps)


class Crawls(Epochs):
    """Epochs at CRAWL_RECORD_S per record, whatever the worker index."""

    def on_recv(self, data: Any, ps: Any) -> None:
        time.sleep(CRAWL_RECORD_S)
        super().on_recv(data, ps)


CRAWL_RECORD_S = 0.2


class PullsThenAdvances(WorkerLogic):
    """Worker 0 takes DOZE_S over its one record and pulls nothing. The others pull a key in
    each record, and advance their clock after the pull of the first, in the same callback."""

    def on_recv(self, data: Any, ps: Any) -> None:
        if ps.worker_index == 0:
            time.sleep(DOZE_S)
            return
        ps.pull(data["k"])
        if data["e"] == 0:
            ps.advance_clock()

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        pass


DOZE_S = 4.0
