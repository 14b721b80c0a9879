"""A shard's data dir: its lock, its snapshots, its write-ahead log, and recovery from them.

Layout of DIR:
    LOCK                 flock'ed by the running shard: a second one is refused
    shard.json           which shard of how many this dir belongs to
    snapshot.bin         the table, the watermarks, the origins (psserver.origins) and
                         the workers' clocks (psserver.clocks) as of a point in the log
    wal-<n>.log          applied pushes, and the clocks workers told, from segment n on
                         (psserver.wal)

A snapshot names the first WAL segment that is not in it. Recovery loads the
snapshot (if any), then replays every later segment's records in order, each
a whole PushRequest applied through the store's all-or-nothing `push_rows`, so
half a batch is never applied. A torn or corrupt record ends the replay: the
log is cut there (one WARNING), and later segments are dropped.

A snapshot is the store's rows copied between two awaits (so it is
consistent with the log position it names), written by a thread to
snapshot.tmp, fsynced and renamed over snapshot.bin; only then are the older
segments removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from psclient.errors import StreampsError
from psclient.files import fsync_dir, replace_file
from psclient.wire.codec import DecodedBatch, decode_batch, encode_batch
from psclient.wire.proto import shard_pb2
from psserver.origins import Origins, tagged
from psserver.store import ParameterStore
from psserver.wal import MAX_RECORD, WriteAheadLog, frame, iter_segments, read_records, segment_numbers

log = logging.getLogger("streamps.durability")

LOCK = "LOCK"
META = "shard.json"
SNAPSHOT = "snapshot.bin"
SNAPSHOT_TMP = "snapshot.tmp"
SNAPSHOT_FORMAT = 1
DEFAULT_SNAPSHOT_INTERVAL_S = 60.0
# Rows per snapshot record: as many as fit in this many bytes of values, so that
# a record stays far below the log's MAX_RECORD whatever a parameter's size.
SNAPSHOT_CHUNK_BYTES = 64 << 20
_HEADER, _CHUNK, _END = b"H", b"C", b"E"
# A WAL record is a PushRequest's bytes, or this byte and a WorkerClock's: a serialized
# PushRequest never starts with 0 (a field tag of field number 0 is invalid).
CLOCK_RECORD = b"\x00"


class DataDirError(StreampsError):
    """A data dir the shard cannot use: one line for `psserver: error:`."""


def lock_data_dir(directory: Path) -> int:
    """Take DIR/LOCK for this process (released when it exits, however it exits); return its fd."""
    if not directory.is_dir():
        raise DataDirError(f"--data-dir {directory} does not exist or is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise DataDirError(f"--data-dir {directory} is not writable")
    try:
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DataDirError(f"--data-dir {directory} is not usable: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirError(f"--data-dir {directory} is in use by another running shard") from None
    return fd


def _json_record(tag: bytes, obj: dict[str, Any]) -> bytes:
    return frame(tag + json.dumps(obj, sort_keys=True).encode())


def write_snapshot(directory: Path, header: dict[str, Any], chunks: list[list[DecodedBatch]]) -> int:
    """Write a snapshot to a temp file, fsync it, rename it into place; return its size."""
    tmp = directory / SNAPSHOT_TMP
    with tmp.open("wb") as out:
        out.write(_json_record(_HEADER, header))
        for chunk in chunks:
            message = shard_pb2.SnapshotChunk(batches=[encode_batch(group) for group in chunk])
            payload = _CHUNK + message.SerializeToString()
            if len(payload) > MAX_RECORD:  # recovery would refuse it: never rename it into place
                raise OSError(f"a snapshot record of {len(payload):,} bytes exceeds {MAX_RECORD:,}")
            out.write(frame(payload))
        out.write(_json_record(_END, {"params": header["params"]}))
        out.flush()
        os.fsync(out.fileno())
        size = out.tell()
    os.replace(tmp, directory / SNAPSHOT)
    fsync_dir(directory)
    return size


def read_snapshot(path: Path) -> tuple[dict[str, Any], list[bytes]]:
    """The header and the chunk payloads of a whole snapshot, or DataDirError."""
    result = read_records(path.read_bytes())
    records = result.records
    if result.problem or len(records) < 2 or records[0][:1] != _HEADER or records[-1][:1] != _END:
        why = result.problem or "it ends early"
        raise DataDirError(
            f"snapshot {path} is damaged ({why} at byte {result.end}); the log segments it covered were removed"
        )
    header = json.loads(records[0][1:])
    if header.get("format") != SNAPSHOT_FORMAT:
        raise DataDirError(f"snapshot {path} has format {header.get('format')!r}, not {SNAPSHOT_FORMAT}")
    return header, [record[1:] for record in records[1:-1]]


def _cut(path: Path, size: int) -> None:
    """Truncate a file and make its new size durable (the directory fsync does not)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_meta(directory: Path, shard: int, num_shards: int) -> None:
    """Refuse a data dir of another shard or layout; mark a new one as this shard's."""
    path = directory / META
    mine = {"shard": shard, "num_shards": num_shards}
    if path.exists():
        try:
            theirs = json.loads(path.read_text(encoding="utf-8"))
            theirs.get("shard")
        except (ValueError, AttributeError):
            raise DataDirError(f"{path} is damaged: not the JSON object a shard writes there") from None
        if theirs != mine:
            raise DataDirError(
                f"--data-dir {directory} holds shard {theirs.get('shard')} of {theirs.get('num_shards')}, "
                f"not shard {shard} of {num_shards}"
            )
        return
    replace_file(path, (json.dumps(mine) + "\n").encode())


