"""`connect()`: drive a running cluster of shards and workers from Python.

A `Cluster` feeds records to remote workers, streams their outputs, pulls and
pushes batches directly, takes snapshots, and merges outputs and the final
model into the same `Left`/`Right` stream as `transform`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np

from psclient.either import Left, Right
from psclient.errors import JobFailed, ShardError, StreampsError, WorkerStopped
from psclient.feeding import feed_workers
from psclient.replay import ReplayBuffer, WorkerRestarts, read_outputs
from psclient.rpc.errors import describe_rpc_error
from psclient.rpc.layout import check_layout, fetch_info
from psclient.rpc.security import Security
from psclient.rpc.serving import DEFAULT_CONNECT_TIMEOUT_S, open_channel, ready_channel
from psclient.rpc.shard_group import ShardGroup
from psclient.watching import NewestSnapshots, ShardSnapshot, ShardWatch, watch_snapshots
from psclient.wire.codec import decode_rows
from psclient.wire.partition import Id
from psclient.wire.proto import shard_pb2, shard_pb2_grpc, worker_pb2, worker_pb2_grpc
from psclient.wire.records import unpack

# After a worker failed, how long to wait for the feeder to report its own error.
FEEDER_JOIN_S = 5.0
# Marks the end of one worker's outputs.
_DONE = object()


class WorkerReported(JobFailed):
    """A worker's own one-line report that its job failed (it is still there to say so)."""


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
        restarts: WorkerRestarts | None = None,
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
        # What restarts a worker that died (a durable LocalCluster): then feeding resends what
        # a restarted worker lost, and its outputs are read on from the new process.
        self.restarts = restarts
        self._replay = [ReplayBuffer() for _ in self.workers]
        self._retired: list[grpc.Channel] = []

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
        for chunk in self._each_shard("snapshot", lambda stub: stub.Snapshot(shard_pb2.SnapshotRequest())):
            ids, values = decode_rows(chunk.batches)
            yield from zip(ids, values, strict=True)

    def logic_outputs(self) -> Iterator[Any]:
        """End every shard's server logic (its close) and yield its outputs, shard by shard."""
        request = shard_pb2.LogicOutputsRequest()
        for chunk in self._each_shard("server logic outputs", lambda stub: stub.LogicOutputs(request)):
            for data in chunk.outputs:
                yield unpack(data)

    def watch(self) -> Iterator[ShardSnapshot]:
        """Each shard's model snapshots (psserver --snapshot-every) as they are taken, until
        the final ones the shards take as they stop."""
        self.check_shards()
        yield from watch_snapshots(self._shard_stubs, self.servers)

    def has_server_logic(self) -> bool:
        """Whether the shards run a server logic (psserver --logic), by their Info."""
        return any(isinstance(info, shard_pb2.InfoResponse) and info.logic for info in self.info())

    def _each_shard(self, what: str, call: Callable[[Any], Iterator[Any]]) -> Iterator[Any]:
        """The messages of one server-streaming call to each shard in turn."""
        self.check_shards()
        for shard, stub in enumerate(self._shard_stubs):
            try:
                yield from call(stub)
            except grpc.RpcError as exc:
                raise ShardError(
                    f"{what} of shard {shard} at {self.servers[shard]} failed: {describe_rpc_error(exc)}"
                ) from None

    def info(self, timeout: float = 5.0) -> list[shard_pb2.InfoResponse | ShardError]:
        """Each shard's Info, or the error that stands in for it."""
        return self._ask_each("shard", lambda stub: stub.Info(shard_pb2.InfoRequest(), timeout=timeout))

    def status(self, timeout: float = 5.0) -> list[worker_pb2.StatusResponse | StreampsError]:
        """Each worker's Status, or the error that stands in for it."""
        return self._ask_each("worker", lambda stub: stub.Status(worker_pb2.StatusRequest(), timeout=timeout))

    def _ask_each(self, kind: str, ask: Callable[[Any], Any]) -> list[Any]:
        """`ask(stub)` of every shard or every worker in turn; one that fails is answered
        by an error naming it, so one server that is down does not hide the others."""
        stubs, addresses, error = (
            (self._shard_stubs, self.servers, ShardError)
            if kind == "shard"
            else (self._worker_stubs, self.workers, StreampsError)
        )
        answers: list[Any] = []
        for index, stub in enumerate(stubs):
            try:
                answers.append(ask(stub))
            except grpc.RpcError as exc:
                answers.append(error(f"{kind} {index} at {addresses[index]}: {describe_rpc_error(exc)}"))
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

    def worker_stub(self, index: int) -> worker_pb2_grpc.WorkerStub:
        return self._worker_stubs[index]

    def reconnect_worker(self, index: int, broken: worker_pb2_grpc.WorkerStub) -> worker_pb2_grpc.WorkerStub:
        """A stub on a new channel to worker `index`, whose old one broke with its process; the
        feeder and the outputs reader both ask, and the first one's new channel serves both."""
        with self._connecting:
            if self._worker_stubs[index] is broken:
                # The old channel is closed with the cluster: the other thread may still hold a call on it.
                self._retired.append(self._worker_channels[index])
                self._worker_channels[index] = open_channel(self.workers[index], self.security)
                self._worker_stubs[index] = worker_pb2_grpc.WorkerStub(self._worker_channels[index])
            return self._worker_stubs[index]

    def feed(
        self,
        records: Iterable[Any],
        *,
        partition_by: Callable[[Any], Hashable] | None = None,
        end_of_input: bool = True,
        iteration_wait_time: float | None = None,
        stop: threading.Event | None = None,
    ) -> int:
        """Send records to the workers (round robin, or by `partition_by` key); blocks
        until all are accepted. With `end_of_input`, the workers' input ends after them.
        With `iteration_wait_time`, input also ends after that many seconds without a record,
        and once `stop` is set, after the records read so far. Returns how many were sent."""
        if not self.workers:
            raise StreampsError("this cluster has no workers to feed")
        self.check_shards()
        for index in range(len(self.workers)):
            self._ready_worker(index)
        return feed_workers(
            self._worker_stubs,
            records,
            partition_by=partition_by,
            end_of_input=end_of_input,
            iteration_wait_time=iteration_wait_time,
            link=self,
            replay=self._replay,
            stop=stop,
        )

    def outputs(self) -> Iterator[Any]:
        """Every worker's outputs, merged as they arrive, until all workers finished.

        Raises JobFailed with the worker's one-line error if a worker failed.
        """
        return self._merged(queue.Queue(), None)

    def _merged(self, merged: queue.Queue[Any], watch: ShardWatch | None) -> Iterator[Any]:
        """`outputs()` through `merged`, where anyone may also put an exception that ends them,
        and with a `watch`, each shard's snapshots among them as `Right` values."""
        for index in range(len(self.workers)):
            self._ready_worker(index)

        def read(index: int) -> None:
            try:
                read_outputs(self, index, merged.put)
                merged.put(_DONE)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.ABORTED:
                    merged.put(WorkerReported(exc.details()))
                else:
                    merged.put(JobFailed(f"worker {index} at {self.workers[index]}: {describe_rpc_error(exc)}"))
            except JobFailed as exc:  # it names the worker
                merged.put(exc)
            except StreampsError as exc:
                merged.put(JobFailed(f"worker {index}: {exc}"))

        for index in range(len(self.workers)):
            threading.Thread(target=read, args=(index,), name=f"outputs-{index}", daemon=True).start()
        if watch is not None:
            watch.start(NewestSnapshots(merged.put).deliver)
        running = len(self.workers)
        try:
            while running:
                item = merged.get()
                if item is _DONE:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield from item
        finally:
            if watch is not None:
                watch.cancel()

    def stream(
        self,
        records: Iterable[Any] | None = None,
        *,
        partition_by: Callable[[Any], Hashable] | None = None,
        iteration_wait_time: float | None = None,
        server_logic: bool | None = None,
        live: bool | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[Left[Any] | Right[Any]]:
        """Feed `records` (if given), yield every output as `Left` while they arrive, then every
        final parameter as `Right((id, value))` once all workers finished; with a server logic
        (`server_logic`; None: ask the shards), every output of the logic as `Right` instead,
        after its close. With `live` (None: the shards that take model snapshots, psserver
        --snapshot-every), each shard's snapshots come among the outputs as it takes them, each a
        run of `Right`s: an endless job's model updates. Setting `stop` ends the input after the
        records read so far: the job ends with every one of them."""
        self.check_shards()  # before any record reaches a worker
        watched = list(range(len(self.servers))) if live else []
        if live is None:  # the shards that take snapshots; watched before the first record is fed
            infos = enumerate(self.info())
            watched = [i for i, info in infos if isinstance(info, shard_pb2.InfoResponse) and info.snapshot_every]
        rewatch = self.restarts is not None
        watch = ShardWatch(self._shard_stubs, self.servers, shards=watched, rewatch=rewatch) if watched else None
        feed_error: list[BaseException] = []
        feeder: threading.Thread | None = None
        merged: queue.Queue[Any] = queue.Queue()
        outputs_ended = threading.Event()
        if records is not None:

            def feed() -> None:
                try:
                    self.feed(records, partition_by=partition_by, iteration_wait_time=iteration_wait_time, stop=stop)
                except BaseException as exc:
                    feed_error.append(exc)
                    # A Feed call that failed (a message over the size limit, say) may leave its
                    # worker waiting for the end of an input that never comes, and its outputs
                    # with it. A worker that failed itself reports that through its outputs,
                    # which end: else this error ends them.
                    # A worker stopped on a signal ends its outputs once it finished what it took.
                    stopped = isinstance(exc, WorkerStopped)
                    if isinstance(exc, JobFailed) and not stopped and not outputs_ended.wait(FEEDER_JOIN_S):
                        merged.put(exc)

            feeder = threading.Thread(target=feed, name="feeder", daemon=True)
            feeder.start()
        try:
            try:
                for out in self._merged(merged, watch):
                    yield out if isinstance(out, Right) else Left(out)
            finally:
                outputs_ended.set()
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
        if feed_error and not isinstance(feed_error[0], WorkerStopped):  # stopped: the model as it ends
            raise feed_error[0]
        if server_logic is None:
            server_logic = self.has_server_logic()
        for result in self.logic_outputs() if server_logic else self.snapshot():
            yield Right(result)

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None
        for channel in [*self._shard_channels, *self._worker_channels, *self._retired]:
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
