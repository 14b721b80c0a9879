"""Whole jobs on real streams: a file published with `psclient publish` and read by workers
from Redis Streams or NATS JetStream, online MF from a Redis stream against the same job on
the file, and an endless Redis job whose shards snapshot the model while it trains and stop
cleanly on SIGTERM. Against real redis-server and nats-server processes (stream_servers.py)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from conftest import TESTS_DIR, Processes, child_env, psserver_argv
from stream_servers import StreamServer
from test_shard_restarts import expected_model

from benchmarks.mf_common import movielens_by_time
from examples.references import running_means
from psclient import Cluster
from psclient.children import worker_argv
from psclient.wire.partition import shard_of

WAIT_S = 120.0
MF_INIT = "normal:10,std=0.1,seed=1"


def _publish(path: Path, url: str, *flags: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "psclient", "publish", "--input", str(path), "--to", url, *flags],
        capture_output=True, text=True, env=child_env(), cwd=TESTS_DIR, timeout=WAIT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stderr.strip().splitlines()[-1]


def _shards(procs: Processes, init: str, *extra: str) -> list[str]:
    return [procs.start_server([*psserver_argv(i, 2, init, "add"), *extra]).address for i in range(2)]


def _workers(
    procs: Processes, logic: str, servers: list[str], tmp_path: Path, *flags: str
) -> list[subprocess.Popen[str]]:
    started = []
    for index in range(2):
        argv = worker_argv(logic, servers, index, 2, "--output", str(tmp_path / f"out-{index}.jsonl"), *flags)
        started.append(procs.popen(argv, stdout=subprocess.DEVNULL)[0])
    return started


def _finish(workers: list[subprocess.Popen[str]], tmp_path: Path) -> list[Any]:
    for index, worker in enumerate(workers):
        assert worker.wait(WAIT_S) == 0, f"worker {index}: " + "\n".join(
            path.read_text()[-2000:] for path in tmp_path.glob("child-*.stderr")
        )
    return [
        json.loads(line) for index in range(2) for line in (tmp_path / f"out-{index}.jsonl").read_text().splitlines()
    ]


@pytest.mark.parametrize("system", ["redis", "nats"])
def test_a_published_file_is_read_whole_by_a_stream_job_and_the_model_is_exact(
    procs: Processes, tmp_path: Path, system: str, request: pytest.FixtureRequest
) -> None:
    server: StreamServer = request.getfixturevalue(f"{system}_server")
    records = range(3_000)
    path = tmp_path / "records.jsonl"
    # A blank line is no record of a JSON lines file: published as the workers would read the file.
    path.write_text("".join(f"{r}\n" + ("\n" if r == 10 else "") for r in records))
    name = "group" if system == "redis" else "durable"
    url = f"{system}://{server.address}/records?{name}=trainers&end=idle:2"

    line = _publish(path, url)
    assert line.startswith(f"psclient: published 3000 records to {system} stream records at {server.address} in ")

    servers = _shards(procs, "const:0")
    outputs = _finish(_workers(procs, "logics:Exactness", servers, tmp_path, "--input", url), tmp_path)
    assert sorted(record for _, record in outputs) == list(records)
    with Cluster(servers) as cluster:
        assert dict(cluster.snapshot()) == expected_model(records)


def _rmse(outputs: list[Any]) -> float:
    return math.sqrt(sum((predicted - stars) ** 2 for predicted, stars in outputs) / len(outputs))


def test_online_mf_from_a_redis_stream_reaches_the_rmse_of_the_same_job_on_the_file(
    procs: Processes, tmp_path: Path, redis_server: StreamServer, capsys: pytest.CaptureFixture[str]
) -> None:
    data = movielens_by_time()  # MovieLens 100K in timestamp order
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("".join(f"{u},{i},{r:g}\n" for u, i, r in data.records()))
    flags = ("--format", "csv", "--partition-key", "0", "--pull-limit", "1024")
    logic = "examples.online_mf:OnlineMF"

    from_file = tmp_path / "file"
    from_file.mkdir()
    servers = _shards(procs, MF_INIT)
    file_rmse = _rmse(_finish(_workers(procs, logic, servers, from_file, "--input", str(ratings), *flags), from_file))

    url = f"redis://{redis_server.address}/ratings?group=mf&end=idle:2"
    assert _publish(ratings, url, "--format", "csv").startswith(f"psclient: published {len(data)} records")
    from_stream = tmp_path / "stream"
    from_stream.mkdir()
    servers = _shards(procs, MF_INIT)
    outputs = _finish(_workers(procs, logic, servers, from_stream, "--input", url, *flags), from_stream)
    assert len(outputs) == len(data)
    stream_rmse = _rmse(outputs)
    stars = np.asarray(data.stars, dtype=np.float64)
    mean_rmse = float(np.sqrt(np.mean((running_means(stars) - stars) ** 2)))  # the prequential baseline
    with capsys.disabled():
        print(f"\n[stream MF] ml-100k online MF, prequential RMSE: file {file_rmse:.4f}, Redis stream "
              f"{stream_rmse:.4f}; the running mean's {mean_rmse:.4f}")  # fmt: skip
    assert abs(stream_rmse - file_rmse) <= 0.02, (file_rmse, stream_rmse)
    assert stream_rmse < mean_rmse - 0.03  # it learned from the stream


def test_an_endless_redis_job_snapshots_its_model_while_it_trains_and_stops_cleanly_on_sigterm(
    procs: Processes, tmp_path: Path, redis_server: StreamServer
) -> None:
    models = tmp_path / "models"
    servers = _shards(procs, "const:0", "--snapshot-every", "0.2", "--snapshot-dir", str(models))
    url = f"redis://{redis_server.address}/records?group=trainers"  # no end: it runs until stopped
    workers = _workers(procs, "logics:Exactness", servers, tmp_path, "--input", url)
    produced = threading.Event()
    stop = threading.Event()

    def produce() -> None:
        with redis.Redis(host="127.0.0.1", port=redis_server.port) as client:
            record = 0
            while not stop.is_set():
                pipe = client.pipeline(transaction=False)
                for _ in range(50):
                    pipe.xadd("records", {"record": json.dumps(record)})
                    record += 1
                pipe.execute()
                time.sleep(0.01)
        produced.set()

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()

    def newest(shard: int) -> int:
        found = [int(path.stem.split("-")[2]) for path in models.glob(f"model-{shard}-*.jsonl")]
        return max(found, default=0)

    deadline = time.monotonic() + WAIT_S
    while min(newest(0), newest(1)) < 3:  # three snapshots of each shard while it trains
        assert time.monotonic() < deadline, "no third snapshot of each shard"
        time.sleep(0.05)
    stop.set()
    assert produced.wait(WAIT_S)
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    outputs = _finish(workers, tmp_path)
    processed = [record for _, record in outputs]
    assert len(processed) == len(set(processed)) > 0
    expected = expected_model(processed)  # type: ignore[arg-type]
    with Cluster(servers) as cluster:
        assert dict(cluster.snapshot()) == expected

    for shard in procs.started[:2]:
        shard.send_signal(signal.SIGTERM)
        assert shard.wait(WAIT_S) == 0
    for shard in range(2):  # the final snapshot holds the model as the job ended
        final = models / f"model-{shard}-{newest(shard):06d}.jsonl"
        model = {entry["id"]: entry["value"] for entry in map(json.loads, final.read_text().splitlines())}
        assert model == {k: v for k, v in expected.items() if shard_of(k, 2) == shard}


def _xadd(server: StreamServer, stream: str, records: range) -> list[bytes]:
    with redis.Redis(host="127.0.0.1", port=server.port) as client:
        return [client.xadd(stream, {"record": json.dumps(record)}) for record in records]


def test_two_jobs_sharing_a_group_name_on_two_streams_both_reach_the_model(
    procs: Processes, tmp_path: Path, redis_server: StreamServer
) -> None:
    _xadd(redis_server, "backfill", range(100))  # older entry ids than the other stream's
    time.sleep(0.05)
    _xadd(redis_server, "clicks", range(100, 200))
    servers = _shards(procs, "const:0")
    for stream in ("clicks", "backfill"):  # the same group name, the same shards, one after the other
        job = tmp_path / stream
        job.mkdir()
        url = f"redis://{redis_server.address}/{stream}?group=train&end=idle:1"
        outputs = _finish(_workers(procs, "logics:Exactness", servers, job, "--input", url), job)
        assert len(outputs) == 100, stream
    with Cluster(servers) as cluster:  # neither job's pushes were taken for the other's
        assert dict(cluster.snapshot()) == expected_model(range(200))


def test_a_pending_entry_deleted_from_the_stream_is_acknowledged_not_taken_for_a_malformed_one(
    procs: Processes, tmp_path: Path, redis_server: StreamServer
) -> None:
    ids = _xadd(redis_server, "records", range(10))
    with redis.Redis(host="127.0.0.1", port=redis_server.port) as client:
        # Worker 0 of job j took the first entry and died; then the entry was trimmed away.
        client.xgroup_create("records", "g", id="0")
        client.xreadgroup("g", "j-w0", {"records": ">"}, count=1)
        client.xdel("records", ids[0])
    servers = _shards(procs, "const:0")
    url = f"redis://{redis_server.address}/records?group=g&end=idle:1"
    argv = worker_argv("logics:Exactness", servers, 0, 1, "--input", url, "--job-id", "j",
                       "--output", str(tmp_path / "out.jsonl"))  # fmt: skip
    worker, stderr = procs.popen(argv, stdout=subprocess.DEVNULL)
    assert worker.wait(WAIT_S) == 0, stderr.read_text()
    with redis.Redis(host="127.0.0.1", port=redis_server.port) as client:
        assert client.xpending("records", "g")["pending"] == 0
    with Cluster(servers) as cluster:
        assert dict(cluster.snapshot()) == expected_model(range(1, 10))
