"""Endless jobs: periodic model snapshots (psserver --snapshot-every), streamed live.

Real shard and worker processes on 127.0.0.1. A snapshot must be one point in
time of its shard (a batch pushed at once is in it whole or not at all), its
file must be what `psserver --load` reads, the numbers only grow, and the
final one (taken at SIGTERM, once the job's streams drained) must hold exactly
what the job pushed.
"""

from __future__ import annotations

import collections
import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TESTS_DIR, Processes, child_env, error_line, psserver_argv

from psclient import connect, transform
from psclient.children import worker_argv
from psclient.either import Left, Right
from psclient.errors import ShardError
from psclient.watching import NewestSnapshots, ShardSnapshot, WatchEnded
from psclient.wire.codec import DecodedBatch
from psclient.wire.partition import shard_of
from psserver.model_snapshots import ModelSnapshot, write_snapshot_file

WAIT_S = 60.0
IDS = 10


def _shard(procs: Processes, shard: int, num_shards: int, *extra: str, init: str = "zeros:2") -> str:
    return procs.start_server([*psserver_argv(shard, num_shards, init, "add"), *extra]).address


def _watch(servers: list[str], into: list[ShardSnapshot]) -> threading.Thread:
    def read() -> None:
        with connect(servers) as cluster:
            into.extend(cluster.watch())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _file_model(path: Path) -> dict[Any, list[float]]:
    return {entry["id"]: entry["value"] for entry in map(json.loads, path.read_text().splitlines())}


