"""One Exchange stream to one shard, on an event loop shared by every stream of a process.

`ShardConnection` keeps the stream open on an `EventLoopThread` and hands every
response to a callback there: the asynchronous core the worker runtime builds on.
After the stream broke, `reopen` replaces it with a new one to the same address;
what to send on it again is the caller's business.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpc

from psclient.errors import ShardError
from psclient.rpc.errors import WRITE_FAILED, StreamBroken, stream_error
from psclient.rpc.layout import fetch_info
from psclient.rpc.security import Security
from psclient.rpc.security import current as current_security
from psclient.rpc.serving import CHANNEL_OPTIONS, DEFAULT_CONNECT_TIMEOUT_S, ready_channel
from psclient.wire.proto import shard_pb2, shard_pb2_grpc

_END = object()
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # the stubs predate it
T = TypeVar("T")
# How long closing a stream waits for the answers to what was sent on it.
CLOSE_TIMEOUT_S = 5.0
# After a write failed because the peer ended the stream, how long to wait for the
# peer's own status to replace gRPC's.
PEER_STATUS_WAIT_S = 1.0


class EventLoopThread:
    """An asyncio event loop on its own daemon thread: where a process's shard streams live.

    Every stream of a worker shares it, so all of the worker's network I/O runs
    on one thread, with no thread per stream and no consumer thread per request
    iterator (each of which took the GIL for every message).
    """

    def __init__(self, name: str = "shard-io"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coroutine` on the loop and wait for its result (from another thread)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self.loop.close()


def _now(coroutine: Coroutine[Any, Any, T]) -> T | None:
    """The result of a coroutine that finishes without waiting, else None (a call's
    code() and details() once it is done)."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    return None


