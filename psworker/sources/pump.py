"""Feeding a worker from a source, on a thread of its own.

The pump takes the source's chunks into the worker's input queue (blocking
while it is full: the backpressure that reaches the source), puts a malformed
record in its place in the order, and passes on to the source, between chunks,
how far the worker's records are finished (`Finished`, reported by the logic
loop at quiescent points), so that a stream acknowledges its entries only
after every push they caused is acknowledged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from psclient.errors import JobFailed
from psclient.inputs import MalformedRecord
from psworker.runtime import WorkerRuntime
from psworker.sources.base import Chunk, Source, SourceError

log = logging.getLogger("streamps.worker")

# Chunks a worker holds queued from a source that acknowledges: what it takes from a shared
# stream it holds from the others, and a restart reads again.
ACKED_QUEUE_CHUNKS = 2


class Finished:
    """The highest position below which (and at which) every record is finished; set on
    the logic's thread, read on the pump's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._position = 0

    def report(self, position: int) -> None:
        with self._lock:
            self._position = max(self._position, position)

    @property
    def position(self) -> int:
        with self._lock:
            return self._position


class Pump:
    def __init__(self, source: Source, runtime: WorkerRuntime, stopping: Callable[[], bool]):
        self.source = source
        self.runtime = runtime
        self.stopping = stopping
        self.finished = Finished()
        self._acked = 0
        if source.acks:
            runtime.report_finished = self.finished.report
            runtime.inputs.capacity = min(runtime.inputs.capacity, ACKED_QUEUE_CHUNKS)
        self.thread = threading.Thread(target=self._run, name="source", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _ack(self, position: int) -> None:
        if position > self._acked:
            self.source.ack(position)
            self._acked = position

    def _run(self) -> None:
        runtime, acks = self.runtime, self.source.acks
        done = runtime.resume_position  # a restarted worker reads on after its checkpoint
        try:
            for chunk in self.source.read():
                if acks:
                    # What the checkpoint covers is done: a stream may give it again unacked.
                    self._ack(max(self.finished.position, min(done, chunk[-1][0] if chunk else 0)))
                if self.stopping():
                    return
                good: Chunk = []
                for position, record in chunk:
                    if position <= done:
                        continue
                    if isinstance(record, MalformedRecord):
                        runtime.feed_positioned(good)
                        good = []
                        # A stream's malformed entry holds its place, so it is acked in turn.
                        runtime.input_error(str(record), position if acks else 0)
                        continue
                    good.append((position, record))
                runtime.feed_positioned(good)
            runtime.end_input()
        except JobFailed:
            pass  # the job already stopped; its error is reported by the runtime
        except SourceError as exc:
            runtime.fail(f"worker {runtime.worker_index}: {exc}")
        except Exception as exc:  # a user's source: one line, the traceback in the log
            name = self.source.describe()
            log.error("source %s failed", name, exc_info=True)
            runtime.fail(f"worker {runtime.worker_index}: source {name} failed: {type(exc).__name__}: {exc}")

    def finish(self, timeout: float) -> None:
        """After the logic ended: acknowledge what it finished, and close the source. Only a
        source that acknowledges is waited for; a reader still blocked (on stdin, say) is left
        to the end of the process."""
        if self.source.acks:
            self.thread.join(timeout)
        if self.thread.is_alive():
            return
        try:
            if self.source.acks:
                self._ack(self.finished.position)
        except SourceError as exc:
            log.error("worker %d: %s", self.runtime.worker_index, exc)
        finally:
            self.source.close()
