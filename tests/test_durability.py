"""psserver --data-dir: pushes acknowledged by a shard survive its SIGKILL, exactly once.

Each test drives real psserver processes over raw Exchange streams
(tests/shard_streams.py), so that it picks the worker_id and every seq itself,
as a restarted worker resends them. tests/test_wal_recovery.py damages the log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import START_TIMEOUT_S, Processes
from shard_streams import (
    WORKER,
    Stream,
    batches,
    expected_model,
    kill,
    model_of,
    restarted,
    split,
    start_shard,
    wal_warnings,
)

from psclient.children import shard_argv
from psclient.wire.codec import encode_id_array
from psclient.wire.proto import shard_pb2
from psserver.wal import HEADER_SIZE, segment_numbers, segment_path


def test_shard_killed_mid_stream_recovers_every_acked_push_once(
    procs: Processes, streams: list[Stream], tmp_path: Path
) -> None:
    pushes = batches(60)
    dirs = [tmp_path / "shard0", tmp_path / "shard1"]
    for directory in dirs:
        directory.mkdir()
    shards = [start_shard(procs, i, 2, dirs[i]) for i in range(2)]
    streams.extend(Stream(shard.address) for shard in shards)
    per_shard = [[split(ids, deltas, 2)[shard] for ids, deltas in pushes] for shard in range(2)]
    for seq in range(1, 31):
        for shard in range(2):
            assert streams[shard].push(seq, *per_shard[shard][seq - 1]) == shard_pb2.PushAck(seq=seq)
    # Ten pushes in flight to shard 1 when it dies: some acked, some maybe applied, some not.
    for seq in range(31, 41):
        streams[1].send(seq, *per_shard[1][seq - 1])
    acked = 30
    acked += 1 if streams[1].ack().seq == 31 else 0
    kill(shards[1])
    with pytest.raises(grpc.RpcError):
        while True:
            assert streams[1].ack().seq == acked + 1
            acked += 1
    streams[1].close()

    shards[1] = start_shard(procs, 1, 2, dirs[1])
    streams[1] = Stream(shards[1].address)
    recovered = streams[1].watermarks()[WORKER]
    assert acked <= recovered <= 40
    # The worker resends from well before its last ack, with the original seqs.
    for seq in range(25, 61):
        ack = streams[1].push(seq, *per_shard[1][seq - 1])
        assert ack == shard_pb2.PushAck(seq=seq, duplicate=seq <= recovered)
    for seq in range(31, 61):
        assert streams[0].push(seq, *per_shard[0][seq - 1]) == shard_pb2.PushAck(seq=seq)
    np.testing.assert_array_equal(model_of(streams), expected_model(pushes))
    assert wal_warnings(shards[1]) == []


def test_snapshot_truncates_the_wal_and_recovery_is_exact(
    procs: Processes, streams: list[Stream], tmp_path: Path
) -> None:
    pushes = batches(80)
    shard = start_shard(procs, 0, 1, tmp_path, "--snapshot-interval", "0.3")
    stream = Stream(shard.address)
    streams.append(stream)
    for seq, (ids, deltas) in enumerate(pushes[:60], 1):
        assert stream.push(seq, ids, deltas).seq == seq
    record = HEADER_SIZE + len(
        shard_pb2.PushRequest(worker_id=WORKER, seq=1, batches=[encode_id_array(*pushes[0])]).SerializeToString()
    )

    def wal_bytes() -> int:
        return sum(segment_path(tmp_path, n).stat().st_size for n in segment_numbers(tmp_path))

    waited = 0.0
    while wal_bytes() >= record and waited < 20:  # a snapshot took the 60 pushes out of the log
        subprocess.run(["sleep", "0.1"], check=True)
        waited += 0.1
    assert wal_bytes() < record
    assert (tmp_path / "snapshot.bin").is_file()
    for seq, (ids, deltas) in enumerate(pushes[60:], 61):
        stream.send(seq, ids, deltas)
    for seq in range(61, 81):
        assert stream.ack().seq == seq
    kill(shard)

    shard, stream = restarted(procs, streams, tmp_path)
    assert stream.watermarks() == {WORKER: 80}
    assert stream.push(80, *pushes[79]) == shard_pb2.PushAck(seq=80, duplicate=True)
    np.testing.assert_array_equal(model_of([stream]), expected_model(pushes))


def test_no_durable_survives_a_killed_shard(procs: Processes, streams: list[Stream], tmp_path: Path) -> None:
    pushes = batches(20)
    shard = start_shard(procs, 0, 1, tmp_path, "--no-durable")
    stream = Stream(shard.address)
    streams.append(stream)
    for seq, (ids, deltas) in enumerate(pushes, 1):
        stream.send(seq, ids, deltas)
    assert [stream.ack().seq for _ in pushes] == list(range(1, 21))
    kill(shard)
    assert "(no fsync;" in shard.stderr_path.read_text()
    _, stream = restarted(procs, streams, tmp_path)
    np.testing.assert_array_equal(model_of([stream]), expected_model(pushes))


def _refused(procs: Processes, *flags: str) -> tuple[int, list[str]]:
    argv = shard_argv(0, 1, "zeros:1", "add", "WARNING", *flags)
    process, stderr_path = procs.popen(argv)
    process.wait(timeout=START_TIMEOUT_S)
    return process.returncode, stderr_path.read_text().splitlines()


def test_unusable_data_dir_is_one_line(procs: Processes, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    assert _refused(procs, "--data-dir", str(missing)) == (
        2,
        [f"psserver: error: --data-dir {missing} does not exist or is not a directory"],
    )
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert _refused(procs, "--data-dir", str(a_file)) == (
        2,
        [f"psserver: error: --data-dir {a_file} does not exist or is not a directory"],
    )
    held = tmp_path / "held"
    held.mkdir()
    start_shard(procs, 0, 1, held)
    assert _refused(procs, "--data-dir", str(held)) == (
        2,
        [f"psserver: error: --data-dir {held} is in use by another running shard"],
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "shard.json").write_text('{"shard": 1, "num_shards": 2}\n')
    assert _refused(procs, "--data-dir", str(other)) == (
        2,
        [f"psserver: error: --data-dir {other} holds shard 1 of 2, not shard 0 of 1"],
    )
    assert _refused(procs, "--no-durable") == (2, ["psserver: error: --durable/--no-durable needs --data-dir"])


def _sent_to_a_new_shard(procs: Processes, streams: list[Stream], tmp_path: Path, pushes: list) -> tuple:
    """A durable shard with `pushes` sent on one stream (seqs from 1), none acked yet."""
    shard = start_shard(procs, 0, 1, tmp_path)
    stream = Stream(shard.address)
    streams.append(stream)
    for seq, (ids, deltas) in enumerate(pushes, 1):
        stream.send(seq, ids, deltas)
    return shard, stream


def test_pushes_before_a_bad_request_are_still_acked(procs: Processes, streams: list[Stream], tmp_path: Path) -> None:
    pushes = batches(8)
    shard, stream = _sent_to_a_new_shard(procs, streams, tmp_path, pushes)
    stream.send(0, *pushes[0])  # seq 0: refused, and it ends the stream
    assert [stream.ack().seq for _ in pushes] == list(range(1, 9))
    with pytest.raises(grpc.RpcError) as failure:
        stream.ack()
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details() == "a push needs a worker_id and a seq >= 1"
    streams.append(fresh := Stream(shard.address))
    np.testing.assert_array_equal(model_of([fresh]), expected_model(pushes))


def test_pipelined_pushes_share_fsyncs(procs: Processes, streams: list[Stream], tmp_path: Path) -> None:
    pushes = batches(200)
    shard, stream = _sent_to_a_new_shard(procs, streams, tmp_path, pushes)
    assert [stream.ack().seq for _ in pushes] == list(range(1, 201))
    shard.process.send_signal(signal.SIGTERM)
    assert shard.process.wait(timeout=20) == 0
    (line,) = [line for line in shard.stderr_path.read_text().splitlines() if "logged 200 pushes with" in line]
    fsyncs = int(line.split(" with ")[1].split()[0])
    assert 1 <= fsyncs < 200, line  # group commit: pushes that arrived during an fsync shared the next


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to any directory")
def test_unwritable_data_dir_is_one_line(procs: Processes, tmp_path: Path) -> None:
    locked = tmp_path / "read-only"
    locked.mkdir(mode=0o500)
    try:
        assert _refused(procs, "--data-dir", str(locked)) == (
            2,
            [f"psserver: error: --data-dir {locked} is not writable"],
        )
    finally:
        locked.chmod(0o700)


def test_shard_killed_again_and_again_while_snapshotting_keeps_every_acked_push_once(
    procs: Processes, streams: list[Stream], tmp_path: Path
) -> None:
    """Five SIGKILLs at seeded points of a pipelined stream, with snapshots every 0.2 s in between."""
    pushes = batches(150, seed=11)
    rng = np.random.default_rng(5)
    flags = ("--snapshot-interval", "0.2")
    shard = start_shard(procs, 0, 1, tmp_path, *flags)
    acked = 0  # the highest seq acknowledged: everything up to it must survive
    for _ in range(5):
        stream = Stream(shard.address)
        resend_from = max(1, acked - 3)  # some duplicates too, as a worker that lost acks would send
        last = min(len(pushes), acked + 30)
        for seq in range(resend_from, last + 1):
            stream.send(seq, *pushes[seq - 1])
        time.sleep(rng.uniform(0, 0.5))  # a snapshot may start now, or in the middle of what follows
        for expected_seq in range(resend_from, resend_from + int(rng.integers(1, last - resend_from + 1))):
            ack = stream.ack()
            assert ack.seq == expected_seq
            assert ack.duplicate or ack.seq > acked  # acked before: never applied again
            acked = max(acked, ack.seq)
        kill(shard)
        stream.close()
        shard = start_shard(procs, 0, 1, tmp_path, *flags)
        streams.append(probe := Stream(shard.address))
        assert probe.watermarks().get(WORKER, 0) >= acked
    assert (tmp_path / "snapshot.bin").is_file()
    stream = Stream(shard.address)
    streams.append(stream)
    recovered = stream.watermarks()[WORKER]
    for seq in range(1, len(pushes) + 1):
        assert stream.push(seq, *pushes[seq - 1]) == shard_pb2.PushAck(seq=seq, duplicate=seq <= recovered)
    np.testing.assert_array_equal(model_of([stream]), expected_model(pushes))