class Durability:
    """The data dir of a running shard: recovery at start, the log while it serves, snapshots."""

    def __init__(
        self,
        directory: Path,
        store: ParameterStore,
        shard: int,
        num_shards: int,
        *,
        durable: bool = True,
        snapshot_interval: float = DEFAULT_SNAPSHOT_INTERVAL_S,
    ):
        self.directory = directory
        self.store = store
        self.shard, self.num_shards = shard, num_shards
        self.durable = durable
        self.snapshot_interval = snapshot_interval
        self.watermarks: dict[str, int] = {}
        self.origins = Origins()
        # Worker index -> the highest clock it told (math.inf: it finished); kept by psserver.clocks.
        self.clocks: dict[int, float] = {}
        self.recovered = False  # the dir held a snapshot or log records
        self._lock_fd = lock_data_dir(directory)
        check_meta(directory, shard, num_shards)
        self._next_segment = 1
        self._wal: WriteAheadLog | None = None
        self._logged_at_snapshot = 0
        self._stop = asyncio.Event()  # bound to a loop only once awaited
        self.snapshots = 0

    @property
    def wal(self) -> WriteAheadLog:
        assert self._wal is not None, "start() first"
        return self._wal

    # -- recovery -------------------------------------------------------------------

    def recover(self) -> None:
        """Load the snapshot and replay the log: the state of every acknowledged push."""
        started = time.perf_counter()
        first = 1
        path = self.directory / SNAPSHOT
        if path.exists():
            header, chunks = read_snapshot(path)
            for payload in chunks:
                for batch in shard_pb2.SnapshotChunk.FromString(payload).batches:
                    self.store.put(decode_batch(batch, with_values=True))
            self.watermarks.update(header["watermarks"])
            self.origins.load_json(header.get("finished_below", {}))  # absent before origins existed
            for index, clock, finished in header.get("worker_clocks", []):
                self.clocks[int(index)] = math.inf if finished else float(clock)
            first = int(header["wal_segment"])
            self.recovered = True
            # Left by a stop between a snapshot's rename and the removal of what it covers.
            self._remove_segments_before(first)
        replayed = self._replay(first)
        segments = segment_numbers(self.directory)
        self._next_segment = max([first, *segments]) + 1 if segments else first
        if self.recovered:
            log.info(
                "recovered %d parameters and %d workers' watermarks from %s (%d pushes replayed) in %.2f s",
                len(self.store),
                len(self.watermarks),
                self.directory,
                replayed,
                time.perf_counter() - started,
            )

    def _replay(self, first: int) -> int:
        replayed = 0
        segments = list(iter_segments(self.directory, first))
        for position, (_, path) in enumerate(segments):
            result = read_records(path.read_bytes())
            for payload in result.records:
                if payload[:1] == CLOCK_RECORD:
                    self.told(shard_pb2.WorkerClock.FromString(payload[1:]))
                    continue
                self._apply(shard_pb2.PushRequest.FromString(payload))
                replayed += 1
            if result.records:
                self.recovered = True
            if result.problem:
                later = segments[position + 1 :]
                log.warning(
                    "WAL %s: %s at byte %d; cut %d bytes there%s, recovery stops at the last whole push",
                    path.name,
                    result.problem,
                    result.end,
                    result.size - result.end,
                    f" and dropped {len(later)} later segments" if later else "",
                )
                _cut(path, result.end)
                for _, dropped in later:
                    dropped.unlink()
                fsync_dir(self.directory)
                break
        return replayed

    def told(self, clock: shard_pb2.WorkerClock) -> bool:
        """Note what a worker told of its clock (the highest counts, or the first of a run);
        whether it changed anything."""
        value = math.inf if clock.finished else float(clock.clock)
        known = self.clocks.get(clock.worker_index, 0.0)
        if value == known or (value < known and not clock.started):
            return False
        self.clocks[clock.worker_index] = value
        return True

    def _apply(self, request: shard_pb2.PushRequest) -> None:
        if tagged(request):  # the live shard's rule (ShardServicer._apply_tagged), from the same state
            fresh = self.origins.fresh(request)
            if fresh:
                self.store.push_rows([decode_batch(request.batches[i], with_values=True) for i in fresh])
            self.origins.record(request, fresh)
            self.watermarks[request.worker_id] = max(self.watermarks.get(request.worker_id, 0), request.seq)
            return
        if request.seq <= self.watermarks.get(request.worker_id, 0):
            return
        self.store.push_rows([decode_batch(batch, with_values=True) for batch in request.batches])
        self.watermarks[request.worker_id] = request.seq

    # -- serving --------------------------------------------------------------------

    def start(self) -> None:
        """Open a fresh log segment; make a loaded model (--load) durable first."""
        if not self.recovered and len(self.store):
            header, chunks = self._capture(self._next_segment)
            write_snapshot(self.directory, header, chunks)
            self.snapshots += 1
        self._wal = WriteAheadLog(self.directory, self._next_segment, durable=self.durable)

    def log_push(self, request: shard_pb2.PushRequest) -> asyncio.Future[None]:
        """Log an applied push; the future says when it may be acknowledged."""
        return self.wal.append(request.SerializeToString())

    def log_clock(self, clock: shard_pb2.WorkerClock) -> asyncio.Future[None]:
        """Log a worker's clock that `told` took; the future says when it may be answered."""
        return self.wal.append(CLOCK_RECORD + clock.SerializeToString())

    def barrier(self) -> asyncio.Future[None]:
        """When every push logged so far may be acknowledged (for a duplicate's ack)."""
        return self.wal.barrier()

    def _capture(self, segment: int) -> tuple[dict[str, Any], list[list[DecodedBatch]]]:
        # Copies of the rows (fancy indexing copies), taken without an await.
        chunks = list(self.store.chunk_rows(self._rows_per_chunk()))
        header = {
            "format": SNAPSHOT_FORMAT,
            "shard": self.shard,
            "num_shards": self.num_shards,
            "wal_segment": segment,
            "watermarks": dict(self.watermarks),
            "finished_below": self.origins.to_json(),
            "worker_clocks": [
                [index, 0 if clock == math.inf else int(clock), clock == math.inf]
                for index, clock in sorted(self.clocks.items())
            ],
            "params": len(self.store),
        }
        return header, chunks

    def _rows_per_chunk(self) -> int:
        return max(1, SNAPSHOT_CHUNK_BYTES // max(self.store.widest_row(), 1))

    async def snapshot(self, *, quiet: bool = False) -> tuple[int, int]:
        """Snapshot the table and watermarks, then remove the log segments it covers;
        return how many parameters and bytes it holds."""
        segment = self.wal.rotate()
        logged = self.wal.records
        header, chunks = self._capture(segment)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        size = await loop.run_in_executor(None, write_snapshot, self.directory, header, chunks)
        removed = await loop.run_in_executor(None, self._remove_segments_before, segment)
        self._logged_at_snapshot = logged  # only now: a failed snapshot is retried at the next interval
        self.snapshots += 1
        if not quiet:
            log.info(
                "snapshot of %d parameters (%d bytes) in %.2f s; removed %d log segments",
                header["params"],
                size,
                time.perf_counter() - started,
                removed,
            )
        return header["params"], size

    def changed_since_snapshot(self) -> bool:
        """Whether a restart now would replay any log record."""
        return self.wal.records > self._logged_at_snapshot or any(
            number < self.wal.segment for number in segment_numbers(self.directory)
        )

    def _remove_segments_before(self, segment: int) -> int:
        removed = 0
        for number, path in list(iter_segments(self.directory, 0)):
            if number < segment:
                path.unlink()
                removed += 1
        fsync_dir(self.directory)
        return removed

    async def run_snapshots(self) -> None:
        """Snapshot every `snapshot_interval` seconds while pushes arrive, until `stop_snapshots`."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.snapshot_interval)
            if self._stop.is_set():
                return
            if self.wal.records == self._logged_at_snapshot:
                continue
            try:
                await self.snapshot()
            except Exception as exc:  # the log still holds everything: report, retry next time
                log.error("snapshot to %s failed: %s: %s", self.directory, type(exc).__name__, exc)

    def stop_snapshots(self) -> None:
        """End `run_snapshots` after the snapshot it may be writing (await its task for that):
        cancelling it would leave a thread writing snapshot.tmp."""
        self._stop.set()

    async def close(self) -> None:
        if self._wal is not None:
            await self._wal.close()
            fsyncs = f"{self._wal.commits} fsyncs" if self.durable else "no fsyncs (--no-durable)"
            log.info("logged %d pushes with %s; %d snapshots", self._wal.records, fsyncs, self.snapshots)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)
