"""The one interface every input of a worker goes through: `Source`.

A source yields this worker's records in chunks, each record with its
position: a positive number, increasing in the order the source yields them,
that names the record in errors, in checkpoints and, for a restartable worker,
in the origins of its pushes (psworker/origins.py). A source whose records
must be acknowledged (a stream's entries) gets `ack(position)` once every
record it yielded at or below that position is finished: processed, and every
push it caused acknowledged by the shards. A record it cannot read is yielded
as a `MalformedRecord` at its position, and the worker treats it as a malformed
line of a file (`--on-error`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from psclient.errors import StreampsError
from psclient.inputs import MalformedRecord

# (position, record or MalformedRecord) pairs, in position order.
Chunk = list[tuple[int, Any]]


class SourceError(StreampsError):
    """A source that cannot be opened or read: one line, naming the source."""


@dataclass(frozen=True)
class SourceContext:
    """What a source knows of the worker that reads it."""

    worker_index: int
    num_workers: int
    # The worker's id (`{job id}-w{index}`): the same across its restarts, so a stream's
    # consumer named by it finds the entries it had taken and not acknowledged.
    worker_id: str
    fmt: str = "jsonl"
    partition_key: str | None = None
    skip_header: bool = False


class Source:
    """Subclass it for a source of your own (`psworker --input module:attr`, where
    `attr` is a callable that takes a `SourceContext` and returns the source)."""

    # What a position is called in messages: "line", "entry", "message", "record".
    position_name = "record"
    # Whether the source wants `ack`: a worker started again gets what was not acked
    # again. Its positions must then name the same record in every run (a stream's entry
    # id): the worker tags its pushes by position, so the shards apply those of a record
    # it takes again once.
    acks = False

    def open(self) -> None:
        """Connect; raise SourceError (one line) when the source cannot be reached."""

    def read(self) -> Iterator[Chunk]:
        """Chunks of (position, record or MalformedRecord); an empty chunk when nothing
        arrived for a while (the worker checks for a stop between chunks). Returning
        ends the input."""
        raise NotImplementedError

    def ack(self, position: int) -> None:
        """Every record yielded at or below `position` is finished. Called on the thread
        that iterates `read`, between chunks, and once more after it ended."""

    def close(self) -> None:
        """Release connections; called once, after the last `ack`."""

    def describe(self) -> str:
        return type(self).__name__


def malformed(where: str, problem: str) -> MalformedRecord:
    return MalformedRecord(f"{where}: {problem}")
