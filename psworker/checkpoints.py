"""A restartable worker's checkpoint: where its input stands, and its logic's state.

Written at a quiescent point (every pull answered, every push acknowledged), so
it holds no message in flight: the input position below which every record is
done and in the shards, the counters, and the logic's own state from
`WorkerLogic.state()` (plain data: numbers, strings, lists, dicts, numpy
arrays, encoded as a record is, with msgpack; never pickle). A worker started
again with the same job id, index and checkpoint dir restores it and reads on
from the position after it; the shards take the pushes of the records it
replays by input position (shard.proto, PushOrigin), so none is applied twice.

One file per worker, `worker-{index}.ckpt`, replaced atomically: written to a
temp file, fsynced, renamed over the old one, and the directory fsynced.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psclient.errors import StreampsError, WireError
from psclient.wire.records import pack, unpack

FORMAT = 1
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


def checkpoint_path(directory: Path, worker_index: int) -> Path:
    return directory / f"worker-{worker_index}.ckpt"


def write_checkpoint(directory: Path, worker_index: int, checkpoint: Checkpoint) -> None:
    try:
        payload = pack(
            {
                "format": FORMAT,
                "worker_id": checkpoint.worker_id,
                "num_workers": checkpoint.num_workers,
                "num_shards": checkpoint.num_shards,
                "position": checkpoint.position,
                "records": checkpoint.records,
                "records_failed": checkpoint.records_failed,
                "outputs": checkpoint.outputs,
                "state": checkpoint.state,
                "finished": checkpoint.finished,
            }
        )
    except WireError as exc:
        raise CheckpointError(f"the logic's state() is not plain data: {exc}") from exc
    path = checkpoint_path(directory, worker_index)
    temp = path.with_suffix(".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        data = MAGIC + zlib.crc32(payload).to_bytes(4, "little") + payload
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
    found = (fields["worker_id"], fields["num_workers"], fields["num_shards"])
    if found != (worker_id, num_workers, num_shards):
        raise CheckpointError(
            f"checkpoint {path} belongs to worker {found[0]} of {found[1]} workers and {found[2]} shards, "
            f"not to worker {worker_id} of {num_workers} workers and {num_shards} shards; "
            "use the job's own --job-id and layout, or another --checkpoint-dir"
        )
    return Checkpoint(
        worker_id=fields["worker_id"],
        num_workers=fields["num_workers"],
        num_shards=fields["num_shards"],
        position=fields["position"],
        records=fields["records"],
        records_failed=fields["records_failed"],
        outputs=fields["outputs"],
        state=fields["state"],
        finished=fields["finished"],
    )