class _Status(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class ShardConnection:
    """One Exchange stream to one shard, run on an `EventLoopThread`.

    `send` queues a request and returns at once; call it on the loop. Each
    response goes to `on_response` and a failure of the stream to `on_error`,
    both called on the loop's thread: they must not block. `info` is the
    shard's Info as it was on connect: its index and count, which the caller
    checks against the server list (check_layout).
    """

    def __init__(
        self,
        shard: int,
        address: str,
        io: EventLoopThread,
        *,
        on_response: Callable[[shard_pb2.ExchangeResponse], None],
        on_error: Callable[[ShardError], None],
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        security: Security | None = None,
    ):
        self.shard = shard
        self.address = address
        self._io = io
        self._on_response, self._on_error = on_response, on_error
        self._security = security or current_security()
        # Reachability, TLS and the layout are checked on a blocking channel, whose
        # errors name the cause; the stream then gets its own channel on the loop.
        channel = ready_channel(address, self.describe(), connect_timeout, self._security)
        try:
            self.info = fetch_info(channel, self.describe(), connect_timeout)
        finally:
            channel.close()
        self._outbox: deque[Any] = deque()
        self._closing = False
        self._channel: grpc.aio.Channel | None = None
        io.run(self._open(), timeout=connect_timeout)

    async def _open(self) -> None:
        self._start(self._security.aio_channel(self.address, CHANNEL_OPTIONS))

    def _start(self, channel: grpc.aio.Channel) -> None:
        """Open the Exchange stream on `channel`, with its writer and reader."""
        self._channel = channel
        self._wake = asyncio.Event()
        stub: Any = shard_pb2_grpc.ParameterShardStub(channel)  # typed for blocking channels
        call = self._call = stub.Exchange(metadata=self._security.call_metadata())
        self._first_status: _Status | None = None
        call.add_done_callback(self._on_done)
        self._writer = asyncio.create_task(self._write(call, self._wake))
        self._reader = asyncio.create_task(self._read(call))

    def describe(self) -> str:
        return f"shard {self.shard} at {self.address}"

    def send(self, request: shard_pb2.ExchangeRequest) -> None:
        """Queue `request` (on the loop's thread); it is written after every request queued before it."""
        self._put(request)

    def _put(self, request: Any) -> None:
        self._outbox.append(request)
        self._wake.set()

    async def reopen(self, timeout: float) -> shard_pb2.InfoResponse:
        """After the stream broke: a new stream to the same address, and the shard's Info now.

        A new channel each time, so that gRPC's own reconnect backoff (which grows
        to minutes) never delays an attempt. Raises grpc.RpcError if the shard
        does not answer Info within `timeout`. Requests queued and not yet written
        are dropped: the caller sends again whatever the shard has not answered,
        once it has checked the Info.
        """
        await self._drop_stream()
        channel = self._security.aio_channel(self.address, CHANNEL_OPTIONS)
        try:
            stub: Any = shard_pb2_grpc.ParameterShardStub(channel)
            info = await stub.Info(shard_pb2.InfoRequest(), timeout=timeout, metadata=self._security.call_metadata())
        except BaseException:
            await channel.close(None)
            raise
        self.info = info
        self._outbox.clear()
        self._start(channel)
        return info

    async def _drop_stream(self) -> None:
        if self._channel is None:
            return
        # The old reader reports nothing from here on: it is no longer this connection's stream.
        call, self._call = self._call, None
        call.cancel()
        self._writer.cancel()
        self._reader.cancel()
        # Let them end now: a task left pending when the loop stops is reported as destroyed.
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)
        channel, self._channel = self._channel, None
        await channel.close(None)

    async def _write(self, call: Any, wake: asyncio.Event) -> None:
        outbox = self._outbox
        try:
            while True:
                await wake.wait()
                wake.clear()
                while outbox:
                    request = outbox.popleft()
                    if request is _END:
                        await call.done_writing()
                        return
                    await call.write(request)
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass  # the stream failed: its reader reports why

    async def _read(self, call: Any) -> None:
        def current() -> bool:
            return call is self._call and not self._closing

        try:
            while (response := await call.read()) is not _EOF:
                if call is not self._call:  # a stream replaced or dropped: its answers go again on the next
                    return
                self._on_response(response)
        except asyncio.CancelledError:
            if current():
                self._on_error(ShardError(f"{self.describe()}: the stream was cancelled"))
            return
        except grpc.RpcError as exc:
            status = await self._peer_status(call, exc)
            if current():
                self._on_error(stream_error(self.describe(), status))
            return
        except Exception as exc:  # a bug in a callback must still surface
            self._on_error(ShardError(f"{self.describe()}: {type(exc).__name__}: {exc}"))
            return
        if current():
            self._on_error(StreamBroken(self.describe(), "closed its stream"))

    def _on_done(self, call: Any) -> None:
        # The call's first status, kept before a failing write can replace it.
        if call is not self._call:
            return
        code = _now(call.code())
        if code is not None:
            self._first_status = _Status(code, _now(call.details()) or "")

    async def _peer_status(self, call: Any, exc: grpc.RpcError) -> Any:
        """The status the shard ended the stream with, rather than the one gRPC makes up.

        A write that fails because the shard just ended the stream (a shard that
        stops, or dies) makes gRPC set the call's status to INTERNAL "Internal
        error from Core": over the shard's own status if that came first (kept
        by `_on_done`), or before it, which then replaces it.
        """
        if exc.code() != grpc.StatusCode.INTERNAL or exc.details() != WRITE_FAILED:
            return exc
        first = self._first_status
        if first is not None and first.code() != grpc.StatusCode.INTERNAL:
            return first
        deadline = time.monotonic() + PEER_STATUS_WAIT_S
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            if await call.code() != grpc.StatusCode.INTERNAL:
                return _Status(await call.code(), await call.details())
        return exc

    def close(self) -> None:
        """End the stream after what was sent (waiting briefly for its answers), then
        drop the channel. Call from outside the loop; on it, await `aclose`."""
        if self._closing:
            return
        with contextlib.suppress(Exception):  # the loop is gone or stuck: nothing left to release in order
            self._io.run(self.aclose(), timeout=CLOSE_TIMEOUT_S + 1.0)

    async def aclose(self, *, wait: bool = True) -> None:
        """End the stream; with `wait`, after the answers to what was sent on it (a shard
        given up on owes none worth waiting for)."""
        if self._closing:
            return
        self._closing = True
        if self._channel is None:  # between two streams: nothing is open
            return
        if wait:
            self._put(_END)
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), CLOSE_TIMEOUT_S)
        await self._drop_stream()
