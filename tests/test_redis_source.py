"""`psworker --input redis://HOST:PORT/STREAM?group=G`: the job's workers read a Redis stream
as one consumer group, and an entry is acknowledged only once every push it caused is; a
worker killed with SIGKILL and started again reads its pending entries again, and the shards
apply their pushes once, so the model is the fault-free one exactly. Against a real
redis-server (tests/stream_servers.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis
from conftest import Processes, error_line, run_psworker
from stream_jobs import JOB, StreamJob
from stream_servers import StreamServer
from test_shard_restarts import expected_model, start_shard

from psclient import Cluster
from psclient.children import worker_argv

STREAM = "records"
GROUP = "trainers"


def client(server: StreamServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port)


def produce(server: StreamServer, records: range, *, pause_every: int = 0, pause_s: float = 0.0) -> None:
    """XADD one entry per record, field `record` holding it as JSON; a pause every so often
    spreads the stream over time, so that a worker can be killed in the middle of it."""
    with client(server) as r:
        pipe = r.pipeline(transaction=False)
        for count, record in enumerate(records, start=1):
            pipe.xadd(STREAM, {"record": json.dumps(record)})
            if pause_every and count % pause_every == 0:
                pipe.execute()
                time.sleep(pause_s)
        pipe.execute()


def pending(server: StreamServer, consumer: str | None = None) -> int:
    with client(server) as r:
        if not r.exists(STREAM) or not any(g["name"].decode() == GROUP for g in r.xinfo_groups(STREAM)):
            return 0  # the workers have not made the group yet
        if consumer is None:
            return int(r.xpending(STREAM, GROUP)["pending"])
        return len(r.xpending_range(STREAM, GROUP, "-", "+", 1_000_000, consumername=consumer))


def stream_url(server: StreamServer) -> str:
    return f"redis://{server.address}/{STREAM}?group={GROUP}&end=idle:3"


def test_two_workers_share_a_stream_and_acknowledge_every_entry(
    tmp_path: Path, procs: Processes, redis_server: StreamServer
) -> None:
    records = range(2_000)
    produce(redis_server, records)  # before the group exists: it starts at the stream's start
    job = StreamJob(procs, tmp_path, stream_url(redis_server))
    job.wait()
    assert pending(redis_server) == 0
    assert job.model() == expected_model(records)
    outputs = job.outputs()
    assert sorted(record for _, record in outputs) == list(records)  # each once, without a failure


@pytest.mark.parametrize("checkpoints", [False, True], ids=["plain", "checkpointed"])
def test_a_worker_killed_mid_stream_and_restarted_leaves_the_model_exact(
    tmp_path: Path, procs: Processes, redis_server: StreamServer, checkpoints: bool
) -> None:
    """Worker 1 is killed while it holds entries it has not acknowledged (some of whose pushes
    the shards may hold); started again under the same name, it reads them again. With
    --checkpoint-dir it acknowledges at its checkpoints, and skips what its checkpoint covers."""
    records = range(20_000)
    producer = threading.Thread(
        target=produce, args=(redis_server, records), kwargs={"pause_every": 500, "pause_s": 0.2}
    )
    producer.start()
    extra = ["--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "300"] if checkpoints else []
    job = StreamJob(procs, tmp_path, stream_url(redis_server), *extra)
    killed_holding = 0
    deadline = time.monotonic() + 60
    while not killed_holding:
        assert time.monotonic() < deadline, "worker 1 never held an unacknowledged entry"
        # Once it has pushes in the shards, and entries in hand.
        if job.written(1) >= 1_000 and pending(redis_server, f"{JOB}-w1"):
            os.kill(job.workers[1].pid, signal.SIGKILL)
            job.workers[1].wait(timeout=10)
            killed_holding = pending(redis_server, f"{JOB}-w1")
            job.workers[1] = job.start(1)
        time.sleep(0.01)
    producer.join()
    job.wait()
    assert pending(redis_server) == 0
    assert job.model() == expected_model(records)
    assert {record for _, record in job.outputs()} == set(records)
    assert "already holds pushes" not in job.logs()


def test_malformed_entries_are_skipped_and_acknowledged_under_on_error_skip(
    tmp_path: Path, procs: Processes, redis_server: StreamServer
) -> None:
    with client(redis_server) as r:
        r.xadd(STREAM, {"record": "1"})
        bad_json = r.xadd(STREAM, {"record": "{oops"}).decode()
        no_field = r.xadd(STREAM, {"value": "2"}).decode()
        r.xadd(STREAM, {"record": "3"})
    (server,) = [start_shard(procs, 0, num_shards=1).address]
    url = f"redis://{redis_server.address}/{STREAM}?group={GROUP}&end=idle:1"
    code, out, err = run_psworker(
        procs, "--logic", "logics:Exactness", "--worker-index", "0", "--num-workers", "1", "--input", url,
        "--on-error", "skip", servers=server,
    )  # fmt: skip
    assert code == 0, err
    assert [json.loads(line)[1] for line in out] == [1, 3]
    warnings = [line for line in err if "skipped" in line]
    assert len(warnings) == 2, err
    assert f"stream {STREAM} entry {bad_json}: malformed JSON: Expecting property name" in warnings[0]
    assert f"stream {STREAM} entry {no_field}: no field 'record'" in warnings[1]
    assert pending(redis_server) == 0
    with Cluster([server]) as cluster:
        assert dict(cluster.snapshot()) == expected_model(range(1, 4, 2))


def test_a_malformed_entry_stops_the_job_in_one_line_and_stays_pending(
    tmp_path: Path, procs: Processes, redis_server: StreamServer
) -> None:
    with client(redis_server) as r:
        r.xadd(STREAM, {"record": "1"})
        bad = r.xadd(STREAM, {"record": b"\xff"}).decode()
    (server,) = [start_shard(procs, 0, num_shards=1).address]
    url = f"redis://{redis_server.address}/{STREAM}?group={GROUP}&end=idle:1"
    code, _, err = run_psworker(
        procs, "--logic", "logics:Exactness", "--worker-index", "0", "--num-workers", "1", "--input", url,
        servers=server,
    )  # fmt: skip
    assert code == 1
    assert error_line(err) == (
        f"psworker: error: worker 0: stream {STREAM} entry {bad}: not UTF-8 (invalid start byte at byte 0)"
    )
    with client(redis_server) as r:  # left for whoever fixes the stream; the good one is done
        assert [item["message_id"].decode() for item in r.xpending_range(STREAM, GROUP, "-", "+", 10)] == [bad]


def test_an_unreachable_redis_or_a_bad_url_is_one_line_and_exit_2(procs: Processes) -> None:
    from stream_servers import free_port

    port = free_port()
    url = f"redis://127.0.0.1:{port}/{STREAM}?group={GROUP}"
    code, _, err = run_psworker(procs, "--logic", "logics:Exactness", "--worker-index", "0", "--num-workers", "1",
                                "--input", url)  # fmt: skip
    assert code == 2
    assert error_line(err).startswith(f"psworker: error: --input {url}: cannot reach Redis at 127.0.0.1:{port}: ")
    for query, problem in [
        ("", "needs ?group=NAME"),
        (f"group={GROUP}&end=soon", "end=soon: expected end=idle:SECONDS (a number > 0)"),
        (f"group={GROUP}&batch=3", "unknown option 'batch' (known: count, end, group)"),
    ]:
        url = f"redis://127.0.0.1:{port}/{STREAM}" + (f"?{query}" if query else "")
        code, _, err = run_psworker(procs, "--logic", "logics:Exactness", "--worker-index", "0", "--num-workers",
                                    "1", "--input", url, "--job-id", "j")  # fmt: skip
        assert (code, error_line(err)) == (2, f"psworker: error: --input {url}: {problem}")


def test_redis_going_away_mid_job_fails_the_worker_in_one_line(
    tmp_path: Path, procs: Processes, redis_server: StreamServer
) -> None:
    """Nothing is lost: what it had not acknowledged stays pending for its next run."""
    server = start_shard(procs, 0, num_shards=1).address
    url = f"redis://{redis_server.address}/{STREAM}?group={GROUP}"
    argv = worker_argv("logics:Exactness", [server], 0, 1, "--input", url, "--output", str(tmp_path / "out"))
    worker, stderr = procs.popen(argv, stdout=subprocess.DEVNULL)
    with client(redis_server) as r:
        r.xadd(STREAM, {"record": "1"})
    deadline = time.monotonic() + 60
    while not (tmp_path / "out").exists() or not (tmp_path / "out").read_text():  # taken, acknowledged
        assert time.monotonic() < deadline and worker.poll() is None, stderr.read_text()
        time.sleep(0.05)
    redis_server.stop()
    assert worker.wait(timeout=20) == 1
    line = error_line(stderr.read_text().splitlines())
    assert line.startswith(f"psworker: error: worker 0: --input {url}: ConnectionError: "), line
