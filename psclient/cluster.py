"""`connect()`: drive a running cluster of shards and workers from Python.

A `Cluster` feeds records to remote workers, streams their outputs, pulls and
pushes batches directly, takes snapshots, and merges outputs and the final
model into the same `Left`/`Right` stream as `transform`.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np

from psclient.either import Left, Right
from psclient.errors import JobFailed, ShardError, StreampsError
from psclient.rpc.errors import describe_rpc_error
from psclient.rpc.layout import check_layout, fetch_info
from psclient.rpc.security import Security
from psclient.rpc.serving import DEFAULT_CONNECT_TIMEOUT_S, open_channel, ready_channel
from psclient.rpc.shard_group import ShardGroup
from psclient.wire.codec import decode_rows
from psclient.wire.partition import Id, key_bucket
from psclient.wire.proto import shard_pb2, shard_pb2_grpc, worker_pb2, worker_pb2_grpc
from psclient.wire.records import pack, unpack

FEED_BATCH = 512
# A partly filled feed batch is sent after this long without new records, so
# slow streams are not held back waiting for a full batch.
FEED_LINGER_S = 0.05
FEED_QUEUE_MESSAGES = 8
# Records read ahead of the router, at most.
SOURCE_READ_AHEAD = 4 * FEED_BATCH
# After a worker failed, how long to wait for the feeder to report its own error.
FEEDER_JOIN_S = 5.0
_END = object()


class WorkerReported(JobFailed):
    """A worker's own one-line report that its job failed (it is still there to say so)."""


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


