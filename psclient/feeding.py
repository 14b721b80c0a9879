"""Records to workers: `feed_workers` reads a source ahead, routes each record to its
worker (round robin, or by a key), batches them and sends one Feed stream per worker.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

import grpc

from psclient.replay import END, Outbox, ReplayBuffer, WorkerLink, feed_failure, send_restartable
from psclient.wire.partition import key_bucket
from psclient.wire.proto import worker_pb2, worker_pb2_grpc
from psclient.wire.records import pack

FEED_BATCH = 512
# Bytes of records per Feed message, at most (but at least one record): large records
# then go in several messages rather than one over gRPC's message size limit.
FEED_BATCH_BYTES = 1 << 20
# A partly filled feed batch is sent after this long without new records, so
# slow streams are not held back waiting for a full batch.
FEED_LINGER_S = 0.05
FEED_QUEUE_MESSAGES = 8
# Records read ahead of the router, at most.
SOURCE_READ_AHEAD = 4 * FEED_BATCH
_END = END


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class _Source:
    """The records of an iterable, read ahead on a thread of their own and taken in runs.

    The thread lets the router time silence (a source may block between
    records) and linger partial batches. Records pass through a deque, taken
    all at once by the router, rather than one by one through a queue whose
    lock and wake-up would cost more than the record's encoding.
    """

    def __init__(self, records: Iterable[Any]):
        self._pending: deque[Any] = deque()
        self._ready = threading.Event()  # set when records may be pending
        self._room = threading.Condition()  # the reader waits here while the deque is full
        self._stopped = False
        threading.Thread(target=self._read, args=(records,), name="record-reader", daemon=True).start()

    def _read(self, records: Iterable[Any]) -> None:
        pending, ready = self._pending, self._ready
        try:
            for record in records:
                pending.append(record)
                if not ready.is_set():
                    ready.set()
                if len(pending) >= SOURCE_READ_AHEAD:
                    with self._room:
                        self._room.wait_for(lambda: len(pending) < SOURCE_READ_AHEAD or self._stopped)
                    if self._stopped:
                        return
            pending.append(_END)
        except BaseException as exc:
            pending.append(_Failure(exc))
        ready.set()

    def take(self, timeout: float) -> list[Any]:
        """Every record read so far (possibly ending in _END or a _Failure); [] after
        `timeout` without one."""
        pending = self._pending
        if not pending:
            self._ready.clear()
            # A record appended before the clear is seen here; one appended after it sets the event.
            if not pending and not self._ready.wait(timeout):
                return []
        taken = [pending.popleft() for _ in range(len(pending))]
        with self._room:
            self._room.notify()
        return taken

    def stop(self) -> None:
        with self._room:
            self._stopped = True
            self._room.notify()


def feed_workers(
    stubs: Sequence[worker_pb2_grpc.WorkerStub],
    records: Iterable[Any],
    *,
    partition_by: Callable[[Any], Hashable] | None,
    end_of_input: bool,
    iteration_wait_time: float | None,
    link: WorkerLink | None = None,
    replay: list[ReplayBuffer] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Send `records` to the workers behind `stubs` and return how many were sent; blocks
    until all are accepted. See `Cluster.feed`. With a `link` that restarts workers, each
    worker's `replay` buffer keeps what it may have to resend (psclient/replay.py), and
    with `end_of_input` this returns once the workers finished. Once `stop` is set, the
    records read from `records` so far are sent, and no more are read: the input ends there."""
    failures: list[BaseException] = []
    if link is not None and link.restarts is not None:
        assert replay is not None
        outboxes = [Outbox(FEED_QUEUE_MESSAGES) for _ in stubs]
        senders = [
            threading.Thread(
                target=send_restartable, args=(i, link, outboxes[i], replay[i], failures), name=f"feed-{i}", daemon=True
            )
            for i in range(len(stubs))
        ]
        return _feed(senders, outboxes, records, partition_by, end_of_input, iteration_wait_time, failures, stop)
    sender_queues: list[queue.Queue[Any]] = [queue.Queue(FEED_QUEUE_MESSAGES) for _ in stubs]

    def send(index: int) -> None:
        def requests() -> Iterator[worker_pb2.FeedRequest]:
            while (message := sender_queues[index].get()) is not _END:
                yield message
            # After the call failed, gRPC's thread still takes one message, which may
            # be this _END: hand it on to the loop below, which would wait for it for good.
            sender_queues[index].put(_END)

        try:
            stubs[index].Feed(requests())
        except grpc.RpcError as exc:
            failures.append(feed_failure(index, exc))
            while sender_queues[index].get() is not _END:  # unblock the router
                pass

    senders = [threading.Thread(target=send, args=(i,), name=f"feed-{i}", daemon=True) for i in range(len(stubs))]
    return _feed(senders, sender_queues, records, partition_by, end_of_input, iteration_wait_time, failures, stop)


