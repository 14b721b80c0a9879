"""The ParameterShard gRPC service: one shard's pulls, pushes, snapshots and info.

The shard runs on grpc.aio: one event loop serves every stream, and each
request's store work runs to completion on it. That serializes the store
without a lock, and it answers a request without handing it from a network
thread to a pool thread and back (measured: half the round-trip latency of the
thread-pool server on loopback). A pull that must wait for a push
(read-your-writes) awaits a condition and never blocks the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from psclient.errors import WireError
from psclient.rpc.errors import shutting_down_details
from psclient.specs import UserFunctionError
from psclient.wire.codec import DecodedBatch, decode_batch, encode_batch
from psclient.wire.partition import shard_of, shards_of_ints
from psclient.wire.proto import shard_pb2, shard_pb2_grpc, tensor_pb2
from psserver import metrics
from psserver.durability import Durability
from psserver.model_snapshots import ModelSnapshots
from psserver.origins import Origins, tagged
from psserver.store import ParameterStore

log = logging.getLogger("streamps.shard")

# A pull that names after_seq waits this long for that push to arrive on the
# client's Push stream. The client sends the push first, so only a failed or
# rejected push stream makes it wait: then the pull fails instead of hanging.
# (Workers use Exchange, where the order of one stream does this without a wait.)
AFTER_SEQ_TIMEOUT_S = 60.0
MAX_IDS_PER_BATCH = 1 << 20
DEFAULT_SNAPSHOT_ROWS = 16_384
# On stop, a stream still takes the requests that reach the shard within this
# long of each other (those a client sent before the stop are in the socket
# already), applies and acks them, and ends only then: up to STOP_DRAIN_S in
# all, so a client that keeps sending cannot hold the shard up.
STOP_IDLE_S = 0.25
STOP_DRAIN_S = 1.0


class ShardServicer(shard_pb2_grpc.ParameterShardServicer):
    def __init__(self, store: ParameterStore, shard: int, num_shards: int, durability: Durability | None = None):
        self.store = store
        self.shard = shard
        self.num_shards = num_shards
        self.durability = durability
        self.model_snapshots: ModelSnapshots | None = None  # psserver --snapshot-every
        # With a data dir, the recovered watermarks (one dict, kept by both).
        self._watermarks: dict[str, int] = durability.watermarks if durability is not None else {}
        self._origins: Origins = durability.origins if durability is not None else Origins()
        self._pushed: asyncio.Condition | None = None  # made on the serving loop
        self._push_waiters = 0  # pulls waiting in `_await_push`
        self._started = time.monotonic()
        self._label = str(shard)
        self._pull_requests = self._pulled_keys = 0
        self._push_requests = self._pushed_keys = 0
        self._stopping = False
        self._drain_until = 0.0  # loop time at which a stopping shard ends every stream
        self._open_streams = 0
        # The tasks of Pull, Push and Exchange streams that wait in this servicer (for a
        # request, or for a push a pull depends on), each with the number of its wait:
        # `stop_streams` ends those still in the same wait STOP_IDLE_S later.
        self._waiting: dict[asyncio.Task[Any], int] = {}
        self._waits = 0
        # Labelled metrics looked up once: a lookup per request costs as much as the update.
        self._metrics = {op: metrics.OpMetrics(self._label, op) for op in ("pull", "push")}
        self._duplicates = metrics.DUPLICATES.labels(self._label)
        # Read when Prometheus scrapes, not set on every request.
        metrics.PARAMETERS.labels(self._label).set_function(lambda: len(self.store))

    def push_count(self) -> int:
        """Push requests taken so far: a model snapshot is skipped while it stays put."""
        return self._push_requests

    @property
    def pushed(self) -> asyncio.Condition:
        """Notified whenever a watermark moves (created lazily on the running loop)."""
        if self._pushed is None:
            self._pushed = asyncio.Condition()
        return self._pushed

    # -- stopping -----------------------------------------------------------

    def stop_streams(self) -> int:
        """Drain, then end, every open Pull, Push and Exchange stream; return how many are open.

        A stream goes on taking the requests already on their way (see
        STOP_IDLE_S), so pushes a client sent before the stop are applied and
        acked, not dropped; then it ends with UNAVAILABLE, `shard N is shutting
        down`. A stream waiting for its next request is ended by cancelling its
        task at that await (`_wait` turns that into the status). Left to the
        server's grace period, the streams of a job (which live as long as the
        job) would only be cancelled after it, with CancelledError tracebacks
        here and "Cancelling all calls" at the workers.
        """
        loop = asyncio.get_running_loop()
        self._stopping = True
        self._drain_until = loop.time() + STOP_DRAIN_S
        for task, wait in list(self._waiting.items()):
            loop.call_later(STOP_IDLE_S, self._end_wait, task, wait)
        return self._open_streams

    async def streams_ended(self, timeout: float) -> None:
        """Wait (at most `timeout`) for the Pull, Push and Exchange streams to end after `stop_streams`."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._open_streams and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    def _end_wait(self, task: asyncio.Task[Any], wait: int) -> None:
        if self._waiting.get(task) == wait:
            task.cancel()

    async def _stop_stream(self, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, shutting_down_details(self.shard))

    async def _wait(self, wait: Callable[[], Awaitable[Any]], context: grpc.aio.ServicerContext) -> Any:
        """Await `wait()` where a stop can end the stream."""
        if self._stopping:
            left = min(STOP_IDLE_S, self._drain_until - asyncio.get_running_loop().time())
            if left <= 0:
                await self._stop_stream(context)
            deadline = asyncio.timeout(left)
            try:
                async with deadline:
                    return await wait()
            except TimeoutError:
                if not deadline.expired():
                    raise  # the wait's own timeout
                await self._stop_stream(context)
        task = asyncio.current_task()
        assert task is not None
        self._waits += 1
        self._waiting[task] = self._waits
        try:
            return await wait()
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            task.uncancel()
            await self._stop_stream(context)
        finally:
            self._waiting.pop(task, None)

    async def _requests(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, name: str
    ) -> AsyncIterator[Any]:
        """The requests of a stream, until it ends or the shard stops. Bytes that
        do not parse end it with INVALID_ARGUMENT, not UNKNOWN."""
        iterator = requests.__aiter__()
        self._open_streams += 1
        try:
            while True:
                try:
                    request = await self._wait(iterator.__anext__, context)
                except StopAsyncIteration:
                    return
                except DecodeError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {name}: {exc}")
                yield request
        finally:
            self._open_streams -= 1

    # -- helpers ------------------------------------------------------------

    def _decode(self, batch: tensor_pb2.ParamBatch, with_values: bool) -> DecodedBatch:
        decoded = decode_batch(batch, with_values=with_values)
        if len(decoded) > MAX_IDS_PER_BATCH:
            raise WireError(f"batch of {len(decoded)} ids exceeds the limit of {MAX_IDS_PER_BATCH}")
        if (
            self.num_shards > 1
            and len(decoded.int_ids)
            and np.any(shards_of_ints(decoded.int_ids, self.num_shards) != self.shard)
        ):
            raise WireError(f"batch holds int ids that do not belong to shard {self.shard}")
        for param_id in decoded.str_ids:
            if shard_of(param_id, self.num_shards) != self.shard:
                raise WireError(f"id {param_id!r} does not belong to shard {self.shard}")
        values = decoded.values
        if values is not None and values.dtype.kind in "fc" and not np.isfinite(values).all():
            # One NaN or Inf delta would poison a parameter for good: refuse the batch.
            raise WireError("batch holds NaN or Inf values")
        return decoded

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, WireError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if isinstance(exc, UserFunctionError):
            # The request was fine; the shard's configured user code was not. Its
            # traceback helps whoever debugs that code, but is not the message.
            log.warning("%s", exc)
            if exc.__cause__ is not None:
                log.info("traceback of %r", exc.__cause__, exc_info=exc.__cause__)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        log.exception("request failed")
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    async def _await_push(self, worker_id: str, seq: int, context: grpc.aio.ServicerContext) -> None:
        self._push_waiters += 1
        try:
            async with self.pushed:
                await self._wait(
                    lambda: asyncio.wait_for(
                        self.pushed.wait_for(lambda: self._watermarks.get(worker_id, 0) >= seq), AFTER_SEQ_TIMEOUT_S
                    ),
                    context,
                )
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"push seq {seq} of worker {worker_id} never arrived"
            )
        finally:
            self._push_waiters -= 1

    async def _answer_pull(
        self, request: shard_pb2.PullRequest, context: grpc.aio.ServicerContext
    ) -> shard_pb2.PullResponse:
        op = self._metrics["pull"]
        if request.after_seq and self._watermarks.get(request.worker_id, 0) < request.after_seq:
            await self._await_push(request.worker_id, request.after_seq, context)
        started = time.perf_counter()
        try:
            keys = self._decode(request.keys, with_values=False)
            groups = self.store.pull_rows(keys.int_ids, keys.str_ids)
            batches = [encode_batch(group) for group in groups]
        except Exception as exc:
            op.errors.inc()
            await self._abort(context, exc)
        self._pull_requests += 1
        self._pulled_keys += len(keys)
        op.observe(started, len(keys), sum(len(b.values.data) for b in batches))
        return shard_pb2.PullResponse(request_id=request.request_id, batches=batches)

    async def _apply_push(
        self, request: shard_pb2.PushRequest, context: grpc.aio.ServicerContext
    ) -> tuple[shard_pb2.PushAck, asyncio.Future[None] | None]:
        """Apply a push; its ack, and (with a data dir) the future to await before sending it."""
        op = self._metrics["push"]
        if not request.worker_id or request.seq == 0:
            op.errors.inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a push needs a worker_id and a seq >= 1")
        if tagged(request):
            return await self._apply_tagged(request, context)
        if request.seq <= self._watermarks.get(request.worker_id, 0):
            self._duplicates.inc()
            # Applied, but maybe not yet on disk: its ack waits for what is logged so far.
            durable = self.durability.barrier() if self.durability is not None else None
            return shard_pb2.PushAck(seq=request.seq, duplicate=True), durable
        started = time.perf_counter()
        try:
            decoded = [self._decode(b, with_values=True) for b in request.batches]
            self.store.push_rows(decoded)
        except Exception as exc:
            op.errors.inc()
            await self._abort(context, exc)
        # Logged in the order applied (no await in between), so replay repeats this order.
        durable = self.durability.log_push(request) if self.durability is not None else None
        self._watermarks[request.worker_id] = request.seq
        self._count_push(started, decoded, request.batches)
        if self._push_waiters:  # a pull with after_seq (the Pull stream's read-your-writes)
            await self._notify_pushed()
        return shard_pb2.PushAck(seq=request.seq, duplicate=False), durable

    async def _apply_tagged(
        self, request: shard_pb2.PushRequest, context: grpc.aio.ServicerContext
    ) -> tuple[shard_pb2.PushAck, asyncio.Future[None] | None]:
        """`_apply_push` for a push with origins (psserver.origins): only the batches
        not applied before are. Its seq only moves the watermark Info reports: a
        restarted worker starts its seqs over."""
        started = time.perf_counter()
        try:
            fresh = self._origins.fresh(request)
            decoded = [self._decode(request.batches[i], with_values=True) for i in fresh]
            if decoded:
                self.store.push_rows(decoded)
        except Exception as exc:
            self._metrics["push"].errors.inc()
            await self._abort(context, exc)
        changed = self._origins.record(request, fresh)
        moved = request.seq > self._watermarks.get(request.worker_id, 0)
        if moved:
            self._watermarks[request.worker_id] = request.seq
        durable = None
        if self.durability is not None:
            # The whole request: recovery runs the same rule on it from the same state.
            # One that changed nothing need not be replayed; its ack waits for what is logged.
            durable = self.durability.log_push(request) if changed or moved else self.durability.barrier()
        if decoded:
            self._count_push(started, decoded, [request.batches[i] for i in fresh])
        else:
            self._duplicates.inc()
        if moved and self._push_waiters:
            await self._notify_pushed()
        return shard_pb2.PushAck(seq=request.seq, duplicate=not decoded), durable

    def _count_push(
        self, started: float, decoded: list[DecodedBatch], batches: Sequence[tensor_pb2.ParamBatch]
    ) -> None:
        keys = sum(len(d) for d in decoded)
        self._push_requests += 1
        self._pushed_keys += keys
        self._metrics["push"].observe(started, keys, sum(len(b.values.data) for b in batches))

    async def _notify_pushed(self) -> None:
        async with self.pushed:
            self.pushed.notify_all()

    async def _exchange_answer(
        self, request: shard_pb2.ExchangeRequest, context: grpc.aio.ServicerContext
    ) -> tuple[asyncio.Future[None] | None, shard_pb2.ExchangeResponse]:
        """Push before pull: the order is the guarantee. The answer, and (with a data dir)
        the future to await before sending it."""
        ack, safe = await self._apply_push(request.push, context) if request.HasField("push") else (None, None)
        answer = await self._answer_pull(request.pull, context) if request.HasField("pull") else None
        return safe, shard_pb2.ExchangeResponse(ack=ack, pull=answer)

    # -- RPCs ---------------------------------------------------------------

    async def Pull(
        self, request_iterator: AsyncIterator[shard_pb2.PullRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.PullResponse]:
        async for request in self._requests(request_iterator, context, "PullRequest"):
            yield await self._answer_pull(request, context)

    async def Push(
        self, request_iterator: AsyncIterator[shard_pb2.PushRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.PushAck]:
        async for request in self._requests(request_iterator, context, "PushRequest"):
            ack, _ = await self._apply_push(request, context)
            yield ack

    async def Exchange(
        self, request_iterator: AsyncIterator[shard_pb2.ExchangeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.ExchangeResponse]:
        # One request at a time, in stream order.
        async for request in self._requests(request_iterator, context, "ExchangeRequest"):
            _, response = await self._exchange_answer(request, context)
            yield response

    async def Snapshot(
        self, request: shard_pb2.SnapshotRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.SnapshotChunk]:
        # Each chunk is taken whole between two awaits, so it is consistent;
        # pushes may land between chunks.
        for groups in self.store.chunk_rows(request.max_rows_per_chunk or DEFAULT_SNAPSHOT_ROWS):
            yield shard_pb2.SnapshotChunk(batches=[encode_batch(group) for group in groups])

    async def Watch(
        self, request: shard_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.SnapshotChunk]:
        if self.model_snapshots is None:
            details = f"shard {self.shard} takes no model snapshots: start it with --snapshot-every SECONDS"
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, details)
            return
        async for message in self.model_snapshots.watch():
            yield message

    async def LogicOutputs(
        self, request: shard_pb2.LogicOutputsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.LogicOutputChunk]:
        # Only a shard with a server logic has outputs (psserver.logic_service).
        none: tuple[shard_pb2.LogicOutputChunk, ...] = ()
        for chunk in none:
            yield chunk

    async def Info(self, request: shard_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> shard_pb2.InfoResponse:
        return shard_pb2.InfoResponse(
            shard=self.shard,
            num_shards=self.num_shards,
            num_params=len(self.store),
            init_spec=self.store.init.spec,
            update_spec=self.store.update.spec,
            watermarks=dict(self._watermarks),
            pull_requests=self._pull_requests,
            pulled_keys=self._pulled_keys,
            push_requests=self._push_requests,
            pushed_keys=self._pushed_keys,
            uptime_seconds=time.monotonic() - self._started,
            finished_below=dict(self._origins.finished_below),
            consistency="async",  # psserver.clocks overrides it
            snapshot_every=self.model_snapshots.every if self.model_snapshots is not None else 0.0,
        )