class Cluster:
    """A handle on running shards (`servers`) and workers (`workers`).

    Nothing is contacted until it is used. Before the first pull, push, snapshot
    or stream, every shard must answer (within `connect_timeout`) and its own
    index and count must match its place in `servers`, else ShardError says
    which one does not (`servers_label` names the list in that message).
    """

    def __init__(
        self,
        servers: Sequence[str],
        workers: Sequence[str] = (),
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        security: Security | None = None,
        servers_label: str = "servers",
    ):
        self.servers = list(servers)
        self.workers = list(workers)
        self.connect_timeout = connect_timeout
        self.security = security
        self.servers_label = servers_label
        self._shards_checked = False
        self._workers_ready: set[int] = set()
        # stream() readies the workers from two threads (feeding, reading outputs);
        # each channel must be replaced once, not closed under the other thread.
        self._connecting = threading.RLock()
        self._shard_channels = [open_channel(a, security) for a in self.servers]
        self._worker_channels = [open_channel(a, security) for a in self.workers]
        self._shard_stubs = [shard_pb2_grpc.ParameterShardStub(c) for c in self._shard_channels]
        self._worker_stubs = [worker_pb2_grpc.WorkerStub(c) for c in self._worker_channels]
        self._group: ShardGroup | None = None

    # -- parameters ---------------------------------------------------------

    @property
    def shards(self) -> ShardGroup:
        if self._group is None:
            self._group = ShardGroup(
                self.servers,
                connect_timeout=self.connect_timeout,
                security=self.security,
                servers_label=self.servers_label,
            )
        return self._group

    def check_shards(self) -> None:
        """Wait for every shard and check its index and count; ShardError names a misplaced one."""
        with self._connecting:
            if self._shards_checked:
                return
            infos = []
            for shard, address in enumerate(self.servers):
                what = f"shard {shard} at {address}"
                channel = ready_channel(address, what, self.connect_timeout, self.security)
                self._shard_channels[shard].close()
                self._shard_channels[shard] = channel
                self._shard_stubs[shard] = shard_pb2_grpc.ParameterShardStub(channel)
                infos.append(fetch_info(channel, what, self.connect_timeout))
            check_layout(self.servers, infos, self.servers_label)
            self._shards_checked = True

    def pull(self, ids: Sequence[Id] | np.ndarray) -> list[Any] | np.ndarray:
        """Current values of `ids` (created from the init function if absent).

        Given a numpy int array, the batch is split, sent and reassembled without
        per-key Python work and the values come back as one stacked array.
        """
        if isinstance(ids, np.ndarray):
            return self.shards.pull_array(ids)
        return self.shards.pull(ids)

    def push(self, ids: Sequence[Id] | np.ndarray, deltas: Sequence[Any] | np.ndarray) -> None:
        """Apply one delta per id; returns once every shard acknowledged.

        Numpy int ids with a stacked delta array take the vectorized path.
        """
        if isinstance(ids, np.ndarray):
            self.shards.push_array(ids, np.asarray(deltas))
        else:
            self.shards.push(ids, list(deltas))

    def snapshot(self) -> Iterator[tuple[Id, Any]]:
        """Every (id, value) of every shard, shard by shard."""
        self.check_shards()
        for shard, stub in enumerate(self._shard_stubs):
            try:
                for chunk in stub.Snapshot(shard_pb2.SnapshotRequest()):
                    ids, values = decode_rows(chunk.batches)
                    yield from zip(ids, values, strict=True)
            except grpc.RpcError as exc:
                raise ShardError(
                    f"snapshot of shard {shard} at {self.servers[shard]} failed: {describe_rpc_error(exc)}"
                ) from None

    def info(self, timeout: float = 5.0) -> list[shard_pb2.InfoResponse | ShardError]:
        """Each shard's Info, or the error that stands in for it."""
        answers: list[shard_pb2.InfoResponse | ShardError] = []
        for shard, stub in enumerate(self._shard_stubs):
            try:
                answers.append(stub.Info(shard_pb2.InfoRequest(), timeout=timeout))
            except grpc.RpcError as exc:
                answers.append(ShardError(f"shard {shard} at {self.servers[shard]}: {describe_rpc_error(exc)}"))
        return answers

    def status(self, timeout: float = 5.0) -> list[worker_pb2.StatusResponse | StreampsError]:
        """Each worker's Status, or the error that stands in for it."""
        answers: list[worker_pb2.StatusResponse | StreampsError] = []
        for index, stub in enumerate(self._worker_stubs):
            try:
                answers.append(stub.Status(worker_pb2.StatusRequest(), timeout=timeout))
            except grpc.RpcError as exc:
                answers.append(StreampsError(f"worker {index} at {self.workers[index]}: {describe_rpc_error(exc)}"))
        return answers

    # -- records and outputs -----------------------------------------------

    def _ready_worker(self, index: int) -> None:
        with self._connecting:
            if index in self._workers_ready:
                return
            address = self.workers[index]
            try:
                channel = ready_channel(address, f"worker {index} at {address}", self.connect_timeout, self.security)
            except ShardError as exc:
                raise StreampsError(str(exc)) from None
            self._worker_channels[index].close()
            self._worker_channels[index] = channel
            self._worker_stubs[index] = worker_pb2_grpc.WorkerStub(channel)
            self._workers_ready.add(index)

    def feed(
        self,
        records: Iterable[Any],
        *,
        partition_by: Callable[[Any], Hashable] | None = None,
        end_of_input: bool = True,
        iteration_wait_time: float | None = None,
    ) -> int:
        """Send records to the workers (round robin, or by `partition_by` key); blocks
        until all are accepted. With `end_of_input`, the workers' input ends after them.
        With `iteration_wait_time`, input also ends after that many seconds without a record.
        Returns how many records were sent."""
        if not self.workers:
            raise StreampsError("this cluster has no workers to feed")
        self.check_shards()
        for index in range(len(self.workers)):
            self._ready_worker(index)
        sender_queues: list[queue.Queue[Any]] = [queue.Queue(FEED_QUEUE_MESSAGES) for _ in self.workers]
        failures: list[BaseException] = []

        def send(index: int) -> None:
            def requests() -> Iterator[worker_pb2.FeedRequest]:
                while (message := sender_queues[index].get()) is not _END:
                    yield message
                # After the call failed, gRPC's thread still takes one message, which may
                # be this _END: hand it on to the loop below, which would wait for it for good.
                sender_queues[index].put(_END)

            try:
                self._worker_stubs[index].Feed(requests())
            except grpc.RpcError as exc:
                failures.append(JobFailed(exc.details() or f"feeding worker {index} failed: {describe_rpc_error(exc)}"))
                while sender_queues[index].get() is not _END:  # unblock the router
                    pass

        senders = [
            threading.Thread(target=send, args=(i,), name=f"feed-{i}", daemon=True) for i in range(len(self.workers))
        ]
        for sender in senders:
            sender.start()
        count = 0
        try:
            count = self._route(records, sender_queues, partition_by, iteration_wait_time, failures)
        finally:
            for index, sender_queue in enumerate(sender_queues):
                sender_queue.put(worker_pb2.FeedRequest(end_of_input=end_of_input))
                sender_queue.put(_END)
                senders[index].join()
        if failures:
            raise failures[0]
        return count

    def _route(
        self,
        records: Iterable[Any],
        sender_queues: list[queue.Queue[Any]],
        partition_by: Callable[[Any], Hashable] | None,
        iteration_wait_time: float | None,
        failures: list[BaseException],
    ) -> int:
        num_workers = len(sender_queues)
        batches: list[list[bytes]] = [[] for _ in range(num_workers)]
        source = _Source(records)

        def flush(index: int) -> None:
            if batches[index]:
                sender_queues[index].put(worker_pb2.FeedRequest(records=batches[index]))
                batches[index] = []

        try:
            return self._route_loop(source, batches, flush, partition_by, iteration_wait_time, failures)
        finally:
            source.stop()
            # Records taken before an error of the iterator still reach their worker.
            for index in range(num_workers):
                flush(index)

    @staticmethod
    def _route_loop(
        source: _Source,
        batches: list[list[bytes]],
        flush: Callable[[int], None],
        partition_by: Callable[[Any], Hashable] | None,
        iteration_wait_time: float | None,
        failures: list[BaseException],
    ) -> int:
        num_workers = len(batches)
        count = 0
        silence = 0.0
        while not failures:
            taken = source.take(FEED_LINGER_S)
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
                batch = batches[index]
                batch.append(pack(record))
                count += 1
                if len(batch) >= FEED_BATCH:
                    flush(index)
        return count

    def outputs(self) -> Iterator[Any]:
        """Every worker's outputs, merged as they arrive, until all workers finished.

        Raises JobFailed with the worker's one-line error if a worker failed.
        """
        merged: queue.Queue[Any] = queue.Queue()
        for index in range(len(self.workers)):
            self._ready_worker(index)

        def read(index: int) -> None:
            try:
                for chunk in self._worker_stubs[index].Outputs(worker_pb2.OutputsRequest()):
                    merged.put([unpack(data) for data in chunk.outputs])
                merged.put(_END)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.ABORTED:
                    merged.put(_Failure(WorkerReported(exc.details())))
                else:
                    merged.put(
                        _Failure(JobFailed(f"worker {index} at {self.workers[index]}: {describe_rpc_error(exc)}"))
                    )
            except StreampsError as exc:
                merged.put(_Failure(JobFailed(f"worker {index}: {exc}")))

        for index in range(len(self.workers)):
            threading.Thread(target=read, args=(index,), name=f"outputs-{index}", daemon=True).start()
        running = len(self.workers)
        while running:
            item = merged.get()
            if item is _END:
                running -= 1
            elif isinstance(item, _Failure):
                raise item.error
            else:
                yield from item

    def stream(
        self,
        records: Iterable[Any] | None = None,
        *,
        partition_by: Callable[[Any], Hashable] | None = None,
        iteration_wait_time: float | None = None,
    ) -> Iterator[Left[Any] | Right[tuple[Id, Any]]]:
        """Feed `records` (if given), yield every output as `Left` while they arrive,
        then every final parameter as `Right((id, value))` once all workers finished."""
        self.check_shards()  # before any record reaches a worker
        feed_error: list[BaseException] = []
        feeder: threading.Thread | None = None
        if records is not None:

            def feed() -> None:
                try:
                    self.feed(records, partition_by=partition_by, iteration_wait_time=iteration_wait_time)
                except BaseException as exc:
                    feed_error.append(exc)

            feeder = threading.Thread(target=feed, name="feeder", daemon=True)
            feeder.start()
        try:
            for out in self.outputs():
                yield Left(out)
        except JobFailed:
            # A failure of the records iterator itself is the root cause: report it.
            if feeder is not None:
                feeder.join(timeout=FEEDER_JOIN_S)
            if feed_error and not isinstance(feed_error[0], JobFailed):
                raise feed_error[0] from None
            raise
        if feeder is not None:
            # The workers finished, so the feeder has sent end_of_input; it may
            # still be on its way to record an error of the records iterator.
            feeder.join()
        if feed_error:
            raise feed_error[0]
        for pair in self.snapshot():
            yield Right(pair)

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None
        for channel in [*self._shard_channels, *self._worker_channels]:
            channel.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    servers: Sequence[str],
    workers: Sequence[str] = (),
    *,
    security: Security | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> Cluster:
    """A `Cluster` for shards at `servers` (in shard order) and workers at `workers`.

    `security` (TLS material, bearer token) defaults to this process's, which is
    plaintext without a token unless configured; see psclient.rpc.security.
    `connect_timeout` bounds the wait for each server that is still starting
    (refusing connections, or its name not resolving yet).
    """
    return Cluster(servers, workers, security=security, connect_timeout=connect_timeout)
