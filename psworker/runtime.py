"""The worker runtime: every user callback and every shard stream share one event loop.

Threads of a worker process:

- the I/O thread, running an asyncio event loop. On it run every shard's
  Exchange stream (grpc.aio) and the logic (`WorkerRuntime._steps`), which
  takes pull answers and input records, calls the user's callbacks, buffers
  the pulls and pushes they issue, one buffer per shard, and flushes each
  buffer as one message. An answer is decoded and handed to on_pull_recv on
  that one thread: no hand-over between threads, no lock on the way. The logic
  lets the streams run after it sends and at least every `YIELD_S`;
- the thread that called `run`, which only waits for the end;
- feeders (a file reader, or Feed RPCs), which block while the input queue is
  full: that is the backpressure that reaches the data source. They wake the
  loop when they add input.

Flow control. At most `pull_limit` pulls are unanswered; further pulls wait in a
queue and no input record is taken while the limit is reached. Answers are
always taken first, and the streams' readers never wait for anything, so there
is no cycle of waits: no deadlock, at any limit down to 1.

Batching. A shard's buffer is flushed when it holds `max_batch` keys, when it
has waited `linger_s`, or when the logic runs out of work, so the batch
size follows the load. A flush sends a shard's pushes and pulls in one
message on its one stream; the shard applies the pushes before it answers the
pulls, and takes a stream's messages in order, which gives read-your-writes.

Termination. A worker is finished when its input ended, `on_input_end`
returned, no pull is unanswered or queued, no callback is pending, and every
push is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from psclient._proto import shard_pb2
from psclient.codec import ALLOWED_KINDS, decode_rows, encode_keys, encode_values
from psclient.errors import JobFailed, ShardError, StreampsError
from psclient.partition import Id, check_id, shard_of
from psclient.shard_client import (
    CLOSE_TIMEOUT_S,
    DEFAULT_CONNECT_TIMEOUT_S,
    EventLoopThread,
    ShardConnection,
    check_layout,
)
from psworker.logic import WorkerLogic, pull_limit_of

log = logging.getLogger("streamps.worker")

# Without a user limit, a worker still bounds its unanswered pulls (memory).
DEFAULT_PULL_LIMIT = 65_536
DEFAULT_MAX_BATCH = 4_096
# How long a buffered pull or push may wait for company before it is sent.
DEFAULT_LINGER_S = 0.002
# Input queue bound, in chunks of records (a Feed message or a file read).
INPUT_CAPACITY_CHUNKS = 64
RECORD_REPR_LIMIT = 160
# After a failure, how long acknowledgements of the last pushes are awaited
# (from the shards whose streams still work: a failed one sends none).
DRAIN_TIMEOUT_S = 10.0
# The logic lets the loop run its streams at least this often while it is busy.
YIELD_S = 0.001
# How long an idle logic sleeps when nothing it waits for has a deadline.
IDLE_WAIT_S = 1.0


class State(enum.Enum):
    RUNNING = 1
    FINISHED = 2
    FAILED = 3


def short_repr(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= RECORD_REPR_LIMIT else text[: RECORD_REPR_LIMIT - 3] + "..."


class InvalidDelta(StreampsError, ValueError):
    """A pushed delta that no shard could apply: refused at `ps.push`, where the
    record that made it is known, rather than when its batch is sent."""


_INT64_MIN, _INT64_END = -(1 << 63), 1 << 63


def check_delta(param_id: Id, delta: Any) -> None:
    """Raise InvalidDelta unless `delta` is a finite number or numeric numpy array.

    This runs on every push, so the common kinds (an array, a Python number)
    take short paths.
    """
    cls = type(delta)
    if cls is np.ndarray:
        kind = delta.dtype.kind
        if kind in "fc":
            if np.isfinite(delta).all():
                return
            raise _non_finite(param_id, delta)
        if kind in ALLOWED_KINDS:
            return
        raise _not_numeric(param_id, delta)
    if cls is float:
        if math.isfinite(delta):
            return
        raise _non_finite(param_id, delta)
    if cls is int:
        if _INT64_MIN <= delta < _INT64_END:
            return
        raise InvalidDelta(f"push of {short_repr(delta)} (int) to id {param_id!r}: an int delta must fit in int64")
    if cls is bool:
        return
    if isinstance(delta, (str, bytes)) or delta is None:
        raise _not_numeric(param_id, delta)
    try:
        array = np.asarray(delta)  # numpy scalars, nested lists of numbers, ...
    except (TypeError, ValueError):  # ragged nesting, or an object numpy cannot take
        raise _not_numeric(param_id, delta) from None
    kind = array.dtype.kind
    if kind not in ALLOWED_KINDS:
        raise _not_numeric(param_id, delta)
    if kind in "fc" and not np.isfinite(array).all():
        raise _non_finite(param_id, delta)


def _what(delta: Any) -> str:
    dtype = getattr(delta, "dtype", None)
    return type(delta).__name__ if dtype is None else f"{type(delta).__name__} of dtype {dtype}"


def _not_numeric(param_id: Id, delta: Any) -> InvalidDelta:
    return InvalidDelta(
        f"push of {short_repr(delta)} ({_what(delta)}) to id {param_id!r}: "
        "a delta must be a number or a numeric numpy array"
    )


def _non_finite(param_id: Id, delta: Any) -> InvalidDelta:
    # The shard would refuse the whole batch holding it: refuse the one push instead.
    return InvalidDelta(
        f"push of {short_repr(delta)} ({_what(delta)}) to id {param_id!r}: "
        "a delta must be finite (NaN and Inf are refused)"
    )


class _Unreadable:
    """Stands in the input queue where a record could not be read."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


