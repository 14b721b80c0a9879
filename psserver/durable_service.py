"""The shard service with a data dir: every push is logged, and acknowledged once it is safe.

A stream here reads and applies its requests as fast as they come, in order,
while a second task sends the answers, also in order, each once the log says
its push is safe (fsynced, or written with --no-durable). So the pushes of one
stream that arrive during an fsync share the next one, as do those of every
other stream: group commit, without a client waiting for the disk between two
of its own pushes. A pull in an Exchange is answered from the table as it is
when the pull is read, after the push before it; only the answer's sending
waits for that push to be safe.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from psclient.wire.proto import shard_pb2
from psserver.service import ShardServicer

_Answer = tuple["asyncio.Future[None] | None", Any]


class EndStream(Exception):
    """Raised by an answer's future: the stream ends with this status where that answer was due
    (a held pull given up: psserver.clocks)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


class _DrainingContext:
    """The stream's context, whose `abort` first sends every answer already queued: a
    push applied and logged before a bad request (or a stop) still gets its ack.
    `raw` is the context itself, for a task the drain waits for (it must not wait for the drain)."""

    def __init__(self, context: grpc.aio.ServicerContext, drain: Callable[[], Awaitable[None]]):
        self.raw = context
        self._drain = drain
        # What the sending task's own abort raised: grpc.aio wants that very exception again.
        self.ended: BaseException | None = None

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        await self._drain()
        if self.ended is not None:
            raise self.ended
        await self.raw.abort(code, details)

    async def end(self, code: grpc.StatusCode, details: str) -> None:
        """End the stream from the sending task."""
        try:
            await self.raw.abort(code, details)
        except BaseException as exc:
            self.ended = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class DurableShardServicer(ShardServicer):
    async def _pipelined(
        self,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        name: str,
        handle: Callable[[Any, grpc.aio.ServicerContext], Awaitable[_Answer]],
    ) -> None:
        answers: asyncio.Queue[_Answer | None] = asyncio.Queue()

        async def send() -> None:
            while (item := await answers.get()) is not None:
                safe, response = item
                if safe is not None:
                    try:
                        await safe
                    except OSError as exc:
                        await draining.end(
                            grpc.StatusCode.UNAVAILABLE, f"shard {self.shard} cannot write its log: {exc}"
                        )
                    except EndStream as exc:
                        await draining.end(exc.code, exc.details)
                await context.write(response)

        async def drain() -> None:
            if not sender.done():
                answers.put_nowait(None)
                await asyncio.wait([sender])

        draining = _DrainingContext(context, drain)
        sender = asyncio.get_running_loop().create_task(send())
        stream_context: Any = draining
        try:
            async for request in self._requests(requests, stream_context, name):
                if sender.done():
                    break
                answers.put_nowait(await handle(request, stream_context))
            answers.put_nowait(None)
            await sender  # raises what ended it (an abort, a broken stream)
        finally:
            if not sender.done():
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sender

    async def _push_answer(self, request: shard_pb2.PushRequest, context: grpc.aio.ServicerContext) -> _Answer:
        ack, safe = await self._apply_push(request, context)
        return safe, ack

    # Coroutines, not generators: grpc.aio then lets the handler write answers
    # itself (context.write), from the sending task.
    async def Push(  # type: ignore[override]
        self, request_iterator: AsyncIterator[shard_pb2.PushRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await self._pipelined(request_iterator, context, "PushRequest", self._push_answer)

    async def Exchange(  # type: ignore[override]
        self, request_iterator: AsyncIterator[shard_pb2.ExchangeRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await self._pipelined(request_iterator, context, "ExchangeRequest", self._exchange_answer)
