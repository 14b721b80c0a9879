"""Client side of the ParameterShard service.

`ShardConnection` keeps one Exchange stream open to one shard on a shared
event loop (`EventLoopThread`) and hands every response to a callback there:
the asynchronous core the worker runtime builds on. `ShardGroup` is the blocking
batch API (pull a list of ids, push a list of deltas) over a Pull and a Push
stream per shard, slicing each batch by owning shard and sending the slices
concurrently.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from psclient.errors import ShardError
from psclient.rpc.security import Security
from psclient.rpc.security import current as current_security
from psclient.rpc.serving import CHANNEL_OPTIONS, DEFAULT_CONNECT_TIMEOUT_S, open_channel
from psclient.wire.codec import (
    INT_IDS_DTYPE,
    decode_batch,
    decode_rows,
    encode_id_array,
    encode_keys,
    encode_values,
)
from psclient.wire.partition import Id, check_id, split_by_shard, split_int_ids
from psclient.wire.proto import shard_pb2, shard_pb2_grpc, tensor_pb2

_END = object()
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # the stubs predate it
T = TypeVar("T")
# How long closing a stream waits for the answers to what was sent on it.
CLOSE_TIMEOUT_S = 5.0
# What grpc.aio reports for a write to a stream its peer has just ended, and how
# long to wait for the peer's own status to replace it.
_WRITE_FAILED = "Internal error from Core"
PEER_STATUS_WAIT_S = 1.0


class _RequestStream:
    """The request side of a streaming call: gRPC's sender thread iterates it."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def put(self, request: Any) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(_END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            request = self._queue.get()
            if request is _END:
                return
            yield request


def describe_rpc_error(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'UNKNOWN'}: {details}"


# A shard that stops ends its open streams with UNAVAILABLE and details ending so.
SHUTTING_DOWN = "is shutting down"


def shutting_down_details(shard: int) -> str:
    return f"shard {shard} {SHUTTING_DOWN}"


