"""SIGTERM as a graceful stop, with real processes and the real signal.

A shard applies and acks the pushes that reached it, snapshots its data dir so
that a restart replays no log, and exits 0. A worker takes no more input,
finishes the records it has (pushes acked, outputs delivered), and exits 0
saying how many records it processed.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import Processes, psserver_argv
from shard_streams import WORKER, Stream, batches, expected_model, model_of, start_shard

from psclient import Cluster, JobFailed
from psclient.children import worker_argv
from psclient.rpc.errors import shutting_down_details
from psserver.wal import segment_numbers, segment_path


def stderr_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def wal_bytes(data_dir: Path) -> int:
    return sum(segment_path(data_dir, n).stat().st_size for n in segment_numbers(data_dir))


@pytest.mark.timeout(120)
def test_sigterm_on_a_durable_shard_acks_what_reached_it_and_snapshots_so_the_restart_replays_nothing(
    procs: Processes, streams: list[Stream], tmp_path: Path
) -> None:
    # Large pushes, so that many are still on their way (in the socket, in flow
    # control) when the signal lands after the first ack.
    pushes = batches(60, size=20_000)
    shard = start_shard(procs, 0, 1, tmp_path)  # snapshots every 60 s: none before the stop
    stream = Stream(shard.address)
    streams.append(stream)
    for seq, (ids, deltas) in enumerate(pushes, 1):
        stream.send(seq, ids, deltas)
    assert stream.ack().seq == 1  # the shard is working through them when the signal lands
    shard.process.send_signal(signal.SIGTERM)
    acked = 1
    with pytest.raises(grpc.RpcError) as ended:
        while True:
            assert stream.ack().seq == acked + 1
            acked += 1
    assert acked == len(pushes)  # every push it was sent before the stop: applied, logged, acked
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ended.value.details() == shutting_down_details(0)
    assert shard.process.wait(timeout=20) == 0
    lines = stderr_lines(shard.stderr_path)
    assert not [line for line in lines if "ERROR" in line or "Traceback" in line], lines
    params = len(np.unique(np.concatenate([ids for ids, _ in pushes])))
    assert re.fullmatch(
        rf"\S+ \S+ INFO shard 0: stopped on SIGTERM; ended 1 open streams; "
        rf"snapshot of {params} parameters \(\d+ bytes\), log emptied",
        lines[-1],
    ), lines
    assert wal_bytes(tmp_path) == 0
    assert (tmp_path / "snapshot.bin").is_file()

    restarted = start_shard(procs, 0, 1, tmp_path)
    streams.append(again := Stream(restarted.address))
    assert again.watermarks() == {WORKER: len(pushes)}
    np.testing.assert_array_equal(model_of([again]), expected_model(pushes))
    assert re.search(r"recovered \d+ parameters and 1 workers' watermarks from .* \(0 pushes replayed\)",
                     restarted.stderr_path.read_text(encoding="utf-8"))  # fmt: skip


def exactness_model(records: list[int]) -> dict[Any, int]:
    """The model logics:Exactness makes of `records`, each processed once."""
    model: dict[Any, int] = defaultdict(int)
    for r in records:
        model[r % 500 - 250] += r % 7 + 1
        model[f"s{r % 300}"] += 2
    return dict(model)


def model_on(shard_address: str) -> dict[Any, int]:
    with Cluster([shard_address]) as cluster:
        return {param_id: int(value) for param_id, value in cluster.snapshot()}


def start_plain_shard(procs: Processes) -> str:
    return procs.start_server(psserver_argv(0, 1, "const:0", "add")).address


@pytest.mark.timeout(120)
def test_sigterm_on_a_feed_worker_refuses_new_records_and_finishes_those_it_took(procs: Processes) -> None:
    shard = start_plain_shard(procs)
    worker = procs.start_server(worker_argv("logics:SlowExactness", [shard], 0, 1, "--port", "0", log_level="INFO"))
    records = list(range(5_000))  # about 5 s of work at 1 ms a record
    outputs: list[Any] = []
    first = threading.Event()
    with Cluster([shard], [worker.address]) as cluster:
        assert cluster.feed(records, end_of_input=False) == len(records)

        def read() -> None:
            for out in cluster.outputs():
                outputs.append(out)
                first.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert first.wait(timeout=20)  # an Outputs reader is attached
        worker.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # the worker polls for the signal every 0.1 s; it has seconds of work left
        with pytest.raises(JobFailed) as refused:
            cluster.feed([9_999], end_of_input=False)
        assert str(refused.value) == "worker 0 is stopping (SIGTERM): it takes no more input"
        reader.join(timeout=30)
        assert not reader.is_alive()

    assert worker.process.wait(timeout=20) == 0
    lines = stderr_lines(worker.stderr_path)
    assert re.fullmatch(
        r"\S+ \S+ INFO worker 0: stopped on SIGTERM: took no more input; processed 5000 records, 5000 outputs",
        lines[-1],
    ), lines
    assert not [line for line in lines if "ERROR" in line or "Traceback" in line], lines
    assert sorted(outputs) == [[0, r] for r in records]  # every output of the records it took
    assert model_on(shard) == exactness_model(records)  # every push acked before it exited


@pytest.mark.timeout(120)
def test_sigterm_on_a_file_worker_stops_reading_and_exits_zero_with_what_it_processed(
    procs: Processes, tmp_path: Path
) -> None:
    shard = start_plain_shard(procs)
    total = 30_000  # 30 s of work at 1 ms a record: far from done when stopped
    source = tmp_path / "records.jsonl"
    source.write_text("".join(f"{r}\n" for r in range(total)), encoding="utf-8")
    output = tmp_path / "outputs.jsonl"
    argv = worker_argv(
        "logics:SlowExactness", [shard], 0, 1, "--input", str(source), "--output", str(output), log_level="INFO"
    )
    worker, stderr_path = procs.popen(argv, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not (output.exists() and output.stat().st_size > 1_000) and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0

    lines = stderr_lines(stderr_path)
    stopped = re.fullmatch(
        r"\S+ \S+ INFO worker 0: stopped on SIGTERM: took no more input; processed (\d+) records, \1 outputs",
        lines[-1],
    )
    assert stopped, lines
    processed = int(stopped.group(1))
    assert 0 < processed < total
    outputs = [line for line in output.read_text(encoding="utf-8").splitlines()]
    # In input order: the records before the stop, each once, and none after.
    assert outputs == [f"[0, {r}]" for r in range(processed)]
    assert model_on(shard) == exactness_model(list(range(processed)))


@pytest.mark.timeout(120)
def test_a_second_sigterm_ends_a_graceful_stop_that_cannot_finish(procs: Processes, tmp_path: Path) -> None:
    # The shard is stopped (SIGSTOP): the worker's pushes are never acked, so its
    # graceful stop cannot end; a second SIGTERM ends it with one line and exit 1.
    shard = procs.start_server(psserver_argv(0, 1, "const:0", "add"))
    source = tmp_path / "records.jsonl"
    source.write_text("".join(f"{r}\n" for r in range(30_000)), encoding="utf-8")
    output = tmp_path / "outputs.jsonl"
    argv = worker_argv(
        "logics:SlowExactness", [shard.address], 0, 1, "--input", str(source), "--output", str(output), log_level="INFO"
    )
    worker, stderr_path = procs.popen(argv, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not (output.exists() and output.stat().st_size > 1_000) and time.monotonic() < deadline:
        time.sleep(0.05)
    shard.process.send_signal(signal.SIGSTOP)
    try:
        worker.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            worker.wait(timeout=2)  # waiting for acks that cannot come
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=15) == 1
    finally:
        shard.process.send_signal(signal.SIGCONT)
    lines = stderr_lines(stderr_path)
    assert any("a second signal stops it at once" in line for line in lines), lines
    assert lines[-1] == "psworker: error: worker 0: stopped by a second SIGTERM before it finished what it took"
