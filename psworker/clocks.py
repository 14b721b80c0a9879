"""A worker's logical clock (`ps.advance_clock()`), for --consistency bsp or ssp:S.

The clock starts at 0. Each advance flushes every shard's buffer with a clock
message, to every shard (even one the worker has nothing else for): the shard
learns of the advance after every push made before it, on the same stream.
Every pull carries the clock it was made at (one that waits for the pull
limit, the clock at which it leaves). When the worker finishes, a last
message says so, and the shards stop counting it (psserver/clocks.py holds
the rule by which they hold pulls back); the worker ends only once every
shard answered it, across a reconnect. A worker that fails says it finished
too: it no longer takes part. Every new stream, the first and each one
reopened after a break, starts with a clock message (psworker/links.py), so
that a shard knows which worker the stream is, and a restarted shard how far
it got.

Under async nothing is sent: the clock only counts.

The rule for logics: advance the clock where it does not wait on a pull
answer that may be held, e.g. in on_recv at an epoch boundary (or in
on_input_end). The slowest worker's pulls are never held, so such a logic
always reaches its next advance, and every held pull is released in the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from psclient.consistency import consistency_name, parse_consistency
from psclient.errors import JobFailed, ShardError
from psclient.wire.proto import shard_pb2
from psworker.batching import ShardBuffers
from psworker.checkpoints import CheckpointError


class WorkerClock:
    # Set by WorkerRuntime.__init__ (via _init_clock) and the runtime's other parts.
    worker_index: int
    num_workers: int
    _buffers: ShardBuffers
    consistency: str
    staleness: int | None
    _async_clock: int
    shard_timeout: float
    _failure: str | None
    _failed_shards: set[int]
    _reconnecting: dict[int, asyncio.Task[None]]
    _wakeup: asyncio.Event
    _shard_unreachable: Callable[[int, str], None]

    def _init_clock(self, consistency: str, restartable: bool) -> None:
        self.staleness = parse_consistency(consistency)
        self.consistency = consistency_name(self.staleness)
        self._async_clock = 0
        if restartable and self.staleness is not None:
            # Its pushes leave per record (psworker/origins.py): after a clock message sent in on_recv.
            raise CheckpointError(
                f"a restartable worker (--checkpoint-dir, or a stream's) cannot run --consistency {consistency}"
            )

    @property
    def clock(self) -> int:
        return self._buffers.clock if self.staleness is not None else self._async_clock

    def advance_clock(self) -> None:
        buffers = self._buffers
        if self.staleness is not None:
            buffers.send_clock(buffers.clock + 1, finished=False)  # what is buffered leaves at the old clock
        buffers.clock += 1

    def _count_clock(self) -> None:
        """advance_clock under async: the count only, so that the pulls go exactly as before."""
        self._async_clock += 1

    def _clock_started(self) -> None:
        """Tell every shard which worker its stream is, and that this run starts at clock 0
        (a clock message, the first thing sent)."""
        if self.staleness is not None:
            for shard in range(self._buffers.num_shards):
                self._buffers.tell_clock(shard, started=True)

    async def _clock_finished(self) -> None:
        """Tell every shard this worker no longer holds the others back, and wait until each
        took it (a shard that reconnects gets it again): JobFailed if one cannot be told."""
        if self.staleness is None:
            return
        buffers = self._buffers
        buffers.send_clock(buffers.clock, finished=True)
        shards = range(buffers.num_shards)
        # Only a shard that stalled stays silent: one that breaks is reopened, or fails the worker.
        deadline = time.monotonic() + self.shard_timeout if self.shard_timeout else None
        while True:
            if self._failure:
                raise JobFailed(self._failure)
            owing = [s for s in shards if buffers.owes(s) and s not in self._failed_shards]
            if not owing:
                return
            if deadline is not None and time.monotonic() >= deadline:
                deadline = None  # a shard that is reconnecting fails on its own deadline
                for shard in owing:
                    if shard not in self._reconnecting:
                        self._shard_unreachable(shard, "no answer")
                continue
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if deadline is None else deadline - time.monotonic()):
                    await self._wakeup.wait()

    def _clock_failed(self, shard: int) -> None:
        """A failed worker no longer takes part: the shard stops counting it (after its pushes)."""
        if self.staleness is not None and shard not in self._reconnecting:
            self._buffers.tell_clock(shard, finished=True)

    def check_consistency(self, infos: list[shard_pb2.InfoResponse]) -> None:
        """ShardError (one line) for a shard whose consistency or worker count is not this worker's."""
        for shard, info in enumerate(infos):
            theirs = info.consistency or "async"
            if theirs != self.consistency:
                raise ShardError(
                    f"shard {shard} runs --consistency {theirs}, but worker {self.worker_index} runs "
                    f"{self.consistency}: every shard and worker of a job must run the same"
                )
            if self.staleness is not None and info.num_workers != self.num_workers:
                raise ShardError(
                    f"shard {shard} counts --num-workers {info.num_workers}, but worker {self.worker_index} "
                    f"is one of {self.num_workers}"
                )