def stream_error(what: str, exc: grpc.RpcError) -> ShardError:
    """A failed stream to the shard `what` as one line; a clean stop of the shard says just that."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    if code == grpc.StatusCode.UNAVAILABLE and details.endswith(SHUTTING_DOWN):
        return ShardError(f"{what} {SHUTTING_DOWN}")
    return ShardError(f"{what} failed: {describe_rpc_error(exc)}")


def _retry_reason(exc: grpc.RpcError, what: str) -> str:
    """Why a failed health check is worth repeating ("refused", "unresolved"), or raise.

    A refused connection is a server still starting, and a name that does not
    resolve yet is one Kubernetes has not published yet (it publishes a pod's
    DNS name only once the pod is ready): both heal by waiting. Any other failure
    to connect (a TLS handshake that fails, plaintext against TLS) will not, so
    it is reported at once.
    """
    detail = exc.details() or ""
    code = exc.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "refused"
    if code == grpc.StatusCode.UNAVAILABLE:
        if "resolv" in detail.lower():  # "errors resolving H:P", "DNS resolution failed for H:P"
            return "unresolved"
        if "refused" in detail.lower():
            return "refused"
        raise ShardError(
            f"{what}: cannot connect ({detail}); check that both sides agree on TLS "
            "(--tls-ca/--tls-cert/--tls-key) and the token"
        ) from None
    raise ShardError(f"{what}: {describe_rpc_error(exc)}") from None


def _host(address: str) -> str:
    target = address.split("///")[-1]  # dns:///name:port
    host, colon, port = target.rpartition(":")
    return host.strip("[]") if colon and port.isdigit() else target


def ready_channel(address: str, what: str, timeout: float, security: Security | None = None) -> grpc.Channel:
    """A channel to `address` whose server answers its health check.

    Waits up to `timeout` for a server that refuses connections or whose name
    does not resolve yet; raises ShardError naming `what` and the reason. A
    health Check (rather than channel_ready_future) leaves no polling thread
    behind that could trip over the channel being closed later.
    """
    deadline = time.monotonic() + timeout
    pause = 0.05
    channel = open_channel(address, security)
    try:
        while True:
            try:
                health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=max(deadline - time.monotonic(), 0.01)
                )
                return channel
            except grpc.RpcError as exc:
                reason = _retry_reason(exc, what)
            left = deadline - time.monotonic()
            if left <= 0:
                if reason == "unresolved":
                    raise ShardError(f"{what}: the name {_host(address)} did not resolve within {timeout:g} s")
                raise ShardError(f"{what} is unreachable (no answer after {timeout:g} s)")
            time.sleep(min(pause, left))
            pause = min(pause * 2, 1.0)
            if reason == "unresolved":
                # A channel whose lookup failed retries it on its own backoff, which
                # grows to minutes; a new channel looks the name up again now.
                channel.close()
                channel = open_channel(address, security)
    except BaseException:
        channel.close()
        raise


def fetch_info(channel: grpc.Channel, what: str, timeout: float) -> shard_pb2.InfoResponse:
    """The shard's Info (its index and count among others); ShardError if it has none."""
    try:
        return shard_pb2_grpc.ParameterShardStub(channel).Info(shard_pb2.InfoRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            raise ShardError(f"{what} is not a shard (it does not serve the ParameterShard service)") from None
        raise ShardError(f"{what}: {describe_rpc_error(exc)}") from None


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def layout_problems(
    servers: Sequence[str], infos: Sequence[shard_pb2.InfoResponse | None], listed_as: str = "servers"
) -> list[tuple[int, str]]:
    """(place in `servers`, message) for every shard whose Info disagrees with its place.

    Ids are routed by their place in the list, modulo its length: a shard started
    with another index or count would accept some pushes and refuse others as
    not its own, mid-job. Wrong counts come first, then two shards claiming one
    index, then shards listed out of order: the first is the likeliest cause.
    `None` stands for a shard that did not answer.
    """
    count = len(servers)
    listed = f"{count} address" if count == 1 else f"{count} addresses"
    known = [(place, address, info) for place, (address, info) in enumerate(zip(servers, infos, strict=True)) if info]
    problems = [
        (place,
         f"{listed_as} lists {listed} but the shard at {address} says it is shard {info.shard} of {info.num_shards}")
        for place, address, info in known
        if info.num_shards != count
    ]  # fmt: skip
    claimed: dict[int, str] = {}
    for place, address, info in known:
        if info.num_shards != count:
            continue
        if info.shard in claimed:
            message = (
                f"{listed_as}: the shards at {claimed[info.shard]} and {address} both say they are shard "
                f"{info.shard} of {count} (each shard needs its own --shard)"
            )
            problems.append((place, message))
        claimed.setdefault(info.shard, address)
    reported = {place for place, _ in problems}
    problems.extend(
        (place, f"{listed_as}: the {_ordinal(place + 1)} address {address} is shard {info.shard} of {count}, "
                f"expected shard {place}")
        for place, address, info in known
        if place not in reported and info.num_shards == count and info.shard != place
    )  # fmt: skip
    return problems


def check_layout(servers: Sequence[str], infos: Sequence[shard_pb2.InfoResponse], listed_as: str = "servers") -> None:
    """Raise ShardError naming the first shard whose Info disagrees with its place in `servers`."""
    problems = layout_problems(servers, infos, listed_as)
    if problems:
        raise ShardError(problems[0][1])


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
        security = security or current_security()
        # Reachability, TLS and the layout are checked on a blocking channel, whose
        # errors name the cause; the stream then gets its own channel on the loop.
        channel = ready_channel(address, self.describe(), connect_timeout, security)
        try:
            self.info = fetch_info(channel, self.describe(), connect_timeout)
        finally:
            channel.close()
        self._outbox: deque[Any] = deque()
        self._closing = False
        io.run(self._open(security), timeout=connect_timeout)

    async def _open(self, security: Security) -> None:
        self._channel = security.aio_channel(self.address, CHANNEL_OPTIONS)
        self._wake = asyncio.Event()
        stub: Any = shard_pb2_grpc.ParameterShardStub(self._channel)  # typed for blocking channels
        self._call = stub.Exchange(metadata=security.call_metadata())
        self._first_status: _Status | None = None
        self._call.add_done_callback(self._on_done)
        self._writer = asyncio.create_task(self._write())
        self._reader = asyncio.create_task(self._read())

    def describe(self) -> str:
        return f"shard {self.shard} at {self.address}"

    def send(self, request: shard_pb2.ExchangeRequest) -> None:
        """Queue `request` (on the loop's thread); it is written after every request queued before it."""
        self._put(request)

    def _put(self, request: Any) -> None:
        self._outbox.append(request)
        self._wake.set()

    async def _write(self) -> None:
        call, outbox, wake = self._call, self._outbox, self._wake
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

    async def _read(self) -> None:
        call = self._call
        try:
            while (response := await call.read()) is not _EOF:
                self._on_response(response)
        except asyncio.CancelledError:
            if not self._closing:
                self._on_error(ShardError(f"{self.describe()}: the stream was cancelled"))
            return
        except grpc.RpcError as exc:
            if not self._closing:
                self._on_error(stream_error(self.describe(), await self._peer_status(exc)))
            return
        except Exception as exc:  # a bug in a callback must still surface
            self._on_error(ShardError(f"{self.describe()}: {type(exc).__name__}: {exc}"))
            return
        if not self._closing:
            self._on_error(ShardError(f"{self.describe()} closed its stream"))

    def _on_done(self, call: Any) -> None:
        # The call's first status, kept before a failing write can replace it.
        code = _now(call.code())
        if code is not None:
            self._first_status = _Status(code, _now(call.details()) or "")

    async def _peer_status(self, exc: grpc.RpcError) -> Any:
        """The status the shard ended the stream with, rather than the one gRPC makes up.

        A write that fails because the shard just ended the stream (a shard that
        stops, or dies) makes gRPC set the call's status to INTERNAL "Internal
        error from Core": over the shard's own status if that came first (kept
        by `_on_done`), or before it, which then replaces it.
        """
        if exc.code() != grpc.StatusCode.INTERNAL or exc.details() != _WRITE_FAILED:
            return exc
        first = self._first_status
        if first is not None and first.code() != grpc.StatusCode.INTERNAL:
            return first
        deadline = time.monotonic() + PEER_STATUS_WAIT_S
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            if await self._call.code() != grpc.StatusCode.INTERNAL:
                return _Status(await self._call.code(), await self._call.details())
        return exc

    def close(self) -> None:
        """End the stream after what was sent (waiting briefly for its answers), then
        drop the channel. Call from outside the loop; on it, await `aclose`."""
        if self._closing:
            return
        with contextlib.suppress(Exception):  # the loop is gone or stuck: nothing left to release in order
            self._io.run(self.aclose(), timeout=CLOSE_TIMEOUT_S + 1.0)

    async def aclose(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._put(_END)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._reader), CLOSE_TIMEOUT_S)
        self._call.cancel()
        self._writer.cancel()
        await self._channel.close(None)


