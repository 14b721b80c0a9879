"""A worker's streams to its shards: opening them, answers coming in, and riding out a restart.

One Exchange stream per shard (psclient/rpc/connection.py), on the worker's
event loop. An answer is matched to what the shard owed (psworker/batching.py)
and queued for the logic. A stream that breaks (UNAVAILABLE, a reset, the
shard's "shutting down") is opened again with exponential backoff and
jitter; then every message the shard had not answered goes again in send
order, each push with its own seq (the shard's watermark for this worker
makes that safe) and each pull behind the pushes it followed. While a shard
is away its requests are only kept, and the logic takes no new input
(psworker/loop.py). Under bsp/ssp the new stream starts with the worker's
clock (ShardBuffers.resumed), and a shard that came back with another
consistency is refused as at connect. A shard that has not answered for `shard_timeout`
seconds, broken or stalled, fails the worker with one line naming it; a
refusal (a bad request or token, another place in the layout) fails it at once.

`WorkerRuntime` (psworker/runtime.py) owns the state and builds on this class.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import grpc

from psclient.errors import ShardError, StreampsError
from psclient.rpc.connection import EventLoopThread, ShardConnection
from psclient.rpc.errors import StreamBroken, is_transient, unreachable_reason
from psclient.rpc.layout import check_layout, info_error
from psclient.wire.codec import decode_batch, decode_rows
from psclient.wire.proto import shard_pb2
from psworker.batching import ShardBuffers
from psworker.loop import Answer
from psworker.origins import OriginTracker

log = logging.getLogger("streamps.worker")

# Reconnecting: the first attempt after about RECONNECT_FIRST_S, each pause twice the
# last up to RECONNECT_MAX_S, each jittered down by up to half, so that the workers
# of a job do not all knock at once on a shard that comes back.
RECONNECT_FIRST_S = 0.05
RECONNECT_MAX_S = 2.0
# How long one attempt waits for the shard's Info (a stopped process accepts
# connections but never answers).
RECONNECT_ATTEMPT_S = 5.0
# How often the worker looks for a shard that owes answers and has gone silent.
SILENCE_CHECK_S = 0.5
# After a failure, how long acknowledgements of the last pushes are awaited
# (from the shards whose streams still work: a failed one sends none).
DRAIN_TIMEOUT_S = 10.0


class ShardLinks:
    # Set by WorkerRuntime.__init__.
    worker_index: int
    worker_id: str
    servers: list[str]
    connect_timeout: float
    shard_timeout: float
    checkpoint_dir: Path | None
    _origins: OriginTracker | None
    _receives_many: bool
    _answers: deque[Answer]
    _buffers: ShardBuffers
    _failed_shards: set[int]
    _connections: list[ShardConnection]
    _reconnecting: dict[int, asyncio.Task[None]]
    _io: EventLoopThread | None
    _wakeup: asyncio.Event
    _sent: bool
    staleness: int | None
    fail: Callable[[str], None]
    check_consistency: Callable[[list[shard_pb2.InfoResponse]], None]
    _clock_failed: Callable[[int], None]

    def connect(self) -> None:
        """Open streams to every shard; ShardError names the one that is unreachable,
        or whose own index and count disagree with its place in --servers (before
        anything is sent, since such a shard would refuse some pushes only mid-job)."""
        self._io = EventLoopThread(f"worker-{self.worker_index}-io")
        try:
            for shard, address in enumerate(self.servers):
                self._connections.append(
                    ShardConnection(
                        shard,
                        address,
                        self._io,
                        on_response=functools.partial(self._on_response, shard),
                        on_error=functools.partial(self._on_shard_error, shard),
                        connect_timeout=self.connect_timeout,
                    )
                )
            check_layout(self.servers, [connection.info for connection in self._connections], "--servers")
            self.check_consistency([connection.info for connection in self._connections])
            # A new run would number its pushes from 1 again, and the shard would take
            # them up to its watermark as duplicates of the last run's: silently dropped.
            # A restartable worker's pushes (and a stream's worker's) are named by input
            # position instead, so its restart is welcome (it replays what is not done).
            for connection in self._connections if self._origins is None else []:
                seq = connection.info.watermarks.get(self.worker_id, 0)
                if seq:
                    raise ShardError(
                        f"{connection.describe()} already holds pushes of worker {self.worker_id} (up to seq {seq}); "
                        "a new run of a worker needs a --job-id of its own"
                    )
        except BaseException:
            self._close_connections()
            raise

    async def _drain_pushes(self) -> None:
        """On a failure in user code or input, still deliver the pushes of the records
        processed before it, so the model reflects exactly those records."""
        shards = range(len(self._connections))

        def drained() -> bool:
            return all(self._buffers.unacked_by_shard[s] == 0 or s in self._failed_shards for s in shards)

        try:
            for shard in shards:
                if shard not in self._failed_shards:
                    self._buffers.flush_pushes(shard)
                    self._clock_failed(shard)
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while not drained() and (left := deadline - time.monotonic()) > 0:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._wakeup.wait()
        except Exception:  # the shards may be the reason for the failure
            log.debug("draining pushes after a failure failed", exc_info=True)

    def _close_connections(self) -> None:
        for connection in self._connections:
            connection.close()
        self._connections = []
        if self._io is not None:
            self._io.close()
            self._io = None

    def _on_response(self, shard: int, response: shard_pb2.ExchangeResponse) -> None:
        # The ack first: it holds whatever the answer beside it turns out to be.
        try:
            self._buffers.received(shard, response)
        except ShardError as exc:
            self._failed_shards.add(shard)
            self.fail(f"worker {self.worker_index}: {self._connections[shard].describe()}: {exc}")
            return
        if response.HasField("pull"):
            try:
                if self._receives_many:
                    ids, values = None, [decode_batch(batch, with_values=True) for batch in response.pull.batches]
                else:
                    ids, values = decode_rows(response.pull.batches)
            except StreampsError as exc:
                # A shard that sends what cannot be read is not waited for when draining.
                self._failed_shards.add(shard)
                self.fail(f"worker {self.worker_index}: malformed pull answer from shard {shard}: {exc}")
                return
            self._answers.append((shard, ids, values))
        self._wakeup.set()

    def _on_shard_error(self, shard: int, error: ShardError) -> None:
        if not isinstance(error, StreamBroken) or not self.shard_timeout:
            self._failed_shards.add(shard)
            self.fail(f"worker {self.worker_index}: {error}")
            return
        if shard in self._reconnecting:  # already on it: only the current stream reports
            return
        log.warning("%s; reconnecting (for up to %g s)", error, self.shard_timeout)
        self._reconnecting[shard] = asyncio.get_running_loop().create_task(self._reconnect(shard, error.reason))

    def _shard_lost(self, shard: int, message: str) -> None:
        self._reconnecting.pop(shard, None)
        self._failed_shards.add(shard)
        self.fail(f"worker {self.worker_index}: {message}")
        self._wakeup.set()  # a drain waiting for this shard's acks stops waiting

    def _shard_unreachable(self, shard: int, last_error: str) -> None:
        describe = self._connections[shard].describe()
        self._shard_lost(shard, f"{describe} unreachable for {self.shard_timeout:g} s (last error: {last_error})")

    async def _reconnect(self, shard: int, last_error: str) -> None:
        """Open a new stream to the shard, then send again all it has not answered.

        The shard counts as away since it last answered while it owed answers (or
        since its stream broke, if it owed none), so a shard that breaks every
        new stream before answering still fails the worker on time.
        """
        connection = self._connections[shard]
        began = time.monotonic()
        silent_since = self._buffers.silent_since[shard]
        deadline = min(began, silent_since if silent_since is not None else began) + self.shard_timeout
        pause = RECONNECT_FIRST_S
        while True:
            await asyncio.sleep(min(random.uniform(pause / 2, pause), max(deadline - time.monotonic(), 0.0)))
            pause = min(pause * 2, RECONNECT_MAX_S)
            left = deadline - time.monotonic()
            if left <= 0:
                self._shard_unreachable(shard, last_error)
                return
            try:
                await connection.reopen(min(RECONNECT_ATTEMPT_S, left))
                break
            except grpc.RpcError as exc:
                if not is_transient(exc):
                    self._shard_lost(shard, str(info_error(connection.describe(), exc)))
                    return
                last_error = unreachable_reason(exc)
        try:
            # A shard that came back with another index or count would take ids that are not its own,
            # and one with another consistency or worker count would not keep the job's bound.
            check_layout(self.servers, [c.info for c in self._connections], "--servers")
            self.check_consistency([c.info for c in self._connections])
        except ShardError as exc:
            self._shard_lost(shard, str(exc))
            return
        del self._reconnecting[shard]
        # Under bsp/ssp the worker's clock goes first (psworker/clocks.py).
        unanswered = self._buffers.resumed(shard) if self.staleness is not None else self._buffers.unanswered(shard)
        log.info(
            "reconnected to %s after %.1f s; resending %d push batches and %d pull requests",
            connection.describe(),
            time.monotonic() - began,
            sum(request.HasField("push") for request in unanswered),
            sum(request.HasField("pull") for request in unanswered),
        )
        for request in unanswered:
            connection.send(request)
        self._wakeup.set()  # input may flow again

    async def _watch_silence(self) -> None:
        """Fail the worker when a shard owes answers and has said nothing for `shard_timeout`
        (a stalled stream: its process stopped, or the network dropped it without a reset)."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(SILENCE_CHECK_S)
            now = time.monotonic()
            if now - last > 2 * SILENCE_CHECK_S:
                # The loop was held up (a long callback): let the readers take what came meanwhile.
                last = now
                continue
            last = now
            for shard, since in enumerate(self._buffers.silent_since):
                if (
                    since is not None
                    and now - since >= self.shard_timeout
                    and shard not in self._reconnecting
                    and shard not in self._failed_shards
                ):
                    self._shard_unreachable(shard, "no answer")

    def _send(self, shard: int, request: shard_pb2.ExchangeRequest) -> None:
        # To a shard that is away, the request is only kept (ShardBuffers keeps every
        # unanswered one): it goes with the others once a new stream is open.
        if shard not in self._reconnecting:
            self._connections[shard].send(request)
            self._sent = True
