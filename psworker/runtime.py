"""The worker runtime: every user callback and every shard stream share one event loop.

Threads of a worker process:

- the I/O thread, running an asyncio event loop. On it run every shard's
  Exchange stream (grpc.aio) and the logic (psworker/loop.py), which
  takes pull answers and input records, calls the user's callbacks, buffers
  the pulls and pushes they issue, one buffer per shard, and flushes each
  buffer as one message. An answer is decoded and handed to on_pull_recv on
  that one thread: no hand-over between threads, no lock on the way. The logic
  lets the streams run after it sends and at least every `YIELD_S`;
- the thread that called `run`, which only waits for the end;
- feeders (a file reader, or Feed RPCs), which block while the input queue is
  full: that is the backpressure that reaches the data source. They wake the
  loop when they add input.

Flow control, batching and input: psworker/pulls.py (the pull limit),
psworker/batching.py (per-shard buffers, one message per flush, Nagle's rule),
psworker/input_queue.py (records from feeders, backpressure). Answers are
always taken first, and the streams' readers never wait for anything, so
there is no cycle of waits: no deadlock, at any pull limit down to 1. A logic
that defines `on_pull_recv_many` gets each answered batch in one call.

Termination. A worker is finished when its input ended, `on_input_end`
returned, no pull is unanswered or queued, no callback is pending, and every
push is acknowledged.

Shard restarts. A stream that broke (the shard stopped, died, or the
connection dropped) is opened again to the same address, with exponential
backoff and jitter; then every message the shard had not answered goes again,
in the order it was sent (psworker/batching.py keeps them): each push with its
own seq, which the shard's watermark for this worker makes safe, and each pull
behind the pushes it followed. While a shard is away the logic takes no new
input. A shard that has not answered for `shard_timeout` seconds, whether its
stream broke or stalled, fails the worker with one line naming it. A refusal
(a bad request, a bad token, a shard with another place in the layout) fails
it at once: sending again would only be refused again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from psclient.errors import JobFailed, ShardError, StreampsError
from psclient.rpc.connection import CLOSE_TIMEOUT_S, EventLoopThread, ShardConnection
from psclient.rpc.errors import StreamBroken, is_transient, unreachable_reason
from psclient.rpc.layout import check_layout, info_error
from psclient.rpc.serving import DEFAULT_CONNECT_TIMEOUT_S
from psclient.wire.codec import decode_batch, decode_rows
from psclient.wire.partition import Id, check_id
from psclient.wire.proto import shard_pb2
from psworker.batching import ShardBuffers
from psworker.checks import check_delta, check_deltas, id_groups
from psworker.input_queue import InputQueue
from psworker.logic import WorkerLogic, pull_limit_of, receives_many, unwrapped
from psworker.loop import Answer, LogicLoop
from psworker.pulls import PullWindow

log = logging.getLogger("streamps.worker")

# Without a user limit, a worker still bounds its unanswered pulls (memory).
DEFAULT_PULL_LIMIT = 65_536
DEFAULT_MAX_BATCH = 4_096
# How long a buffered pull or push may wait for company before it is sent.
DEFAULT_LINGER_S = 0.002
# Input queue bound, in chunks of records (a Feed message or a file read).
INPUT_CAPACITY_CHUNKS = 64
# After a failure, how long acknowledgements of the last pushes are awaited
# (from the shards whose streams still work: a failed one sends none).
DRAIN_TIMEOUT_S = 10.0
# How long a worker waits for a shard that does not answer (its stream broke or
# stalled) before it fails; 0: fail at once when a stream breaks.
DEFAULT_SHARD_TIMEOUT_S = 60.0
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


def new_job_id() -> str:
    """A job id for a worker started without one: its own, so that two jobs sharing
    shards never share a worker id (and so a watermark)."""
    return uuid.uuid4().hex[:12]


class State(enum.Enum):
    RUNNING = 1
    FINISHED = 2
    FAILED = 3


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

    def pull_many(self, ids: Any) -> None:
        self._runtime.pull_many(ids)

    def push_many(self, ids: Any, deltas: Any) -> None:
        self._runtime.push_many(ids, deltas)

    def output(self, out: Any) -> None:
        self._runtime.output(out)


class WorkerRuntime(LogicLoop):
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
        shard_timeout: float = DEFAULT_SHARD_TIMEOUT_S,
        job_id: str | None = None,
    ):
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
        if shard_timeout < 0:
            raise ValueError(f"shard_timeout must be >= 0, not {shard_timeout!r}")
        self.logic = logic
        # Callbacks go straight to the user's logic: a pull-limit wrapper only passes them on.
        self._callbacks = unwrapped(logic)
        self.servers = list(servers)
        self.worker_index = worker_index
        self.num_workers = num_workers
        # Named by its job and index, not by the process, so that the shards know a worker
        # across its restarts (connect refuses one whose id they already hold pushes of).
        self.job_id = job_id or new_job_id()
        self.worker_id = f"{self.job_id}-w{worker_index}"
        self.pull_limit = pull_limit or pull_limit_of(logic) or DEFAULT_PULL_LIMIT
        self.on_error = on_error
        self.position_name = position_name
        self.connect_timeout = connect_timeout
        self.shard_timeout = shard_timeout
        self._emit = emit
        self._receives_many = receives_many(logic)
        self.client = _Client(self)
        num_shards = len(self.servers)

        # Fed from other threads (a file reader, Feed RPCs).
        self.inputs = InputQueue(worker_index, INPUT_CAPACITY_CHUNKS, self._wake_threadsafe)
        self._failure: str | None = None
        self.state = State.RUNNING

        # The loop thread only (the logic and the stream callbacks). Status and the
        # metrics read the counters below from other threads without a lock: each
        # read is of one int or one length, so it is at worst a moment old.
        # (shard, ids, values) per answer, decoded on arrival: lists of ids and of
        # user-facing values, or for a logic with on_pull_recv_many, ids None and the batches.
        self._answers: deque[Answer] = deque()
        self._failed_shards: set[int] = set()
        self._input_end_called = False
        self._buffers = ShardBuffers(
            num_shards,
            self.worker_id,
            self._send,
            max_batch=max_batch,
            # Pulls an idle shard's buffer collects before it is sent while other
            # answers are due (see ShardBuffers.flush_idle): a quarter of the pull limit.
            min_batch=max(1, min(self.pull_limit, max_batch) // 4),
            linger_s=linger_s,
        )
        self._pulls = PullWindow(self.pull_limit, self._buffers)
        self._connections: list[ShardConnection] = []
        # Shards whose stream broke, and the task opening a new one.
        self._reconnecting: dict[int, asyncio.Task[None]] = {}
        self._watch: asyncio.Task[None] | None = None
        self._io: EventLoopThread | None = None
        self._wakeup = asyncio.Event()  # set on the loop when there is news for the logic
        self._sent = False  # a request was queued since the logic last let the loop run

        # Counters (read by Status from other threads; ints are updated atomically).
        self.started = time.monotonic()
        self.records = 0
        self.records_failed = 0
        self.outputs = 0
        self.pulls = 0
        self.pushes = 0

    # -- feeding (any thread) ------------------------------------------------

    def feed(self, records: list[Any]) -> None:
        """Queue records (in order); blocks while the input queue is full."""
        self.inputs.feed(records)

    def feed_positioned(self, chunk: list[tuple[int, Any]]) -> None:
        """Queue (position, record) pairs; the position names the record in errors."""
        self.inputs.feed_positioned(chunk)

    def end_input(self) -> None:
        self.inputs.end()

    def input_error(self, message: str) -> None:
        """A record could not be read. It takes its place in the input order: the
        records before it are processed first, then it is skipped (on_error=skip)
        or stops the job."""
        self.inputs.unreadable(message)

    def fail(self, message: str) -> None:
        with self.inputs.cond:
            if self._failure is None:
                self._failure = message
        self.inputs.refuse(self._failure)  # a feeder waiting for room gives up
        self._wake_threadsafe()

    def _wake_threadsafe(self) -> None:
        """Wake the logic, from any thread."""
        io = self._io
        if io is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed: nobody to wake
                io.loop.call_soon_threadsafe(self._wakeup.set)

    # -- network callbacks (on the loop, between two steps of the logic) --------

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
                self._shard_lost(
                    shard,
                    f"{connection.describe()} unreachable for {self.shard_timeout:g} s (last error: {last_error})",
                )
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
            # A shard that came back with another index or count would take ids that are not its own.
            check_layout(self.servers, [c.info for c in self._connections], "--servers")
        except ShardError as exc:
            self._shard_lost(shard, str(exc))
            return
        del self._reconnecting[shard]
        unanswered = self._buffers.unanswered(shard)
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
                    self._shard_lost(
                        shard,
                        f"{self._connections[shard].describe()} unreachable for {self.shard_timeout:g} s "
                        "(last error: no answer)",
                    )

    # -- the ParameterServerClient calls (on the loop) ------------------------

    def pull(self, param_id: Id) -> None:
        self.pulls += 1
        self._pulls.pull(param_id)

    def pull_many(self, ids: Any) -> None:
        for chunk, _ in id_groups(ids):
            self.pulls += len(chunk)
            self._pulls.pull_chunk(chunk)

    def push(self, param_id: Id, delta: Any) -> None:
        check_delta(param_id, delta)
        self.pushes += 1
        self._buffers.push(param_id, delta)

    def push_many(self, ids: Any, deltas: Any) -> None:
        groups = id_groups(ids)
        array = check_deltas(ids, deltas, len(ids))
        self.pushes += sum(len(chunk) for chunk, _ in groups)
        for chunk, rows in groups:
            self._buffers.push_chunk(chunk, array if rows is None else array[rows])

    def _send(self, shard: int, request: shard_pb2.ExchangeRequest) -> None:
        # To a shard that is away, the request is only kept (ShardBuffers keeps every
        # unanswered one): it goes with the others once a new stream is open.
        if shard not in self._reconnecting:
            self._connections[shard].send(request)
            self._sent = True

    def output(self, out: Any) -> None:
        self._emit(out)
        self.outputs += 1

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
            for connection in self._connections:
                # A new run would number its pushes from 1 again, and the shard would take
                # them up to its watermark as duplicates of the last run's: silently dropped.
                seq = connection.info.watermarks.get(self.worker_id, 0)
                if seq:
                    raise ShardError(
                        f"{connection.describe()} already holds pushes of worker {self.worker_id} (up to seq {seq}); "
                        "a new run of a worker needs a --job-id of its own"
                    )
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
                self.fail(f"worker {self.worker_index}: {exc}")
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
        if self.shard_timeout:
            self._watch = asyncio.get_running_loop().create_task(self._watch_silence())
        try:
            self._call_user("open", self.logic.open)
            await self._steps()
            self._call_user("close", self.logic.close)
        except JobFailed as exc:
            await self._drain_pushes()
            await self._finish(State.FAILED, str(exc))
            raise
        except Exception as exc:  # a defect of the runtime itself: still deliver the pushes made so far
            log.error("worker %d: runtime error", self.worker_index, exc_info=True)
            await self._drain_pushes()
            await self._finish(
                State.FAILED, f"worker {self.worker_index}: runtime stopped: {type(exc).__name__}: {exc}"
            )
            raise
        except BaseException as exc:  # cancelled: the loop is going away, nothing can be sent
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
            return all(self._buffers.unacked_by_shard[s] == 0 or s in self._failed_shards for s in shards)

        try:
            for shard in shards:
                if shard not in self._failed_shards:
                    self._buffers.flush_pushes(shard)
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while not drained() and (left := deadline - time.monotonic()) > 0:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._wakeup.wait()
        except Exception:  # the shards may be the reason for the failure
            log.debug("draining pushes after a failure failed", exc_info=True)

    async def _finish(self, state: State, failure: str | None) -> None:
        with self.inputs.cond:
            if failure and not self._failure:
                self._failure = failure
            self.state = state
        self.inputs.refuse(self._failure or f"worker {self.worker_index} is no longer taking input")
        for task in [*self._reconnecting.values(), *([self._watch] if self._watch else [])]:
            task.cancel()
        self._reconnecting.clear()
        for shard, connection in enumerate(self._connections):
            await connection.aclose(wait=shard not in self._failed_shards)

    @property
    def error(self) -> str | None:
        return self._failure

    def counters(self) -> dict[str, int]:
        """Every counter and queue depth: for Status, the metrics endpoint and tests.

        The loop-owned ints are read without a lock (see __init__): each is at
        worst a moment old.
        """
        depths = {"input_queue_chunks": self.inputs.waiting(), "answer_queue_chunks": len(self._answers)}
        return {
            "records": self.records,
            "records_failed": self.records_failed,
            "outputs": self.outputs,
            "pulls": self.pulls,
            "pushes": self.pushes,
            "pulls_in_flight": self._pulls.in_flight,
            "pulls_queued": self._pulls.queued,
            "pushes_unacked": self._buffers.unacked,
            **depths,
        }
