"""Bounded staleness on a shard: pulls of workers too far ahead wait (--consistency bsp|ssp:S).

Every worker tells every shard its logical clock: on each pull, and in a
clock message when it advances or finishes (psworker/batching.py). The
message travels on the worker's Exchange stream behind the pushes made before
the advance, so a shard that knows a worker reached clock c holds every push
that worker made before it.

A pull of a worker at clock c is answered once c - S <= the lowest clock of
the unfinished workers (a worker not heard from yet is at 0; a finished one
no longer counts). The answer is read from the store when it is released, not
when the pull arrived, so it holds every push the slow workers made before
their clock reached c - S. Its stream keeps being read meanwhile (the
pipelining of psserver.durable_service): pushes are applied and acked in
order, and only the answers behind the held one wait, to keep stream order.

The slowest worker is never held, so as long as a worker's logic advances its
clock without waiting for an answer that may be held (e.g. in on_recv at an
epoch boundary, or in on_input_end), every held pull is released in the end.

A worker that fails tells the shards it finished too: it no longer takes
part. One that dies without a word (killed) cannot: a stream speaks for a
worker once it carried that worker's clock (workers send it first on every
stream), and when the slowest worker has had no stream to this shard for
--hold-timeout seconds, the pulls it holds back fail their streams with one
line naming it. A shard with a data dir logs every clock a worker tells
(psserver.durability), and answers that message only once it is logged, so a
restarted shard knows who finished.

On stop, pulls still held after the drain (STOP_DRAIN_S) are given up: their
streams end with "shutting down", and the workers send them again elsewhere.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import math
import time
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import grpc

from psclient.rpc.errors import shutting_down_details
from psclient.wire.proto import shard_pb2
from psserver.durability import Durability
from psserver.durable_service import DurableShardServicer, EndStream
from psserver.service import STOP_DRAIN_S
from psserver.store import ParameterStore

# How long a held pull waits for a worker that holds it back and has no stream to the shard.
DEFAULT_HOLD_TIMEOUT_S = 60.0


class ClockGate:
    """The workers' clocks as this shard knows them, and the pulls waiting for them."""

    def __init__(self, staleness: int, num_workers: int, known: dict[int, float] | None = None):
        self.staleness = staleness
        self.num_workers = num_workers
        self.clocks: list[float] = [0.0] * num_workers
        # Kept up to date for a data dir (Durability.clocks), which it also starts from.
        self.known = known if known is not None else {}
        for index, clock in self.known.items():
            if index < num_workers:
                self.clocks[index] = clock
        self.slowest = min(self.clocks)
        self.gaps: Counter[int] = Counter()
        self.held = 0
        # (release clock, arrival order, future): released once slowest >= release clock.
        self._waiting: list[tuple[float, int, asyncio.Future[None]]] = []
        self._arrivals = 0
        # Per worker: its open streams to this shard, and since when it has had none.
        self.streams = [0] * num_workers
        self.absent_since = [time.monotonic()] * num_workers
        self.ended: EndStream | None = None  # set on stop: every hold fails so

    def check(self, worker_index: int) -> str | None:
        """Why a worker index cannot take part, or None."""
        if worker_index >= self.num_workers:
            return f"worker index {worker_index} is not below the shard's --num-workers {self.num_workers}"
        return None

    def advance(self, worker_index: int, clock: float) -> bool:
        """The worker reached `clock` (math.inf: it finished); release the pulls this frees.
        Whether it moved the worker's clock."""
        if clock <= self.clocks[worker_index]:
            return False
        was_slowest = self.clocks[worker_index] == self.slowest
        self.clocks[worker_index] = self.known[worker_index] = clock
        if not was_slowest:
            return True
        self.slowest = min(self.clocks)
        while self._waiting and self._waiting[0][0] <= self.slowest:
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():
                future.set_result(None)
        return True

    def restart(self, worker_index: int, clock: float) -> bool:
        """A new run of the worker starts at `clock`: what was known of its index goes.
        Whether it changed the worker's clock."""
        if clock >= self.clocks[worker_index]:
            return self.advance(worker_index, clock)
        self.clocks[worker_index] = self.known[worker_index] = clock
        self.slowest = min(self.clocks)
        return True

    def hold(self, worker_index: int, clock: int) -> asyncio.Future[None] | None:
        """None if a pull at `clock` may be answered now, else the future that says when."""
        self.advance(worker_index, clock)
        release = clock - self.staleness
        if release <= self.slowest:
            return None
        self.held += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.ended is not None:
            future.set_exception(self.ended)
            return future
        self._arrivals += 1
        heapq.heappush(self._waiting, (release, self._arrivals, future))
        return future

    def answered(self, clock: int) -> None:
        """Count the gap at which a pull at `clock` is answered."""
        gap = clock - self.slowest
        self.gaps[int(gap) if gap > 0 else 0] += 1

    def waiting(self) -> bool:
        return any(not future.done() for _, _, future in self._waiting)

    def give_up(self, why: EndStream, *, for_good: bool = False) -> None:
        """Fail every held pull with `why`; `for_good`: those held from now on too."""
        if for_good:
            self.ended = why
        waiting, self._waiting = self._waiting, []
        for _, _, future in waiting:
            if not future.done():
                future.set_exception(why)

    def joined(self, worker_index: int) -> None:
        self.streams[worker_index] += 1

    def left(self, worker_index: int) -> None:
        self.streams[worker_index] -= 1
        if not self.streams[worker_index]:
            self.absent_since[worker_index] = time.monotonic()

    def absent_slowest(self, timeout: float) -> int | None:
        """A slowest unfinished worker that has had no stream for `timeout` seconds, if any."""
        now = time.monotonic()
        for index, clock in enumerate(self.clocks):
            if clock == self.slowest and not self.streams[index] and now - self.absent_since[index] >= timeout:
                return index
        return None


