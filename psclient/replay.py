"""Feeding workers that a local cluster restarts (`transform(durable=True)`).

A restartable worker (`psworker --checkpoint-dir`) fed through Feed numbers
its records from 1, across its restarts, and a restarted one resumes after
its last checkpoint: it expects the records after it again (Status says from
which position on, `next_position`). So the feeder keeps, per worker, what it
sent past that worker's last checkpoint (`checkpoint_position`, polled), and
when the worker's stream breaks and the cluster restarts it, waits for it,
resends from `next_position` on (and the end of input, if it had been sent)
and carries on. After the end of its input, the feeder stays until the
worker has finished, to resend again should it be restarted before.

The shards apply the pushes of replayed records once (by input position); the
worker's outputs are at-least-once: those of a replayed record come again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grpc

from psclient.errors import JobFailed, WorkerStopped
from psclient.rpc.errors import describe_rpc_error
from psclient.wire.proto import worker_pb2, worker_pb2_grpc
from psclient.wire.records import unpack

# How long a broken worker has to be restarted and serve again.
WORKER_BACK_TIMEOUT_S = 60.0
# How often the feeder asks a worker for its last checkpoint, to drop what it no longer needs.
TRIM_INTERVAL_S = 0.5
STATUS_TIMEOUT_S = 5.0
# What a worker that died leaves on its streams (a reset, a closed socket).
BROKEN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
_RUNNING = worker_pb2.StatusResponse.State.RUNNING
END = object()  # after the last message of a feed
_END = END
_STALE = object()


class WorkerRestarts(Protocol):
    """What restarts workers (LocalCluster)."""

    def wait_for_worker(self, index: int, timeout: float) -> bool: ...


class WorkerLink(Protocol):
    """The client side of the workers (Cluster): their current stubs, and new ones."""

    restarts: WorkerRestarts | None

    def worker_stub(self, index: int) -> worker_pb2_grpc.WorkerStub: ...

    def reconnect_worker(self, index: int, broken: worker_pb2_grpc.WorkerStub) -> worker_pb2_grpc.WorkerStub: ...


class Outbox:
    """The feed messages of one worker, bounded; only the current Feed call takes them, so
    that a call that broke cannot take one after its successor started."""

    def __init__(self, capacity: int):
        self._cond = threading.Condition()
        self._items: deque[Any] = deque()
        self._capacity = capacity
        self.attempt = 0
        self.closed = False  # _END was taken: nothing more comes

    def put(self, item: Any) -> None:
        with self._cond:
            while len(self._items) >= self._capacity and item is not _END:
                self._cond.wait()
            self._items.append(item)
            self._cond.notify_all()

    def get(self) -> Any:
        with self._cond:
            while not self._items:
                self._cond.wait()
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def take(self, attempt: int, record: Callable[[Any], None]) -> Any:
        """The next item for call `attempt`, recorded (under the lock) as taken; _STALE
        when a later call took over."""
        with self._cond:
            while not self._items and attempt == self.attempt:
                self._cond.wait()
            if attempt != self.attempt:
                return _STALE
            item = self._items.popleft()
            if item is _END:
                self.closed = True
            else:
                record(item)
            self._cond.notify_all()
            return item

    def next_attempt(self) -> int:
        with self._cond:
            self.attempt += 1
            self._cond.notify_all()
            return self.attempt


class ReplayBuffer:
    """What was fed to one worker past its last checkpoint: (first position, records)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: deque[tuple[int, list[bytes]]] = deque()
        self.next_position: int | None = None  # of the next record sent; None until asked
        self.ended = False  # end_of_input was sent

    def sent(self, message: worker_pb2.FeedRequest) -> None:
        """Called with the outbox's lock held, as `message` is taken for a Feed call."""
        assert self.next_position is not None
        if message.records:
            self.entries.append((self.next_position, list(message.records)))
            self.next_position += len(message.records)
        self.ended = self.ended or message.end_of_input

    def trim(self, checkpoint_position: int) -> None:
        with self.lock:
            while self.entries and self.entries[0][0] + len(self.entries[0][1]) - 1 <= checkpoint_position:
                self.entries.popleft()

    def resend_from(self, index: int, position: int) -> list[worker_pb2.FeedRequest]:
        """The messages that take a worker expecting `position` next to where the feeder is."""
        with self.lock:
            if self.next_position is None:
                self.next_position = position
            first = self.entries[0][0] if self.entries else self.next_position
            if not first <= position <= self.next_position:
                raise JobFailed(
                    f"worker {index} expects record {position} next, but this feeder holds records "
                    f"{first} to {self.next_position - 1}: it was fed by another client, or its checkpoints were lost"
                )
            messages = [
                worker_pb2.FeedRequest(records=records[max(0, position - start) :])
                for start, records in self.entries
                if start + len(records) > position
            ]
            if self.ended:
                messages.append(worker_pb2.FeedRequest(end_of_input=True))
            return messages


def feed_failure(index: int, exc: grpc.RpcError) -> JobFailed:
    """What a Feed call that failed means for the job: a worker stopping on a signal
    (OUT_OF_RANGE) ends the feeding (WorkerStopped); a worker that refused the records because
    it failed gives its own one line; anything else fails the job, naming the worker."""
    if exc.code() == grpc.StatusCode.OUT_OF_RANGE:
        return WorkerStopped(exc.details() or f"worker {index} is stopping: it takes no more input")
    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and exc.details():
        return JobFailed(exc.details())
    return JobFailed(f"feeding worker {index} failed: {describe_rpc_error(exc)}")


