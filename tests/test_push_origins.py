"""Pushes tagged with their input record (PushOrigin): a restarted worker's replay is applied once.

A restartable worker replays the records after its checkpoint under new seqs,
batched differently from its first run; the shard must skip exactly the
(position, part) releases it applied before. Real psserver processes over raw
Exchange streams (tests/shard_streams.py). Each release adds 10**position to
one parameter (part k to parameter k), so every decimal digit of a pulled value
counts how often one release was applied: 1111111 is "each once".
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import Processes, push_once
from shard_streams import DIM, WORKER, Stream, kill, restarted, start_shard

from psclient.children import shard_argv
from psclient.wire.codec import encode_id_array
from psclient.wire.proto import shard_pb2
from psserver.durability import Durability, read_snapshot, write_snapshot
from psserver.origins import Origins
from psserver.store import ParameterStore
from psserver.wal import segment_numbers, segment_path

Release = tuple[int, int]  # (position, part)


def push(seq: int, releases: list[Release], below: int) -> shard_pb2.PushRequest:
    """One request holding `releases`, each as one batch, with finished_below `below`."""
    return shard_pb2.PushRequest(
        worker_id=WORKER,
        seq=seq,
        batches=[
            encode_id_array(np.array([part], np.int64), np.full((1, DIM), 10.0**position, np.float32))
            for position, part in releases
        ],
        origins=[shard_pb2.PushOrigin(position=position, part=part) for position, part in releases],
        finished_below=below,
    )


def send_all(stream: Stream, requests: list[shard_pb2.PushRequest]) -> list[bool]:
    """Send every request pipelined; the `duplicate` flag of each ack, in order."""
    for request in requests:
        stream.send_push(request)
    acks = [stream.ack() for _ in requests]
    assert [ack.seq for ack in acks] == [request.seq for request in requests]
    return [ack.duplicate for ack in acks]


def model(stream: Stream) -> list[float]:
    """Parameters 0 and 1 (every release of part 0 goes to the first, of part 1 to the second)."""
    values = stream.pull(np.array([0, 1], np.int64))
    assert (values == values[:, :1]).all()
    return values[:, 0].tolist()


def plain_shard(procs: Processes) -> str:
    """A shard without --data-dir; its address."""
    return procs.start_server(shard_argv(0, 1, f"zeros:{DIM}", "add", "INFO")).address


def open_stream(address: str, streams: list[Stream]) -> Stream:
    stream = Stream(address)
    streams.append(stream)
    return stream


def test_a_replay_batched_anew_under_new_seqs_applies_each_record_once(procs: Processes, streams: list[Stream]) -> None:
    address = plain_shard(procs)
    first = open_stream(address, streams)
    first_run = [push(1, [(0, 0), (1, 0), (2, 0)], 2), push(2, [(3, 0), (4, 0)], 3)]
    assert send_all(first, first_run) == [False, False]
    first.close()  # the worker dies; its checkpoint was taken after record 1
    replay = open_stream(address, streams)

    duplicates = send_all(
        replay,
        [
            push(1, [(0, 0), (2, 0)], 0),  # below finished_below 3
            push(2, [(3, 0)], 0),  # applied above it
            push(3, [(4, 0), (5, 0)], 5),  # record 4 again, 5 new
            push(4, [(6, 0)], 7),
        ],
    )

    assert duplicates == [True, True, False, False]
    assert model(replay) == [1111111.0, 0.0]
    info = replay.info()
    assert dict(info.finished_below) == {WORKER: 7}
    assert dict(info.watermarks) == {WORKER: 4}


def test_a_release_seen_twice_is_applied_once_and_its_batches_all_apply(
    procs: Processes, streams: list[Stream]
) -> None:
    stream = open_stream(plain_shard(procs), streams)
    # Record 1 released as two batches (both parameters) in one request; record 2 once.
    twice = push(1, [(1, 0), (1, 0)], 0)
    twice.batches[1].CopyFrom(encode_id_array(np.array([1], np.int64), np.full((1, DIM), 10.0, np.float32)))
    again = shard_pb2.PushRequest()
    again.CopyFrom(twice)
    again.seq = 2

    duplicates = send_all(stream, [twice, again, push(3, [(1, 0), (2, 0)], 0)])

    assert duplicates == [False, True, False]
    assert model(stream) == [110.0, 10.0]


def test_the_part_a_record_had_not_released_is_applied_on_replay(procs: Processes, streams: list[Stream]) -> None:
    stream = open_stream(plain_shard(procs), streams)
    # Record 1 released part 0 early (it pulled after pushing), then its worker died.
    assert send_all(stream, [push(1, [(1, 0)], 1)]) == [False]

    duplicates = send_all(stream, [push(1, [(1, 0), (1, 1)], 2), push(2, [(1, 1)], 2)])

    assert duplicates == [False, True]
    assert model(stream) == [10.0, 10.0]
    assert dict(stream.info().finished_below) == {WORKER: 2}
    # Records 2 to 4 pushed nothing here: finished_below alone still moves.
    assert send_all(stream, [push(3, [], 5)]) == [True]
    assert dict(stream.info().finished_below) == {WORKER: 5}


def test_finished_below_prunes_the_applied_releases() -> None:
    origins = Origins()
    first = push(1, [(0, 0), (1, 0), (2, 0), (3, 1)], 2)
    assert origins.fresh(first) == [0, 1, 2, 3]
    assert origins.record(first, [0, 1, 2, 3])
    assert origins.to_json() == {WORKER: [2, [[2, 0], [3, 1]]]}

    replayed = push(1, [(1, 0), (2, 0), (2, 1)], 0)
    assert origins.fresh(replayed) == [2]
    assert origins.record(replayed, [2])
    assert origins.to_json() == {WORKER: [2, [[2, 0], [2, 1], [3, 1]]]}

    finished = push(2, [], 3)
    assert origins.fresh(finished) == []
    assert origins.record(finished, [])
    assert origins.to_json() == {WORKER: [3, [[3, 1]]]}
    assert not origins.record(finished, [])  # nothing new: such a request is not logged

    restored = Origins()
    restored.load_json(origins.to_json())
    assert (restored.finished_below, restored.applied) == ({WORKER: 3}, {WORKER: {(3, 1)}})


@pytest.mark.parametrize("durable", [False, True])
def test_origins_that_do_not_match_the_batches_are_refused_and_nothing_is_applied(
    procs: Processes, tmp_path: Path, durable: bool
) -> None:
    flags = ("--data-dir", str(tmp_path)) if durable else ()
    shard = procs.start_server(shard_argv(0, 1, f"zeros:{DIM}", "add", "INFO", *flags))
    stream = Stream(shard.address)
    try:
        bad = push(1, [(1, 0), (2, 0)], 0)
        del bad.origins[1]

        with pytest.raises(grpc.RpcError) as refused:
            push_once(stream.stub, bad)

        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == (
            "push seq 1 of worker worker-a has 1 origins for 2 batches: tag every batch with its origin, or none"
        )
        info = stream.info()
        assert (info.num_params, dict(info.watermarks), dict(info.finished_below)) == (0, {}, {})
    finally:
        stream.close()


def _wal_bytes(directory: Path) -> int:
    return sum(segment_path(directory, n).stat().st_size for n in segment_numbers(directory))


@pytest.mark.parametrize("snapshotted", [False, True])
def test_a_durable_shard_killed_and_a_whole_replay_applies_each_record_once(
    procs: Processes, streams: list[Stream], tmp_path: Path, snapshotted: bool
) -> None:
    flags = ("--snapshot-interval", "0.3") if snapshotted else ()
    shard = start_shard(procs, 0, 1, tmp_path, *flags)
    stream = Stream(shard.address)
    streams.append(stream)
    first_run = [push(1, [(0, 0), (1, 0), (2, 0)], 2), push(2, [(3, 0), (4, 0)], 3), push(3, [(5, 0)], 4)]
    assert send_all(stream, first_run) == [False, False, False]
    if snapshotted:  # wait until a snapshot holds it all, so the log holds none of it
        waited = 0.0
        while (_wal_bytes(tmp_path) or not (tmp_path / "snapshot.bin").is_file()) and waited < 20:
            subprocess.run(["sleep", "0.1"], check=True)
            waited += 0.1
        assert _wal_bytes(tmp_path) == 0
        header, _ = read_snapshot(tmp_path / "snapshot.bin")
        assert header["finished_below"] == {WORKER: [4, [[4, 0], [5, 0]]]}
    kill(shard)

    _, stream = restarted(procs, streams, tmp_path, *flags)
    info = stream.info()
    assert (dict(info.finished_below), dict(info.watermarks)) == ({WORKER: 4}, {WORKER: 3})
    duplicates = send_all(
        stream,
        [
            push(1, [(0, 0)], 0),
            push(2, [(1, 0), (2, 0), (3, 0)], 0),
            push(3, [(4, 0)], 0),
            push(4, [(5, 0), (6, 0)], 7),
        ],
    )

    assert duplicates == [True, True, True, False]
    assert model(stream) == [1111111.0, 0.0]
    assert dict(stream.info().finished_below) == {WORKER: 7}


def test_a_snapshot_from_before_origins_still_loads(tmp_path: Path) -> None:
    from psclient.specs import make_init, make_update

    store = ParameterStore(make_init("const:0"), make_update("add"))
    durability = Durability(tmp_path, store, 0, 1)
    header = {"format": 1, "shard": 0, "num_shards": 1, "wal_segment": 1, "watermarks": {WORKER: 9}, "params": 0}
    write_snapshot(tmp_path, header, [])

    durability.recover()
    asyncio.run(durability.close())

    assert (durability.watermarks, durability.origins.finished_below) == ({WORKER: 9}, {})
