"""The batching knobs reach the worker runtime: `--batch-max-keys` and `--batch-linger-ms` on
psworker and `psclient run`, `batch_max_keys=` and `batch_linger_ms=` on transform and LocalCluster."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import TESTS_DIR, Processes, StartShards, child_env, run_psworker, text_file
from logics import Exactness

from psclient import Left, Right, connect, transform
from psclient.cluster import Cluster
from psclient.local import LocalCluster
from psclient.wire.proto import shard_pb2
from psworker.runtime import WorkerRuntime

RECORDS = 300


def exactness_model(records: range) -> dict[Any, int]:
    """The model of logics:Exactness over `records`: every key it pushes, summed."""
    expected: dict[Any, int] = Counter()
    for r in records:
        expected[r % 500 - 250] += r % 7 + 1
        expected[f"s{r % 300}"] += 2
    return dict(expected)


def shard_info(address: str) -> shard_pb2.InfoResponse:
    with Cluster([address]) as cluster:
        (info,) = cluster.info()
    assert isinstance(info, shard_pb2.InfoResponse), info
    return info


def model_of(servers: list[str]) -> dict[Any, Any]:
    with connect(servers) as cluster:
        return dict(cluster.snapshot())


# -- psworker ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_psworker_batch_max_keys_1_sends_every_key_in_a_push_of_its_own(
    tmp_path: Path, procs: Processes, start_shards: StartShards
) -> None:
    (server,) = start_shards(1)
    data = text_file(tmp_path / "records.jsonl", map(str, range(RECORDS)))

    code, _, stderr = run_psworker(
        procs, "--logic", "logics:Exactness", "--worker-index", "0", "--num-workers", "1",
        "--input", str(data), "--output", str(tmp_path / "out.jsonl"), "--batch-max-keys", "1", servers=server,
    )  # fmt: skip

    assert code == 0, stderr
    info = shard_info(server)
    assert info.pushed_keys == 2 * RECORDS  # Exactness pushes two keys a record
    assert info.push_requests == 2 * RECORDS
    assert model_of([server]) == exactness_model(range(RECORDS))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("linger_flags", "push_requests"),
    [
        # Each record's push has waited 5 ms, past the 2 ms linger, when its callback returns.
        ([], 100),
        # With a minute's linger the pushes wait for the logic to run out of records: one push.
        (["--batch-linger-ms", "60000"], 1),
    ],
)
def test_psworker_batch_linger_ms_holds_a_busy_logics_pushes_together(
    tmp_path: Path, procs: Processes, start_shards: StartShards, linger_flags: list[str], push_requests: int
) -> None:
    (server,) = start_shards(1)
    # Fewer records than one chunk the file reader hands over: the logic never waits for input.
    data = text_file(tmp_path / "records.jsonl", map(str, range(100)))

    code, _, stderr = run_psworker(
        procs, "--logic", "logics:PushThenWait", "--worker-index", "0", "--num-workers", "1",
        "--input", str(data), "--output", str(tmp_path / "out.jsonl"), *linger_flags, servers=server,
    )  # fmt: skip

    assert code == 0, stderr
    info = shard_info(server)
    assert info.pushed_keys == 100
    assert info.push_requests == push_requests
    assert model_of([server]) == dict.fromkeys(range(10), 10)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--batch-max-keys", "0", "0 is not in the range x>=1."),
        ("--batch-max-keys", "many", "'many' is not a valid integer range."),
        ("--batch-linger-ms", "-1", "-1.0 is not in the range x>=0."),
        ("--batch-linger-ms", "nan", "nan is not a finite number."),
        ("--batch-linger-ms", "inf", "inf is not a finite number."),
    ],
)
def test_psworker_refuses_bad_batching_knobs_in_one_line(procs: Processes, flag: str, value: str, message: str) -> None:
    code, _, stderr = run_psworker(
        procs, "--logic", "logics:Exactness", "--worker-index", "0", "--num-workers", "1", "--port", "0", flag, value
    )

    assert code == 2
    variable = "STREAMPS_" + flag[2:].upper().replace("-", "_")
    assert stderr[-1] == f"Error: Invalid value for '{flag}' (env var: '{variable}'): {message}"


@pytest.mark.timeout(120)
def test_psworker_reads_the_batching_knobs_from_the_environment() -> None:
    argv = [sys.executable, "-m", "psworker", "--logic", "logics:Exactness", "--servers", "127.0.0.1:1",
            "--worker-index", "0", "--num-workers", "1", "--port", "0"]  # fmt: skip

    run = subprocess.run(argv, capture_output=True, text=True, env=child_env(STREAMPS_BATCH_LINGER_MS="-5"),
                         cwd=TESTS_DIR, timeout=60)  # fmt: skip

    assert run.returncode == 2
    assert run.stderr.splitlines()[-1] == (
        "Error: Invalid value for '--batch-linger-ms' (env var: 'STREAMPS_BATCH_LINGER_MS'): "
        "-5.0 is not in the range x>=0."
    )


def test_the_runtime_refuses_bad_batching_knobs() -> None:
    with pytest.raises(ValueError, match=r"^max_batch must be >= 1, not 0$"):
        WorkerRuntime(Exactness(), ["127.0.0.1:1"], 0, 1, emit=print, max_batch=0)
    with pytest.raises(ValueError, match=r"^linger_s must be a finite number >= 0, not -0.001$"):
        WorkerRuntime(Exactness(), ["127.0.0.1:1"], 0, 1, emit=print, linger_s=-0.001)


# -- LocalCluster, transform, psclient run --------------------------------------------------


@pytest.mark.timeout(180)
def test_a_local_cluster_gives_its_workers_the_batching_knobs() -> None:
    with LocalCluster("logics:Exactness", "const:0", "add", num_workers=2, num_shards=1, batch_max_keys=1) as cluster:
        with Cluster(cluster.servers, cluster.workers) as client:
            items = list(client.stream(range(RECORDS)))
        info = shard_info(cluster.servers[0])

    assert info.pushed_keys == 2 * RECORDS
    assert info.push_requests == 2 * RECORDS
    assert dict(item.value for item in items if isinstance(item, Right)) == exactness_model(range(RECORDS))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("knobs", [{"batch_max_keys": 3}, {"batch_max_keys": 1, "batch_linger_ms": 0}])
def test_transform_with_batching_knobs_gives_the_exact_model(knobs: dict[str, Any]) -> None:
    records = range(2_000)

    items = list(transform(records, Exactness(), "const:0", "add", 2, 2, **knobs))

    assert sorted(item.value[1] for item in items if isinstance(item, Left)) == list(records)
    assert dict(item.value for item in items if isinstance(item, Right)) == exactness_model(records)


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"batch_max_keys": 0}, "batch_max_keys must be an int of 1 or more, not 0"),
        ({"batch_max_keys": 2.5}, "batch_max_keys must be an int of 1 or more, not 2.5"),
        ({"batch_linger_ms": -1}, "batch_linger_ms must be a finite number of 0 or more, not -1"),
        ({"batch_linger_ms": float("nan")}, "batch_linger_ms must be a finite number of 0 or more, not nan"),
    ],
)
def test_transform_refuses_bad_batching_knobs_before_any_process_starts(knobs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        transform(range(3), Exactness(), "const:0", "add", **knobs)

    assert str(raised.value) == message


@pytest.mark.timeout(180)
def test_psclient_run_takes_the_batching_knobs(tmp_path: Path, procs: Processes) -> None:
    data = text_file(tmp_path / "records.jsonl", map(str, range(RECORDS)))
    model = tmp_path / "model.jsonl"
    argv = [
        sys.executable, "-m", "psclient", "run", "--logic", "logics:Exactness", "--input", str(data),
        "--init", "const:0", "--update", "add", "--workers", "2", "--shards", "2", "--output", str(tmp_path / "o"),
        "--model", str(model), "--batch-max-keys", "1", "--batch-linger-ms", "0",
    ]  # fmt: skip

    process, stderr_path = procs.popen(argv)
    process.communicate(timeout=120)

    assert process.returncode == 0, stderr_path.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in model.read_text(encoding="utf-8").splitlines()]
    assert {row["id"]: row["value"] for row in rows} == exactness_model(range(RECORDS))


@pytest.mark.timeout(120)
def test_psclient_run_refuses_a_bad_batching_knob(tmp_path: Path, procs: Processes) -> None:
    data = text_file(tmp_path / "records.jsonl", map(str, range(3)))
    argv = [sys.executable, "-m", "psclient", "run", "--logic", "logics:Exactness", "--input", str(data),
            "--batch-max-keys", "0"]  # fmt: skip

    process, stderr_path = procs.popen(argv)
    process.communicate(timeout=60)

    assert process.returncode == 2
    assert stderr_path.read_text(encoding="utf-8").splitlines()[-1] == (
        "Error: Invalid value for '--batch-max-keys' (env var: 'STREAMPS_BATCH_MAX_KEYS'): 0 is not in the range x>=1."
    )
