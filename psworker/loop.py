"""The logic loop of a worker: one step at a time, on the worker's event loop.

A step takes the answers that arrived (always first), else the next input
record, else calls `on_input_end` once the input ended; when there is
nothing to do it flushes by Nagle's rule (psworker/batching.py) and tells
the loop how long it may sleep. `_steps` lets the shard streams run between
steps, after each send and at least every `YIELD_S`. Every user callback goes
through `_call_user`, which turns an exception into the one-line error (or a
skipped record under `--on-error skip`).

`WorkerRuntime` (psworker/runtime.py) owns the state this reads and builds
on this class; it is apart only to keep the runtime's wiring and lifecycle
in a file of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from psclient.errors import JobFailed
from psclient.wire.codec import DecodedBatch
from psclient.wire.partition import Id
from psworker.batching import ShardBuffers
from psworker.checkpoints import Checkpointing
from psworker.checks import InvalidDelta, short_repr
from psworker.input_queue import InputQueue, Unreadable
from psworker.logic import ParameterServerClient, WorkerLogic
from psworker.origins import OriginTracker
from psworker.pulls import PullWindow

log = logging.getLogger("streamps.worker")

# The logic lets the loop run its streams at least this often while it is busy.
YIELD_S = 0.001
# How long an idle logic sleeps when nothing it waits for has a deadline.
IDLE_WAIT_S = 1.0

# (shard, ids, values) per answer, decoded on arrival: lists of ids and of
# user-facing values, or for a logic with on_pull_recv_many, ids None and the batches.
Answer = tuple[int, list[Id] | None, list[Any]]


def _by_kind(batch: DecodedBatch) -> list[tuple[np.ndarray | list[str], np.ndarray]]:
    """An answered batch as on_pull_recv_many takes it: (int ids, values), then (str ids,
    values), each present only when the batch holds that kind; arrays are the logic's own
    (writable, and no longer tied to the message)."""
    assert batch.values is not None
    values = np.array(batch.values)
    ints = len(batch.int_ids)
    kinds: list[tuple[np.ndarray | list[str], np.ndarray]] = []
    if ints:
        kinds.append((batch.int_ids.copy(), values[:ints]))
    if batch.str_ids:
        kinds.append((batch.str_ids, values[ints:]))
    return kinds


class LogicLoop(Checkpointing):
    # Set by WorkerRuntime.__init__.
    worker_index: int
    on_error: str
    position_name: str
    client: ParameterServerClient[Any, Any]
    inputs: InputQueue
    records: int
    records_failed: int
    _callbacks: WorkerLogic
    _receives_many: bool
    _answers: deque[Answer]
    _pulls: PullWindow
    _buffers: ShardBuffers
    _failure: str | None
    _input_end_called: bool
    _wakeup: asyncio.Event
    _sent: bool
    _reconnecting: dict[int, Any]
    _origins: OriginTracker | None
    stopped: bool

    def _call_user(
        self, name: str, fn: Callable[..., None], *args: Any, position: int | None = None, record: Any = None
    ) -> None:
        try:
            fn(*args)
        except Exception as exc:
            where = "" if position is None else f" ({self.position_name} {position}: {short_repr(record)})"
            what = str(exc) if isinstance(exc, InvalidDelta) else f"{type(exc).__name__}: {exc}"
            message = f"worker {self.worker_index} failed in {name}: {what}{where}"
            if self.on_error == "skip" and name in ("on_recv", "on_pull_recv", "on_pull_recv_many"):
                self.records_failed += 1
                log.warning("%s; skipped", message, exc_info=True)
                return
            log.error("%s", message, exc_info=True)
            raise JobFailed(message) from exc

    def _unreadable(self, message: str) -> None:
        if self.on_error != "skip":
            raise JobFailed(f"worker {self.worker_index}: {message}")
        self.records_failed += 1
        log.warning("%s; skipped", message)

    def _deliver(self, answers: deque[Answer]) -> None:
        if self._origins is not None:
            self._deliver_tracked(answers, self._origins)
            return
        if self._receives_many:
            self._deliver_many(answers)
            return
        on_pull_recv, client = self._callbacks.on_pull_recv, self.client
        for shard, ids, values in answers:
            self._buffers.answered(shard)
            assert ids is not None
            for param_id, value in zip(ids, values, strict=True):
                self._pulls.answered(1)
                self._call_user("on_pull_recv", on_pull_recv, param_id, value, client)
            self._buffers.flush_if_lingering()

    def _deliver_many(self, answers: deque[Answer]) -> None:
        """One on_pull_recv_many call per answered batch (two when it holds ints and strs)."""
        on_pull_recv_many, client = self._callbacks.on_pull_recv_many, self.client
        for shard, _, batches in answers:
            self._buffers.answered(shard)
            for batch in batches:
                self._pulls.answered(len(batch))
                for ids, values in _by_kind(batch):
                    self._call_user("on_pull_recv_many", on_pull_recv_many, ids, values, client)
            self._buffers.flush_if_lingering()

    def _deliver_tracked(self, answers: deque[Answer], origins: OriginTracker) -> None:
        """`_deliver` of a restartable worker: each answer's callback runs as a callback of
        the record that pulled it, so that the pushes it makes carry that record's origin.
        `on_pull_recv_many` gets one call per answered batch and record."""
        client = self.client
        for shard, ids, values in answers:
            self._buffers.answered(shard)
            if ids is not None:
                on_pull_recv = self._callbacks.on_pull_recv
                for param_id, value, origin in zip(ids, values, origins.origins_of(shard, ids).tolist(), strict=True):
                    self._pulls.answered(1)
                    origins.enter(origin)
                    self._call_user("on_pull_recv", on_pull_recv, param_id, value, client)
                    origins.leave(origin, 1)
                self._buffers.flush_if_lingering()
                continue
            batches: list[DecodedBatch] = values
            every_id: list[Id] = [param_id for batch in batches for param_id in batch.ids()]
            by_key = origins.origins_of(shard, every_id)
            start = 0
            for batch in batches:
                self._pulls.answered(len(batch))
                for kind_ids, kind_values in _by_kind(batch):
                    kind_origins = by_key[start : start + len(kind_ids)]
                    start += len(kind_ids)
                    self._deliver_runs(origins, kind_ids, kind_values, kind_origins)
            self._buffers.flush_if_lingering()

    def _deliver_runs(self, origins: OriginTracker, ids: Any, values: np.ndarray, by_key: np.ndarray) -> None:
        """One on_pull_recv_many call per run of answers of one record."""
        on_pull_recv_many = self._callbacks.on_pull_recv_many
        bounds = [0, *(np.flatnonzero(np.diff(by_key)) + 1).tolist(), len(by_key)]
        for first, end in itertools.pairwise(bounds):
            origin = int(by_key[first])
            origins.enter(origin)
            self._call_user("on_pull_recv_many", on_pull_recv_many, ids[first:end], values[first:end], self.client)
            origins.leave(origin, end - first)

    def _call_tracked(self, name: str, fn: Callable[..., None], *args: Any) -> None:
        """A callback of no record (open, on_input_end): a restartable worker gives it an
        origin of its own, 0 for open, one past the last record for on_input_end."""
        origins = self._origins
        if origins is None:
            self._call_user(name, fn, *args)
            return
        origin = 0 if name == "open" else origins.frontier
        origins.enter(origin, first=True)
        self._call_user(name, fn, *args)
        origins.leave(origin)

    def _input_may_flow(self) -> bool:
        # Not while a shard is away: what the logic would push to it could only pile up.
        # Nor while a checkpoint is due: it waits for everything in flight to be answered.
        return (
            self._pulls.input_may_flow and not self._reconnecting and not self._checkpoint_due() and not self._ack_due()
        )

    def _quiescent(self) -> bool:
        """Nothing in flight: every pull answered and taken, every push acknowledged."""
        return (
            not self._answers
            and self._pulls.settled
            and self._buffers.buffered_since is None
            and self._buffers.unacked == 0
            and (self._origins is None or self._origins.idle)
        )

    def _finished(self) -> bool:
        return self._input_end_called and self._quiescent()

    def _step(self) -> bool | float:
        """Do one unit of work. Return True when the worker is finished, False after
        some work, or how long to wait for news (an answer, input, a failure) when
        there is nothing to do."""
        if self._failure:
            raise JobFailed(self._failure)
        if self._answers:
            answers, self._answers = self._answers, deque()
            self._deliver(answers)
            return False
        if self._input_may_flow():
            item = self.inputs.take()
            if item is not None:
                position, record = item
                if isinstance(record, Unreadable):
                    self._unreadable(record.message)
                    return False
                self.records += 1
                on_recv, origins = self._callbacks.on_recv, self._origins
                if origins is None:
                    self._call_user("on_recv", on_recv, record, self.client, position=position, record=record)
                else:
                    origins.enter(position, first=True)
                    self._call_user("on_recv", on_recv, record, self.client, position=position, record=record)
                    origins.leave(position)
                self._buffers.flush_if_lingering()
                return False
            if not self._input_end_called and self.inputs.closed and not self.inputs.waiting():
                self._input_end_called = True
                if not (self.stopped and self.checkpoint_dir is not None):  # else it resumes later
                    self._call_tracked("on_input_end", self._callbacks.on_input_end, self.client)
                return False
        elif self._checkpoint_due() or self._ack_due():
            if self._quiescent():
                self._settle()
                return False
            self._buffers.flush_all()  # what lingers would only hold the checkpoint back
        if self._acks_owed() and not self.inputs.waiting() and self._quiescent():
            self._settle()  # a stream that went quiet: its entries taken are acknowledged now
            return False
        linger_left = self._buffers.flush_idle()
        inputs = self.inputs
        with inputs.cond:
            if self._finished():
                return True
            if not (
                self._answers
                or self._failure
                or (self._input_may_flow() and (inputs.waiting() or (inputs.closed and not self._input_end_called)))
            ):
                return IDLE_WAIT_S if linger_left is None else linger_left
        return False

    async def _steps(self) -> None:
        """Step the logic until it is finished, letting the streams move in between."""
        wakeup = self._wakeup
        last_yield = time.monotonic()
        while True:
            wakeup.clear()  # set again by any news that arrives from here on
            result = self._step()
            if result is True:
                return
            if result is False:
                # Requests leave, and answers come in, only while the loop runs
                # the streams: let it after a send, and at least every YIELD_S.
                now = time.monotonic()
                if self._sent or now - last_yield >= YIELD_S:
                    self._sent = False
                    last_yield = now
                    await asyncio.sleep(0)
                continue
            self._sent = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(result):
                    await wakeup.wait()
            last_yield = time.monotonic()
