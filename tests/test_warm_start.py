"""Warm start: half a job, its model saved, the other half from that model, equals one whole run.

Exactness (tests/logics.py) adds int deltas to int and str ids, so the model of
a run does not depend on the order of pushes, and any lost or doubled push
shows. Through the CLI: `psclient snapshot` of the first half's shards,
`psserver --load` of that file by fresh shards (each keeps its own ids). Through
the SDK: `transform(..., model=...)` with the first half's parameters.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import START_TIMEOUT_S, Processes
from logics import Exactness

from psclient.children import shard_argv, worker_argv
from psclient.either import Right
from psclient.jobs import transform
from psclient.wire.partition import shard_of

RECORDS = list(range(3000))
HALF = 1500
SHARDS = 2
RUN_TIMEOUT_S = 120


def start_shards(procs: Processes, *extra: str) -> list[tuple[str, Path]]:
    """Fresh const:0/add shards: (address, stderr file) in shard order."""
    started = [procs.start_server(shard_argv(i, SHARDS, "const:0", "add", "INFO", *extra)) for i in range(SHARDS)]
    return [(service.address, service.stderr_path) for service in started]


def run_job(procs: Processes, servers: list[str], records: list[int], path: Path) -> None:
    """Two file-mode workers over `records`, to their end."""
    path.write_text("".join(f"{r}\n" for r in records), encoding="utf-8")
    argvs = [
        worker_argv("logics:Exactness", servers, i, 2, "--input", str(path), "--output", str(path) + f".out{i}")
        for i in range(2)
    ]
    workers = [procs.popen(argv, stdout=subprocess.DEVNULL) for argv in argvs]
    for process, stderr in workers:
        assert process.wait(timeout=RUN_TIMEOUT_S) == 0, stderr.read_text()


def snapshot(procs: Processes, servers: list[str], output: Path) -> dict:
    argv = [sys.executable, "-m", "psclient", "snapshot", "--servers", ",".join(servers), "--output", str(output)]
    process, stderr = procs.popen(argv)
    assert process.wait(timeout=RUN_TIMEOUT_S) == 0, stderr.read_text()
    return {row["id"]: row["value"] for row in map(json.loads, output.read_text().splitlines())}


@pytest.mark.timeout(240)
def test_psclient_snapshot_then_load_equals_one_run(procs: Processes, tmp_path: Path) -> None:
    whole = [address for address, _ in start_shards(procs)]
    run_job(procs, whole, RECORDS, tmp_path / "all.txt")
    expected = snapshot(procs, whole, tmp_path / "all.jsonl")

    first = [address for address, _ in start_shards(procs)]
    run_job(procs, first, RECORDS[:HALF], tmp_path / "first.txt")
    saved = snapshot(procs, first, tmp_path / "half.jsonl")
    assert saved != expected

    shards = start_shards(procs, "--load", str(tmp_path / "half.jsonl"))
    loaded = [sum(1 for param_id in saved if _owner(param_id) == shard) for shard in range(SHARDS)]
    for shard, (_, stderr) in enumerate(shards):
        line = f"loaded {loaded[shard]} parameters from {tmp_path / 'half.jsonl'} ({len(saved) - loaded[shard]} of"
        assert line in stderr.read_text()
    second = [address for address, _ in shards]
    run_job(procs, second, RECORDS[HALF:], tmp_path / "second.txt")
    assert snapshot(procs, second, tmp_path / "resumed.jsonl") == expected


def _owner(param_id: int | str) -> int:
    return shard_of(param_id, SHARDS)


@pytest.mark.timeout(240)
def test_transform_with_model_equals_one_run() -> None:
    def model(items: list) -> dict:
        return dict(item.value for item in items if isinstance(item, Right))

    expected = model(list(transform(RECORDS, Exactness(), "const:0", "add", 2, SHARDS)))
    half = model(list(transform(RECORDS[:HALF], Exactness(), "const:0", "add", 2, SHARDS)))
    resumed = model(list(transform(RECORDS[HALF:], Exactness(), "const:0", "add", 2, SHARDS, model=half.items())))
    assert half != expected
    assert resumed == expected


def test_load_of_a_bad_file_is_one_line(procs: Processes, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "value": 2}\n{"id": 2}\n', encoding="utf-8")
    process, stderr = procs.popen(shard_argv(0, 1, "const:0", "add", "WARNING", "--load", str(bad)))
    assert process.wait(timeout=START_TIMEOUT_S) == 2
    assert stderr.read_text().splitlines() == [
        f"psserver: error: --load {bad} line 2: not an {{id, value}} object ('value')"
    ]


def test_load_into_a_data_dir_is_durable_and_not_loaded_twice(procs: Processes, tmp_path: Path) -> None:
    model = tmp_path / "model.jsonl"
    model.write_text("".join(json.dumps({"id": i, "value": i * 10}) + "\n" for i in range(50)), encoding="utf-8")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    argv = shard_argv(0, 1, "const:0", "add", "INFO", "--data-dir", str(data_dir), "--load", str(model))
    first = procs.start_server(argv)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    model.write_text(json.dumps({"id": 0, "value": -1}) + "\n", encoding="utf-8")  # must not be read again

    again = procs.start_server(argv)
    assert snapshot(procs, [again.address], tmp_path / "out.jsonl") == {i: i * 10 for i in range(50)}
    assert f"--load {model} ignored: {data_dir} holds this shard's state" in again.stderr_path.read_text()
