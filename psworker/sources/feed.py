"""The Feed RPC as a source: the records clients send a worker (psworker/service.py).

Every input of a worker is a `Source` (base.py). The others are read: a pump
(pump.py) iterates their `read()` on a thread of its own and queues each chunk.
Feed's records arrive on gRPC's threads instead, request by request, so this
source is pushed: the Feed call hands each request's records to `push`, which
decodes them, numbers them and queues them on the call's own thread. That is
the whole of the Feed path, the default one of `transform` and `psclient run`,
and it stays as cheap as it was before Feed was a source: no thread and no
queue between the call and the input queue, which a pump would add for every
chunk. The backpressure is the input queue's own: a full queue blocks `push`,
so the call reads no further request and gRPC's flow control holds the client.
No pump reads a FeedSource; its `read()` says so. `open()` and `close()` have
nothing to do: the Worker server (psworker/running.py) binds the port and ends
the calls.

Its positions are the records of all Feed calls, numbered from 1 in the order
they were queued; a restarted worker numbers on after its checkpoint
(psworker/checkpoints.py), and its feeder resends from `next_position`
(Status, psclient/replay.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from psclient.wire.records import unpack
from psworker.sources.base import Chunk, Source, SourceError

if TYPE_CHECKING:
    from psworker.runtime import WorkerRuntime


class FeedSource(Source):
    position_name = "record"

    def __init__(self, runtime: WorkerRuntime, address: str = ""):
        self.runtime = runtime
        self._inputs = runtime.inputs
        self.address = address  # where its calls come in, once the server is bound

    def describe(self) -> str:
        return f"the Feed RPC on {self.address}" if self.address else "the Feed RPC"

    def read(self) -> Iterator[Chunk]:
        raise SourceError(f"{self.describe()}: its records are pushed by its calls; no pump reads it")

    def push(self, encoded: Sequence[bytes]) -> int:
        """Queue one request's records (decoded from the wire: WireError when one is not
        a record, and then none is queued); block while the input queue is full."""
        records = [unpack(data) for data in encoded]
        self._inputs.feed(records)
        return len(records)

    def end(self) -> None:
        """A caller said its input ended (`end_of_input`)."""
        self.runtime.end_input()

    @property
    def next_position(self) -> int:
        """The position the next record queued will have."""
        return self._inputs.records_fed + 1

    @property
    def stopped(self) -> bool:
        """A stop on a signal ended the input: not a failure (the feeder is told so with
        OUT_OF_RANGE)."""
        return self.runtime.stopped and not self.runtime.error

    @property
    def stop_reason(self) -> str | None:
        """Why a stop on a signal turns feeders away, once it does."""
        return self._inputs.refusal if self.stopped else None
