"""A shard's write-ahead log: checksummed records in numbered segment files, group-committed.

A record is a 12-byte header (magic, payload length, CRC-32 of length and
payload) and its payload. A WAL record's payload is one applied PushRequest as
its protobuf bytes, so replay goes through the very decoding a live push does
and (worker_id, seq) comes back with it. Nothing is pickled.

Segments are `wal-<number>.log`; a snapshot names the first segment that is not
in it, and every older one can go. New records always go to a fresh segment
after a restart, so a tail cut at recovery is never written after.

Group commit: a record is written at once; records written while an fsync is
under way share the next one. The fsync runs in a thread (`run_in_executor`),
so the shard's event loop keeps serving while the disk works; each record's
future is resolved only once an fsync that began after its write has returned
(or, without `durable`, once it is written).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from psclient.files import fsync_dir, write_all

MAGIC = b"SPW1"
_HEADER = struct.Struct("<4sII")  # magic, payload length, crc32(length bytes + payload)
HEADER_SIZE = _HEADER.size
# A length past this is a corrupt header, not a record (a push batch is far smaller).
MAX_RECORD = 1 << 30
SEGMENT_GLOB = "wal-*.log"


def header(payload: bytes) -> bytes:
    """The header of `payload`'s record."""
    length = struct.pack("<I", len(payload))
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload, zlib.crc32(length)))


def frame(payload: bytes) -> bytes:
    """`payload` as one record."""
    return header(payload) + payload


@dataclass
class ReadResult:
    """The whole records of a file, and where and why reading stopped short (if it did)."""

    records: list[bytes] = field(default_factory=list)
    end: int = 0  # offset just past the last whole record
    size: int = 0
    problem: str | None = None  # "torn ..." or "corrupt ...": what lies at `end`


def read_records(data: bytes) -> ReadResult:
    """Every whole, intact record from the start of `data`, stopping at the first that is not."""
    result = ReadResult(size=len(data))
    offset = 0
    while offset < len(data):
        if len(data) - offset < HEADER_SIZE:
            result.problem = f"torn record header ({len(data) - offset} of {HEADER_SIZE} bytes)"
            break
        magic, length, crc = _HEADER.unpack_from(data, offset)
        if magic != MAGIC or length > MAX_RECORD:
            result.problem = "corrupt record header"
            break
        start = offset + HEADER_SIZE
        if start + length > len(data):
            result.problem = f"torn record ({len(data) - start} of {length} payload bytes)"
            break
        payload = data[start : start + length]
        if zlib.crc32(payload, zlib.crc32(struct.pack("<I", length))) != crc:
            result.problem = "corrupt record (checksum mismatch)"
            break
        result.records.append(payload)
        offset = start + length
    result.end = offset
    return result


def segment_path(directory: Path, number: int) -> Path:
    return directory / f"wal-{number:012d}.log"


def segment_numbers(directory: Path) -> list[int]:
    """The numbers of the WAL segments in `directory`, in order."""
    numbers = []
    for path in directory.glob(SEGMENT_GLOB):
        stem = path.name[len("wal-") : -len(".log")]
        if stem.isdigit():
            numbers.append(int(stem))
    return sorted(numbers)


class _Segment:
    def __init__(self, directory: Path, number: int):
        self.number = number
        self.path = segment_path(directory, number)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.named = False  # its directory entry is durable


