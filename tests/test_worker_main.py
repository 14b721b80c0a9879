"""psworker's main: the Feed path binds its port before it waits for shards; a worker names
the source it reads (the Feed RPC as any other) in its log."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from conftest import Processes, run_psworker, text_file
from test_shard_restarts import start_shard

from psclient import Cluster
from psclient.children import worker_argv


@pytest.mark.timeout(120)
def test_a_feed_worker_whose_port_is_taken_exits_2_at_once_without_waiting_for_shards(procs: Processes) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The shard address refuses connections: a worker would wait the whole connect timeout for it.
        code, stdout, stderr = run_psworker(
            procs, "--logic", "logics:WordCount", "--worker-index", "0", "--num-workers", "1",
            "--port", str(port), "--connect-timeout", "30",
        )  # fmt: skip

    assert code == 2, stderr
    assert stdout == []
    # gRPC's own log may say it first; ours is the last line.
    assert stderr[-1].startswith(f"psworker: error: cannot listen on 127.0.0.1:{port}"), stderr


@pytest.mark.timeout(120)
def test_a_worker_logs_the_source_it_reads_the_feed_rpc_as_a_file(procs: Processes, tmp_path: Path) -> None:
    shard = start_shard(procs, 0, num_shards=1).address
    worker = procs.start_server(worker_argv("logics:Exactness", [shard], 0, 1, "--port", "0", log_level="INFO"))
    with Cluster([shard], [worker.address]) as cluster:
        assert cluster.feed(range(3)) == 3
        (status,) = cluster.status()  # before the outputs are read: then the worker exits
        assert not isinstance(status, Exception)
        assert status.next_position == 4  # the Feed source's positions: its records, numbered from 1
        assert sorted(cluster.outputs()) == [[0, 0], [0, 1], [0, 2]]
    assert worker.process.wait(timeout=20) == 0
    lines = worker.stderr_path.read_text(encoding="utf-8").splitlines()
    assert _reading(lines) == [f"INFO worker 0: reading the Feed RPC on {worker.address}"], lines

    records = text_file(tmp_path / "records.jsonl", ["0", "1", "2"])
    code, stdout, stderr = run_psworker(
        procs, "--logic", "logics:Exactness", "--worker-index", "0", "--num-workers", "1",
        "--input", str(records), "--log-level", "INFO", servers=shard,
    )  # fmt: skip
    assert code == 0, stderr
    assert sorted(json.loads(line) for line in stdout) == [[0, 0], [0, 1], [0, 2]]
    assert _reading(stderr) == [f"INFO worker 0: reading {records}"], stderr


def _reading(stderr: list[str]) -> list[str]:
    """The lines that name the worker's input, without their time."""
    return [line.split(" ", 2)[2] for line in stderr if " reading " in line]
