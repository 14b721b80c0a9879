"""Recovery from a damaged log: a torn tail, a flipped byte; and recovery of every table.

psserver processes are killed after acknowledged pushes, their log is damaged
on disk, and the restarted shard must hold exactly the pushes before the damage
and report it in one WARNING line.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import Processes
from shard_streams import (
    WORKER,
    Stream,
    batches,
    expected_model,
    model_of,
    pushed_and_killed,
    restarted,
    start_shard,
    wal_warnings,
)

from psclient.wire.codec import decode_batch
from psclient.wire.proto import shard_pb2
from psserver.wal import HEADER_SIZE, read_records


def test_torn_wal_tail_recovers_to_the_last_whole_push(procs: Processes, streams: list[Stream], tmp_path: Path) -> None:
    wal = pushed_and_killed(procs, tmp_path, 10)
    size = wal.stat().st_size
    record = size // 10
    with wal.open("r+b") as handle:
        handle.truncate(size - record // 2)  # half of the last record is gone

    shard, stream = restarted(procs, streams, tmp_path)
    assert stream.watermarks() == {WORKER: 9}
    np.testing.assert_array_equal(model_of([stream]), expected_model(batches(10)[:9]))
    (warning,) = wal_warnings(shard)
    kept = record - record // 2
    assert f"torn record ({kept - HEADER_SIZE} of {record - HEADER_SIZE} payload bytes)" in warning
    assert f"at byte {9 * record}; cut {kept} bytes there" in warning
    # The resent tenth push is applied once, and the log carries on.
    assert stream.push(10, *batches(10)[9]) == shard_pb2.PushAck(seq=10)
    np.testing.assert_array_equal(model_of([stream]), expected_model(batches(10)))


def test_flipped_byte_mid_wal_is_reported_and_nothing_after_it_applied(
    procs: Processes, streams: list[Stream], tmp_path: Path
) -> None:
    wal = pushed_and_killed(procs, tmp_path, 10)
    data = bytearray(wal.read_bytes())
    assert len(read_records(bytes(data)).records) == 10
    record = len(data) // 10
    data[4 * record + record // 2] ^= 0x40  # inside the fifth push's payload
    wal.write_bytes(bytes(data))

    shard, stream = restarted(procs, streams, tmp_path)
    assert stream.watermarks() == {WORKER: 4}
    np.testing.assert_array_equal(model_of([stream]), expected_model(batches(10)[:4]))
    (warning,) = wal_warnings(shard)
    assert f"corrupt record (checksum mismatch) at byte {4 * record}; cut {6 * record} bytes there" in warning


def test_recovery_keeps_str_ids_and_every_signature(tmp_path: Path) -> None:
    """In process: a snapshot and a log over int and str ids, in two tables (int64 and float64)."""
    import asyncio

    from psclient.specs import make_init, make_update
    from psserver.durability import DataDirError, Durability
    from psserver.store import ParameterStore

    def store() -> ParameterStore:
        return ParameterStore(make_init("const:0"), make_update("add"))

    def push(seq: int, ids: list, deltas: np.ndarray) -> shard_pb2.PushRequest:
        from psclient.wire.codec import encode_values

        return shard_pb2.PushRequest(worker_id=WORKER, seq=seq, batches=encode_values(ids, list(deltas)))

    requests = [
        push(1, [1, "a", 2], np.array([3, 4, 5])),  # int parameters
        push(2, [2, "b"], np.array([0.5, 1.5])),  # 2 becomes a float, "b" starts as one
        push(3, ["c", 1, "a"], np.array([7, 8, 9])),
    ]

    async def serve(durability: Durability, logged: list[shard_pb2.PushRequest], snapshot_after: int) -> None:
        durability.start()
        for number, request in enumerate(logged, 1):
            durability.store.push_rows([decode_batch(b, with_values=True) for b in request.batches])
            durability.watermarks[request.worker_id] = request.seq
            await durability.log_push(request)
            if number == snapshot_after:
                await durability.snapshot()
        await durability.close()

    live = Durability(tmp_path, store(), 0, 1)
    with pytest.raises(DataDirError, match="is in use by another running shard"):
        Durability(tmp_path, store(), 0, 1)
    asyncio.run(serve(live, requests, snapshot_after=2))
    recovered = Durability(tmp_path, store(), 0, 1)
    recovered.recover()
    assert recovered.watermarks == {WORKER: 3}
    ids = [1, 2, "a", "b", "c"]
    expected = live.store.pull(ids)
    got = recovered.store.pull(ids)
    assert [(group_ids, values.dtype, values.tolist()) for group_ids, values in got] == [
        (group_ids, values.dtype, values.tolist()) for group_ids, values in expected
    ]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (needs root and mount; skipped where either is missing)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_shard_and_it_recovers_what_it_acked(
    procs: Processes, streams: list[Stream], small_disk: Path
) -> None:
    pushes = batches(40, size=1024)  # about 24 KB a record: the disk fills after ten or so
    shard = start_shard(procs, 0, 1, small_disk)
    stream = Stream(shard.address)
    for seq, (ids, deltas) in enumerate(pushes, 1):
        stream.send(seq, ids, deltas)
    acked = 0
    with pytest.raises(grpc.RpcError) as failure:
        while True:
            assert stream.ack().seq == acked + 1
            acked += 1
    stream.close()
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failure.value.details() == "shard 0 cannot write its log: [Errno 28] No space left on device"
    assert 0 < acked < len(pushes)
    assert shard.process.wait(timeout=20) == 1
    assert shard.stderr_path.read_text().splitlines()[-1] == (
        f"psserver: error: shard 0 cannot write its log in {small_disk}: [Errno 28] No space left on device"
    )

    _, stream = restarted(procs, streams, small_disk)
    recovered = stream.watermarks()[WORKER]
    assert recovered >= acked
    np.testing.assert_array_equal(model_of([stream]), expected_model(pushes[:recovered]))


def _durable_store(tmp_path: Path, init: str = "zeros:4") -> tuple:
    from psclient.specs import make_init, make_update
    from psserver.durability import Durability
    from psserver.store import ParameterStore

    store = ParameterStore(make_init(init), make_update("add"))
    return store, Durability(tmp_path, store, 0, 1)


def test_snapshot_records_are_sized_by_bytes_so_wide_parameters_recover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot record holds as many rows as fit in SNAPSHOT_CHUNK_BYTES, not a fixed row count:
    wide parameters never make a record that recovery would refuse after the log is gone."""
    import asyncio

    from psserver import durability as durability_module
    from psserver.durability import SNAPSHOT, read_snapshot

    monkeypatch.setattr(durability_module, "SNAPSHOT_CHUNK_BYTES", 3 * 4096)  # three rows of 1,024 float32
    monkeypatch.setattr(durability_module, "MAX_RECORD", 4 * 4096 + 1024)
    store, durable = _durable_store(tmp_path, "zeros:1024")
    store.pull_rows(np.arange(10), [])

    async def snapshot() -> None:
        durable.start()
        await durable.snapshot()
        await durable.close()

    asyncio.run(snapshot())
    _, chunks = read_snapshot(tmp_path / SNAPSHOT)
    assert len(chunks) == 4  # 3 + 3 + 3 + 1 rows
    _, recovered = _durable_store(tmp_path, "zeros:1024")
    recovered.recover()
    assert len(recovered.store) == 10


