"""The shard service with a server logic (psserver.logic): answers that may come later.

A stream is read and its requests handled in order as they come, as with a
data dir (psserver.durable_service, whose pipelining this reuses): a push is
deduplicated and handed to the logic at once, and a pull is handed to the
logic, whose answers fill it in. A second task sends the answers in request
order, each once it is complete. So a pull waiting for a lock holds back only
the answers behind it on its own stream, never the reading: the push that
frees the lock, on this stream or another, is still read and applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar

import grpc

from psclient.wire.proto import shard_pb2, tensor_pb2
from psserver.durable_service import DurableShardServicer
from psserver.logic import LogicStore, _Pull
from psserver.service import STOP_DRAIN_S

# Bytes of outputs per LogicOutputs chunk: well under gRPC's 4 MiB message limit.
OUTPUT_CHUNK_BYTES = 1 << 20

_Waiting = dict["asyncio.Future[None]", _Pull]
# The unanswered pulls of the stream a task serves (grpc.aio runs each call in its own task).
_STREAM_PULLS: ContextVar[_Waiting | None] = ContextVar("stream_pulls", default=None)


class LogicShardServicer(DurableShardServicer):
    def __init__(self, store: LogicStore, shard: int, num_shards: int):
        super().__init__(store, shard, num_shards)
        self.logic_store = store
        self._unanswered: _Waiting = {}

    def stop_streams(self) -> int:
        """As without a logic; then, once the streams had their drain, a pull the logic
        still has not answered is given up, so that its stream ends (UNAVAILABLE, shutting
        down) and the worker resends it elsewhere, rather than the stop waiting for it."""
        open_streams = super().stop_streams()
        asyncio.get_running_loop().call_later(STOP_DRAIN_S, self._give_up_pulls)
        return open_streams

    def _give_up_pulls(self) -> None:
        self._drop(self._unanswered)

    def _drop(self, pulls: _Waiting) -> None:
        """Give up pulls: their futures are cancelled, and an answer the logic gives later
        goes to the next pull of that id by that worker (one sent again on a new stream)."""
        for done, pull in list(pulls.items()):
            pull.dropped = True
            done.cancel()
            self._unanswered.pop(done, None)

    @contextlib.contextmanager
    def _stream(self) -> Iterator[None]:
        """Serve one stream; the pulls it leaves unanswered are dropped at its end."""
        pulls: _Waiting = {}
        _STREAM_PULLS.set(pulls)
        try:
            yield
        finally:
            self._drop(pulls)

    async def _start_pull(
        self, request: shard_pb2.PullRequest, response: shard_pb2.PullResponse, context: grpc.aio.ServicerContext
    ) -> asyncio.Future[None]:
        """Hand the pull to the logic; the future is done once `response` holds every answer."""
        op = self._metrics["pull"]
        started = time.perf_counter()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        found = _STREAM_PULLS.get()
        stream: _Waiting = found if found is not None else {}

        def finish(batches: list[tensor_pb2.ParamBatch]) -> None:
            self._unanswered.pop(done, None)
            stream.pop(done, None)
            if done.cancelled():  # given up (a stop, or its stream ended)
                return
            response.batches.extend(batches)
            op.observe(started, len(ids), sum(len(b.values.data) for b in batches))
            done.set_result(None)

        response.request_id = request.request_id
        try:
            ids = self._decode(request.keys, with_values=False).ids()
            pull = self.logic_store.pull_logic(ids, request.worker_index, finish)
        except Exception as exc:
            op.errors.inc()
            await self._abort(context, exc)
        if not done.done():
            self._unanswered[done] = stream[done] = pull
        self._pull_requests += 1
        self._pulled_keys += len(ids)
        return done

    async def _answer_pull(
        self, request: shard_pb2.PullRequest, context: grpc.aio.ServicerContext
    ) -> shard_pb2.PullResponse:
        # The Pull stream: one request at a time, as without a logic.
        if request.after_seq and self._watermarks.get(request.worker_id, 0) < request.after_seq:
            await self._await_push(request.worker_id, request.after_seq, context)
        response = shard_pb2.PullResponse()
        done = await self._start_pull(request, response, context)
        await self._wait(lambda: asyncio.shield(done), context)
        return response

    async def _exchange_answer(
        self, request: shard_pb2.ExchangeRequest, context: grpc.aio.ServicerContext
    ) -> tuple[asyncio.Future[None] | None, shard_pb2.ExchangeResponse]:
        """Push before pull, as without a logic; the answer goes once the pull's future is done."""
        ack, _ = await self._apply_push(request.push, context) if request.HasField("push") else (None, None)
        response = shard_pb2.ExchangeResponse(ack=ack)
        if not request.HasField("pull"):
            return None, response
        response.pull.SetInParent()
        return await self._start_pull(request.pull, response.pull, context), response

    async def Pull(
        self, request_iterator: AsyncIterator[shard_pb2.PullRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.PullResponse]:
        with self._stream():
            async for response in super().Pull(request_iterator, context):
                yield response

    async def Exchange(  # type: ignore[override]
        self, request_iterator: AsyncIterator[shard_pb2.ExchangeRequest], context: grpc.aio.ServicerContext
    ) -> None:
        with self._stream():
            await super().Exchange(request_iterator, context)

    async def Info(self, request: shard_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> shard_pb2.InfoResponse:
        response = await super().Info(request, context)
        response.logic = self.logic_store.spec
        return response

    async def LogicOutputs(
        self, request: shard_pb2.LogicOutputsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.LogicOutputChunk]:
        try:
            self.logic_store.close()
        except Exception as exc:
            await self._abort(context, exc)
        chunk: list[bytes] = []
        size = 0
        for out in self.logic_store.handle.outputs:
            if chunk and size + len(out) > OUTPUT_CHUNK_BYTES:
                yield shard_pb2.LogicOutputChunk(outputs=chunk)
                chunk, size = [], 0
            chunk.append(out)
            size += len(out)
        if chunk:
            yield shard_pb2.LogicOutputChunk(outputs=chunk)
