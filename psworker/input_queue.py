"""Records on their way to a worker's logic, in order, each with its position.

Feeders (a source's pump, the Feed calls through the FeedSource) put chunks
from any thread and block while `capacity` chunks wait: that is the
backpressure that reaches the data source. The logic takes records one at a time on the worker's event loop. A
record that could not be read keeps its place as an `Unreadable`, so the
records before it are processed first.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from psclient.errors import JobFailed


class Unreadable:
    """Stands in the queue where a record could not be read."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


class InputQueue:
    def __init__(self, worker_index: int, capacity: int, wake: Callable[[], None]):
        self.worker_index = worker_index
        self.capacity = capacity
        self._wake = wake  # tells the loop that something arrived; callable from any thread
        # Shared with feeders: guarded by `cond`.
        self.cond = threading.Condition()
        self._chunks: deque[list[tuple[int, Any]]] = deque()
        self.closed = False  # the input ended: nothing more will be fed
        self._refusal: str | None = None  # why feeders are turned away (the job failed or finished)
        self.records_fed = 0
        # The loop's chunk, being taken record by record.
        self._chunk: list[tuple[int, Any]] = []
        self._position = 0
        # The position of the last record taken (a restartable worker checkpoints it).
        self.last_taken = 0

    # -- feeders (any thread) ---------------------------------------------------

    def feed(self, records: list[Any]) -> None:
        """Queue records (in order), numbered on from the last; blocks while the queue is full."""
        with self.cond:
            first = self.records_fed + 1
            self.records_fed += len(records)
        self.feed_positioned(list(enumerate(records, start=first)))

    def feed_positioned(self, chunk: list[tuple[int, Any]]) -> None:
        """Queue (position, record) pairs; the position names the record in errors."""
        if not chunk:
            return
        with self.cond:
            while len(self._chunks) >= self.capacity and self._refusal is None:
                self.cond.wait()
            if self._refusal is not None:
                raise JobFailed(self._refusal)
            if self.closed:
                raise JobFailed(f"worker {self.worker_index}: input already ended")
            self._chunks.append(chunk)
        self._wake()

    def unreadable(self, message: str, position: int = 0) -> None:
        """A record could not be read: it takes its place in the input order (at `position`
        when a stream acknowledges it once handled; a file's has none)."""
        self.feed_positioned([(position, Unreadable(message))])

    def end(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self._wake()

    def stop(self, reason: str, *, drop_queued: bool = False) -> None:
        """End the input here (a graceful stop) and turn feeders away with `reason`,
        those waiting for room too. The records queued so far are still processed,
        unless `drop_queued`: a source's read-ahead, which no one was told was
        taken (the chunk the logic is in still is)."""
        with self.cond:  # an RLock: refuse takes it again
            self.refuse(reason)
            self.closed = True
            if drop_queued:
                self._chunks.clear()
        self._wake()

    @property
    def refusal(self) -> str | None:
        """Why feeders are turned away, once they are."""
        return self._refusal

    def refuse(self, reason: str) -> None:
        """Turn feeders away from now on, those waiting for room too."""
        with self.cond:
            if self._refusal is None:
                self._refusal = reason
            self.cond.notify_all()

    # -- the logic (the loop) ------------------------------------------------------

    def take(self) -> tuple[int, Any] | None:
        """The next (position, record), or None when nothing waits."""
        if self._position >= len(self._chunk):
            with self.cond:
                if not self._chunks:
                    return None
                self._chunk = self._chunks.popleft()
                self._position = 0
                self.cond.notify_all()  # a feeder may wait for room
        item = self._chunk[self._position]
        self._position += 1
        if item[0] > self.last_taken:  # an unreadable record is at 0
            self.last_taken = item[0]
        return item

    def waiting(self) -> int:
        """Chunks not yet taken up (call with `cond` held for a view consistent with `closed`)."""
        return len(self._chunks)