def send_restartable(
    index: int, link: WorkerLink, outbox: Outbox, buffer: ReplayBuffer, failures: list[BaseException]
) -> None:
    """Run worker `index`'s Feed calls: one, and one more after each restart of the worker."""
    stop_trimming = threading.Event()
    try:
        stub = link.worker_stub(index)
        try:
            resumed: Resumed | None = _resume(index, stub, buffer)
        except grpc.RpcError as exc:
            if exc.code() not in BROKEN:
                raise
            resumed = _after_break(index, link, stub, buffer)  # it died before this feed began
        threading.Thread(
            target=_trim, args=(index, link, buffer, stop_trimming), name=f"trim-{index}", daemon=True
        ).start()
        while resumed is not None:
            stub, resend = resumed
            attempt = outbox.next_attempt()
            try:
                stub.Feed(_requests(outbox, attempt, buffer, resend))
                if buffer.ended and not _finished(stub):
                    # Restarted before it finished: what followed its checkpoint goes again.
                    resumed = _after_break(index, link, stub, buffer)
                elif outbox.closed:
                    return
            except grpc.RpcError as exc:
                if exc.code() not in BROKEN:
                    raise
                outbox.next_attempt()  # before asking where the worker stands: the broken call takes no more
                resumed = _after_break(index, link, stub, buffer)
    except grpc.RpcError as exc:
        failures.append(feed_failure(index, exc))
    except JobFailed as exc:
        failures.append(exc)
    finally:
        stop_trimming.set()
        outbox.next_attempt()  # a broken call's generator takes nothing more
        if not outbox.closed:
            while outbox.get() is not _END:  # unblock the router
                pass


Resumed = tuple[worker_pb2_grpc.WorkerStub, list[worker_pb2.FeedRequest]]


def _requests(
    outbox: Outbox, attempt: int, buffer: ReplayBuffer, resend: list[worker_pb2.FeedRequest]
) -> Iterator[worker_pb2.FeedRequest]:
    yield from resend
    resend.clear()  # sent: a later break asks the worker again where it stands
    while not outbox.closed:
        item = outbox.take(attempt, buffer.sent)
        if item is _STALE or item is _END:
            return
        yield item


def _after_break(
    index: int, link: WorkerLink, stub: worker_pb2_grpc.WorkerStub, buffer: ReplayBuffer
) -> Resumed | None:
    """Wait for worker `index` to serve again and resume it; None if it finished and exited."""
    assert link.restarts is not None
    deadline = time.monotonic() + WORKER_BACK_TIMEOUT_S
    while True:
        if not link.restarts.wait_for_worker(index, max(0.0, deadline - time.monotonic())):
            return None
        stub = link.reconnect_worker(index, stub)
        try:
            return _resume(index, stub, buffer)
        except grpc.RpcError as exc:
            # Its death not seen yet, or the new process not serving yet: look again.
            if time.monotonic() >= deadline:
                raise JobFailed(f"worker {index} did not come back: {describe_rpc_error(exc)}") from None
            time.sleep(0.05)


def _resume(index: int, stub: worker_pb2_grpc.WorkerStub, buffer: ReplayBuffer) -> Resumed:
    status = stub.Status(worker_pb2.StatusRequest(), timeout=STATUS_TIMEOUT_S, wait_for_ready=True)
    buffer.trim(status.checkpoint_position)
    if status.state != _RUNNING:
        return stub, []  # finished (or failed: its Outputs say why)
    return stub, buffer.resend_from(index, status.next_position)


def _finished(stub: worker_pb2_grpc.WorkerStub) -> bool:
    """After the end of input: wait until the worker finished (True), or broke (False)."""
    while True:
        try:
            status = stub.Status(worker_pb2.StatusRequest(), timeout=STATUS_TIMEOUT_S)
        except grpc.RpcError as exc:
            if exc.code() in BROKEN:
                return False
            raise
        if status.state != _RUNNING:
            return True
        time.sleep(TRIM_INTERVAL_S / 5)


def _trim(index: int, link: WorkerLink, buffer: ReplayBuffer, stop: threading.Event) -> None:
    while not stop.wait(TRIM_INTERVAL_S):
        try:
            status = link.worker_stub(index).Status(worker_pb2.StatusRequest(), timeout=STATUS_TIMEOUT_S)
        except grpc.RpcError:
            continue  # broken: the sender sees it too, and trims when the worker is back
        except ValueError:  # the cluster closed its channels: the job is over
            return
        buffer.trim(status.checkpoint_position)


def read_outputs(link: WorkerLink, index: int, put: Callable[[list[Any]], None]) -> None:
    """Worker `index`'s outputs, a chunk at a time into `put`, from each process that serves it:
    a restarted worker's outputs start again at its checkpoint, so they are at-least-once."""
    stub = link.worker_stub(index)
    deadline: float | None = None  # while it is away
    while True:
        try:
            for chunk in stub.Outputs(worker_pb2.OutputsRequest()):
                deadline = None
                put([unpack(data) for data in chunk.outputs])
            return
        except grpc.RpcError as exc:
            if link.restarts is None or exc.code() not in BROKEN:
                raise
            if deadline is None:
                deadline = time.monotonic() + WORKER_BACK_TIMEOUT_S
            elif time.monotonic() >= deadline:
                raise JobFailed(f"worker {index} did not come back: {describe_rpc_error(exc)}") from None
            if not link.restarts.wait_for_worker(index, max(0.0, deadline - time.monotonic())):
                return  # it finished and exited
            time.sleep(0.05)  # its death may not be seen yet
            stub = link.reconnect_worker(index, stub)
