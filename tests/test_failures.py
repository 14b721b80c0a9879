"""Failures end a job promptly, with one line naming what failed, and lose no acknowledged push.

A delta no shard could apply is refused at `ps.push`; a Feed-mode worker whose job
failed does not wait for a reader that never comes; a dead shard costs no wait
beyond --shard-timeout; a shard stopped by SIGTERM ends its streams with a status
saying so.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Processes, Service, StartShards, error_line, psserver_argv, run_psworker
from logics import JsonPush

from psclient import Cluster, JobFailed, LocalCluster, transform
from psclient.children import worker_argv
from psworker.checks import InvalidDelta, check_delta

ONE_WORKER = ("--worker-index", "0", "--num-workers", "1")


# -- 1. a delta no shard could apply is refused at ps.push -------------------------------


@pytest.mark.parametrize(
    "delta",
    [
        1,
        -(1 << 63),
        2.5,
        True,
        1 + 2j,
        np.float32(1.5),
        np.int8(-3),
        np.bool_(True),
        np.array([1.0, 2.0], dtype=np.float32),
        np.array([[1, 2]], dtype=np.uint16),
        np.array([1 + 1j], dtype=np.complex64),
        np.array(3),
        [1.0, 2.0],
    ],
    ids=repr,
)
def test_numeric_deltas_are_accepted(delta: Any) -> None:
    check_delta(3, delta)


@pytest.mark.parametrize(
    ("delta", "message"),
    [
        ("abc", "push of 'abc' (str) to id 3: a delta must be a number or a numeric numpy array"),
        (b"abc", "push of b'abc' (bytes) to id 3: a delta must be a number or a numeric numpy array"),
        (None, "push of None (NoneType) to id 3: a delta must be a number or a numeric numpy array"),
        ([1, "a"], "push of [1, 'a'] (list) to id 3: a delta must be a number or a numeric numpy array"),
        ([[1, 2], [3]], "push of [[1, 2], [3]] (list) to id 3: a delta must be a number or a numeric numpy array"),
        ({"a": 1}, "push of {'a': 1} (dict) to id 3: a delta must be a number or a numeric numpy array"),
        (
            np.array(["a"]),
            "push of array(['a'], dtype='<U1') (ndarray of dtype <U1) to id 3: "
            "a delta must be a number or a numeric numpy array",
        ),
        (
            np.array([1, None], dtype=object),
            "push of array([1, None], dtype=object) (ndarray of dtype object) to id 3: "
            "a delta must be a number or a numeric numpy array",
        ),
        (1 << 64, "push of 18446744073709551616 (int) to id 3: an int delta must fit in int64"),
        (float("nan"), "push of nan (float) to id 3: a delta must be finite (NaN and Inf are refused)"),
        (
            np.array([1.0, np.inf]),
            "push of array([ 1., inf]) (ndarray of dtype float64) to id 3: "
            "a delta must be finite (NaN and Inf are refused)",
        ),
    ],
    ids=repr,
)
def test_non_numeric_or_non_finite_deltas_are_refused(delta: Any, message: str) -> None:
    with pytest.raises(InvalidDelta) as info:
        check_delta(3, delta)

    assert str(info.value) == message


def records_with_str_delta_on_line_3(path: Path) -> None:
    records = [{"id": 1, "delta": 1}, {"id": 2, "delta": 2}, {"id": 3, "delta": "abc"}, {"id": 4, "delta": 4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


STR_DELTA_ERROR = (
    "worker 0 failed in on_recv: push of 'abc' (str) to id 3: a delta must be a number or a numeric numpy array"
)


@pytest.mark.timeout(120)
def test_str_delta_stops_psworker_with_one_line_and_keeps_the_pushes_before_it(
    tmp_path: Path, procs: Processes, start_shards: StartShards
) -> None:
    data = tmp_path / "records.jsonl"
    records_with_str_delta_on_line_3(data)
    servers = start_shards(1)

    code, stdout, stderr = run_psworker(
        procs, *ONE_WORKER, "--logic", "logics:JsonPush", "--input", str(data), servers=servers[0]
    )
    with Cluster(servers) as cluster:
        model = dict(cluster.snapshot())

    assert code == 1
    assert error_line(stderr) == f"psworker: error: {STR_DELTA_ERROR} (line 3: {{'id': 3, 'delta': 'abc'}})"
    assert [json.loads(out) for out in stdout] == [1, 2]
    assert model == {1: 1, 2: 2}


@pytest.mark.timeout(120)
def test_str_delta_is_skipped_with_on_error_skip(tmp_path: Path, procs: Processes, start_shards: StartShards) -> None:
    data = tmp_path / "records.jsonl"
    records_with_str_delta_on_line_3(data)
    servers = start_shards(1)

    code, stdout, stderr = run_psworker(
        procs, *ONE_WORKER, "--logic", "logics:JsonPush", "--input", str(data), "--on-error", "skip", servers=servers[0]
    )
    with Cluster(servers) as cluster:
        model = dict(cluster.snapshot())

    assert code == 0, stderr
    skipped = [line for line in stderr if line.endswith("; skipped")]
    assert len(skipped) == 1, stderr
    assert skipped[0].endswith(f"{STR_DELTA_ERROR} (line 3: {{'id': 3, 'delta': 'abc'}}); skipped")
    assert [json.loads(out) for out in stdout] == [1, 2, 4]
    assert model == {1: 1, 2: 2, 4: 4}


@pytest.mark.timeout(120)
def test_str_delta_fails_transform_naming_worker_callback_and_record() -> None:
    records = [{"id": 1, "delta": 1}, {"id": 2, "delta": 2}, {"id": 3, "delta": "abc"}, {"id": 4, "delta": 4}]

    with pytest.raises(JobFailed) as info:
        list(transform(records, JsonPush(), "const:0", "add", 1, 1))

    assert str(info.value) == f"{STR_DELTA_ERROR} (record 3: {{'id': 3, 'delta': 'abc'}})"


# -- 6. a failed shard costs no wait for acknowledgements it will never send -------------


def records_killing(cluster: LocalCluster, shard: int, after: int, killed: list[float]) -> Iterator[int]:
    """Endless records; once `after` were taken, `shard` of `cluster` is stopped, so that
    the worker's pushes to it go unacknowledged, and a second later killed."""
    process = cluster.children[shard].process  # shards are the first children, in order
    for record in itertools.count():
        if record == after:
            process.send_signal(signal.SIGSTOP)
            time.sleep(1.0)  # the worker goes on with the thousands of records queued before it
            process.kill()
            killed.append(time.monotonic())
        yield record