class _BlockingStreams:
    """Pull and Push streams to one shard whose answers the calling thread reads itself.

    Reading in the caller saves the hand-over to a reader thread and back, which
    is most of a blocking call's latency on loopback.
    """

    def __init__(self, shard: int, address: str, connect_timeout: float, security: Security | None):
        self.shard = shard
        self.address = address
        self._channel = ready_channel(address, self.describe(), connect_timeout, security)
        try:
            self.info = fetch_info(self._channel, self.describe(), connect_timeout)
        except ShardError:
            self._channel.close()
            raise
        stub = shard_pb2_grpc.ParameterShardStub(self._channel)
        self._pulls, self._pushes = _RequestStream(), _RequestStream()
        self._pull_answers = stub.Pull(iter(self._pulls))
        self._push_acks = stub.Push(iter(self._pushes))

    def describe(self) -> str:
        return f"shard {self.shard} at {self.address}"

    def send_pull(self, request: shard_pb2.PullRequest) -> None:
        self._pulls.put(request)

    def send_push(self, request: shard_pb2.PushRequest) -> None:
        self._pushes.put(request)

    def _next(self, answers: Any) -> Any:
        try:
            return next(answers)
        except grpc.RpcError as exc:
            raise stream_error(self.describe(), exc) from None
        except StopIteration:
            raise ShardError(f"{self.describe()} closed its stream") from None

    def pull_answer(self) -> shard_pb2.PullResponse:
        return self._next(self._pull_answers)

    def push_ack(self) -> shard_pb2.PushAck:
        return self._next(self._push_acks)

    def close(self) -> None:
        self._pulls.close()
        self._pushes.close()
        self._pull_answers.cancel()
        self._push_acks.cancel()
        self._channel.close()


