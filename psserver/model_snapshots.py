"""Periodic model snapshots (`psserver --snapshot-every`): files to --load, streamed live.

An endless job never reaches the end where the client reads the final model,
so a shard shows its model while it trains. Every `every` seconds in which a
push was applied, it copies its whole store at once (between two awaits of the
serving loop, so the copy is one point in time of this shard), writes it to
`DIR/model-<shard>-<number>.jsonl` in the JSON lines `psserver --load` reads,
keeps the newest `keep` files, and hands it to every Watch stream open at the
time. On a stop, once the job's streams have drained, it takes a last one: the
model the shard ends with, marked final.

A watcher that falls behind drops the older of its unsent snapshots: a slow
client sees fewer snapshots but never holds the shard up. Writing a file runs
on a thread; a snapshot that is due while the last one is still being written
is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from psclient.files import fsync_dir, write_all
from psclient.wire.codec import DecodedBatch, encode_batch
from psclient.wire.proto import shard_pb2
from psserver.store import ParameterStore

log = logging.getLogger("streamps")

DEFAULT_KEEP = 5
# Bytes of parameter values per streamed chunk: well under the message limit.
CHUNK_BYTES = 1 << 20
# Snapshots a watcher may have waiting before the oldest is dropped.
WATCHER_BACKLOG = 2
_FILE_NAME = re.compile(r"model-(\d+)-(\d+)\.jsonl")


@dataclass(frozen=True)
class SnapshotPlan:
    """Where and how often (psserver --snapshot-dir, --snapshot-every, --snapshot-keep)."""

    directory: Path
    every: float
    keep: int = DEFAULT_KEEP


@dataclass(frozen=True)
class ModelSnapshot:
    """One copy of a shard's whole store; `chunks` are copies, safe to read on any thread."""

    number: int
    params: int
    chunks: list[list[DecodedBatch]]
    final: bool

    def messages(self) -> list[shard_pb2.SnapshotChunk]:
        """Its Watch messages: the chunks, the last one (maybe empty) marked `end`."""
        messages = [shard_pb2.SnapshotChunk(batches=[encode_batch(group) for group in chunk]) for chunk in self.chunks]
        if not messages:
            messages.append(shard_pb2.SnapshotChunk())
        for message in messages:
            message.snapshot = self.number
        messages[-1].end = True
        messages[-1].final = self.final
        return messages


def snapshot_file(directory: Path, shard: int, number: int) -> Path:
    return directory / f"model-{shard}-{number:06d}.jsonl"


def write_snapshot_file(path: Path, snapshot: ModelSnapshot) -> int:
    """Write the snapshot's JSON lines to `path` whole (temp file, fsync, rename); return its bytes.
    A write that fails leaves no temp file behind."""
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size = 0
        for chunk in snapshot.chunks:
            for batch in chunk:
                values = [] if batch.values is None else batch.values.tolist()
                lines = [
                    json.dumps({"id": param_id, "value": value})
                    for param_id, value in zip(batch.ids(), values, strict=True)
                ]
                data = ("\n".join(lines) + "\n").encode()
                write_all(fd, data)
                size += len(data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(temp, path)
    fsync_dir(path.parent)
    return size


class ModelSnapshots:
    """A shard's periodic model snapshots: taken on the serving loop, written on a thread."""

    def __init__(self, store: ParameterStore, shard: int, plan: SnapshotPlan, changes: Callable[[], int]):
        self.store = store
        self.shard = shard
        self.directory = plan.directory
        self.every = plan.every
        self.keep = plan.keep
        # A count that grows with every applied push: no change, no snapshot.
        self._changes = changes
        self._changes_at_last = changes()  # no snapshot before the first push
        self.taken = 0
        self._number = max(self._numbers_on_disk(), default=0)  # numbers go on across restarts
        self._watchers: set[asyncio.Queue[ModelSnapshot | None]] = set()
        self._writing: asyncio.Future[int] | None = None
        self._stop = asyncio.Event()

    def _numbers_on_disk(self) -> list[int]:
        numbers = []
        for path in self.directory.iterdir():
            match = _FILE_NAME.fullmatch(path.name)
            if match and int(match.group(1)) == self.shard:
                numbers.append(int(match.group(2)))
        return numbers

    # -- taking -------------------------------------------------------------

    def _capture(self, *, final: bool) -> ModelSnapshot:
        rows = max(1, CHUNK_BYTES // max(self.store.widest_row(), 1))
        # Fancy indexing copies: the chunks no longer share memory with the store.
        chunks = list(self.store.chunk_rows(rows))
        self._number += 1
        self._changes_at_last = self._changes()
        return ModelSnapshot(self._number, len(self.store), chunks, final)

    async def take(self, *, final: bool = False) -> ModelSnapshot:
        """Copy the store now, hand the copy to every watcher, then write its file."""
        snapshot = self._capture(final=final)
        self.taken += 1
        for watcher in list(self._watchers):
            if watcher.qsize() >= WATCHER_BACKLOG:
                watcher.get_nowait()  # the oldest unsent one: a slow watcher sees fewer
            watcher.put_nowait(snapshot)
        path = snapshot_file(self.directory, self.shard, snapshot.number)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        self._writing = loop.run_in_executor(None, write_snapshot_file, path, snapshot)
        try:
            size = await self._writing
        finally:
            self._writing = None
        await loop.run_in_executor(None, self._remove_old)
        log.info(
            "model snapshot %d%s: %d parameters, %d bytes to %s in %.2f s",
            snapshot.number,
            " (final)" if final else "",
            snapshot.params,
            size,
            path,
            time.perf_counter() - started,
        )
        return snapshot

    def _remove_old(self) -> None:
        for number in sorted(self._numbers_on_disk())[: -self.keep]:
            with contextlib.suppress(FileNotFoundError):
                snapshot_file(self.directory, self.shard, number).unlink()

    async def run(self) -> None:
        """Take a snapshot every `every` seconds in which something changed, until `stop`."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.every)
            if self._stop.is_set():
                return
            if self._writing is not None or self._changes() == self._changes_at_last:
                continue
            try:
                await self.take()
            except Exception as exc:  # a full disk, a value JSON cannot hold: the next period tries again
                log.error("model snapshot to %s failed: %s: %s", self.directory, type(exc).__name__, exc)

    def stop(self) -> None:
        """End `run` after the snapshot it may be writing (await its task for that)."""
        self._stop.set()

    async def finish(self) -> str:
        """The final snapshot, then the end of every Watch stream; a line for the stop log."""
        try:
            snapshot = await self.take(final=True)
            outcome = f"; final model snapshot {snapshot.number} of {snapshot.params} parameters"
        except Exception as exc:  # the stop goes on: the streams end, the data dir closes
            log.error("final model snapshot to %s failed: %s: %s", self.directory, type(exc).__name__, exc)
            outcome = "; no final model snapshot"
        for watcher in list(self._watchers):
            watcher.put_nowait(None)
        return outcome

    # -- watching -----------------------------------------------------------

    async def watch(self) -> AsyncIterator[shard_pb2.SnapshotChunk]:
        """The Watch messages of every snapshot taken from now on, until the final one."""
        watcher: asyncio.Queue[ModelSnapshot | None] = asyncio.Queue()
        self._watchers.add(watcher)
        try:
            while (snapshot := await watcher.get()) is not None:
                for message in snapshot.messages():
                    yield message
        finally:
            self._watchers.discard(watcher)