@pytest.mark.timeout(120)
def test_killed_shard_fails_the_job_within_seconds() -> None:
    cluster = LocalCluster("logics:Exactness", "const:0", "add", num_workers=2, num_shards=2)
    killed: list[float] = []

    with cluster, Cluster(cluster.servers, cluster.workers) as client:
        with pytest.raises(JobFailed) as info:
            for _ in client.stream(records_killing(cluster, 1, 5_000, killed)):
                pass
        elapsed = time.monotonic() - killed[0]

    assert re.match(rf"worker [01]: shard 1 at {cluster.servers[1]} failed: UNAVAILABLE", str(info.value)), info.value
    # It took at least 10 s (waiting for acknowledgements from the dead shard); it
    # takes well under one, and the margin is for a loaded machine.
    assert elapsed < 4.0, elapsed


# -- 5. a Feed-mode worker whose job failed does not wait for a reader that never comes ---


def unreachable(address: str, shard: int = 0) -> str:
    return f"worker 0: shard {shard} at {address} unreachable for 3 s (last error: connection refused)"


def feed_mode_worker(
    procs: Processes, servers: list[str], index: int = 0, num_workers: int = 1, *, shard_timeout: str = "3"
) -> Service:
    """A worker that waits `shard_timeout` seconds (reconnecting) for a shard that went away."""
    return procs.start_server(
        worker_argv(
            "logics:Exactness", servers, index, num_workers, "--port", "0", "--shard-timeout", shard_timeout,
            log_level="INFO",
        )
    )  # fmt: skip


def start_shard(procs: Processes) -> Service:
    return procs.start_server(psserver_argv(0, 1, "const:0", "add"))


@pytest.mark.timeout(120)
def test_feed_mode_worker_exits_soon_after_its_job_failed_when_nobody_reads(procs: Processes) -> None:
    shard = start_shard(procs)
    worker = feed_mode_worker(procs, [shard.address])
    with Cluster([shard.address], [worker.address]) as cluster:
        cluster.feed(range(100), end_of_input=False)

    shard.process.kill()
    code = worker.process.wait(timeout=20)  # it used to wait for an Outputs reader for good

    stderr = worker.stderr_path.read_text(encoding="utf-8").splitlines()
    assert code == 1
    assert stderr[-1] == f"psworker: error: {unreachable(shard.address)}", stderr


@pytest.mark.timeout(120)
def test_attached_outputs_reader_gets_the_failure_before_the_worker_exits(procs: Processes) -> None:
    shard = start_shard(procs)
    worker = feed_mode_worker(procs, [shard.address])
    outputs: list[Any] = []
    with Cluster([shard.address], [worker.address]) as cluster:
        cluster.feed(range(100), end_of_input=False)
        reader = cluster.outputs()
        outputs.extend(itertools.islice(reader, 100))  # attached and drained

        shard.process.kill()
        with pytest.raises(JobFailed) as info:
            next(reader)
    code = worker.process.wait(timeout=20)

    assert outputs == [[0, r] for r in range(100)]
    assert str(info.value) == unreachable(shard.address)
    assert code == 1


