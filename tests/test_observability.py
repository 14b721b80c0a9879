"""Metrics, structured logs and health of running shards and workers."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import Processes, psserver_argv
from grpc_health.v1 import health_pb2, health_pb2_grpc

from psclient import connect
from psclient.children import worker_argv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """`name{labels}` -> value of every streamps sample."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("streamps_"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@pytest.mark.timeout(120)
def test_shard_metrics_count_requests_keys_bytes_and_parameters(procs: Processes) -> None:
    port = free_port()
    argv = [*psserver_argv(0, 1, "zeros:4", "add"), "--metrics-port", str(port)]
    address = procs.start_server(argv).address

    with connect([address]) as cluster:
        cluster.push([1, 2, 3], np.ones((3, 4), dtype=np.float32))  # float32: the parameters stay float32
        cluster.pull([1, 2])
    samples = scrape(port)

    assert samples['streamps_shard_requests_total{op="push",shard="0"}'] == 1
    assert samples['streamps_shard_keys_total{op="push",shard="0"}'] == 3
    assert samples['streamps_shard_keys_total{op="pull",shard="0"}'] == 2
    assert samples['streamps_shard_bytes_total{op="pull",shard="0"}'] == 2 * 4 * 4
    assert samples['streamps_shard_parameters{shard="0"}'] == 3
    assert samples['streamps_shard_request_seconds_count{op="pull",shard="0"}'] == 1


@pytest.mark.timeout(120)
def test_worker_metrics_count_records_and_outputs(procs: Processes) -> None:
    shard = procs.start_server(psserver_argv(0, 1, "const:0", "add")).address
    port = free_port()
    worker = procs.start_server(
        worker_argv("logics:Exactness", [shard], 0, 1, "--port", "0", "--metrics-port", str(port), log_level="INFO")
    ).address

    with connect([shard], [worker]) as cluster:
        cluster.feed(range(25))
        outputs = list(cluster.outputs())
        samples = scrape(port)

    assert len(outputs) == 25
    assert samples['streamps_worker_records_total{worker="0"}'] == 25
    assert samples['streamps_worker_outputs_total{worker="0"}'] == 25
    assert samples['streamps_worker_pulls_in_flight{worker="0"}'] == 0


@pytest.mark.timeout(60)
def test_json_logs_name_the_shard_and_health_reports_serving(procs: Processes) -> None:
    service = procs.start_server(
        [*psserver_argv(3, 4, "const:0", "add"), "--log-level", "INFO", "--log-format", "json"]
    )

    with grpc.insecure_channel(service.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    deadline = time.monotonic() + 10
    lines: list[str] = []
    while time.monotonic() < deadline and not any("serving shard" in line for line in lines):
        lines = Path(service.stderr_path).read_text().splitlines()
        time.sleep(0.1)

    assert status == health_pb2.HealthCheckResponse.SERVING
    entries = [json.loads(line) for line in lines if line.strip()]
    assert entries and all(entry["service"] == "shard 3" for entry in entries)
    assert any("serving shard 3/4" in entry["message"] for entry in entries)
