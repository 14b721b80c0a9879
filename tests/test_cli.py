"""The command lines, started as a user would: psserver, psworker, psclient."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import Processes, StartShards

from psclient.children import worker_argv
from psclient.wire.partition import key_bucket

RUN_TIMEOUT_S = 120

LINES = [f"{'red green' if n % 3 else 'blue'} w{n % 7} w{n % 4}" for n in range(301)]


def word_counts(lines: list[str]) -> dict[str, int]:
    return dict(Counter(word for line in lines for word in line.split()))


psworker_argv = worker_argv


def run_cli(argv: list[str], procs: Processes) -> tuple[int, str, str]:
    """Run a command to its end (cwd tests/, stdout captured); return (code, stdout, stderr)."""
    process, stderr_path = procs.popen(argv)
    stdout, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    return process.returncode, stdout, stderr_path.read_text(encoding="utf-8")


def snapshot(servers: list[str], procs: Processes) -> dict:
    argv = [sys.executable, "-m", "psclient", "snapshot", "--servers", ",".join(servers)]
    code, stdout, stderr = run_cli(argv, procs)
    assert code == 0, stderr
    rows = [json.loads(line) for line in stdout.splitlines()]
    model = {row["id"]: row["value"] for row in rows}
    assert len(model) == len(rows), "snapshot holds an id twice"
    return model


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.timeout(180)
def test_two_servers_two_file_workers_then_snapshot_is_exact(
    tmp_path: Path, procs: Processes, start_shards: StartShards
) -> None:
    data = tmp_path / "words.txt"
    data.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    servers = start_shards(2, init="const:0", update="add")
    argvs = [
        psworker_argv("logics:WordCount", servers, i, 2, "--input", str(data), "--format", "lines",
                      "--output", str(tmp_path / f"out{i}.jsonl"))
        for i in range(2)
    ]  # fmt: skip
    workers = [procs.popen(argv, stdout=subprocess.DEVNULL) for argv in argvs]

    codes = [process.wait(timeout=RUN_TIMEOUT_S) for process, _ in workers]
    model = snapshot(servers, procs)

    assert codes == [0, 0], [path.read_text() for _, path in workers]
    assert model == word_counts(LINES)
    for i in range(2):
        assert read_jsonl(tmp_path / f"out{i}.jsonl") == [[line, len(line.split())] for line in LINES[i::2]]


@pytest.mark.timeout(180)
def test_jsonl_workers_by_partition_key(tmp_path: Path, procs: Processes, start_shards: StartShards) -> None:
    rows = [{"id": (n % 23) - 11 if n % 2 else f"k{n % 13}", "delta": n % 5 + 0.5} for n in range(400)]
    data = tmp_path / "pushes.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    expected: dict = Counter()
    for row in rows:
        expected[row["id"]] += row["delta"]
    servers = start_shards(2, init="const:0.0", update="add")

    argvs = [
        psworker_argv("logics:JsonPush", servers, i, 3, "--input", str(data), "--partition-key", "id",
                      "--output", str(tmp_path / f"out{i}.jsonl"))
        for i in range(3)
    ]  # fmt: skip

    workers = [procs.popen(argv, stdout=subprocess.DEVNULL)[0] for argv in argvs]
    codes = [process.wait(timeout=RUN_TIMEOUT_S) for process in workers]
    model = snapshot(servers, procs)

    assert codes == [0, 0, 0]
    assert model == expected
    assert all(type(value) is float for value in model.values())
    for i in range(3):
        outputs = read_jsonl(tmp_path / f"out{i}.jsonl")
        assert outputs == [row["id"] for row in rows if key_bucket(row["id"], 3) == i]


@pytest.mark.timeout(180)
def test_psclient_run_writes_outputs_and_model(tmp_path: Path, procs: Processes) -> None:
    data = tmp_path / "words.txt"
    data.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    outputs, model = tmp_path / "outputs.jsonl", tmp_path / "model.jsonl"

    argv = [
        sys.executable, "-m", "psclient", "run", "--logic", "logics:WordCount", "--input", str(data),
        "--format", "lines", "--init", "const:0", "--update", "add", "--workers", "2", "--shards", "2",
        "--output", str(outputs), "--model", str(model),
    ]  # fmt: skip

    code, _, stderr = run_cli(argv, procs)

    assert code == 0, stderr
    assert sorted(map(tuple, read_jsonl(outputs))) == sorted((line, len(line.split())) for line in LINES)
    assert {row["id"]: row["value"] for row in read_jsonl(model)} == word_counts(LINES)
    assert len(read_jsonl(model)) == len(word_counts(LINES))


@pytest.mark.timeout(180)
def test_psclient_feed_to_serving_workers(tmp_path: Path, procs: Processes, start_shards: StartShards) -> None:
    data = tmp_path / "words.txt"
    data.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    servers = start_shards(2)
    workers = [procs.start_server(psworker_argv("logics:WordCount", servers, i, 2)) for i in range(2)]

    argv = [
        sys.executable, "-m", "psclient", "feed", "--workers", ",".join(w.address for w in workers),
        "--input", str(data), "--format", "lines",
    ]  # fmt: skip

    code, stdout, stderr = run_cli(argv, procs)
    worker_codes = [w.process.wait(timeout=RUN_TIMEOUT_S) for w in workers]
    model = snapshot(servers, procs)

    assert code == 0, stderr
    assert sorted(map(tuple, map(json.loads, stdout.splitlines()))) == sorted((ln, len(ln.split())) for ln in LINES)
    assert worker_codes == [0, 0]
    assert model == word_counts(LINES)


@pytest.mark.timeout(120)
def test_psclient_status_lists_every_shard(procs: Processes, start_shards: StartShards) -> None:
    servers = start_shards(2, init="const:0", update="max")

    code, stdout, stderr = run_cli(
        [sys.executable, "-m", "psclient", "status", "--servers", ",".join(servers), "--json"], procs
    )

    assert code == 0, stderr
    rows = json.loads(stdout)
    assert [(row["node"], row["address"], row["up"], row["params"]) for row in rows] == [
        ("shard 0", servers[0], True, 0),
        ("shard 1", servers[1], True, 0),
    ]


@pytest.mark.parametrize(
    ("flag", "spec", "named"),
    [
        ("--init", "zeros:abc", "dimension 'abc'"),
        ("--init", "nosuchmodule:fn", "no module named 'nosuchmodule'"),
        ("--update", "bogus", "unknown update 'bogus'"),
        ("--init", "uniform:3,low=2,high=1", "init 'uniform:3,low=2,high=1': low must be below high"),
        ("--init", "normal:3,std=-1", "init 'normal:3,std=-1': std must be >= 0"),
        ("--init", "zeros:0", "init 'zeros:0': dimension '0' must be positive"),
        ("--init", "normal:3,seed=x", "init 'normal:3,seed=x': bad value for seed: 'x'"),
        ("--init", "zeros:2,size=3", "init 'zeros:2,size=3': unknown option 'size=3' (allowed: none)"),
    ],
)
@pytest.mark.timeout(120)
def test_psserver_rejects_a_bad_spec_with_exit_code_2(flag: str, spec: str, named: str, procs: Processes) -> None:
    argv = [sys.executable, "-m", "psserver", "--shard", "0", "--num-shards", "1", "--port", "0", flag, spec]

    code, stdout, stderr = run_cli(argv, procs)

    assert code == 2
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("psserver: error: ")
    assert named in lines[0]


@pytest.mark.parametrize(
    ("flag", "spec", "message"),
    [
        ("--init", "uniform:3,low=2,high=1", "psclient: error: init 'uniform:3,low=2,high=1': low must be below high"),
        ("--init", "zeros:0", "psclient: error: init 'zeros:0': dimension '0' must be positive"),
        ("--update", "sum", "psclient: error: unknown update 'sum': use add, replace, max, min or module:attr"),
    ],
)
@pytest.mark.timeout(120)
def test_psclient_run_refuses_a_bad_spec_before_starting_a_cluster(
    flag: str, spec: str, message: str, tmp_path: Path, procs: Processes
) -> None:
    data = tmp_path / "words.txt"
    data.write_text("a b\n", encoding="utf-8")
    argv = [
        sys.executable, "-m", "psclient", "run", "--logic", "logics:WordCount", "--input", str(data),
        "--format", "lines", "--workers", "1", "--shards", "1", flag, spec,
    ]  # fmt: skip

    code, stdout, stderr = run_cli(argv, procs)

    assert code == 2
    assert stdout == ""
    assert stderr.strip().splitlines() == [message]
