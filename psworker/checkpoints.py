"""A restartable worker's checkpoint: where its input stands, and its logic's state.

Written at a quiescent point (every pull answered, every push acknowledged), so
it holds no message in flight: the input position below which every record is
done and in the shards, the counters, the logic's own state from
`WorkerLogic.state()` (plain data: numbers, strings, lists, dicts, numpy
arrays, encoded as a record is, with msgpack; never pickle), and the outputs
of a Feed-mode worker that no Outputs reader has taken yet, as the packed
bytes the stream carries: the records they came from are not replayed. A worker started
again with the same job id, index and checkpoint dir restores it and reads on
from the position after it; the shards take the pushes of the records it
replays by input position (shard.proto, PushOrigin), so none is applied twice.

One file per worker, `worker-{index}.ckpt`, replaced atomically: written to a
temp file, fsynced, renamed over the old one, and the directory fsynced.
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psclient.errors import JobFailed, StreampsError, WireError
from psclient.files import replace_file
from psclient.wire.records import pack, unpack
from psworker.batching import ShardBuffers
from psworker.input_queue import InputQueue
from psworker.logic import WorkerLogic
from psworker.origins import OriginTracker

log = logging.getLogger("streamps.worker")

FORMAT = 1
# A restartable worker checkpoints every this many records (a pause of one round
# trip to the shards, while everything in flight is answered).
DEFAULT_CHECKPOINT_EVERY = 10_000
# A source whose entries are acknowledged (a stream) gets them acknowledged at quiescent
# points: input pauses for one after this many records, or this long after the last one.
ACK_EVERY_RECORDS = 256
ACK_INTERVAL_S = 0.5
# The file starts with a magic and a CRC-32 of the payload: a checkpoint cut short
# by a crash of the machine mid-write is refused, not half read.
MAGIC = b"SPCK"


class CheckpointError(StreampsError):
    """A checkpoint that cannot be read, or belongs to another worker or job layout."""


@dataclass
class Checkpoint:
    worker_id: str
    num_workers: int
    num_shards: int
    # Every record at an input position up to this one is processed and its pushes applied.
    position: int
    records: int
    records_failed: int
    outputs: int
    state: Any
    # The logic had finished (on_input_end returned, everything acknowledged).
    finished: bool = False
    # Outputs made before the checkpoint that no reader had taken (packed, in order): a
    # resumed worker delivers them first, since the records they came from are done.
    outputs_pending: list[bytes] = field(default_factory=list)


def checkpoint_path(directory: Path, worker_index: int) -> Path:
    return directory / f"worker-{worker_index}.ckpt"


def write_checkpoint(directory: Path, worker_index: int, checkpoint: Checkpoint) -> None:
    try:
        payload = pack({"format": FORMAT, **vars(checkpoint)})
    except WireError as exc:
        raise CheckpointError(f"the logic's state() is not plain data: {exc}") from exc
    data = MAGIC + zlib.crc32(payload).to_bytes(4, "little") + payload
    replace_file(checkpoint_path(directory, worker_index), data)


def read_checkpoint(
    directory: Path, worker_index: int, *, worker_id: str, num_workers: int, num_shards: int
) -> Checkpoint | None:
    """This worker's checkpoint, or None when it has none yet. CheckpointError, one line,
    when the file is damaged or was written by another job or layout."""
    path = checkpoint_path(directory, worker_index)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    payload = data[8:]
    if data[:4] != MAGIC or int.from_bytes(data[4:8], "little") != zlib.crc32(payload):
        raise CheckpointError(f"checkpoint {path} is damaged (bad magic or checksum)")
    try:
        fields = unpack(payload)
    except WireError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from exc
    if not isinstance(fields, dict) or fields.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has an unknown format")
    del fields["format"]
    try:
        checkpoint = Checkpoint(**fields)
    except TypeError:  # a field missing, or one this version does not know
        raise CheckpointError(f"checkpoint {path} has an unknown format") from None
    pending = checkpoint.outputs_pending  # [] in a checkpoint written before it existed
    if not isinstance(pending, list) or not all(isinstance(data, bytes) for data in pending):
        raise CheckpointError(f"checkpoint {path} has an unknown format (outputs_pending)")
    found = (checkpoint.worker_id, checkpoint.num_workers, checkpoint.num_shards)
    if found != (worker_id, num_workers, num_shards):
        raise CheckpointError(
            f"checkpoint {path} belongs to worker {found[0]} of {found[1]} workers and {found[2]} shards, "
            f"not to worker {worker_id} of {num_workers} workers and {num_shards} shards; "
            "use the job's own --job-id and layout, or another --checkpoint-dir"
        )
    return checkpoint


class Checkpointing:
    """The checkpoints of a restartable worker: when one is due, writing it, resuming
    from one. `WorkerRuntime` (psworker/runtime.py) builds on this class, through
    LogicLoop (psworker/loop.py), which writes one when the loop is quiescent."""

    # Set by WorkerRuntime.__init__.
    worker_index: int
    worker_id: str
    num_workers: int
    position_name: str
    records: int
    records_failed: int
    outputs: int
    inputs: InputQueue
    _callbacks: WorkerLogic
    _buffers: ShardBuffers

    def _init_checkpoints(
        self,
        directory: Path | None,
        every: int,
        flush_outputs: Callable[[], None] | None,
        pending_outputs: Callable[[], list[bytes]] | None,
        track_origins: bool = False,
    ) -> None:
        """A worker with a `directory` is restartable: its pushes carry their records'
        origins (psworker/origins.py), and it resumes from the checkpoint it finds there.
        So do a stream's workers (`track_origins`), whose positions are the entries' own:
        a restarted one gets its unacknowledged entries again, and the shards take their
        pushes once."""
        self.checkpoint_dir = directory
        self.checkpoint_every = every
        # A restart replays only the records after a checkpoint, so the outputs of those it
        # covers must outlive the process: written out before it (an --output file), or
        # kept in it while no reader has taken them (the Outputs stream).
        self.flush_outputs = flush_outputs
        self.pending_outputs = pending_outputs
        self._checkpointed_records = 0
        self.checkpoint_position = 0  # of the last checkpoint written or resumed from (Status)
        self._origins: OriginTracker | None = None
        self.resumed: Checkpoint | None = None
        # Told, at quiescent points, the position up to which every record taken is finished.
        self.report_finished: Callable[[int], None] | None = None
        self._reported = 0
        self._reported_records = 0
        self._reported_at = time.monotonic()
        if directory is not None or track_origins:
            self._origins = OriginTracker(self._buffers)
            self._buffers.finished_below = self._origins.finished_below
        if directory is not None:
            self.resumed = read_checkpoint(
                directory,
                self.worker_index,
                worker_id=self.worker_id,
                num_workers=self.num_workers,
                num_shards=self._buffers.num_shards,
            )

    def _resume_from(self, checkpoint: Checkpoint) -> None:
        assert self._origins is not None
        self.records = self._checkpointed_records = checkpoint.records
        self.records_failed = checkpoint.records_failed
        self.outputs = checkpoint.outputs
        self.inputs.last_taken = self.inputs.records_fed = self.checkpoint_position = checkpoint.position
        self._origins.frontier = checkpoint.position + 1
        log.info(
            "resuming from its checkpoint after %s %d (%d records processed)%s",
            self.position_name,
            checkpoint.position,
            checkpoint.records,
            "; it had finished" if checkpoint.finished else "",
        )

    @property
    def resume_position(self) -> int:
        """Input positions up to this one are done (0: start from the beginning)."""
        return self.resumed.position if self.resumed is not None else 0

    def _checkpoint_due(self) -> bool:
        return self.checkpoint_dir is not None and self.records - self._checkpointed_records >= self.checkpoint_every

    def _acks_owed(self) -> bool:
        return self.report_finished is not None and self.inputs.last_taken > self._reported

    def _ack_due(self) -> bool:
        """Whether input pauses for a quiescent point, where the records taken are acknowledged
        to their source. A checkpointed worker acknowledges at its checkpoints only, so that
        what it acknowledged and what its logic's state holds agree."""
        if self.checkpoint_dir is not None or not self._acks_owed():
            return False
        return (
            self.records - self._reported_records >= ACK_EVERY_RECORDS
            or time.monotonic() - self._reported_at >= ACK_INTERVAL_S
        )

    def _settle(self, *, finished: bool = False) -> None:
        """At a quiescent point: checkpoint (a restartable worker), and tell the source that
        every record taken so far is finished."""
        if self.checkpoint_dir is not None:
            self._write_checkpoint(finished=finished)
        elif self._acks_owed():
            self._flush_outputs()  # the entries are not read again: their outputs must be out first
            self._report(self.inputs.last_taken)

    def _flush_outputs(self) -> None:
        try:
            if self.flush_outputs is not None:
                self.flush_outputs()
        except OSError as exc:
            raise JobFailed(f"worker {self.worker_index}: cannot write its outputs: {exc}") from exc

    def _report_after_failure(self) -> None:
        """Once a failed worker's pushes are drained, the records below its first unfinished
        one are done: acknowledged, so that a restart does not take them again."""
        origins = self._origins
        if self.report_finished is None or self.checkpoint_dir is not None or origins is None:
            return
        done = min(self.inputs.last_taken, origins.finished_below() - 1)
        if not self._buffers.unacked and done > self._reported:
            with contextlib.suppress(JobFailed):  # failed already; its outputs file may be why
                self._flush_outputs()
                self._report(done)

    def _report(self, position: int) -> None:
        self._reported, self._reported_records, self._reported_at = position, self.records, time.monotonic()
        if self.report_finished is not None:
            self.report_finished(position)

    def _write_checkpoint(self, *, finished: bool) -> None:
        """Checkpoint at a quiescent point: every record taken so far is done and in the shards."""
        assert self.checkpoint_dir is not None and self._origins is not None
        started = time.perf_counter()
        try:
            state = self._callbacks.state()
        except Exception as exc:
            raise JobFailed(f"worker {self.worker_index} failed in state: {type(exc).__name__}: {exc}") from exc
        checkpoint = Checkpoint(
            worker_id=self.worker_id,
            num_workers=self.num_workers,
            num_shards=self._buffers.num_shards,
            position=self.inputs.last_taken,
            records=self.records,
            records_failed=self.records_failed,
            outputs=self.outputs,
            state=state,
            finished=finished,
            # On the logic's thread, the only one that makes outputs: none is made meanwhile.
            outputs_pending=self.pending_outputs() if self.pending_outputs is not None else [],
        )
        try:
            if self.flush_outputs is not None:
                self.flush_outputs()
            write_checkpoint(self.checkpoint_dir, self.worker_index, checkpoint)
        except (CheckpointError, OSError) as exc:
            raise JobFailed(f"worker {self.worker_index}: cannot checkpoint: {exc}") from exc
        self._checkpointed_records = self.records
        self.checkpoint_position = checkpoint.position
        self._report(checkpoint.position)
        log.debug(
            "checkpoint at %s %d (%d records) in %.1f ms",
            self.position_name,
            checkpoint.position,
            self.records,
            1000 * (time.perf_counter() - started),
        )