@dataclass
class _Stream:
    """One Exchange stream: the worker it speaks for (once it told its clock), and its held pulls' tasks."""

    worker: int | None = None
    released: set[asyncio.Task[None]] = field(default_factory=set)


def _settled(tasks: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
    tasks.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: the sending task reports it, if it still runs


# The Exchange stream a task serves (grpc.aio runs each call in its own task).
_STREAM: ContextVar[_Stream | None] = ContextVar("clocked_stream", default=None)


class ClockedShardServicer(DurableShardServicer):
    def __init__(
        self,
        store: ParameterStore,
        shard: int,
        num_shards: int,
        durability: Durability | None,
        *,
        consistency: str,
        staleness: int,
        num_workers: int,
        hold_timeout: float = DEFAULT_HOLD_TIMEOUT_S,
    ):
        super().__init__(store, shard, num_shards, durability)
        self.consistency = consistency
        self.gate = ClockGate(staleness, num_workers, durability.clocks if durability is not None else None)
        self.hold_timeout = hold_timeout
        self._watching: asyncio.Task[None] | None = None

    def stop_streams(self) -> int:
        """As without clocks; then, once the streams had their drain, the pulls still held are
        given up, so that their streams end (shutting down) rather than the stop waiting for them."""
        open_streams = super().stop_streams()
        why = EndStream(grpc.StatusCode.UNAVAILABLE, shutting_down_details(self.shard))
        asyncio.get_running_loop().call_later(STOP_DRAIN_S, lambda: self.gate.give_up(why, for_good=True))
        return open_streams

    async def Exchange(  # type: ignore[override]
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> None:
        stream = _Stream()
        _STREAM.set(stream)
        try:
            await super().Exchange(request_iterator, context)
        finally:
            # A held answer no one will read must not be counted (or logged about) when released.
            for task in list(stream.released):
                task.cancel()
            if stream.worker is not None:
                self.gate.left(stream.worker)

    async def _exchange_answer(
        self, request: shard_pb2.ExchangeRequest, context: grpc.aio.ServicerContext
    ) -> tuple[Any, shard_pb2.ExchangeResponse]:
        """Push, then the clock, then the pull: answered now, or once the slowest catches up."""
        ack, safe = await self._apply_push(request.push, context) if request.HasField("push") else (None, None)
        gate = self.gate
        stream = _STREAM.get()
        if request.HasField("clock"):
            told = request.clock
            if (problem := gate.check(told.worker_index)) is not None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            if stream is not None and stream.worker is None:
                stream.worker = told.worker_index
                gate.joined(told.worker_index)
            if told.started:
                moved = gate.restart(told.worker_index, told.clock)
            else:
                moved = gate.advance(told.worker_index, math.inf if told.finished else told.clock)
            if moved and self.durability is not None:
                safe = self.durability.log_clock(told)  # after the push's record: safe once both are
        response = shard_pb2.ExchangeResponse(ack=ack)
        if not request.HasField("pull"):
            return safe, response
        pull = request.pull
        if (problem := gate.check(pull.worker_index)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        held = gate.hold(pull.worker_index, pull.clock)
        if held is None:
            gate.answered(pull.clock)
            response.pull.CopyFrom(await self._answer_pull(pull, context))
            return safe, response
        # The sending task waits for this one, and a drain for the sending task: nothing here
        # may wait for the drain (its context's abort would), so it uses the stream's own.
        raw = getattr(context, "raw", context)

        async def released() -> None:
            await held  # EndStream if given up (a stop, or a worker gone)
            gate.answered(pull.clock)
            response.pull.CopyFrom(await self._answer_pull(pull, raw))
            if safe is not None:
                await safe

        task = asyncio.get_running_loop().create_task(released())
        if stream is not None:
            stream.released.add(task)
            task.add_done_callback(functools.partial(_settled, stream.released))
        if self.hold_timeout and self._watching is None:
            self._watching = asyncio.get_running_loop().create_task(self._watch_holds())
        return task, response

    async def _watch_holds(self) -> None:
        """While pulls are held: fail them once the slowest worker has been gone for hold_timeout."""
        gate = self.gate
        try:
            while gate.waiting():
                await asyncio.sleep(min(1.0, self.hold_timeout / 4))
                index = gate.absent_slowest(self.hold_timeout)
                if index is not None:
                    why = (
                        f"pull held back by worker {index}, at clock {gate.clocks[index]:.0f} ({self.consistency}), "
                        f"which has had no stream to shard {self.shard} for {self.hold_timeout:g} s: "
                        "is it still running?"
                    )
                    gate.give_up(EndStream(grpc.StatusCode.FAILED_PRECONDITION, why))
        finally:
            self._watching = None

    async def Info(self, request: shard_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> shard_pb2.InfoResponse:
        response = await super().Info(request, context)
        response.consistency = self.consistency
        response.num_workers = self.gate.num_workers
        response.clock_gaps.update(self.gate.gaps)
        response.held_pulls = self.gate.held
        return response
