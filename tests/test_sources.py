"""The Source interface (psworker/sources): a user's own source (`--input module:attr`),
records decoded from stream entries, and a stream job that runs until SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
from conftest import Processes, error_line, run_psworker
from stream_servers import StreamServer
from test_shard_restarts import expected_model, start_shard

from psclient import Cluster
from psclient.children import worker_argv
from psclient.inputs import MalformedRecord, decode_record
from psclient.wire.partition import key_bucket


def test_a_users_source_feeds_the_workers_and_its_malformed_record_is_handled_per_on_error(
    procs: Processes,
) -> None:
    servers = [start_shard(procs, 0, num_shards=1).address]
    outputs = []
    for index in range(2):
        code, out, err = run_psworker(
            procs, "--logic", "logics:Exactness", "--worker-index", str(index), "--num-workers", "2",
            "--input", "user_sources:Numbers", "--on-error", "skip", servers=servers[0],
        )  # fmt: skip
        assert code == 0, err
        outputs += [json.loads(line)[1] for line in out]
        if index == 0:
            assert any("number 500 is unlucky; skipped" in line for line in err), err
    good = [n for n in range(1, 1001) if n != 500]
    assert sorted(outputs) == good
    with Cluster(servers) as cluster:
        assert dict(cluster.snapshot()) == expected_model(good)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "code", "message"),
    [
        ("user_sources:Broken", 1, "worker 0: source Broken failed: RuntimeError: the feed went away"),
        (
            "user_sources:not_a_source",
            2,
            "--input 'user_sources:not_a_source' returned a int, not a Source",
        ),
        (
            "user_sources:NOT_CALLABLE",
            2,
            "--input 'user_sources:NOT_CALLABLE' is not a Source subclass or a factory of one",
        ),
        ("no_such_module:Source", 2, "--input 'no_such_module:Source': no module named 'no_such_module'"),
    ],
)
def test_a_users_source_that_fails_or_is_not_one_is_one_line(
    procs: Processes, spec: str, code: int, message: str
) -> None:
    servers = [start_shard(procs, 0, num_shards=1).address]
    got, _, err = run_psworker(
        procs, "--logic", "logics:Exactness", "--worker-index", "0", "--num-workers", "1", "--input", spec,
        servers=servers[0],
    )  # fmt: skip
    assert (got, error_line(err)) == (code, f"psworker: error: {message}")


def test_stream_entries_decode_as_a_line_of_their_format() -> None:
    assert decode_record(b'{"a": [1, 2]}', "jsonl") == {"a": [1, 2]}
    assert decode_record(b"1,x,2.5", "csv") == (1, "x", 2.5)
    assert decode_record(b"1\tx", "tsv") == (1, "x")
    assert decode_record("é".encode(), "lines") == "é"
    for data, fmt, problem in [
        (b"{", "jsonl", "malformed JSON: Expecting property name enclosed in double quotes at column 2"),
        (b"\xff", "lines", "not UTF-8 (invalid start byte at byte 0)"),
        (b'1,"x', "csv", "malformed csv: unexpected end of data"),
    ]:
        with pytest.raises(MalformedRecord) as caught:
            decode_record(data, fmt)
        assert str(caught.value) == problem


def test_a_stream_job_runs_until_sigterm_and_a_new_run_reads_on(
    tmp_path: Path, procs: Processes, redis_server: StreamServer
) -> None:
    servers = [start_shard(procs, 0, num_shards=1).address]
    url = f"redis://{redis_server.address}/records?group=g"
    r = redis.Redis(port=redis_server.port)
    for record in range(100):
        r.xadd("records", {"record": json.dumps(record)})
    out = tmp_path / "out.jsonl"
    argv = worker_argv("logics:Exactness", servers, 0, 1, "--input", url, "--output", str(out), log_level="INFO")
    worker, stderr = procs.popen(argv, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60

    def done() -> bool:  # every entry acknowledged, and its output written before that
        return out.exists() and len(out.read_text().splitlines()) == 100 and not r.xpending("records", "g")["pending"]

    while not done():
        assert time.monotonic() < deadline and worker.poll() is None, stderr.read_text()
        time.sleep(0.05)
    time.sleep(1)
    assert worker.poll() is None  # no end of input: it waits for more
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0, stderr.read_text()
    assert "stopped on SIGTERM: took no more input; processed 100 records, 100 outputs" in stderr.read_text()
    for record in range(100, 150):
        r.xadd("records", {"record": json.dumps(record)})
    code, _, err = run_psworker(
        procs, "--logic", "logics:Exactness", "--worker-index", "0", "--num-workers", "1",
        "--input", url + "&end=idle:1", "--output", str(out), servers=servers[0],
    )  # fmt: skip
    assert code == 0, err
    assert sorted(json.loads(line)[1] for line in out.read_text().splitlines()) == list(range(150))
    assert r.xpending("records", "g")["pending"] == 0
    with Cluster(servers) as cluster:
        assert dict(cluster.snapshot()) == expected_model(range(150))
    r.close()


def _publish_nats(server: StreamServer, bodies: list[bytes]) -> None:
    from test_jetstream_source import publish

    publish(server, bodies)


@pytest.mark.parametrize("kind", ["redis", "nats"])
def test_partition_key_sends_the_records_of_a_key_to_one_worker(
    tmp_path: Path, procs: Processes, request: pytest.FixtureRequest, kind: str
) -> None:
    """--partition-key on a stream: every worker reads it all and keeps the records whose key
    maps to it (the rule of a file's records); a record without the key is malformed."""
    server: StreamServer = request.getfixturevalue(f"{kind}_server")
    records = [{"id": f"k{n % 37}", "delta": n} for n in range(1_000)]
    bodies = [json.dumps(record).encode() for record in records] + [b'{"delta": 1}']
    if kind == "redis":
        with redis.Redis(port=server.port) as r:
            for body in bodies:
                r.xadd("records", {"record": body})
        url = f"redis://{server.address}/records?group=g&end=idle:2"
    else:
        _publish_nats(server, bodies)
        url = f"nats://{server.address}/records?durable=d&end=idle:2"
    shards = [start_shard(procs, index).address for index in range(2)]
    workers = []
    for index in range(2):
        argv = worker_argv(
            "logics:JsonPush", shards, index, 2, "--input", url, "--partition-key", "id", "--on-error", "skip",
            "--output", str(tmp_path / f"out-{index}.jsonl"),
        )  # fmt: skip
        workers.append(procs.popen(argv, stdout=subprocess.DEVNULL))
    for process, stderr in workers:
        assert process.wait(timeout=120) == 0, stderr.read_text()
    for index in range(2):
        ids = [json.loads(line) for line in (tmp_path / f"out-{index}.jsonl").read_text().splitlines()]
        assert ids and all(key_bucket(i, 2) == index for i in ids)
    assert sum(len((tmp_path / f"out-{index}.jsonl").read_text().splitlines()) for index in range(2)) == 1_000
    warnings = [line for _, stderr in workers for line in stderr.read_text().splitlines() if "skipped" in line]
    assert len(warnings) == 1 and "no partition key 'id' in {'delta': 1}; skipped" in warnings[0], warnings
    model: dict[str, int] = {}
    for record in records:
        model[record["id"]] = model.get(record["id"], 0) + record["delta"]  # type: ignore[operator]
    with Cluster(shards) as cluster:
        assert dict(cluster.snapshot()) == model
