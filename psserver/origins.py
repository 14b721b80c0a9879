"""Which pushes of a restartable worker a shard has applied, by the input record they came from.

A restartable worker (psworker --checkpoint-dir) tags each push batch with the
input position of the record that made it and a part number (PushOrigin), and
tells the shard `finished_below`: every record below that position has finished
and all its pushes have reached the shard. After a restart it replays the
records after its checkpoint and batches their pushes anew, under new seqs, so a
seq watermark cannot tell which of them the shard already holds; their origins
can. Per worker the shard keeps B, the highest finished_below it was sent, and
A, the (position, part) pairs at or above B it applied. A batch is a duplicate
if its position is below B or its pair is in A.

The live service and the recovery replay both go through this one rule, from the
same state in the same order, so a recovered shard holds exactly the B and A it
had; snapshots store them as `to_json` gives them.
"""

from __future__ import annotations

from typing import Any

from psclient.errors import WireError
from psclient.wire.proto import shard_pb2


def tagged(request: shard_pb2.PushRequest) -> bool:
    """Whether `request` is deduplicated by origin. A restartable worker may also send
    finished_below with no batch at all: that too only moves B."""
    return bool(request.origins) or request.finished_below > 0


class Origins:
    """Per worker_id: B (`finished_below`) and A (`applied`), as above."""

    def __init__(self) -> None:
        self.finished_below: dict[str, int] = {}
        self.applied: dict[str, set[tuple[int, int]]] = {}

    def fresh(self, request: shard_pb2.PushRequest) -> list[int]:
        """The indices of `request.batches` not applied before (judged as the state is now)."""
        origins = request.origins
        if len(origins) != len(request.batches):
            raise WireError(
                f"push seq {request.seq} of worker {request.worker_id} has {len(origins)} origins "
                f"for {len(request.batches)} batches: tag every batch with its origin, or none"
            )
        below = self.finished_below.get(request.worker_id, 0)
        applied = self.applied.get(request.worker_id, ())
        return [
            i
            for i, origin in enumerate(origins)
            if origin.position >= below and (origin.position, origin.part) not in applied
        ]

    def record(self, request: shard_pb2.PushRequest, fresh: list[int]) -> bool:
        """Note that the `fresh` batches of `request` were applied and advance B;
        return whether the state changed (else the request need not be logged)."""
        worker = request.worker_id
        changed = worker not in self.finished_below
        applied = self.applied.setdefault(worker, set())
        for i in fresh:
            origin = request.origins[i]
            applied.add((origin.position, origin.part))
        below = self.finished_below.get(worker, 0)
        if request.finished_below > below:
            below = request.finished_below
            # Pairs below B are duplicates by B alone: A keeps only the records still open.
            self.applied[worker] = {pair for pair in applied if pair[0] >= below}
            changed = True
        self.finished_below[worker] = below
        return changed or bool(fresh)

    def to_json(self) -> dict[str, list[Any]]:
        """{worker: [B, [[position, part], ...]]}, for a snapshot's header."""
        return {
            worker: [below, sorted([list(pair) for pair in self.applied.get(worker, ())])]
            for worker, below in self.finished_below.items()
        }

    def load_json(self, saved: dict[str, list[Any]]) -> None:
        """Restore what `to_json` gave."""
        for worker, (below, applied) in saved.items():
            self.finished_below[worker] = int(below)
            self.applied[worker] = {(int(position), int(part)) for position, part in applied}
