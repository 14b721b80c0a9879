"""A shard's write-ahead log: checksummed records in numbered segment files, group-committed.

A record is a 12-byte header (magic, payload length, CRC-32 of length and
payload) and its payload. A WAL record's payload is one applied PushRequest as
its protobuf bytes, so replay goes through the very decoding a live push does
and (worker_id, seq) comes back with it. Nothing is pickled.

Segments are `wal-<number>.log`; a snapshot names the first segment that is not
in it, and every older one can go. New records always go to a fresh segment
after a restart, so a tail cut at recovery is never written after.

Group commit: records appended while a write and fsync are under way wait in
memory and go to disk together in the next one. The write and the fsync run
in a thread (`run_in_executor`), so the shard's event loop keeps serving while
the disk works; each record's future is resolved only once the fsync covering
it has returned (or, without `durable`, once it is written).
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

MAGIC = b"SPW1"
_HEADER = struct.Struct("<4sII")  # magic, payload length, crc32(length bytes + payload)
HEADER_SIZE = _HEADER.size
# A length past this is a corrupt header, not a record (a push batch is far smaller).
MAX_RECORD = 1 << 30
SEGMENT_GLOB = "wal-*.log"


def frame(payload: bytes) -> bytes:
    """`payload` as one record."""
    length = struct.pack("<I", len(payload))
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload, zlib.crc32(length))) + payload


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


def fsync_dir(directory: Path) -> None:
    """Make a file's creation, rename or removal in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Segment:
    def __init__(self, directory: Path, number: int):
        self.number = number
        self.path = segment_path(directory, number)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.size = 0
        self.named = False  # its directory entry is durable


class WriteAheadLog:
    """Appends records to the current segment; `append` returns a future that says when it is safe.

    Used from one event loop only. A failed write or fsync fails every record
    it carried and every later one: after a failed fsync the kernel may have
    dropped the pages, so nothing written since can be trusted.
    """

    def __init__(self, directory: Path, first_segment: int, *, durable: bool):
        self.directory = directory
        self.durable = durable
        self._segment = _Segment(directory, first_segment)
        # Records not yet handed to the disk: (segment, frames, futures) per segment.
        self._pending: list[tuple[_Segment, list[bytes], list[asyncio.Future[None]]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._closed_segments: list[_Segment] = []
        self.error: OSError | None = None
        self.commits = 0  # writes (and fsyncs) done: fewer than records when group commit works
        self.records = 0

    @property
    def segment(self) -> int:
        """The number of the segment new records go to."""
        return self._segment.number

    def append(self, payload: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.error is not None:
            future.set_exception(self.error)
            return future
        if not self._pending or self._pending[-1][0] is not self._segment:
            self._pending.append((self._segment, [], []))
        _, frames, futures = self._pending[-1]
        frames.append(frame(payload))
        futures.append(future)
        self.records += 1
        self._kick()
        return future

    def barrier(self) -> asyncio.Future[None]:
        """A future resolved once every record appended so far is safe (as `append`'s are)."""
        loop = asyncio.get_running_loop()
        if self.error is not None:
            future: asyncio.Future[None] = loop.create_future()
            future.set_exception(self.error)
            return future
        if not self._pending and self._flushing is None:
            future = loop.create_future()
            future.set_result(None)
            return future
        if not self._pending:
            self._pending.append((self._segment, [], []))
        future = loop.create_future()
        self._pending[-1][2].append(future)
        self._kick()
        return future

    def rotate(self) -> int:
        """Send new records to a fresh segment; return its number. Records already
        appended still go to the segment they were appended to."""
        self._closed_segments.append(self._segment)
        self._segment = _Segment(self.directory, self._segment.number + 1)
        return self._segment.number

    def _kick(self) -> None:
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                groups, self._pending = self._pending, []
                work = [(segment, b"".join(frames)) for segment, frames, _ in groups]
                try:
                    await loop.run_in_executor(None, self._write, work)
                except OSError as exc:
                    self.error = exc
                    for _, _, futures in [*groups, *self._pending]:
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    self._pending = []
                    return
                self.commits += 1
                for _, _, futures in groups:
                    for future in futures:
                        if not future.done():
                            future.set_result(None)
        finally:
            self._flushing = None
        self._close_retired()

    def _write(self, work: list[tuple[_Segment, bytes]]) -> None:
        for segment, data in work:
            if data:
                _write_all(segment.fd, data)
                segment.size += len(data)
        if self.durable:
            for segment in {id(s): s for s, _ in work}.values():
                os.fdatasync(segment.fd)
                if not segment.named:
                    fsync_dir(self.directory)
                    segment.named = True

    def _close_retired(self) -> None:
        """Close segments that were rotated away from once nothing waits to be written to them."""
        waiting = {id(segment) for segment, _, _ in self._pending}
        keep = []
        for segment in self._closed_segments:
            if id(segment) in waiting:
                keep.append(segment)
            else:
                os.close(segment.fd)
        self._closed_segments = keep

    async def close(self) -> None:
        """Write what is pending, then close every segment."""
        if self._pending or self._flushing is not None:
            with contextlib.suppress(OSError):  # already reported to whoever waited on those records
                await self.barrier()
        if self._flushing is not None:
            await self._flushing
        self._close_retired()
        os.close(self._segment.fd)


def iter_segments(directory: Path, first: int) -> Iterator[tuple[int, Path]]:
    """(number, path) of every segment from `first` on, in order."""
    for number in segment_numbers(directory):
        if number >= first:
            yield number, segment_path(directory, number)
