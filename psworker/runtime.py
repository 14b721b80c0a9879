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

Batch calls. `pull_many` and `push_many` take arrays of ids: they are split by
shard with numpy and sit in the shard buffers as array chunks next to the
single pulls and pushes, so that a flush still sends one message per shard, in
the order the logic made its calls. A logic that defines `on_pull_recv_many`
gets each answered batch in one call, as arrays.

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

from psclient.errors import JobFailed, ShardError, StreampsError
from psclient.rpc.shard_client import (
    CLOSE_TIMEOUT_S,
    DEFAULT_CONNECT_TIMEOUT_S,
    EventLoopThread,
    ShardConnection,
    check_layout,
)
from psclient.wire.codec import (
    ALLOWED_KINDS,
    INT_IDS_DTYPE,
    DecodedBatch,
    decode_batch,
    decode_rows,
    encode_id_array,
    encode_keys,
    encode_values,
)
from psclient.wire.partition import Id, check_id, shard_of, split_by_shard, split_int_ids
from psclient.wire.proto import shard_pb2, tensor_pb2
from psworker.logic import WorkerLogic, pull_limit_of, receives_many

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


def check_deltas(ids: Any, deltas: Any, count: int) -> np.ndarray:
    """`deltas` as an array with one numeric, finite row per id, or InvalidDelta.

    The `push_many` form of `check_delta`: whole-array checks; the message
    names the first id whose row is not finite.
    """
    try:
        array = deltas if type(deltas) is np.ndarray else np.asarray(deltas)
    except (TypeError, ValueError):  # ragged rows, or objects numpy cannot take
        array = None
    if array is None or array.dtype.kind not in ALLOWED_KINDS:
        raise InvalidDelta(
            f"push_many of {short_repr(deltas)} ({_what(deltas)}) to {count} ids: "
            "the deltas must be a numeric numpy array"
        )
    if array.ndim == 0 or array.shape[0] != count:
        raise InvalidDelta(f"push_many of deltas of shape {array.shape} to {count} ids: the deltas need one row per id")
    if array.dtype.kind in "fc":
        finite = np.isfinite(array)
        if not finite.all():
            row = int(np.flatnonzero(~finite.reshape(count, -1).all(axis=1))[0])
            param_id = ids[row]
            if isinstance(param_id, np.generic):
                param_id = param_id.item()
            raise InvalidDelta(
                f"push_many of {short_repr(array[row])} (row {row} of {count}) to id {param_id!r}: "
                "a delta must be finite (NaN and Inf are refused)"
            )
    return array