class ShardGroup:
    """Blocking batch pulls and pushes against every shard of a cluster.

    A call sends its slice to every shard it touches at once, then collects the
    answers. Calls from several threads take turns (one lock). A pull after a
    push through the same group sees it. A shard that fails or goes away makes
    the call raise ShardError (a silent peer is found by the channel keepalive).
    Opening the group raises ShardError if a shard's own index or count
    disagrees with its place in `servers` (`servers_label` names that list).
    """

    def __init__(
        self,
        servers: Sequence[str],
        *,
        worker_id: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        security: Security | None = None,
        servers_label: str = "servers",
    ):
        self.servers = list(servers)
        self.worker_id = worker_id or f"client-{uuid.uuid4().hex[:12]}"
        self._lock = threading.Lock()
        self._request_ids = itertools.count(1)
        self._seqs = [0] * len(servers)
        self.connections: list[_BlockingStreams] = []
        try:
            for shard, address in enumerate(servers):
                self.connections.append(_BlockingStreams(shard, address, connect_timeout, security))
            check_layout(self.servers, [c.info for c in self.connections], servers_label)
        except BaseException:
            self.close()
            raise

    @property
    def num_shards(self) -> int:
        return len(self.servers)

    def _pull(self, slices: list[tuple[int, tensor_pb2.ParamBatch]]) -> list[shard_pb2.PullResponse]:
        """Send one pull per (shard, keys) and return the answers in the same order."""
        with self._lock:
            for shard, keys in slices:
                self.connections[shard].send_pull(
                    shard_pb2.PullRequest(
                        request_id=next(self._request_ids),
                        keys=keys,
                        worker_id=self.worker_id,
                        after_seq=self._seqs[shard],
                    )
                )
            return [self.connections[shard].pull_answer() for shard, _ in slices]

    def _push(self, slices: list[tuple[int, list[tensor_pb2.ParamBatch]]]) -> None:
        with self._lock:
            for shard, batches in slices:
                self._seqs[shard] += 1
                self.connections[shard].send_push(
                    shard_pb2.PushRequest(worker_id=self.worker_id, seq=self._seqs[shard], batches=batches)
                )
            for shard, _ in slices:
                self.connections[shard].push_ack()

    def pull(self, ids: Sequence[Id]) -> list[Any]:
        """Values of `ids` in the order given (arrays, or Python scalars)."""
        ids = [check_id(i) for i in ids]
        slices = [
            (shard, encode_keys([ids[p] for p in positions]))
            for shard, positions in enumerate(split_by_shard(ids, self.num_shards))
            if positions
        ]
        by_id: dict[Id, Any] = {}
        for answer in self._pull(slices):
            got_ids, values = decode_rows(answer.batches)
            by_id.update(zip(got_ids, values, strict=True))
        return [by_id[i] for i in ids]

    def push(self, ids: Sequence[Id], deltas: Sequence[Any]) -> None:
        """Apply deltas and wait until every shard acknowledged them."""
        ids = [check_id(i) for i in ids]
        if len(ids) != len(deltas):
            raise ValueError(f"{len(ids)} ids but {len(deltas)} deltas")
        self._push(
            [
                (shard, encode_values([ids[p] for p in positions], [deltas[p] for p in positions]))
                for shard, positions in enumerate(split_by_shard(ids, self.num_shards))
                if positions
            ]
        )

    # -- vectorized int-id batches: no per-key Python work ---------------------

    def _split_ints(self, ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(shard, positions) of every shard that owns some of `ids`."""
        if self.num_shards == 1:
            return [(0, np.arange(len(ids)))]
        return split_int_ids(ids, self.num_shards)

    def pull_array(self, ids: np.ndarray) -> np.ndarray:
        """Values of int `ids` stacked in one array, row i for ids[i].

        Every pulled parameter must share one dtype and shape (one table per shard).
        """
        ids = np.ascontiguousarray(ids, dtype=INT_IDS_DTYPE)
        split = self._split_ints(ids)
        answers = self._pull([(shard, encode_id_array(ids[positions])) for shard, positions in split])
        result: np.ndarray | None = None
        for (_, positions), answer in zip(split, answers, strict=True):
            if len(answer.batches) != 1:
                raise ShardError("pulled parameters differ in dtype or shape; use pull() for those")
            values = decode_batch(answer.batches[0], with_values=True).values
            assert values is not None
            if result is None:
                result = np.empty((len(ids), *values.shape[1:]), dtype=values.dtype)
            result[positions] = values
        return result if result is not None else np.empty((0,))

    def push_array(self, ids: np.ndarray, deltas: np.ndarray) -> None:
        """Apply deltas[i] to int ids[i]; returns once every shard acknowledged."""
        ids = np.ascontiguousarray(ids, dtype=INT_IDS_DTYPE)
        deltas = np.asarray(deltas)
        if deltas.shape[:1] != ids.shape:
            raise ValueError(f"{len(ids)} ids but deltas of shape {deltas.shape}")
        self._push(
            [
                (
                    shard,
                    [encode_id_array(ids[positions], deltas[positions])],
                )
                for shard, positions in self._split_ints(ids)
            ]
        )

    def close(self) -> None:
        for connection in self.connections:
            connection.close()
        self.connections = []

    def __enter__(self) -> ShardGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