def test_a_shard_snapshots_whole_batches_to_files_and_watchers_and_once_more_at_sigterm(
    procs: Processes, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    address = _shard(procs, 0, 1, "--snapshot-every", "0.1", "--snapshot-dir", str(models), "--snapshot-keep", "3")
    seen: list[ShardSnapshot] = []
    watcher = _watch([address], seen)
    rounds = 0
    with connect([address]) as cluster:
        _wait_for(lambda: cluster.info()[0].snapshot_every == pytest.approx(0.1), "the shard's Info")
        # Each round pushes +1 to every id in one batch, so any point in time holds equal values.
        while len(seen) < 4:
            cluster.push(np.arange(IDS), np.ones((IDS, 2), np.float32))
            rounds += 1
            time.sleep(0.01)
        shard = procs.started[0]
        shard.send_signal(signal.SIGTERM)
        assert shard.wait(WAIT_S) == 0
    watcher.join(WAIT_S)
    assert not watcher.is_alive()

    numbers = [snapshot.number for snapshot in seen]
    assert numbers == sorted(set(numbers)) and len(numbers) >= 5
    assert [snapshot.final for snapshot in seen] == [False] * (len(seen) - 1) + [True]
    counts = []
    for snapshot in seen:
        values = {value[0] for _, value in snapshot.params} | {value[1] for _, value in snapshot.params}
        assert len(values) <= 1, f"snapshot {snapshot.number} is not one point in time: {sorted(values)}"
        counts.append(values.pop() if values else 0.0)
    assert counts == sorted(counts)  # the model only grows
    final = seen[-1]
    assert dict(final.params) == {i: pytest.approx([rounds, rounds]) for i in range(IDS)}

    # The newest three files are kept, each the snapshot of its number.
    files = sorted(models.iterdir())
    assert [path.name for path in files] == [f"model-0-{n:06d}.jsonl" for n in numbers[-3:]]
    assert _file_model(files[-1]) == {i: [float(rounds)] * 2 for i in range(IDS)}
    # A snapshot file is a model psserver --load starts from.
    loaded = _shard(procs, 0, 1, "--load", str(files[-2]))
    with connect([loaded]) as cluster:
        expected = next(s for s in seen if s.number == numbers[-2])
        assert np.array_equal(cluster.pull(np.arange(IDS)), np.stack([dict(expected.params)[i] for i in range(IDS)]))


def _endless(quiet: threading.Event) -> Iterator[int]:
    """Records for ever; once `quiet` is set, none: an endless input with nothing arriving."""
    for record in itertools.count():
        yield record
        if record % 64 == 0:
            time.sleep(0.005)
        while quiet.is_set():
            time.sleep(0.05)


def _exactness_model(records: list[int]) -> dict[Any, float]:
    """The model of tests/logics.py Exactness over `records`."""
    model: dict[Any, float] = collections.defaultdict(float)
    for record in records:
        model[record % 500 - 250] += record % 7 + 1
        model[f"s{record % 300}"] += 2
    return dict(model)


@pytest.mark.parametrize("input_at_the_stop", ["flowing", "quiet"])
def test_an_endless_job_streams_its_model_while_it_trains_and_stops_cleanly_on_sigterm(
    procs: Processes, tmp_path: Path, input_at_the_stop: str
) -> None:
    models = tmp_path / "models"
    flags = ("--snapshot-every", "0.2", "--snapshot-dir", str(models))
    servers = [_shard(procs, i, 2, *flags, init="const:0") for i in range(2)]
    workers = [procs.start_server(worker_argv("logics:Exactness", servers, i, 2, "--port", "0")) for i in range(2)]
    seen: list[ShardSnapshot] = []
    watcher = _watch(servers, seen)
    stream: list[Left[Any] | Right[Any]] = []
    ended: list[BaseException | None] = []
    quiet = threading.Event()

    def consume() -> None:
        try:
            with connect(servers, [w.address for w in workers]) as cluster:
                stream.extend(cluster.stream(_endless(quiet)))
            ended.append(None)
        except BaseException as exc:
            ended.append(exc)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    _wait_for(lambda: len({(s.shard, s.number) for s in seen if s.params}) >= 6, "three snapshots of each shard")
    live_rights = sum(isinstance(item, Right) for item in list(stream))
    assert live_rights > 0, "no model update reached the stream while the job trained"

    if input_at_the_stop == "quiet":  # the workers wait for their next record as the signal comes
        quiet.set()
        time.sleep(0.5)
    for worker in workers:  # they finish what they took, deliver its outputs, and exit 0
        worker.process.send_signal(signal.SIGTERM)
    for worker in workers:
        assert worker.process.wait(WAIT_S) == 0, error_line(worker.stderr_path.read_text().splitlines())
    consumer.join(WAIT_S)
    assert ended == [None], f"the stream of a stopped job ended with {ended}"

    processed = [item.value[1] for item in stream if isinstance(item, Left)]
    assert len(processed) == len(set(processed)) > 0
    expected = _exactness_model(processed)
    # The final model closes the stream: the last Rights, one per parameter.
    final = dict(item.value for item in stream[-len(expected) :])
    assert final == {k: pytest.approx(v) for k, v in expected.items()}

    for index in range(2):
        procs.started[index].send_signal(signal.SIGTERM)
        assert procs.started[index].wait(WAIT_S) == 0
    watcher.join(WAIT_S)
    finals = {s.shard: dict(s.params) for s in seen if s.final}
    assert sorted(finals) == [0, 1]
    for shard, params in finals.items():
        assert params == {k: pytest.approx(v) for k, v in expected.items() if shard_of(k, 2) == shard}
        newest = max(path for path in models.iterdir() if path.name.startswith(f"model-{shard}-"))
        assert _file_model(newest) == {k: pytest.approx(v) for k, v in params.items()}


def test_transform_yields_model_updates_during_the_job_then_the_exact_final_model(tmp_path: Path) -> None:
    records = list(range(6_000))

    def slow() -> Iterator[int]:
        for record in records:
            yield record
            if record % 200 == 0:
                time.sleep(0.02)

    models = tmp_path / "models"
    stream = list(
        transform(slow(), "logics:Exactness", "const:0", "add", 2, 2, snapshot_every=0.1, snapshot_dir=models)
    )
    lefts = [i for i, item in enumerate(stream) if isinstance(item, Left)]
    rights = [i for i, item in enumerate(stream) if isinstance(item, Right)]
    assert len(lefts) == len(records)
    assert rights[0] < lefts[-1], "no model update came before the job ended"
    model: dict[Any, float] = {}
    for index in rights:  # later snapshots overwrite earlier ones; the final model comes last
        param_id, value = stream[index].value
        model[param_id] = value
    assert model == {k: pytest.approx(v) for k, v in _exactness_model(records).items()}
    numbers = {int(path.stem.split("-")[2]) for path in models.iterdir() if path.name.startswith("model-0-")}
    assert max(numbers) >= 3


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (
            ["--snapshot-every", "1"],
            "--snapshot-every needs --snapshot-dir DIR (or --data-dir, whose models/ it then uses)",
        ),
        (["--snapshot-dir", "x"], "--snapshot-dir needs --snapshot-every SECONDS"),
        (
            ["--snapshot-every", "1", "--snapshot-dir", "x", "--logic", "server_logics:Counting"],
            "--snapshot-every cannot be used with --logic: a server logic keeps its own state",
        ),
    ],
)
def test_bad_snapshot_flags_are_refused_in_one_line(flags: list[str], line: str) -> None:
    done = subprocess.run(
        [*psserver_argv(0, 1, "zeros:1", "add"), *flags], capture_output=True, text=True, timeout=WAIT_S, check=False
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"psserver: error: {line}"]