def test_a_snapshot_record_too_large_to_recover_is_refused_before_it_replaces_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from psserver import durability as durability_module
    from psserver.durability import SNAPSHOT, SNAPSHOT_TMP

    monkeypatch.setattr(durability_module, "MAX_RECORD", 100)
    store, durable = _durable_store(tmp_path)

    async def snapshot() -> None:
        durable.start()
        store.pull_rows(np.arange(10), [])
        with pytest.raises(OSError, match="exceeds 100"):
            await durable.snapshot()
        await durable.close()

    asyncio.run(snapshot())
    assert not (tmp_path / SNAPSHOT).exists()
    assert (tmp_path / SNAPSHOT_TMP).exists()  # the failed attempt; the next one overwrites it


def test_a_failed_rotate_keeps_the_current_segment_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening the next segment can fail (EMFILE, ENOSPC): the log must carry on in the current one,
    not close the fd its appends use."""
    import asyncio
    import os

    from psserver import wal as wal_module
    from psserver.wal import WriteAheadLog, segment_path

    async def run() -> None:
        log = WriteAheadLog(tmp_path, 1, durable=True)
        await log.append(b"first")
        real_open = os.open

        def refuse_new_segments(path: object, *args: object, **kwargs: object) -> int:
            if Path(str(path)) == segment_path(tmp_path, 2):
                raise OSError(24, "Too many open files")
            return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(wal_module.os, "open", refuse_new_segments)
        with pytest.raises(OSError, match="Too many open files"):
            log.rotate()
        monkeypatch.setattr(wal_module.os, "open", real_open)
        await log.append(b"second")
        await log.close()

    asyncio.run(run())
    assert read_records(segment_path(tmp_path, 1).read_bytes()).records == [b"first", b"second"]
    assert not segment_path(tmp_path, 2).exists()


def test_a_damaged_shard_json_is_one_line(tmp_path: Path) -> None:
    from psserver.durability import DataDirError

    (tmp_path / "shard.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataDirError, match=r"shard\.json is damaged"):
        _durable_store(tmp_path)