@pytest.mark.timeout(120)
def test_feed_mode_worker_exits_soon_after_its_job_failed_when_its_reader_went_away(procs: Processes) -> None:
    shard = start_shard(procs)
    worker = feed_mode_worker(procs, [shard.address])
    with Cluster([shard.address], [worker.address]) as cluster:
        cluster.feed(range(100), end_of_input=False)
        outputs = list(itertools.islice(cluster.outputs(), 100))
    time.sleep(1.5)  # closing the client cancelled its Outputs stream; let the worker see it

    shard.process.kill()
    code = worker.process.wait(timeout=20)

    stderr = worker.stderr_path.read_text(encoding="utf-8").splitlines()
    assert outputs == [[0, r] for r in range(100)]
    assert code == 1
    assert stderr[-1] == f"psworker: error: {unreachable(shard.address)}", stderr


# -- 7. a shard stopped by SIGTERM ends its streams with a status that says so ---------------


def start_shards_logging_info(procs: Processes, num_shards: int) -> list[Service]:
    shards = []
    for shard in range(num_shards):
        argv = psserver_argv(shard, num_shards, "const:0", "add")
        shards.append(procs.start_server([*argv[: argv.index("--log-level")], "--log-level", "INFO"]))
    return shards


def assert_stopped_cleanly(shard: Service, index: int) -> None:
    code = shard.process.wait(timeout=20)
    stderr = shard.stderr_path.read_text(encoding="utf-8").splitlines()
    assert code == 0, stderr
    assert not [line for line in stderr if "ERROR" in line or "Traceback" in line], stderr
    assert re.fullmatch(rf"\S+ \S+ INFO shard {index}: stopped on SIGTERM; ended \d+ open streams", stderr[-1]), stderr


@pytest.mark.timeout(120)
def test_sigterm_on_a_shard_ends_idle_worker_streams_with_shutting_down(procs: Processes) -> None:
    (shard,) = start_shards_logging_info(procs, 1)
    worker = feed_mode_worker(procs, [shard.address])
    with Cluster([shard.address], [worker.address]) as cluster:
        cluster.feed(range(100), end_of_input=False)

    shard.process.terminate()
    assert_stopped_cleanly(shard, 0)
    code = worker.process.wait(timeout=20)

    stderr = worker.stderr_path.read_text(encoding="utf-8").splitlines()
    assert code == 1
    warnings = [line for line in stderr if "reconnecting" in line]
    assert len(warnings) == 1, stderr
    assert warnings[0].endswith(
        f" WARNING worker 0: shard 0 at {shard.address} is shutting down; reconnecting (for up to 3 s)"
    ), stderr
    assert stderr[-1] == f"psworker: error: {unreachable(shard.address)}", stderr


def records_terminating(shard: Service, after: int, terminated: list[float]) -> Iterator[int]:
    """Endless records; SIGTERM to `shard` once `after` were taken."""
    for record in itertools.count():
        if record == after:
            shard.process.terminate()
            terminated.append(time.monotonic())
        yield record


@pytest.mark.timeout(120)
def test_sigterm_on_a_shard_in_a_busy_job_fails_it_at_once_naming_the_shard(procs: Processes) -> None:
    shards = start_shards_logging_info(procs, 2)
    servers = [shard.address for shard in shards]
    # --shard-timeout 0: no reconnecting, the worker fails as soon as the stream ends.
    workers = [feed_mode_worker(procs, servers, index, 2, shard_timeout="0").address for index in range(2)]
    terminated: list[float] = []

    with Cluster(servers, workers) as cluster, pytest.raises(JobFailed) as info:
        for _ in cluster.stream(records_terminating(shards[1], 5_000, terminated)):
            pass
    elapsed = time.monotonic() - terminated[0]

    # The shard ends its streams with "shutting down"; a worker in the middle of a write
    # may see its socket closed before that status arrives, and then says so instead.
    assert re.fullmatch(
        rf"worker [01]: shard 1 at {re.escape(servers[1])} "
        r"(is shutting down|failed: UNAVAILABLE: Stream removed \(sendmsg: Broken pipe \(32\)\))",
        str(info.value),
    ), info.value
    assert_stopped_cleanly(shards[1], 1)
    # The shard used to wait out its 5 s grace period before ending the streams; and
    # feeding, in about a third of the runs, waited 5 s for a thread that never ended.
    assert elapsed < 4.0, elapsed
