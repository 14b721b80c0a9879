"""The shards' model snapshots (psserver --snapshot-every), read as they are taken.

`ShardWatch` reads every shard's Watch stream on a thread of its own and hands
each snapshot, once its last chunk is in, to a callback: `Cluster.watch()`
yields them, `Cluster.stream()` turns them into live `Right((id, value))`
values among the outputs of an endless job.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from psclient.either import Right
from psclient.errors import ShardError
from psclient.rpc.errors import describe_rpc_error
from psclient.wire.codec import decode_rows
from psclient.wire.partition import Id
from psclient.wire.proto import shard_pb2, shard_pb2_grpc

# How long to wait before watching a shard again that went away (rewatch).
REWATCH_S = 0.2


@dataclass(frozen=True)
class ShardSnapshot:
    """One shard's whole model at one point in time (its number counts the shard's snapshots);
    `final` is the one it took as it stopped."""

    shard: int
    number: int
    final: bool
    params: list[tuple[Id, Any]]


@dataclass(frozen=True)
class WatchEnded:
    """A shard's Watch stream ended: after its final snapshot, or with `error`."""

    shard: int
    error: ShardError | None = None


def _assemble(shard: int, chunks: list[shard_pb2.SnapshotChunk]) -> ShardSnapshot:
    params: list[tuple[Id, Any]] = []
    for chunk in chunks:
        ids, values = decode_rows(chunk.batches)
        params.extend(zip(ids, values, strict=True))
    return ShardSnapshot(shard, chunks[-1].snapshot, chunks[-1].final, params)


class ShardWatch:
    """A Watch call to every shard (of `shards`), each read on its own thread into `deliver`."""

    def __init__(
        self,
        stubs: Sequence[shard_pb2_grpc.ParameterShardStub],
        servers: Sequence[str],
        *,
        shards: Sequence[int] | None = None,
        rewatch: bool = False,
    ):
        self.servers = list(servers)
        self._stubs = list(stubs)
        watched = range(len(stubs)) if shards is None else shards  # the shards that take snapshots
        self._calls = {shard: self._stubs[shard].Watch(shard_pb2.WatchRequest()) for shard in watched}
        self._cancelled = threading.Event()
        # Watch again a shard that went away without its final snapshot (a restarted
        # shard of a durable job), rather than report it: the job reports a dead one.
        self.rewatch = rewatch
        self._lock = threading.Lock()

    def start(self, deliver: Callable[[ShardSnapshot | WatchEnded], None]) -> None:
        for shard, call in list(self._calls.items()):
            threading.Thread(target=self._read, args=(shard, call, deliver), name=f"watch-{shard}", daemon=True).start()

    def _read(self, shard: int, call: Any, deliver: Callable[[ShardSnapshot | WatchEnded], None]) -> None:
        while True:
            chunks: list[shard_pb2.SnapshotChunk] = []
            try:
                for chunk in call:
                    chunks.append(chunk)
                    if chunk.end:
                        deliver(_assemble(shard, chunks))
                        chunks = []
                deliver(WatchEnded(shard))
                return
            except grpc.RpcError as exc:
                if self._cancelled.is_set():
                    return
                if not (self.rewatch and exc.code() == grpc.StatusCode.UNAVAILABLE):
                    what = f"model snapshots of shard {shard} at {self.servers[shard]}"
                    deliver(WatchEnded(shard, ShardError(f"{what}: {describe_rpc_error(exc)}")))
                    return
            if self._cancelled.wait(REWATCH_S):
                return
            with self._lock:
                if self._cancelled.is_set():
                    return
                call = self._calls[shard] = self._stubs[shard].Watch(shard_pb2.WatchRequest())

    def cancel(self) -> None:
        """End every call; their threads then end without a report."""
        with self._lock:
            self._cancelled.set()
            for call in self._calls.values():
                call.cancel()


class NewestSnapshots:
    """Hands each shard's snapshots on to `put` as iterables of `Right`s, keeping only the
    newest one a slow reader has not taken yet: it skips the older ones rather than have
    them pile up in memory."""

    def __init__(self, put: Callable[[Any], None]):
        self._put = put
        self._newest: dict[int, ShardSnapshot] = {}
        self._lock = threading.Lock()

    def deliver(self, item: ShardSnapshot | WatchEnded) -> None:
        if isinstance(item, WatchEnded):
            if item.error is not None:
                self._put(item.error)
            return
        with self._lock:
            due = item.shard not in self._newest  # else the token put for the older one takes this
            self._newest[item.shard] = item
        if due:
            self._put(_Due(self, item.shard))

    def take(self, shard: int) -> list[Right[tuple[Id, Any]]]:
        with self._lock:
            snapshot = self._newest.pop(shard)
        return [Right(pair) for pair in snapshot.params]


@dataclass(frozen=True)
class _Due:
    """A shard's newest snapshot, taken when the reader gets to it."""

    snapshots: NewestSnapshots
    shard: int

    def __iter__(self) -> Iterator[Right[tuple[Id, Any]]]:
        return iter(self.snapshots.take(self.shard))


def watch_snapshots(
    stubs: Sequence[shard_pb2_grpc.ParameterShardStub], servers: Sequence[str]
) -> Iterator[ShardSnapshot]:
    """Every shard's snapshots as they come, until each shard's final one; ShardError if a
    shard's stream fails (a shard without --snapshot-every, one that died)."""
    arrived: queue.Queue[ShardSnapshot | WatchEnded] = queue.Queue()
    watch = ShardWatch(stubs, servers)
    watch.start(arrived.put)
    running = len(servers)
    try:
        while running:
            item = arrived.get()
            if isinstance(item, ShardSnapshot):
                yield item
            elif item.error is not None:
                raise item.error
            else:
                running -= 1
    finally:
        watch.cancel()
