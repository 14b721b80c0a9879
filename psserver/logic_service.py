"""The shard service with a server logic (psserver.logic): answers that may come later.

A stream is read and its requests handled in order as they come, as with a
data dir (psserver.durable_service, whose pipelining this reuses): a push is
deduplicated and handed to the logic at once, and a pull is handed to the
logic, whose answers fill it in. A second task sends the answers in request
order, each once it is complete. So a pull waiting for a lock holds back only
the answers behind it on its own stream, never the reading: the push that
frees the lock, on this stream or another, is still read and applied.

A pull is known by (worker_id, worker_index, request_id), which a worker sends
again unchanged on a new stream when the old one broke. If the old stream has
not ended here yet (its connection died without a reset), the pull sent again
takes the old one's place, answers given so far included, and the logic is not
asked again; the old stream is given up. A pull whose answer the logic gives
with a bad value fails its own stream with the line the callback fails with.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Generator, Iterator
from contextvars import ContextVar
from typing import Any

import grpc

from psclient.wire.proto import shard_pb2, tensor_pb2
from psserver.durable_service import DurableShardServicer
from psserver.logic import LogicStore, _Pull
from psserver.service import STOP_DRAIN_S, ShardServicer

# Bytes of outputs per LogicOutputs chunk: well under gRPC's 4 MiB message limit.
OUTPUT_CHUNK_BYTES = 1 << 20

# A pull's future: None once it is answered, or the line that fails its stream.
_Done = asyncio.Future[str | None]
_Waiting = dict[_Done, _Pull]
_Key = tuple[str, int, int]  # a pull's (worker_id, worker_index, request_id)


class _Stream:
    """One stream's unanswered pulls, and its own grpc context (not the draining one)."""

    __slots__ = ("context", "pulls")

    def __init__(self, context: grpc.aio.ServicerContext):
        self.context = context
        self.pulls: _Waiting = {}


# The stream a task serves (grpc.aio runs each call in its own task).
_STREAM: ContextVar[_Stream | None] = ContextVar("stream", default=None)


class _Delivery:
    """What a stream's sender awaits before it writes a pull's answer: the pull's future;
    if the pull was refused, the stream then ends with that line, in its place in the
    stream's order (the answers before it are written)."""

    __slots__ = ("context", "done")

    def __init__(self, done: _Done, context: grpc.aio.ServicerContext):
        self.done = done
        self.context = context

    def __await__(self) -> Generator[Any, None, None]:
        refused = yield from self.done.__await__()
        if refused is not None:
            yield from self.context.abort(grpc.StatusCode.FAILED_PRECONDITION, refused).__await__()


class LogicShardServicer(DurableShardServicer):
    def __init__(self, store: LogicStore, shard: int, num_shards: int):
        super().__init__(store, shard, num_shards)
        self.logic_store = store
        self._unanswered: _Waiting = {}
        # The newest unanswered pull of each key, and the pulls of its stream.
        self._by_key: dict[_Key, tuple[_Done, _Waiting]] = {}

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
            self._forget(done, pull.key, pulls)

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:  # type: ignore[override]
        """As without a logic, once the stream's pulls the logic has not answered are given
        up: the stream first sends the answers before the error, and would wait for those,
        maybe for good (a lock its own failing push was to free, say)."""
        stream = _STREAM.get()
        if stream is not None:
            self._drop(stream.pulls)
        await ShardServicer._abort(context, exc)

    def _forget(self, done: _Done, key: _Key, pulls: _Waiting) -> None:
        self._unanswered.pop(done, None)
        pulls.pop(done, None)
        if self._by_key.get(key, (None,))[0] is done:
            del self._by_key[key]

    def _sent_again(self, key: _Key, ids: list[Any], pulls: _Waiting) -> _Pull | None:
        """The pull `key` names if it still waits on another stream (which its worker left,
        or it would not send it again): it is taken from that stream, which is given up."""
        found = self._by_key.get(key)
        if found is None or found[1] is pulls:
            return None
        old_done, old_pulls = found
        pull = old_pulls[old_done]
        if pull.ids != ids:  # not the same pull: a restarted worker counts its requests anew
            return None
        self._forget(old_done, key, old_pulls)
        # Its answer could only go to a stream nobody reads, and the answers behind it with it.
        old_done.set_result(f"pull request {key[2]} of worker {key[1]} was sent again on another stream")
        return pull

    @contextlib.contextmanager
    def _stream(self, context: grpc.aio.ServicerContext) -> Iterator[None]:
        """Serve one stream; the pulls it leaves unanswered are dropped at its end."""
        stream = _Stream(context)
        _STREAM.set(stream)
        try:
            yield
        finally:
            self._drop(stream.pulls)

    async def _start_pull(
        self, request: shard_pb2.PullRequest, response: shard_pb2.PullResponse, context: grpc.aio.ServicerContext
    ) -> _Done:
        """Hand the pull to the logic (or take the place of the same pull on a stream its
        worker left); the future is done once `response` holds every answer."""
        op = self._metrics["pull"]
        started = time.perf_counter()
        done: _Done = asyncio.get_running_loop().create_future()
        found = _STREAM.get()
        pulls: _Waiting = found.pulls if found is not None else {}
        key = (request.worker_id, request.worker_index, request.request_id)

        def finish(batches: list[tensor_pb2.ParamBatch]) -> None:
            self._forget(done, key, pulls)
            if done.done():  # given up (a stop, or its stream ended)
                return
            response.batches.extend(batches)
            op.observe(started, len(ids), sum(len(b.values.data) for b in batches))
            done.set_result(None)

        def refuse(line: str) -> None:
            self._forget(done, key, pulls)
            if not done.done():
                op.errors.inc()
                done.set_result(line)

        response.request_id = request.request_id
        try:
            ids = self._decode(request.keys, with_values=False).ids()
            taken = self._sent_again(key, ids, pulls)
            if taken is None:
                pull = self.logic_store.pull_logic(ids, request.worker_index, finish, refuse)
            else:
                pull, pull.finish, pull.refuse = taken, finish, refuse
        except Exception as exc:
            op.errors.inc()
            await self._abort(context, exc)
        if not done.done():
            pull.key = key
            self._unanswered[done] = pulls[done] = pull
            self._by_key[key] = (done, pulls)
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
        refused = await self._wait(lambda: asyncio.shield(done), context)
        if refused is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, refused)
        return response

    async def _exchange_answer(
        self, request: shard_pb2.ExchangeRequest, context: grpc.aio.ServicerContext
    ) -> tuple[Any, shard_pb2.ExchangeResponse]:
        """Push before pull, as without a logic; the answer goes once its _Delivery is awaited."""
        ack, _ = await self._apply_push(request.push, context) if request.HasField("push") else (None, None)
        response = shard_pb2.ExchangeResponse(ack=ack)
        if not request.HasField("pull"):
            return None, response
        response.pull.SetInParent()
        done = await self._start_pull(request.pull, response.pull, context)
        stream = _STREAM.get()
        # `context` here is the draining one, whose abort waits for the sender: the sender
        # ends the stream with the stream's own context.
        return _Delivery(done, stream.context if stream is not None else context), response

    async def Pull(
        self, request_iterator: AsyncIterator[shard_pb2.PullRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.PullResponse]:
        with self._stream(context):
            async for response in super().Pull(request_iterator, context):
                yield response

    async def Exchange(  # type: ignore[override]
        self, request_iterator: AsyncIterator[shard_pb2.ExchangeRequest], context: grpc.aio.ServicerContext
    ) -> None:
        with self._stream(context):
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
