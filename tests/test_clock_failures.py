"""bsp/ssp when something goes wrong: a worker that fails or is killed, a shard that restarts
or stops while it holds a pull, a stream that breaks under a held pull. Real processes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Processes, error_line
from shard_streams import Stream
from test_consistency import EPOCHS, KEYS, infos, job_records, model, owner_keys

from psclient import transform
from psclient.children import shard_argv, worker_argv
from psclient.errors import SpecError
from psclient.wire.codec import encode_keys
from psclient.wire.proto import shard_pb2

# Generous bounds for "does not hang": the jobs here take seconds.
WAIT_S = 60
HOLD_TIMEOUT_S = 2


def start_shard(procs: Processes, consistency: str, num_workers: int, *extra: str, port: int = 0) -> str:
    argv = shard_argv(0, 1, "const:0", "add", "INFO", "--consistency", consistency, "--num-workers",
                      str(num_workers), *extra, port=port)  # fmt: skip
    return procs.start_server(argv).address


def start_workers(
    procs: Processes, server: str, logics: list[str], records: list[dict[str, int]], tmp_path: Path, *extra: str
) -> list[tuple[subprocess.Popen[str], Path]]:
    path = tmp_path / "input.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    flags = ["--input", str(path), "--partition-key", "w", "--consistency", "bsp", *extra]
    return [
        procs.popen(worker_argv(logic, [server], index, len(logics), *flags), stdout=subprocess.DEVNULL)
        for index, logic in enumerate(logics)
    ]


def stderr_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_a_worker_that_fails_no_longer_holds_the_others_back(procs: Processes, tmp_path: Path) -> None:
    # Worker 0 reaches clock 1 and fails there: still counted, it would hold worker 1 at clock 2 for good.
    server = start_shard(procs, "bsp", 2)
    records = job_records([EPOCHS, EPOCHS])
    (failing, failing_err), (other, other_err) = start_workers(
        procs, server, ["clock_logics:FailsInEpoch1", "clock_logics:Epochs"], records, tmp_path
    )
    assert failing.wait(timeout=WAIT_S) == 1
    failed = error_line(stderr_lines(failing_err))
    assert failed.startswith("psworker: error: worker 0 failed in on_recv: ValueError: boom")
    assert other.wait(timeout=WAIT_S) == 0, other_err.read_text()
    # Worker 0's first epoch (its pushes were delivered before it ended), and all of worker 1's.
    assert model([server]) == {key: 1.0 + EPOCHS for key in range(KEYS)}


def test_a_killed_worker_fails_the_pulls_it_holds_back_with_one_line(procs: Processes, tmp_path: Path) -> None:
    server = start_shard(procs, "bsp", 2, "--hold-timeout", str(HOLD_TIMEOUT_S))
    records = job_records([EPOCHS, EPOCHS])
    (crawler, _), (other, other_err) = start_workers(
        procs, server, ["clock_logics:Crawls", "clock_logics:Epochs"], records, tmp_path
    )
    deadline = time.monotonic() + WAIT_S
    while not infos([server])[0].held_pulls:  # worker 1 is ahead, and waits for worker 0
        assert time.monotonic() < deadline and other.poll() is None
        time.sleep(0.05)
    crawler.send_signal(signal.SIGKILL)
    crawler.wait(timeout=10)
    killed = time.monotonic()
    assert other.wait(timeout=WAIT_S) == 1
    assert time.monotonic() - killed < HOLD_TIMEOUT_S + 20  # generous: it does not hang
    assert error_line(stderr_lines(other_err)) == (
        f"psworker: error: worker 1: shard 0 at {server} failed: FAILED_PRECONDITION: pull held back by worker 0, "
        f"at clock 0 (bsp), which has had no stream to shard 0 for {HOLD_TIMEOUT_S} s: is it still running?"
    )


@pytest.mark.parametrize("durable", [True, False])
def test_a_restarted_shard_after_a_worker_finished(durable: bool, procs: Processes, tmp_path: Path) -> None:
    # Worker 0 does one epoch and exits; the shard is killed and started again on its port.
    data = tmp_path / "data"
    data.mkdir()
    # Without a data dir, the hold timeout is what ends the wait.
    extra = ["--data-dir", str(data)] if durable else ["--hold-timeout", str(HOLD_TIMEOUT_S)]
    server = start_shard(procs, "bsp", 2, *extra)
    records = job_records([1, EPOCHS], keys=4)
    (first, first_err), (crawler, crawler_err) = start_workers(
        procs, server, ["clock_logics:Epochs", "clock_logics:Crawls"], records, tmp_path, "--shard-timeout", "30"
    )
    assert first.wait(timeout=WAIT_S) == 0, first_err.read_text()
    shard = procs.started[0]
    shard.send_signal(signal.SIGKILL)
    shard.wait(timeout=10)
    assert crawler.poll() is None  # still in its epochs
    start_shard(procs, "bsp", 2, *extra, port=int(server.rsplit(":", 1)[1]))
    if durable:  # the shard logged that worker 0 finished
        assert crawler.wait(timeout=WAIT_S) == 0, crawler_err.read_text()
        assert model([server]) == {key: 1.0 + EPOCHS for key in range(4)}
        return
    # Without a data dir the shard cannot know: a clear line, not a silent hang.
    assert crawler.wait(timeout=WAIT_S) == 1
    assert error_line(stderr_lines(crawler_err)).endswith(
        "pull held back by worker 0, at clock 0 (bsp), which has had no stream to shard 0 for 2 s: is it still running?"
    )


def test_a_new_job_on_a_data_dir_starts_its_workers_clocks_afresh(procs: Processes, tmp_path: Path) -> None:
    # The first job's workers both finished; its shard stops (a snapshot keeps their clocks) and starts again.
    data = tmp_path / "data"
    data.mkdir()
    server = start_shard(procs, "bsp", 2, "--data-dir", str(data))
    first_job = start_workers(procs, server, ["clock_logics:Epochs"] * 2, job_records([1, 1]), tmp_path)
    for process, stderr_path in first_job:
        assert process.wait(timeout=WAIT_S) == 0, stderr_path.read_text()
    shard = procs.started[0]
    shard.send_signal(signal.SIGTERM)
    assert shard.wait(timeout=WAIT_S) == 0
    server = start_shard(procs, "bsp", 2, "--data-dir", str(data))
    # The second job's worker 0 is slow, and connected before worker 1 starts: it holds worker 1 back.
    path = tmp_path / "input.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in job_records([EPOCHS, EPOCHS])))
    flags = ["--input", str(path), "--partition-key", "w", "--consistency", "bsp", "--job-id", "second"]
    slow, slow_err = procs.popen(worker_argv("clock_logics:Crawls", [server], 0, 2, *flags), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + WAIT_S
    while "second-w0" not in infos([server])[0].watermarks:
        assert time.monotonic() < deadline and slow.poll() is None
        time.sleep(0.05)
    fast, fast_err = procs.popen(worker_argv("clock_logics:Epochs", [server], 1, 2, *flags), stdout=subprocess.DEVNULL)
    assert fast.wait(timeout=WAIT_S) == 0, fast_err.read_text()
    assert slow.wait(timeout=WAIT_S) == 0, slow_err.read_text()
    (info,) = infos([server])
    assert info.held_pulls > 0 and max(info.clock_gaps) == 0, info
    assert model([server]) == {key: 2.0 + 2.0 * EPOCHS for key in range(KEYS)}


def test_a_stopped_shard_ends_a_held_pull_at_once(procs: Processes, tmp_path: Path) -> None:
    # Two workers, only worker 1 runs: its pulls at clock 1 are held.
    server = start_shard(procs, "bsp", 2)
    path = tmp_path / "input.jsonl"
    path.write_text("".join(json.dumps({"e": e, "k": k}) + "\n" for e in range(3) for k in range(4)))
    worker, worker_err = procs.popen(
        worker_argv("clock_logics:Epochs", [server], 1, 2, "--input", str(path), "--consistency", "bsp",
                    "--shard-timeout", "3", log_level="INFO"),
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + WAIT_S
    while not infos([server])[0].held_pulls:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    shard = procs.started[0]
    stopped = time.monotonic()
    shard.send_signal(signal.SIGTERM)
    assert shard.wait(timeout=WAIT_S) == 0
    assert time.monotonic() - stopped < 3  # not the whole grace period: nothing waits for the held pull
    assert worker.wait(timeout=WAIT_S) == 1
    lines = stderr_lines(worker_err)
    assert any(f"shard 0 at {server} is shutting down; reconnecting" in line for line in lines), lines
    assert not any("Cancelling all calls" in line for line in lines), lines


def test_a_worker_refuses_a_shard_that_came_back_with_another_consistency(procs: Processes, tmp_path: Path) -> None:
    server = start_shard(procs, "bsp", 1)
    records = [{"w": 0, "e": e, "k": k} for e in range(EPOCHS) for k in range(4)]
    ((worker, worker_err),) = start_workers(procs, server, ["clock_logics:Crawls"], records, tmp_path)
    deadline = time.monotonic() + WAIT_S
    while not infos([server])[0].watermarks:  # it runs, with the bsp shard
        assert time.monotonic() < deadline and worker.poll() is None
        time.sleep(0.05)
    shard = procs.started[0]
    shard.send_signal(signal.SIGKILL)
    shard.wait(timeout=10)
    port = int(server.rsplit(":", 1)[1])
    procs.start_server(shard_argv(0, 1, "const:0", "add", "WARNING", port=port))  # async now
    assert worker.wait(timeout=WAIT_S) == 1
    assert error_line(stderr_lines(worker_err)) == (
        "psworker: error: worker 0: shard 0 runs --consistency async, but worker 0 runs bsp: every shard and "
        "worker of a job must run the same"
    )


def test_held_pulls_of_a_broken_stream_are_not_answered_later(procs: Processes, streams: list[Stream]) -> None:
    server = start_shard(procs, "bsp", 2)
    ahead = Stream(server)
    streams.append(ahead)
    ahead.send_request(shard_pb2.ExchangeRequest(clock=shard_pb2.WorkerClock(worker_index=1, clock=1)))
    for request_id in (1, 2):  # both held: worker 0 is at clock 0
        pull = shard_pb2.PullRequest(request_id=request_id, keys=encode_keys([7]), worker_index=1, clock=1)
        ahead.send_request(shard_pb2.ExchangeRequest(pull=pull))
    deadline = time.monotonic() + WAIT_S
    while infos([server])[0].held_pulls < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ahead.close()
    time.sleep(0.5)  # the shard sees the stream end
    slow = Stream(server)
    streams.append(slow)
    slow.send_request(shard_pb2.ExchangeRequest(clock=shard_pb2.WorkerClock(worker_index=0, finished=True)))
    slow.answer()
    time.sleep(0.5)  # a released pull would be answered by now
    (info,) = infos([server])
    assert (info.pull_requests, dict(info.clock_gaps)) == (0, {})


def test_a_consistency_that_is_not_a_string_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match=r"^unknown consistency None: use async, bsp or ssp:S with S >= 0$"):
        transform([], "logics:Exactness", "const:0", "add", consistency=None)  # type: ignore[arg-type]


def test_a_pull_made_before_advance_clock_carries_the_clock_it_was_made_at(procs: Processes, tmp_path: Path) -> None:
    # Worker 1 pulls, then advances in the same callback: that pull is at clock 0, which worker 0
    # (dozing at clock 0) does not hold back; its next pull, at clock 1, is held.
    server = start_shard(procs, "bsp", 2)
    owners = owner_keys(2)
    records = [{"w": owners[w], "e": e, "k": e} for w in (0, 1) for e in range(2 if w else 1)]
    for process, stderr_path in start_workers(procs, server, ["clock_logics:PullsThenAdvances"] * 2, records, tmp_path):
        assert process.wait(timeout=WAIT_S) == 0, stderr_path.read_text()
    (info,) = infos([server])
    assert (info.pull_requests, info.held_pulls) == (2, 1)
