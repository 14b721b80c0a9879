"""`psworker --input nats://HOST:PORT/STREAM?durable=NAME`: each worker reads a NATS JetStream
stream with its own durable pull consumer and takes its share of the messages by stream
sequence; a message is acknowledged only once every push it caused is. A worker killed with
SIGKILL and started again gets its unacknowledged messages again, and the shards apply their
pushes once: the model is the fault-free one exactly. Against a real nats-server -js
(tests/stream_servers.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import nats
from conftest import Processes, error_line, run_psworker
from stream_jobs import WORKERS, StreamJob
from stream_servers import StreamServer, free_port
from test_shard_restarts import expected_model, start_shard

from psclient import Cluster

STREAM = "records"
DURABLE = "trainers"


async def _publish(server: StreamServer, bodies: list[bytes], pause_every: int, pause_s: float) -> None:
    nc = await nats.connect(f"nats://{server.address}")
    js = nc.jetstream()
    try:
        await js.stream_info(STREAM)
    except nats.js.errors.NotFoundError:
        await js.add_stream(name=STREAM, subjects=[STREAM])
    for count, body in enumerate(bodies, start=1):
        await js.publish(STREAM, body)
        if pause_every and count % pause_every == 0:
            await asyncio.sleep(pause_s)
    await nc.close()


def publish(server: StreamServer, bodies: list[bytes], *, pause_every: int = 0, pause_s: float = 0.0) -> None:
    asyncio.run(_publish(server, bodies, pause_every, pause_s))


def records_of(records: range) -> list[bytes]:
    return [json.dumps(record).encode() for record in records]


async def _consumer_counts(server: StreamServer, consumer: str) -> tuple[int, int]:
    nc = await nats.connect(f"nats://{server.address}")
    try:
        info = await nc.jetstream().consumer_info(STREAM, consumer)
        return info.num_ack_pending, info.num_pending
    except nats.js.errors.NotFoundError:
        return 0, 0
    finally:
        await nc.close()


def unacked(server: StreamServer, index: int) -> int:
    """Messages worker `index`'s consumer delivered and did not have acknowledged."""
    return asyncio.run(_consumer_counts(server, f"{DURABLE}-w{index}"))[0]


def undelivered(server: StreamServer, index: int) -> int:
    return asyncio.run(_consumer_counts(server, f"{DURABLE}-w{index}"))[1]


def stream_url(server: StreamServer) -> str:
    return f"nats://{server.address}/{STREAM}?durable={DURABLE}&end=idle:3&ack_wait=2"


def test_two_workers_share_a_stream_and_acknowledge_every_message(
    tmp_path: Path, procs: Processes, nats_server: StreamServer
) -> None:
    records = range(3_000)
    publish(nats_server, records_of(records))
    job = StreamJob(procs, tmp_path, stream_url(nats_server))
    job.wait()
    assert [(unacked(nats_server, i), undelivered(nats_server, i)) for i in range(WORKERS)] == [(0, 0)] * WORKERS
    assert job.model() == expected_model(records)
    outputs = job.outputs()
    assert sorted(record for _, record in outputs) == list(records)
    # Message (sequence) s is worker (s mod 2)'s; record r is message r + 1.
    assert all(worker == (record + 1) % WORKERS for worker, record in outputs)


def test_a_worker_killed_mid_stream_and_restarted_leaves_the_model_exact(
    tmp_path: Path, procs: Processes, nats_server: StreamServer
) -> None:
    records = range(20_000)
    publish(nats_server, [])  # the stream, before its consumers
    producer = threading.Thread(
        target=publish, args=(nats_server, records_of(records)), kwargs={"pause_every": 500, "pause_s": 0.2}
    )
    producer.start()
    job = StreamJob(procs, tmp_path, stream_url(nats_server))
    killed_holding = 0
    deadline = time.monotonic() + 60
    while not killed_holding:
        assert time.monotonic() < deadline, "worker 1 never held an unacknowledged message"
        # Once it has pushes in the shards, and entries in hand.
        if job.written(1) >= 1_000 and unacked(nats_server, 1):
            os.kill(job.workers[1].pid, signal.SIGKILL)
            job.workers[1].wait(timeout=10)
            killed_holding = unacked(nats_server, 1)
            job.workers[1] = job.start(1)
        time.sleep(0.01)
    producer.join()
    job.wait()
    assert [(unacked(nats_server, i), undelivered(nats_server, i)) for i in range(WORKERS)] == [(0, 0)] * WORKERS
    assert job.model() == expected_model(records)
    assert {record for _, record in job.outputs()} == set(records)


def test_a_malformed_message_is_skipped_and_acknowledged_under_on_error_skip(
    procs: Processes, nats_server: StreamServer
) -> None:
    publish(nats_server, [b"1", b"[1,", b"3"])
    (server,) = [start_shard(procs, 0, num_shards=1).address]
    url = f"nats://{nats_server.address}/{STREAM}?durable={DURABLE}&end=idle:1"
    code, out, err = run_psworker(
        procs, "--logic", "logics:Exactness", "--worker-index", "0", "--num-workers", "1", "--input", url,
        "--on-error", "skip", servers=server,
    )  # fmt: skip
    assert code == 0, err
    assert [json.loads(line)[1] for line in out] == [1, 3]
    (warning,) = [line for line in err if "skipped" in line]
    assert f"stream {STREAM} message 2: malformed JSON: Expecting value at column 4; skipped" in warning
    assert unacked(nats_server, 0) == 0
    with Cluster([server]) as cluster:
        assert dict(cluster.snapshot()) == expected_model(range(1, 4, 2))


def test_an_unreachable_server_or_a_missing_stream_is_one_line_and_exit_2(
    procs: Processes, nats_server: StreamServer
) -> None:
    port = free_port()
    for url, problem in [
        (f"nats://127.0.0.1:{port}/{STREAM}?durable={DURABLE}", f"cannot reach NATS at 127.0.0.1:{port}: "),
        (f"nats://{nats_server.address}/nothing?durable={DURABLE}", "no JetStream stream 'nothing'"),
        (f"nats://{nats_server.address}/{STREAM}?durable={DURABLE}&ack_wait=0", "ack_wait must be a number"),
    ]:
        code, _, err = run_psworker(procs, "--logic", "logics:Exactness", "--worker-index", "0", "--num-workers",
                                    "1", "--input", url)  # fmt: skip
        assert code == 2, err
        assert error_line(err).startswith(f"psworker: error: --input {url}: {problem}")
