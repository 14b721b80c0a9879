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
- feeders (a source's pump, or the Feed calls pushing into the FeedSource:
  psworker/sources), which block while the input queue is full: that is the
  backpressure that reaches the data source. They wake the loop when they add input.

Flow control, batching and input: psworker/pulls.py (the pull limit),
psworker/batching.py (per-shard buffers, one message per flush, Nagle's rule),
psworker/input_queue.py (records from feeders, backpressure). Answers are
always taken first, and the streams' readers never wait for anything, so
there is no cycle of waits: no deadlock, at any pull limit down to 1. A logic
that defines `on_pull_recv_many` gets each answered batch in one call.

Termination. A worker is finished when its input ended, `on_input_end`
returned, nothing is owed or pending, and every push is acknowledged.

Shard restarts: psworker/links.py. The logical clock: psworker/clocks.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from psclient.errors import JobFailed, ShardError
from psclient.rpc.connection import CLOSE_TIMEOUT_S, EventLoopThread, ShardConnection
from psclient.rpc.serving import DEFAULT_BATCH_LINGER_MS, DEFAULT_BATCH_MAX_KEYS, DEFAULT_CONNECT_TIMEOUT_S
from psclient.wire.partition import Id, check_id
from psworker.batching import ShardBuffers
from psworker.checkpoints import DEFAULT_CHECKPOINT_EVERY
from psworker.checks import check_delta, check_deltas, id_groups
from psworker.clocks import WorkerClock
from psworker.input_queue import InputQueue
from psworker.links import DRAIN_TIMEOUT_S, ShardLinks
from psworker.logic import WorkerLogic, pull_limit_of, receives_many, unwrapped
from psworker.loop import Answer, LogicLoop
from psworker.pulls import PullWindow

log = logging.getLogger("streamps.worker")

# Without a user limit, a worker still bounds its unanswered pulls (memory).
DEFAULT_PULL_LIMIT = 65_536
# Keys in one message to a shard, and how long a buffered pull or push may wait
# for company before it is sent (`--batch-max-keys`, `--batch-linger-ms`).
DEFAULT_MAX_BATCH = DEFAULT_BATCH_MAX_KEYS
DEFAULT_LINGER_S = DEFAULT_BATCH_LINGER_MS / 1000
# Input queue bound, in chunks of records (a Feed message or a file read).
INPUT_CAPACITY_CHUNKS = 64
# How long a worker waits for a shard that does not answer (its stream broke or
# stalled) before it fails; 0: fail at once when a stream breaks.
DEFAULT_SHARD_TIMEOUT_S = 60.0


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

    __slots__ = ("_runtime", "advance_clock", "num_shards", "num_workers", "worker_index")

    def __init__(self, runtime: WorkerRuntime):
        self._runtime, self.worker_index, self.num_workers = runtime, runtime.worker_index, runtime.num_workers
        self.num_shards = len(runtime.servers)
        self.advance_clock = runtime.advance_clock if runtime.staleness is not None else runtime._count_clock

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


class WorkerRuntime(LogicLoop, ShardLinks, WorkerClock):
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
        checkpoint_dir: Path | None = None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        flush_outputs: Callable[[], None] | None = None,
        pending_outputs: Callable[[], list[bytes]] | None = None,
        consistency: str = "async",
        track_origins: bool = False,
    ):
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
        if shard_timeout < 0:
            raise ValueError(f"shard_timeout must be >= 0, not {shard_timeout!r}")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, not {checkpoint_every!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, not {max_batch!r}")
        if not (linger_s >= 0 and math.isfinite(linger_s)):
            raise ValueError(f"linger_s must be a finite number >= 0, not {linger_s!r}")
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
        self._init_clock(consistency, checkpoint_dir is not None or track_origins)
        self.client = _Client(self)
        num_shards = len(self.servers)

        # Fed from other threads (a source's pump, the Feed calls).
        self.inputs = InputQueue(worker_index, INPUT_CAPACITY_CHUNKS, self._wake_threadsafe)
        self._failure: str | None = None
        self.state = State.RUNNING
        # Stopped by a signal (a graceful stop) rather than at the end of its input.
        self.stopped = False

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
            worker_index=worker_index,
        )
        self._pulls = PullWindow(self.pull_limit, self._buffers)
        self._init_checkpoints(checkpoint_dir, checkpoint_every, flush_outputs, pending_outputs, track_origins)
        self._connections: list[ShardConnection] = []
        # Shards whose stream broke, and the task opening a new one.
        self._reconnecting: dict[int, asyncio.Task[None]] = {}
        self._watch: asyncio.Task[None] | None = None
        self._io: EventLoopThread | None = None
        self._wakeup = asyncio.Event()  # set on the loop when there is news for the logic
        self._sent = False  # a request was queued since the logic last let the loop run

        # Counters (read by Status from other threads; ints are updated atomically).
        self.started = time.monotonic()
        self.records = self.records_failed = self.outputs = self.pulls = self.pushes = 0
        if self.resumed is not None:
            self._resume_from(self.resumed)

    # -- feeding (any thread) ------------------------------------------------

    def feed(self, records: list[Any]) -> None:
        """Queue records (in order); blocks while the input queue is full."""
        self.inputs.feed(records)

    def feed_positioned(self, chunk: list[tuple[int, Any]]) -> None:
        """Queue (position, record) pairs; the position names the record in errors."""
        self.inputs.feed_positioned(chunk)

    def end_input(self) -> None:
        self.inputs.end()

    def input_error(self, message: str, position: int = 0) -> None:
        """A record could not be read. It takes its place in the input order: the
        records before it are processed first, then it is skipped (on_error=skip)
        or stops the job."""
        self.inputs.unreadable(message, position)

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

    # -- the ParameterServerClient calls (on the loop) ------------------------

    def pull(self, param_id: Id) -> None:
        self.pulls += 1
        if self._origins is not None:
            self._origins.pulled(param_id)
        self._pulls.pull(param_id)

    def pull_many(self, ids: Any) -> None:
        for chunk, _ in id_groups(ids):
            self.pulls += len(chunk)
            if self._origins is not None:
                self._origins.pulled_chunk(chunk)
            self._pulls.pull_chunk(chunk)

    def push(self, param_id: Id, delta: Any) -> None:
        check_delta(param_id, delta)
        self.pushes += 1
        if self._origins is not None:
            self._origins.hold(param_id, delta)
        else:
            self._buffers.push(param_id, delta)

    def push_many(self, ids: Any, deltas: Any) -> None:
        groups = id_groups(ids)
        array = check_deltas(ids, deltas, len(ids))
        self.pushes += sum(len(chunk) for chunk, _ in groups)
        for chunk, rows in groups:
            part = array if rows is None else array[rows]
            if self._origins is not None:
                self._origins.hold_chunk(chunk, part)
            else:
                self._buffers.push_chunk(chunk, part)

    def output(self, out: Any) -> None:
        self._emit(out)
        self.outputs += 1

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
        if self.shard_timeout and self.staleness is None:  # a held pull is not a stalled shard
            self._watch = asyncio.get_running_loop().create_task(self._watch_silence())
        try:
            if self.resumed is not None and self.resumed.finished:
                await self._finish(State.FINISHED, None)  # nothing left to do: not even open
                return
            self._clock_started()
            self._call_tracked("open", self.logic.open)
            if self.resumed is not None:
                self._call_user("restore", self._callbacks.restore, self.resumed.state)
            await self._steps()
            await self._clock_finished()
            self._settle(finished=not self.stopped)
            self._call_user("close", self.logic.close)
        except JobFailed as exc:
            await self._drain_pushes()
            self._report_after_failure()
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