class _Client:
    """The `ParameterServerClient` handed to callbacks; every call is logic-thread only."""

    __slots__ = ("_runtime", "num_shards", "num_workers", "worker_index")

    def __init__(self, runtime: WorkerRuntime):
        self._runtime = runtime
        self.worker_index = runtime.worker_index
        self.num_workers = runtime.num_workers
        self.num_shards = len(runtime.servers)

    def pull(self, param_id: Id) -> None:
        self._runtime.pull(check_id(param_id))

    def push(self, param_id: Id, delta: Any) -> None:
        self._runtime.push(check_id(param_id), delta)

    def output(self, out: Any) -> None:
        self._runtime.output(out)


class WorkerRuntime:
    def __init__(
        self,
        logic: WorkerLogic,
        servers: Sequence[str],
        worker_index: int,
        num_workers: int,
        *,
        emit: Callable[[Any], None],
        pull_limit: int | None = None,
        on_error: str = "fail",
        position_name: str = "record",
        max_batch: int = DEFAULT_MAX_BATCH,
        linger_s: float = DEFAULT_LINGER_S,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    ):
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
        self.logic = logic
        self.servers = list(servers)
        self.worker_index = worker_index
        self.num_workers = num_workers
        self.worker_id = f"w{worker_index}-{uuid.uuid4().hex[:12]}"
        self.pull_limit = pull_limit or pull_limit_of(logic) or DEFAULT_PULL_LIMIT
        self.on_error = on_error
        self.position_name = position_name
        self.max_batch = max_batch
        self.linger_s = linger_s
        self.connect_timeout = connect_timeout
        self._emit = emit
        self.client = _Client(self)
        num_shards = len(self.servers)

        # Shared with feeders and readers: guarded by _cond.
        self._cond = threading.Condition()
        self._chunks: deque[list[tuple[int, Any]]] = deque()
        self._answers: deque[tuple[int, list[Id], list[Any]]] = deque()
        self._unacked = 0
        self._unacked_by_shard = [0] * num_shards
        self._failed_shards: set[int] = set()
        self._input_closed = False
        self._failure: str | None = None
        self.state = State.RUNNING

        # The loop thread only (the logic and the stream callbacks).
        self._chunk: list[tuple[int, Any]] = []
        self._chunk_pos = 0
        self._input_end_called = False
        self._in_flight = 0
        self._queued_pulls: deque[Id] = deque()
        self._pull_buffers: list[list[Id]] = [[] for _ in range(num_shards)]
        self._push_ids: list[list[Id]] = [[] for _ in range(num_shards)]
        self._push_deltas: list[list[Any]] = [[] for _ in range(num_shards)]
        self._buffered_since: float | None = None
        self._seqs = [0] * num_shards
        self._pulls_out = [0] * num_shards  # pull requests sent and not yet answered
        self._request_id = 0
        self._connections: list[ShardConnection] = []
        self._io: EventLoopThread | None = None
        self._wakeup = asyncio.Event()  # set on the loop when there is news for the logic
        self._sent = False  # a request was queued since the logic last let the loop run

        # Counters (read by Status from other threads; ints are updated atomically).
        self.started = time.monotonic()
        self.records_fed = 0
        self.records = 0
        self.records_failed = 0
        self.outputs = 0
        self.pulls = 0
        self.pushes = 0

    # -- feeding (any thread) ------------------------------------------------

    def feed(self, records: list[Any]) -> None:
        """Queue records (in order); blocks while the input queue is full."""
        with self._cond:
            first = self.records_fed + 1
            self.records_fed += len(records)
        self.feed_positioned(list(enumerate(records, start=first)))

    def feed_positioned(self, chunk: list[tuple[int, Any]]) -> None:
        """Queue (position, record) pairs; the position names the record in errors."""
        if not chunk:
            return
        with self._cond:
            while len(self._chunks) >= INPUT_CAPACITY_CHUNKS and self.state is State.RUNNING and not self._failure:
                self._cond.wait()
            if self._failure or self.state is not State.RUNNING:
                raise JobFailed(self._failure or f"worker {self.worker_index} is no longer taking input")
            if self._input_closed:
                raise JobFailed(f"worker {self.worker_index}: input already ended")
            self._chunks.append(chunk)
        self._wake_threadsafe()

    def end_input(self) -> None:
        with self._cond:
            self._input_closed = True
            self._cond.notify_all()
        self._wake_threadsafe()

    def input_error(self, message: str) -> None:
        """A record could not be read. It takes its place in the input order: the
        records before it are processed first, then it is skipped (on_error=skip)
        or stops the job."""
        self.feed_positioned([(0, _Unreadable(message))])

    def fail(self, message: str) -> None:
        with self._cond:
            if self._failure is None:
                self._failure = message
            self._cond.notify_all()
        self._wake_threadsafe()

    def _wake_threadsafe(self) -> None:
        """Wake the logic, from any thread."""
        io = self._io
        if io is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed: nobody to wake
                io.loop.call_soon_threadsafe(self._wakeup.set)

    # -- network callbacks (on the loop, between two steps of the logic) --------

    def _on_response(self, shard: int, response: shard_pb2.ExchangeResponse) -> None:
        if response.HasField("pull"):
            try:
                ids, values = decode_rows(response.pull.batches)
            except StreampsError as exc:
                self.fail(f"worker {self.worker_index}: malformed pull answer: {exc}")
                return
            self._answers.append((shard, ids, values))
        if response.HasField("ack"):
            self._unacked -= 1
            self._unacked_by_shard[shard] -= 1
        self._wakeup.set()

    def _on_shard_error(self, shard: int, error: ShardError) -> None:
        with self._cond:
            self._failed_shards.add(shard)
        self.fail(f"worker {self.worker_index}: {error}")

    # -- the ParameterServerClient calls (on the loop) ------------------------

    def pull(self, param_id: Id) -> None:
        self.pulls += 1
        if self._in_flight < self.pull_limit:
            self._in_flight += 1
            self._buffer_pull(param_id)
        else:
            self._queued_pulls.append(param_id)

    def _buffer_pull(self, param_id: Id) -> None:
        shard = shard_of(param_id, len(self._pull_buffers))
        buffer = self._pull_buffers[shard]
        buffer.append(param_id)
        if self._buffered_since is None:
            self._buffered_since = time.monotonic()
        if len(buffer) >= self.max_batch:
            self._flush_shard(shard)

    def push(self, param_id: Id, delta: Any) -> None:
        check_delta(param_id, delta)
        self.pushes += 1
        shard = shard_of(param_id, len(self._push_ids))
        ids = self._push_ids[shard]
        ids.append(param_id)
        self._push_deltas[shard].append(delta)
        if self._buffered_since is None:
            self._buffered_since = time.monotonic()
        if len(ids) >= self.max_batch:
            self._flush_shard(shard)

    def output(self, out: Any) -> None:
        self._emit(out)
        self.outputs += 1

    # -- batching ---------------------------------------------------------------

    def _flush_shard(self, shard: int) -> None:
        # The push and the pulls leave in one message; the shard applies the push
        # before it answers the pulls, which gives read-your-writes.
        push = pull = None
        ids = self._push_ids[shard]
        if ids:
            deltas = self._push_deltas[shard]
            self._push_ids[shard], self._push_deltas[shard] = [], []
            self._seqs[shard] += 1
            self._unacked += 1
            self._unacked_by_shard[shard] += 1
            push = shard_pb2.PushRequest(
                worker_id=self.worker_id, seq=self._seqs[shard], batches=encode_values(ids, deltas)
            )
        pulls = self._pull_buffers[shard]
        if pulls:
            self._pull_buffers[shard] = []
            self._request_id += 1
            self._pulls_out[shard] += 1
            pull = shard_pb2.PullRequest(request_id=self._request_id, keys=encode_keys(pulls))
        if push is not None or pull is not None:
            self._connections[shard].send(shard_pb2.ExchangeRequest(push=push, pull=pull))
            self._sent = True

    def _flush_all(self) -> None:
        if self._buffered_since is not None:
            self._buffered_since = None
            for shard in range(len(self._connections)):
                self._flush_shard(shard)

    def _flush_idle(self) -> float | None:
        """Flush what should leave now that the logic has nothing to do.

        Nagle's rule, per shard: buffers go out at once to a shard with nothing
        outstanding; a shard still answering earlier requests gets them when
        the linger ends, so that the answers coming back (which free pull
        slots) add to the batch meanwhile. Without this, a worker blocked at
        its pull limit sends one key per request and the requests queue up.
        Returns how long the rest may still wait, or None when nothing is left.
        """
        since = self._buffered_since
        if since is None:
            return None
        waited = time.monotonic() - since
        if waited >= self.linger_s:
            self._flush_all()
            return None
        waiting = False
        for shard in range(len(self._connections)):
            has_pulls = bool(self._pull_buffers[shard])
            if not has_pulls and not self._push_ids[shard]:
                continue
            idle_shard = self._pulls_out[shard] == 0 if has_pulls else self._unacked_by_shard[shard] == 0
            if idle_shard:
                self._flush_shard(shard)
            else:
                waiting = True
        if not waiting:
            self._buffered_since = None
            return None
        return self.linger_s - waited

    def _flush_if_lingering(self) -> None:
        since = self._buffered_since
        if since is not None and time.monotonic() - since >= self.linger_s:
            self._flush_all()

    # -- the logic (on the loop) -------------------------------------------------------

    def _call_user(
        self, name: str, fn: Callable[..., None], *args: Any, position: int | None = None, record: Any = None
    ) -> None:
        try:
            fn(*args)
        except Exception as exc:
            where = "" if position is None else f" ({self.position_name} {position}: {short_repr(record)})"
            what = str(exc) if isinstance(exc, InvalidDelta) else f"{type(exc).__name__}: {exc}"
            message = f"worker {self.worker_index} failed in {name}: {what}{where}"
            if self.on_error == "skip" and name in ("on_recv", "on_pull_recv"):
                self.records_failed += 1
                log.warning("%s; skipped", message, exc_info=True)
                return
            log.error("%s", message, exc_info=True)
            raise JobFailed(message) from exc

    def _unreadable(self, message: str) -> None:
        if self.on_error != "skip":
            raise JobFailed(f"worker {self.worker_index}: {message}")
        self.records_failed += 1
        log.warning("%s; skipped", message)

    def _next_record(self) -> tuple[int, Any] | None:
        if self._chunk_pos >= len(self._chunk):
            with self._cond:
                if not self._chunks:
                    return None
                self._chunk = self._chunks.popleft()
                self._chunk_pos = 0
                self._cond.notify_all()  # a feeder may wait for room
        item = self._chunk[self._chunk_pos]
        self._chunk_pos += 1
        return item

    def _deliver(self, answers: deque[tuple[int, list[Id], list[Any]]]) -> None:
        on_pull_recv, client = self.logic.on_pull_recv, self.client
        for shard, ids, values in answers:
            self._pulls_out[shard] -= 1
            for param_id, value in zip(ids, values, strict=True):
                self._in_flight -= 1
                if self._queued_pulls:
                    self._in_flight += 1
                    self._buffer_pull(self._queued_pulls.popleft())
                self._call_user("on_pull_recv", on_pull_recv, param_id, value, client)
            self._flush_if_lingering()

    def _input_may_flow(self) -> bool:
        return self._in_flight < self.pull_limit and not self._queued_pulls

    def _finished_locked(self) -> bool:
        return (
            self._input_end_called
            and not self._answers
            and self._in_flight == 0
            and not self._queued_pulls
            and self._buffered_since is None
            and self._unacked == 0
        )

    def _step(self) -> bool | float:
        """Do one unit of work. Return True when the worker is finished, False after
        some work, or how long to wait for news (an answer, input, a failure) when
        there is nothing to do."""
        if self._failure:
            raise JobFailed(self._failure)
        if self._answers:
            answers, self._answers = self._answers, deque()
            self._deliver(answers)
            return False
        if self._input_may_flow():
            item = self._next_record()
            if item is not None:
                position, record = item
                if isinstance(record, _Unreadable):
                    self._unreadable(record.message)
                    return False
                self.records += 1
                self._call_user("on_recv", self.logic.on_recv, record, self.client, position=position, record=record)
                self._flush_if_lingering()
                return False
            if not self._input_end_called and self._input_closed and not self._chunks:
                self._input_end_called = True
                self._call_user("on_input_end", self.logic.on_input_end, self.client)
                return False
        linger_left = self._flush_idle()
        with self._cond:
            if self._finished_locked():
                return True
            if not (
                self._answers
                or self._failure
                or (self._input_may_flow() and (self._chunks or (self._input_closed and not self._input_end_called)))
            ):
                return IDLE_WAIT_S if linger_left is None else linger_left
        return False

    async def _steps(self) -> None:
        """Step the logic until it is finished, letting the streams move in between."""
        wakeup = self._wakeup
        last_yield = time.monotonic()
        while True:
            wakeup.clear()  # set again by any news that arrives from here on
            result = self._step()
            if result is True:
                return
            if result is False:
                # Requests leave, and answers come in, only while the loop runs
                # the streams: let it after a send, and at least every YIELD_S.
                now = time.monotonic()
                if self._sent or now - last_yield >= YIELD_S:
                    self._sent = False
                    last_yield = now
                    await asyncio.sleep(0)
                continue
            self._sent = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(result):
                    await wakeup.wait()
            last_yield = time.monotonic()

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
        except BaseException:
            self._close_connections()
            raise

    def _close_connections(self) -> None:
        for connection in self._connections:
            connection.close()
        self._connections = []
        if self._io is not None:
            self._io.close()
            self._io = None

    def run(self) -> None:
        """Run the logic to the end; raise JobFailed with a one-line message on failure.

        The logic runs on the I/O loop's thread, beside the shard streams: an
        answer reaches on_pull_recv with no hand-over between threads. This
        thread only waits.
        """
        if not self._connections:
            try:
                self.connect()
            except ShardError as exc:
                with self._cond:
                    self._failure = self._failure or f"worker {self.worker_index}: {exc}"
                    self.state = State.FAILED
                raise JobFailed(self._failure) from exc
        assert self._io is not None
        done = asyncio.run_coroutine_threadsafe(self._run(), self._io.loop)
        try:
            done.result()
        except BaseException as exc:
            if not done.done():  # this thread was interrupted (KeyboardInterrupt): stop the logic
                self.fail(f"worker {self.worker_index}: runtime stopped: {type(exc).__name__}: {exc}")
                with contextlib.suppress(BaseException):  # it delivers the pushes made so far, then ends
                    done.result(timeout=DRAIN_TIMEOUT_S + CLOSE_TIMEOUT_S)
            raise
        finally:
            self._close_connections()

    async def _run(self) -> None:
        try:
            self._call_user("open", self.logic.open)
            await self._steps()
            self._call_user("close", self.logic.close)
        except ShardError as exc:
            await self._finish(State.FAILED, f"worker {self.worker_index}: {exc}")
            raise JobFailed(self._failure) from exc
        except JobFailed as exc:
            await self._drain_pushes()
            await self._finish(State.FAILED, str(exc))
            raise
        except BaseException as exc:
            await self._finish(
                State.FAILED, f"worker {self.worker_index}: runtime stopped: {type(exc).__name__}: {exc}"
            )
            raise
        await self._finish(State.FINISHED, None)

    async def _drain_pushes(self) -> None:
        """On a failure in user code or input, still deliver the pushes of the records
        processed before it, so the model reflects exactly those records."""
        shards = range(len(self._connections))

        def drained() -> bool:
            return all(self._unacked_by_shard[s] == 0 or s in self._failed_shards for s in shards)

        try:
            for shard in shards:
                with self._cond:
                    failed = shard in self._failed_shards
                if not failed:
                    self._push_only(shard)
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while not drained() and (left := deadline - time.monotonic()) > 0:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._wakeup.wait()
        except Exception:  # the shards may be the reason for the failure
            log.debug("draining pushes after a failure failed", exc_info=True)

    def _push_only(self, shard: int) -> None:
        pulls, self._pull_buffers[shard] = self._pull_buffers[shard], []
        self._flush_shard(shard)
        self._pull_buffers[shard] = pulls

    async def _finish(self, state: State, failure: str | None) -> None:
        with self._cond:
            if failure and not self._failure:
                self._failure = failure
            self.state = state
            self._cond.notify_all()
        for connection in self._connections:
            await connection.aclose()

    @property
    def error(self) -> str | None:
        return self._failure

    def metrics_snapshot(self) -> dict[str, int]:
        """Every counter and queue depth, for the metrics endpoint."""
        with self._cond:
            depths = {"input_queue_chunks": len(self._chunks), "answer_queue_chunks": len(self._answers)}
        return {
            "records": self.records,
            "records_failed": self.records_failed,
            "outputs": self.outputs,
            "pulls": self.pulls,
            "pushes": self.pushes,
            **self.snapshot_counters(),
            **depths,
        }

    def snapshot_counters(self) -> dict[str, int]:
        with self._cond:
            return {
                "pulls_in_flight": self._in_flight,
                "pulls_queued": len(self._queued_pulls),
                "pushes_unacked": self._unacked,
            }
