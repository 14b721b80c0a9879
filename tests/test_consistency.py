"""Consistency per job (--consistency async | bsp | ssp:S): real shards and workers.

Every answered pull's clock gap (its worker's clock minus the slowest
unfinished worker's, when it was answered) is counted by the shard and read
back from its Info. Worker 0 is the slow one (clock_logics.SLOW_RECORD_S per
record); the clock advances once per epoch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Processes, error_line, run_psworker

from psclient import Right, connect, transform
from psclient.children import shard_argv, worker_argv
from psclient.wire.partition import key_bucket
from psclient.wire.proto import shard_pb2, shard_pb2_grpc

# Generous: the jobs here take seconds; a hold that is never released would hang them.
JOB_TIMEOUT_S = 120
EPOCHS, KEYS = 5, 8


def owner_keys(num_workers: int) -> list[int]:
    """A --partition-key value per worker index, that lands its records on that worker."""
    found: dict[int, int] = {}
    value = 0
    while len(found) < num_workers:
        found.setdefault(key_bucket(value, num_workers), value)
        value += 1
    return [found[index] for index in range(num_workers)]


def job_records(epochs_per_worker: list[int], keys: int = KEYS) -> list[dict[str, int]]:
    """Per worker, `keys` records per epoch (the keys shared by all), epoch by epoch."""
    owners = owner_keys(len(epochs_per_worker))
    return [
        {"w": owners[worker], "e": epoch, "k": key}
        for epoch in range(max(epochs_per_worker))
        for worker, epochs in enumerate(epochs_per_worker)
        if epoch < epochs
        for key in range(keys)
    ]


def start_shards(
    procs: Processes, consistency: str, num_shards: int, num_workers: int, data_dir: Path | None = None
) -> list[str]:
    extra = ["--consistency", consistency, "--num-workers", str(num_workers)] if consistency != "async" else []
    addresses = []
    for shard in range(num_shards):
        if data_dir is not None:
            (data_dir / f"shard-{shard}").mkdir(parents=True)
        durable = ["--data-dir", str(data_dir / f"shard-{shard}")] if data_dir is not None else []
        argv = shard_argv(shard, num_shards, "const:0", "add", "WARNING", *extra, *durable)
        addresses.append(procs.start_server(argv).address)
    return addresses


def run_workers(
    procs: Processes, servers: list[str], consistency: str, epochs_per_worker: list[int], tmp_path: Path
) -> None:
    """Run one psworker per entry of `epochs_per_worker` to its end; each must exit 0 in time."""
    path = tmp_path / "input.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in job_records(epochs_per_worker)))
    workers = []
    for index in range(len(epochs_per_worker)):
        argv = worker_argv("clock_logics:Epochs", servers, index, len(epochs_per_worker), "--input", str(path))
        argv += ["--partition-key", "w", "--consistency", consistency]
        workers.append(procs.popen(argv, stdout=subprocess.DEVNULL))
    deadline = time.monotonic() + JOB_TIMEOUT_S
    for process, stderr_path in workers:
        code = process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        assert code == 0, stderr_path.read_text()


def infos(servers: list[str]) -> list[shard_pb2.InfoResponse]:
    found = []
    for address in servers:
        with grpc.insecure_channel(address) as channel:
            found.append(shard_pb2_grpc.ParameterShardStub(channel).Info(shard_pb2.InfoRequest(), timeout=10))
    return found


def model(servers: list[str]) -> dict[Any, float]:
    with connect(servers) as cluster:
        return {param_id: float(value) for param_id, value in cluster.snapshot()}


@pytest.mark.parametrize("consistency, bound, durable", [("bsp", 0, False), ("ssp:2", 2, False), ("bsp", 0, True)])
def test_every_answered_pull_is_within_the_staleness_bound(
    consistency: str, bound: int, durable: bool, procs: Processes, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data" if durable else None  # held answers wait for their push's fsync too
    servers = start_shards(procs, consistency, num_shards=2, num_workers=3, data_dir=data_dir)
    run_workers(procs, servers, consistency, [EPOCHS] * 3, tmp_path)
    answered = infos(servers)
    gaps: dict[int, int] = {}
    for info in answered:
        assert (info.consistency, info.num_workers) == (consistency, 3)
        for gap, count in info.clock_gaps.items():
            gaps[gap] = gaps.get(gap, 0) + count
    assert sum(gaps.values()) == sum(info.pull_requests for info in answered)  # every pull, once
    assert max(gaps) <= bound, gaps
    assert sum(info.held_pulls for info in answered) > 0  # the fast workers did run ahead, and waited
    assert model(servers) == {key: 3.0 * EPOCHS for key in range(KEYS)}


def test_a_finished_worker_does_not_hold_the_others_back(procs: Processes, tmp_path: Path) -> None:
    # Worker 0 stops after one epoch, at clock 0: counted, it would hold the others at clock 1 for good.
    servers = start_shards(procs, "bsp", num_shards=2, num_workers=3)
    run_workers(procs, servers, "bsp", [1, EPOCHS, EPOCHS], tmp_path)
    answered = infos(servers)
    assert max(gap for info in answered for gap in info.clock_gaps) == 0
    assert model(servers) == {key: 1.0 + 2.0 * EPOCHS for key in range(KEYS)}


@pytest.mark.parametrize("consistency", ["async", "bsp", "ssp:2"])
def test_transform_ends_with_exact_results_under_each_model(consistency: str) -> None:
    from clock_logics import Epochs

    records = job_records([EPOCHS] * 3)
    stream = transform(
        records, Epochs, "const:0", "add", 3, 2, partition_by=lambda record: record["w"], consistency=consistency
    )
    rights = dict(item.value for item in stream if isinstance(item, Right))
    assert rights == {key: 3.0 * EPOCHS for key in range(KEYS)}


@pytest.mark.parametrize(
    "shard_consistency, shard_workers, worker_consistency, message",
    [
        ("bsp", 1, "async", "shard 0 runs --consistency bsp, but worker 0 runs async"),
        ("ssp:2", 1, "ssp:3", "shard 0 runs --consistency ssp:2, but worker 0 runs ssp:3"),
        ("async", 1, "bsp", "shard 0 runs --consistency async, but worker 0 runs bsp"),
        ("bsp", 2, "bsp", "shard 0 counts --num-workers 2, but worker 0 is one of 1"),
    ],
)
def test_a_worker_refuses_shards_of_another_consistency_or_worker_count(
    shard_consistency: str,
    shard_workers: int,
    worker_consistency: str,
    message: str,
    procs: Processes,
    tmp_path: Path,
) -> None:
    (server,) = start_shards(procs, shard_consistency, num_shards=1, num_workers=shard_workers)
    path = tmp_path / "input.jsonl"
    path.write_text('{"w": 0, "e": 0, "k": 1}\n')
    code, _, stderr = run_psworker(
        procs, "--logic", "clock_logics:Epochs", "--worker-index", "0", "--num-workers", "1",
        "--input", str(path), "--consistency", worker_consistency, servers=server,
    )  # fmt: skip
    assert code != 0
    assert message in error_line(stderr)


def test_a_clocked_shard_needs_num_workers(procs: Processes) -> None:
    process, stderr_path = procs.popen(shard_argv(0, 1, "const:0", "add", "WARNING", "--consistency", "ssp:1"))
    assert process.wait(timeout=30) == 2
    assert stderr_path.read_text().strip().splitlines()[-1] == (
        "psserver: error: --consistency ssp:1 needs --num-workers (the job's number of workers)"
    )


def test_a_bad_consistency_is_refused_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="unknown consistency 'ssp:x'"):
        transform([], "logics:Exactness", "const:0", "add", consistency="ssp:x")


def test_psclient_run_passes_the_consistency_to_every_shard_and_worker(tmp_path: Path, procs: Processes) -> None:
    path = tmp_path / "input.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in job_records([EPOCHS] * 2)))
    model_path = tmp_path / "model.jsonl"
    argv = [
        sys.executable, "-m", "psclient", "run", "--logic", "clock_logics:Epochs", "--input", str(path),
        "--partition-key", "w", "--init", "const:0", "--workers", "2", "--shards", "2", "--consistency", "ssp:1",
        "--output", str(tmp_path / "outputs.jsonl"), "--model", str(model_path),
    ]  # fmt: skip
    process, stderr_path = procs.popen(argv, stdout=subprocess.DEVNULL)
    assert process.wait(timeout=JOB_TIMEOUT_S) == 0, stderr_path.read_text()
    rows = [json.loads(line) for line in model_path.read_text().splitlines()]
    assert {row["id"]: row["value"] for row in rows} == {key: 2.0 * EPOCHS for key in range(KEYS)}


def test_psclient_run_refuses_a_bad_consistency(tmp_path: Path, procs: Processes) -> None:
    path = tmp_path / "input.jsonl"
    path.write_text('{"w": 0, "e": 0, "k": 1}\n')
    argv = [
        sys.executable, "-m", "psclient", "run", "--logic", "clock_logics:Epochs", "--input", str(path),
        "--consistency", "ssp:-1",
    ]  # fmt: skip
    process, stderr_path = procs.popen(argv, stdout=subprocess.DEVNULL)
    assert process.wait(timeout=60) == 2
    assert "unknown consistency 'ssp:-1': use async, bsp or ssp:S with S >= 0" in stderr_path.read_text()