class WriteAheadLog:
    """Appends records to the current segment; `append` returns a future that says when it is safe.

    Used from one event loop only. A record is written (to the page cache) at
    once, on the loop, so the log's order is the order of `append` calls; only
    fsyncs run in a thread. A failed write or fsync fails every record waiting
    and every later one: after a failed fsync the kernel may have dropped the
    pages, so nothing written since can be trusted.
    """

    def __init__(self, directory: Path, first_segment: int, *, durable: bool):
        self.directory = directory
        self.durable = durable
        self._segment = _Segment(directory, first_segment)
        # Written, not yet fsynced: the futures waiting, and the segments to fsync.
        self._waiting: list[asyncio.Future[None]] = []
        self._unsynced: dict[int, _Segment] = {}
        self._retired: list[_Segment] = []  # rotated away from, closed once synced
        self._syncing: asyncio.Task[None] | None = None
        self.error: OSError | None = None
        self.commits = 0  # fsyncs done: fewer than records when group commit works
        self.records = 0

    @property
    def segment(self) -> int:
        """The number of the segment new records go to."""
        return self._segment.number

    def _future(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.error is not None:
            future.set_exception(self.error)
        return future

    def append(self, payload: bytes) -> asyncio.Future[None]:
        future = self._future()
        if future.done():
            return future
        try:
            head = header(payload)
            # writev: no copy of a large payload into one buffer with its header.
            written = os.writev(self._segment.fd, [head, payload])
            if written < len(head) + len(payload):
                write_all(self._segment.fd, (head + payload)[written:])
        except OSError as exc:  # a torn record may be left: recovery cuts the log there
            self._fail(exc)
            future.set_exception(exc)
            return future
        self.records += 1
        if not self.durable:
            future.set_result(None)
            return future
        self._unsynced[self._segment.number] = self._segment
        self._waiting.append(future)
        self._kick()
        return future

    def barrier(self) -> asyncio.Future[None]:
        """A future resolved once every record appended so far is safe (as `append`'s are)."""
        future = self._future()
        if future.done():
            return future
        if not self._waiting and self._syncing is None:
            future.set_result(None)  # nothing written is waiting for an fsync
            return future
        self._waiting.append(future)  # the next fsync covers all written so far
        self._kick()
        return future

    def rotate(self) -> int:
        """Send new records to a fresh segment; return its number."""
        # Opened first: if that fails, the current segment stays current (retired,
        # its fd would be closed under the appends that still use it).
        fresh = _Segment(self.directory, self._segment.number + 1)
        self._retired.append(self._segment)
        self._segment = fresh
        self._close_retired()
        return self._segment.number

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        waiting, self._waiting = self._waiting, []
        for future in waiting:
            if not future.done():
                future.set_exception(exc)

    def _kick(self) -> None:
        if self._syncing is None:
            self._syncing = asyncio.get_running_loop().create_task(self._sync())

    async def _sync(self) -> None:
        """fsync until nothing waits: what was written during one fsync goes in the next."""
        loop = asyncio.get_running_loop()
        try:
            while self._waiting and self.error is None:
                waiting, self._waiting = self._waiting, []
                segments, self._unsynced = list(self._unsynced.values()), {}
                try:
                    await loop.run_in_executor(None, self._fsync, segments)
                except OSError as exc:
                    self._waiting = waiting + self._waiting
                    self._fail(exc)
                    return
                self.commits += 1
                for future in waiting:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._syncing = None
            self._close_retired()

    def _fsync(self, segments: list[_Segment]) -> None:
        for segment in segments:
            os.fdatasync(segment.fd)
            if not segment.named:
                fsync_dir(self.directory)
                segment.named = True

    def _close_retired(self) -> None:
        if self._syncing is not None:
            return  # an fsync may be using them
        for segment in self._retired:
            if segment.number not in self._unsynced:
                os.close(segment.fd)
        self._retired = [segment for segment in self._retired if segment.number in self._unsynced]

    async def close(self) -> None:
        """Wait for the pending fsync, then close every segment."""
        with contextlib.suppress(OSError):  # already reported to whoever waited on those records
            await self.barrier()
        self._retired.append(self._segment)
        self._unsynced = {}
        self._close_retired()


def iter_segments(directory: Path, first: int) -> Iterator[tuple[int, Path]]:
    """(number, path) of every segment from `first` on, in order."""
    for number in segment_numbers(directory):
        if number >= first:
            yield number, segment_path(directory, number)