def test_watching_a_shard_without_snapshots_is_one_clear_error(procs: Processes) -> None:
    address = _shard(procs, 0, 1)
    with connect([address]) as cluster, pytest.raises(ShardError) as raised:
        next(cluster.watch())
    assert str(raised.value) == (
        f"model snapshots of shard 0 at {address}: FAILED_PRECONDITION: shard 0 takes no model snapshots: "
        "start it with --snapshot-every SECONDS"
    )


def test_transform_refuses_a_bad_snapshot_every() -> None:
    with pytest.raises(ValueError, match="snapshot_every must be a positive number of seconds, not 0"):
        transform([1], "logics:Exactness", "const:0", "add", snapshot_every=0)


@pytest.mark.parametrize(("input_at_the_stop", "durable"), [("flowing", False), ("quiet", False), ("quiet", True)])
def test_psclient_run_on_endless_stdin_writes_snapshots_and_stops_on_sigterm_with_the_exact_model(
    tmp_path: Path, input_at_the_stop: str, durable: bool
) -> None:
    models, model, outputs = tmp_path / "models", tmp_path / "model.jsonl", tmp_path / "outputs.jsonl"
    argv = [
        sys.executable, "-m", "psclient", "run", "--logic", "logics:Exactness", "--input", "-", "--format", "jsonl",
        "--init", "const:0", "--workers", "2", "--shards", "2", "--snapshot-every", "0.2",
        "--snapshot-dir", str(models), "--model", str(model), "--output", str(outputs),
        *(["--durable"] if durable else []),
    ]  # fmt: skip
    log = (tmp_path / "stderr").open("w")
    run = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=log, text=True, env=child_env(), cwd=TESTS_DIR)
    assert run.stdin is not None
    written = 0

    def numbers(shard: int) -> list[int]:
        found = [int(p.stem.split("-")[2]) for p in models.glob(f"model-{shard}-*.jsonl")] if models.is_dir() else []
        return sorted(found)

    try:
        deadline = time.monotonic() + WAIT_S
        while min(max(numbers(0), default=0), max(numbers(1), default=0)) < 3:  # an input that never ends
            assert time.monotonic() < deadline and run.poll() is None, "no third snapshot of each shard"
            run.stdin.write("".join(f"{written + i}\n" for i in range(50)))
            run.stdin.flush()
            written += 50
            time.sleep(0.01)
        if input_at_the_stop == "quiet":  # every record written is read before the signal
            time.sleep(1.0)
        run.send_signal(signal.SIGTERM)  # stdin stays open: the stop is the signal's
        run.wait(WAIT_S)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        run.stdin.close()
        log.close()
    stderr = (tmp_path / "stderr").read_text()
    assert run.returncode == 0, stderr
    assert stderr.strip().splitlines()[-1].startswith("psclient: stopped by SIGTERM: "), stderr
    processed = [json.loads(line)[1] for line in outputs.read_text().splitlines()]
    assert len(processed) == len(set(processed)) > 0
    # The stop ends the input after the records read so far: each of them, and no other, is processed.
    assert sorted(processed) == list(range(written if input_at_the_stop == "quiet" else len(processed)))
    expected = _exactness_model(processed)
    assert _file_model(model) == {k: pytest.approx(v) for k, v in expected.items()}
    for shard in range(2):  # the final snapshot each shard took as it stopped holds the same model
        final = _file_model(models / f"model-{shard}-{numbers(shard)[-1]:06d}.jsonl")
        assert final == {k: pytest.approx(v) for k, v in expected.items() if shard_of(k, 2) == shard}


def test_a_slow_reader_of_live_snapshots_gets_each_shards_newest_and_holds_no_backlog() -> None:
    delivered: list[Any] = []
    newest = NewestSnapshots(delivered.append)
    for number in (1, 2, 3):  # three snapshots of shard 0 before the reader gets to any
        newest.deliver(ShardSnapshot(0, number, False, [(0, float(number))]))
    newest.deliver(ShardSnapshot(1, 1, False, [(1, 10.0)]))
    newest.deliver(WatchEnded(1))
    assert len(delivered) == 2  # one token per shard, not per snapshot
    assert [list(token) for token in delivered] == [[Right((0, 3.0))], [Right((1, 10.0))]]


def test_a_snapshot_that_cannot_be_written_leaves_no_partial_file(tmp_path: Path) -> None:
    values = np.array([[1 + 2j]], dtype=np.complex64)  # no JSON for it: the write fails midway
    snapshot = ModelSnapshot(1, 1, [[DecodedBatch(np.array([7], dtype=np.int64), [], values)]], False)
    with pytest.raises(TypeError):
        write_snapshot_file(tmp_path / "model-0-000001.jsonl", snapshot)
    assert list(tmp_path.iterdir()) == []