def _feed(
    senders: list[threading.Thread],
    sender_queues: Sequence[queue.Queue[Any] | Outbox],
    records: Iterable[Any],
    partition_by: Callable[[Any], Hashable] | None,
    end_of_input: bool,
    iteration_wait_time: float | None,
    failures: list[BaseException],
    stop: threading.Event | None,
) -> int:
    for sender in senders:
        sender.start()
    count = 0
    try:
        count = _route(records, sender_queues, partition_by, iteration_wait_time, failures, stop)
    finally:
        for index, sender_queue in enumerate(sender_queues):
            sender_queue.put(worker_pb2.FeedRequest(end_of_input=end_of_input))
            sender_queue.put(_END)
            senders[index].join()
    if failures:
        raise failures[0]
    return count


def _route(
    records: Iterable[Any],
    sender_queues: Sequence[queue.Queue[Any] | Outbox],
    partition_by: Callable[[Any], Hashable] | None,
    iteration_wait_time: float | None,
    failures: list[BaseException],
    stop: threading.Event | None,
) -> int:
    num_workers = len(sender_queues)
    batches: list[list[bytes]] = [[] for _ in range(num_workers)]
    sizes = [0] * num_workers  # bytes in each batch
    source = _Source(records)

    def flush(index: int) -> None:
        if batches[index]:
            sender_queues[index].put(worker_pb2.FeedRequest(records=batches[index]))
            batches[index] = []
            sizes[index] = 0

    try:
        return _route_loop(source, batches, sizes, flush, partition_by, iteration_wait_time, failures, stop)
    finally:
        source.stop()
        # Records taken before an error of the iterator still reach their worker.
        for index in range(num_workers):
            flush(index)


def _route_loop(
    source: _Source,
    batches: list[list[bytes]],
    sizes: list[int],
    flush: Callable[[int], None],
    partition_by: Callable[[Any], Hashable] | None,
    iteration_wait_time: float | None,
    failures: list[BaseException],
    stop: threading.Event | None,
) -> int:
    num_workers = len(batches)
    count = 0
    silence = 0.0
    while not failures:
        # A stop takes what was read ahead, once (a source that never blocks would not run dry), and ends.
        stopping = stop is not None and stop.is_set()
        taken = source.take(0 if stopping else FEED_LINGER_S)
        if stopping:
            taken.append(_END)
        if not taken:
            silence += FEED_LINGER_S
            for index in range(num_workers):
                flush(index)
            if iteration_wait_time is not None and silence >= iteration_wait_time:
                break
            continue
        silence = 0.0
        for record in taken:
            if record is _END:
                return count
            if isinstance(record, _Failure):
                raise record.error
            index = count % num_workers if partition_by is None else key_bucket(partition_by(record), num_workers)
            data = pack(record)
            if batches[index] and sizes[index] + len(data) > FEED_BATCH_BYTES:
                flush(index)
            batch = batches[index]
            batch.append(data)
            sizes[index] += len(data)
            count += 1
            if len(batch) >= FEED_BATCH:
                flush(index)
    return count