def _int_ids(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "u" and array.size and int(array.max()) > _INT64_END - 1:
        raise ValueError(f"int parameter id {int(array.max())} does not fit in signed 64 bits")
    return np.ascontiguousarray(array, dtype=INT_IDS_DTYPE)


def id_groups(ids: Any) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """The ids of a `pull_many`/`push_many` as (chunk, rows) pairs.

    A chunk is an int64 array, or an object array of str ids (str ids need a
    hash each, int ids need no Python work at all); `rows` are the positions of
    the chunk's ids in `ids`, None for all of them in order. A sequence mixing
    ints and strs gives one chunk of each. Raises TypeError or ValueError for
    what is not an id.
    """
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise ValueError(f"ids must be one-dimensional, got shape {ids.shape}")
        if ids.dtype.kind in "iu":
            return [(_int_ids(ids), None)] if len(ids) else []
        if ids.dtype.kind not in "UO":
            raise TypeError(f"parameter ids are int or str, not {ids.dtype}")
        ids = ids.tolist()
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"pull_many and push_many take an array or a sequence of ids, not {type(ids).__name__}")
    if not ids:
        return []
    types = set(map(type, ids))
    if types == {str}:
        return [(np.array(ids, dtype=object), None)]
    if str not in types:
        try:
            array = np.asarray(ids) if types <= {int, np.int64, np.int32} else None
        except OverflowError:
            array = None
        if array is None or array.dtype.kind not in "iu":  # bools, floats, ints past 64 bits: say which
            array = np.asarray([check_id(i) for i in ids], dtype=INT_IDS_DTYPE)
        return [(_int_ids(array), None)]
    checked = [check_id(i) for i in ids]
    is_str = np.fromiter((type(i) is str for i in checked), dtype=bool, count=len(checked))
    int_rows, str_rows = np.flatnonzero(~is_str), np.flatnonzero(is_str)
    ints = np.asarray([checked[r] for r in int_rows.tolist()], dtype=INT_IDS_DTYPE)
    strs = np.array([checked[r] for r in str_rows.tolist()], dtype=object)
    return [(ints, int_rows), (strs, str_rows)]


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

    def pull_many(self, ids: Any) -> None:
        self._runtime.pull_many(ids)

    def push_many(self, ids: Any, deltas: Any) -> None:
        self._runtime.push_many(ids, deltas)

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
        self._receives_many = receives_many(logic)
        self.client = _Client(self)
        num_shards = len(self.servers)

        # Shared with feeders (file reader, Feed RPCs): guarded by _cond.
        self._cond = threading.Condition()
        self._chunks: deque[list[tuple[int, Any]]] = deque()
        self._input_closed = False
        self._failure: str | None = None
        self.state = State.RUNNING

        # The loop thread only (the logic and the stream callbacks). Status and the
        # metrics read the counters below from other threads without a lock: each
        # read is of one int or one length, so it is at worst a moment old.
        # (shard, ids, values) per answer, decoded on arrival: lists of ids and of
        # user-facing values, or for a logic with on_pull_recv_many, ids None and the batches.
        self._answers: deque[tuple[int, list[Id] | None, list[Any]]] = deque()
        self._unacked = 0
        self._unacked_by_shard = [0] * num_shards
        self._failed_shards: set[int] = set()
        self._chunk: list[tuple[int, Any]] = []
        self._chunk_pos = 0
        self._input_end_called = False
        self._in_flight = 0
        # Single ids, and chunks of pull_many (int64 or object arrays: slices are views).
        self._queued_pulls: deque[Id | np.ndarray] = deque()
        self._queued_count = 0
        self._pull_buffers: list[list[Id]] = [[] for _ in range(num_shards)]
        self._pull_chunks: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
        self._pull_chunk_keys = [0] * num_shards
        # A shard's pushes, in call order: encoded batches (push_many chunks, and the
        # single pushes made before them), then the single pushes since.
        self._push_batches: list[list[tensor_pb2.ParamBatch]] = [[] for _ in range(num_shards)]
        self._push_batch_keys = [0] * num_shards
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
        # The ack first: it holds whatever the answer beside it turns out to be.
        if response.HasField("ack"):
            self._unacked -= 1
            self._unacked_by_shard[shard] -= 1
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
            self._queued_count += 1

    def pull_many(self, ids: Any) -> None:
        for chunk, _ in id_groups(ids):
            count = len(chunk)
            self.pulls += count
            room = self.pull_limit - self._in_flight
            if room <= 0 or self._queued_pulls:
                self._queued_pulls.append(chunk)
                self._queued_count += count
                continue
            if count > room:  # the rest waits for answers, as single pulls do
                self._queued_pulls.append(chunk[room:])
                self._queued_count += count - room
                chunk = chunk[:room]
            self._in_flight += len(chunk)
            self._buffer_pull_chunk(chunk)

    def _release_queued(self, slots: int) -> None:
        """Send up to `slots` queued pulls, oldest first (answers freed their slots)."""
        queue = self._queued_pulls
        while slots > 0 and queue:
            head = queue[0]
            if not isinstance(head, np.ndarray):
                queue.popleft()
                taken = 1
                self._buffer_pull(head)
            elif slots == 1:  # the common case at a small limit: no array work for one id
                taken = 1
                if len(head) == 1:
                    queue.popleft()
                else:
                    queue[0] = head[1:]
                self._buffer_pull(head[:1].tolist()[0])  # a Python int or str, whatever the chunk holds
            else:
                taken = min(slots, len(head))
                if taken == len(head):
                    queue.popleft()
                else:
                    queue[0] = head[taken:]
                self._buffer_pull_chunk(head[:taken])
            slots -= taken
            self._in_flight += taken
            self._queued_count -= taken

    def _shard_positions(self, chunk: np.ndarray) -> list[tuple[int, np.ndarray | None]]:
        """(shard, positions in chunk) of every shard owning some of `chunk`; None: all of it."""
        num_shards = len(self._pull_buffers)
        if num_shards == 1:
            return [(0, None)]
        if chunk.dtype == object:
            split = split_by_shard(chunk.tolist(), num_shards)
            return [(shard, np.asarray(positions, dtype=np.intp)) for shard, positions in enumerate(split) if positions]
        return list(split_int_ids(chunk, num_shards))

    def _buffer_pull_chunk(self, chunk: np.ndarray) -> None:
        if self._buffered_since is None:
            self._buffered_since = time.monotonic()
        for shard, positions in self._shard_positions(chunk):
            part = chunk if positions is None else chunk[positions]
            while len(part):
                room = self.max_batch - len(self._pull_buffers[shard]) - self._pull_chunk_keys[shard]
                self._pull_chunks[shard].append(part[:room])
                self._pull_chunk_keys[shard] += min(room, len(part))
                part = part[room:]
                if self._pull_chunk_keys[shard] + len(self._pull_buffers[shard]) >= self.max_batch:
                    self._flush_shard(shard)

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
        if len(ids) + self._push_batch_keys[shard] >= self.max_batch:
            self._flush_shard(shard)

    def push_many(self, ids: Any, deltas: Any) -> None:
        groups = id_groups(ids)
        count = sum(len(chunk) for chunk, _ in groups)
        array = check_deltas(ids, deltas, len(ids))
        self.pushes += count
        if self._buffered_since is None and count:
            self._buffered_since = time.monotonic()
        for chunk, rows in groups:
            chunk_deltas = array if rows is None else array[rows]
            for shard, positions in self._shard_positions(chunk):
                part_ids = chunk if positions is None else chunk[positions]
                part_deltas = chunk_deltas if positions is None else chunk_deltas[positions]
                while len(part_ids):
                    room = self.max_batch - len(self._push_ids[shard]) - self._push_batch_keys[shard]
                    self._buffer_push_chunk(shard, part_ids[:room], part_deltas[:room])
                    part_ids, part_deltas = part_ids[room:], part_deltas[room:]
                    if len(self._push_ids[shard]) + self._push_batch_keys[shard] >= self.max_batch:
                        self._flush_shard(shard)

    def _buffer_push_chunk(self, shard: int, ids: np.ndarray, deltas: np.ndarray) -> None:
        batches = self._push_batches[shard]
        singles = self._push_ids[shard]
        if singles:  # encoded first: the shard applies a flush's pushes in the order they were made
            batches.extend(encode_values(singles, self._push_deltas[shard]))
            self._push_batch_keys[shard] += len(singles)
            self._push_ids[shard], self._push_deltas[shard] = [], []
        batches.append(encode_id_array(ids, deltas))
        self._push_batch_keys[shard] += len(ids)

    def output(self, out: Any) -> None:
        self._emit(out)
        self.outputs += 1

    # -- batching ---------------------------------------------------------------

    def _flush_shard(self, shard: int) -> None:
        # The push and the pulls leave in one message; the shard applies the push
        # before it answers the pulls, which gives read-your-writes.
        push = pull = None
        ids, batches = self._push_ids[shard], self._push_batches[shard]
        if ids or batches:
            deltas = self._push_deltas[shard]
            self._push_ids[shard], self._push_deltas[shard] = [], []
            self._push_batches[shard], self._push_batch_keys[shard] = [], 0
            self._seqs[shard] += 1
            self._unacked += 1
            self._unacked_by_shard[shard] += 1
            if ids:  # single pushes made after the last push_many (earlier ones are in batches)
                batches.extend(encode_values(ids, deltas))
            push = shard_pb2.PushRequest(worker_id=self.worker_id, seq=self._seqs[shard], batches=batches)
        pulls, chunks = self._pull_buffers[shard], self._pull_chunks[shard]
        if pulls or chunks:
            self._pull_buffers[shard], self._pull_chunks[shard], self._pull_chunk_keys[shard] = [], [], 0
            self._request_id += 1
            self._pulls_out[shard] += 1
            if chunks and all(chunk.dtype != object for chunk in chunks) and not any(type(i) is str for i in pulls):
                keys = encode_id_array(np.concatenate([*chunks, np.asarray(pulls, dtype=INT_IDS_DTYPE)]))
            else:
                keys = encode_keys(pulls + [param_id for chunk in chunks for param_id in chunk.tolist()])
            pull = shard_pb2.PullRequest(request_id=self._request_id, keys=keys)
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
            has_pulls = bool(self._pull_buffers[shard] or self._pull_chunks[shard])
            if not has_pulls and not (self._push_ids[shard] or self._push_batches[shard]):
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
            if self.on_error == "skip" and name in ("on_recv", "on_pull_recv", "on_pull_recv_many"):
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

    def _deliver(self, answers: deque[tuple[int, list[Id] | None, list[Any]]]) -> None:
        if self._receives_many:
            self._deliver_many(answers)
            return
        on_pull_recv, client = self.logic.on_pull_recv, self.client
        for shard, ids, values in answers:
            self._pulls_out[shard] -= 1
            assert ids is not None
            for param_id, value in zip(ids, values, strict=True):
                self._in_flight -= 1
                if self._queued_pulls:
                    self._release_queued(1)
                self._call_user("on_pull_recv", on_pull_recv, param_id, value, client)
            self._flush_if_lingering()

    def _deliver_many(self, answers: deque[tuple[int, list[Id] | None, list[Any]]]) -> None:
        """One on_pull_recv_many call per answered batch (two when it holds ints and strs)."""
        on_pull_recv_many, client = self.logic.on_pull_recv_many, self.client
        for shard, _, batches in answers:
            self._pulls_out[shard] -= 1
            batch: DecodedBatch
            for batch in batches:
                assert batch.values is not None
                count = len(batch)
                self._in_flight -= count
                if self._queued_pulls:
                    self._release_queued(count)
                values = np.array(batch.values)  # writable, and no longer tied to the message
                ints = len(batch.int_ids)
                if ints:
                    int_values = values[:ints] if batch.str_ids else values
                    self._call_user("on_pull_recv_many", on_pull_recv_many, batch.int_ids.copy(), int_values, client)
                if batch.str_ids:
                    self._call_user("on_pull_recv_many", on_pull_recv_many, batch.str_ids, values[ints:], client)
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
                    self._cond.notify_all()  # a feeder waiting for room gives up
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
            return all(self._unacked_by_shard[s] == 0 or s in self._failed_shards for s in shards)

        try:
            for shard in shards:
                if shard not in self._failed_shards:
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
        chunks, self._pull_chunks[shard] = self._pull_chunks[shard], []
        self._flush_shard(shard)
        self._pull_buffers[shard], self._pull_chunks[shard] = pulls, chunks

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
        return {  # loop-owned ints, read without a lock (see __init__)
            "pulls_in_flight": self._in_flight,
            "pulls_queued": self._queued_count,
            "pushes_unacked": self._unacked,
        }
