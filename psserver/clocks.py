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
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections import Counter
from typing import Any

import grpc

from psclient.wire.proto import shard_pb2
from psserver.durability import Durability
from psserver.durable_service import DurableShardServicer
from psserver.store import ParameterStore


class ClockGate:
    """The workers' clocks as this shard knows them, and the pulls waiting for them."""

    def __init__(self, staleness: int, num_workers: int):
        self.staleness = staleness
        self.num_workers = num_workers
        self.clocks: list[float] = [0.0] * num_workers
        self.slowest = 0.0
        self.gaps: Counter[int] = Counter()
        self.held = 0
        # (release clock, arrival order, future): released once slowest >= release clock.
        self._waiting: list[tuple[float, int, asyncio.Future[None]]] = []
        self._arrivals = 0

    def check(self, worker_index: int) -> str | None:
        """Why a worker index cannot take part, or None."""
        if worker_index >= self.num_workers:
            return f"worker index {worker_index} is not below the shard's --num-workers {self.num_workers}"
        return None

    def advance(self, worker_index: int, clock: float) -> None:
        """The worker reached `clock` (math.inf: it finished); release the pulls this frees."""
        if clock <= self.clocks[worker_index]:
            return
        was_slowest = self.clocks[worker_index] == self.slowest
        self.clocks[worker_index] = clock
        if not was_slowest:
            return
        self.slowest = min(self.clocks)
        while self._waiting and self._waiting[0][0] <= self.slowest:
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():
                future.set_result(None)

    def hold(self, worker_index: int, clock: int) -> asyncio.Future[None] | None:
        """None if a pull at `clock` may be answered now, else the future that says when."""
        self.advance(worker_index, clock)
        release = clock - self.staleness
        if release <= self.slowest:
            return None
        self.held += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._arrivals += 1
        heapq.heappush(self._waiting, (release, self._arrivals, future))
        return future

    def answered(self, clock: int) -> None:
        """Count the gap at which a pull at `clock` is answered."""
        gap = clock - self.slowest
        self.gaps[int(gap) if gap > 0 else 0] += 1


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
    ):
        super().__init__(store, shard, num_shards, durability)
        self.consistency = consistency
        self.gate = ClockGate(staleness, num_workers)

    async def _exchange_answer(
        self, request: shard_pb2.ExchangeRequest, context: grpc.aio.ServicerContext
    ) -> tuple[Any, shard_pb2.ExchangeResponse]:
        """Push, then the clock, then the pull: answered now, or once the slowest catches up."""
        ack, safe = await self._apply_push(request.push, context) if request.HasField("push") else (None, None)
        gate = self.gate
        if request.HasField("clock"):
            told = request.clock
            if (problem := gate.check(told.worker_index)) is not None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            gate.advance(told.worker_index, math.inf if told.finished else told.clock)
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

        async def released() -> None:
            await self._wait(lambda: held, context)
            gate.answered(pull.clock)
            response.pull.CopyFrom(await self._answer_pull(pull, context))
            if safe is not None:
                await safe

        return asyncio.get_running_loop().create_task(released()), response

    async def Info(self, request: shard_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> shard_pb2.InfoResponse:
        response = await super().Info(request, context)
        response.consistency = self.consistency
        response.num_workers = self.gate.num_workers
        response.clock_gaps.update(self.gate.gaps)
        response.held_pulls = self.gate.held
        return response
