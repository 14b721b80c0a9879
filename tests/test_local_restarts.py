"""transform with durability: a shard killed mid-job is restarted on its port from its data dir, a
worker on its port from its checkpoint, and the model is exactly the fault-free one; past
max_restarts, or without durability, the job fails with one line naming the child; a worker
whose own code fails is not restarted."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import Processes
from logics import Exactness, FailOnX, PacedWindows

import psclient.local
from psclient import JobFailed, Left, Right, transform

RECORDS = 200_000
# PacedWindows takes about 0.5 ms a record: with 3 workers, long enough for each to checkpoint
# (every 10,000 records) well before its end.
WORKER_RECORDS = 50_000
RUN_TIMEOUT_S = 120


class RecordingChild(psclient.local.ChildProcess):
    """A ChildProcess that remembers itself and the address it announced."""

    started: ClassVar[list[RecordingChild]] = []

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.announced: str | None = None
        RecordingChild.started.append(self)

    def address(self, timeout: float) -> str:
        self.announced = super().address(timeout)
        return self.announced


@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> list[RecordingChild]:
    RecordingChild.started = []
    monkeypatch.setattr(psclient.local, "ChildProcess", RecordingChild)
    return RecordingChild.started


def named(children: list[RecordingChild], name: str) -> list[RecordingChild]:
    """Every child started under `name`, the first start first (a restart adds one)."""
    return [child for child in children if child.name == name]


def expected_model(records: int) -> dict[Any, int]:
    """What Exactness pushes over records 0..records-1, summed: the fault-free model."""
    model: Counter[Any] = Counter()
    for r in range(records):
        model[r % 500 - 250] += r % 7 + 1
        model[f"s{r % 300}"] += 2
    return dict(model)


def run_killing(stream: Any, children: list[RecordingChild], name: str, kills: int) -> dict[Any, Any]:
    """Read the stream; SIGKILL `name` after the first 10 outputs, then each restart of it as
    soon as it listens, `kills` times in all; return the model of the Rights."""
    seen = killed = 0
    model: dict[Any, Any] = {}
    try:
        for item in stream:
            if isinstance(item, Right):
                param_id, value = item.value
                model[param_id] = value
                continue
            seen += 1
            starts = named(children, name)
            if seen >= 10 and killed < kills and len(starts) == killed + 1 and starts[-1].announced is not None:
                os.kill(starts[-1].process.pid, signal.SIGKILL)
                killed += 1
    finally:
        stream.close()  # every child is gone even when an assertion failed mid-stream
    assert killed == kills, f"the job ended after {killed} of {kills} kills"
    return model


@pytest.mark.timeout(300)
def test_a_durable_shard_killed_mid_job_is_restarted_and_the_model_is_exact(
    children: list[RecordingChild],
) -> None:
    stream = transform(range(RECORDS), Exactness(), "const:0", "add", 2, 2, progress=False, durable=True)

    model = run_killing(stream, children, "shard 0", kills=1)

    assert model == expected_model(RECORDS)
    first, restarted = named(children, "shard 0")
    assert restarted.announced == first.announced  # the same host:port: the workers know it
    data_dirs = [str(c.process.args[c.process.args.index("--data-dir") + 1]) for c in (first, restarted)]  # type: ignore[index, union-attr]
    assert data_dirs[0] == data_dirs[1]  # the same data dir: the restart recovers what it acked
    assert not Path(data_dirs[0]).parent.exists()  # the cluster's own dir is removed
    assert all(child.process.poll() is not None for child in children)


@pytest.mark.timeout(300)
def test_a_durable_shard_killed_while_the_model_streams_live_is_watched_again_and_the_model_is_exact(
    children: list[RecordingChild], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    stream = transform(
        range(RECORDS), Exactness(), "const:0", "add", 2, 2, progress=False, durable=True,
        snapshot_every=0.1, snapshot_dir=models,
    )  # fmt: skip

    model = run_killing(stream, children, "shard 0", kills=1)

    assert model == expected_model(RECORDS)  # the final model closes the stream, after every live one
    numbers = sorted(int(path.stem.split("-")[2]) for path in models.glob("model-0-*.jsonl"))
    first, restarted = named(children, "shard 0")
    assert numbers and restarted.announced == first.announced


def flag(child: RecordingChild, name: str) -> float:
    """The value of option `name` on `child`'s command line."""
    argv = [str(arg) for arg in child.process.args]  # type: ignore[union-attr]
    return float(argv[argv.index(name) + 1])


@pytest.mark.timeout(300)
def test_a_shard_killed_while_a_worker_restarts_is_restarted_too_and_the_model_is_exact(
    children: list[RecordingChild],
) -> None:
    """The restarted worker announces itself only once it reached every shard: the shard
    killed meanwhile is restarted beside it, and the worker waits for it as it starts."""
    stream = transform(range(RECORDS), Exactness(), "const:0", "add", 2, 2, progress=False, durable=True)
    seen = 0
    model: dict[Any, Any] = {}
    outputs: Counter[int] = Counter()
    try:
        for item in stream:
            if isinstance(item, Right):
                model[item.value[0]] = item.value[1]
                continue
            outputs[item.value[1]] += 1
            seen += 1
            if seen == 10:
                os.kill(named(children, "worker 1")[0].process.pid, signal.SIGKILL)
                time.sleep(0.1)
                os.kill(named(children, "shard 0")[0].process.pid, signal.SIGKILL)
    finally:
        stream.close()

    assert model == expected_model(RECORDS)
    assert outputs.keys() == set(range(RECORDS))  # at least once
    assert [len(named(children, name)) for name in ("worker 1", "shard 0")] == [2, 2]
    for worker in named(children, "worker 1"):
        assert flag(worker, "--connect-timeout") >= flag(worker, "--shard-timeout") == 60
    assert all(child.process.poll() is not None for child in children)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["shard 1", "worker 1"])
def test_a_child_killed_more_often_than_max_restarts_fails_the_job_naming_it(
    children: list[RecordingChild], name: str
) -> None:
    stream = transform(
        range(10 * RECORDS), Exactness(), "const:0", "add", 2, 2, progress=False, durable=True, max_restarts=1
    )

    with pytest.raises(JobFailed) as failed:
        run_killing(stream, children, name, kills=2)

    last = named(children, name)[-1]
    assert str(failed.value) == (
        f"{name} (pid {last.process.pid}) was killed by signal 9 (SIGKILL); no restart left (max_restarts=1)"
    )
    assert len(named(children, name)) == 2
    assert all(child.process.poll() is not None for child in children)


@pytest.mark.timeout(300)
def test_without_durability_a_killed_shard_fails_the_job_at_once(children: list[RecordingChild]) -> None:
    stream = transform(range(10 * RECORDS), Exactness(), "const:0", "add", 2, 2, progress=False)

    with pytest.raises(JobFailed) as failed:
        run_killing(stream, children, "shard 0", kills=1)

    (shard,) = named(children, "shard 0")
    assert str(failed.value) == f"shard 0 (pid {shard.process.pid}) was killed by signal 9 (SIGKILL)"
    assert all(child.process.poll() is not None for child in children)


def checkpoint_of(child: RecordingChild) -> Path:
    """Where worker `child` checkpoints (its --checkpoint-dir)."""
    argv = [str(arg) for arg in child.process.args]  # type: ignore[union-attr]
    index = argv[argv.index("--worker-index") + 1]
    return Path(argv[argv.index("--checkpoint-dir") + 1]) / f"worker-{index}.ckpt"


def windows_model(records: int) -> dict[Any, int]:
    """What PacedWindows pushes over records 0..records-1: the fault-free model."""
    return dict(Counter(r % 100 for r in range(records)))


@pytest.mark.timeout(300)
def test_a_durable_worker_killed_mid_job_is_restarted_and_the_model_is_exact(
    children: list[RecordingChild],
) -> None:
    """Killed after its first checkpoint, worker 1 is restarted on its port; the feeder
    resends the records after that checkpoint, and the shards apply their pushes once."""
    stream = transform(
        range(WORKER_RECORDS), PacedWindows(), "const:0", "add", 3, 2, progress=False, durable=True, max_restarts=3
    )
    model: dict[Any, Any] = {}
    windows: list[list[int]] = []
    checkpointed = False
    try:
        for item in stream:
            if isinstance(item, Right):
                model[item.value[0]] = item.value[1]
                continue
            windows.append(item.value)
            first = named(children, "worker 1")[0]
            if not checkpointed and checkpoint_of(first).exists():
                os.kill(first.process.pid, signal.SIGKILL)
                checkpointed = True
    finally:
        stream.close()

    assert checkpointed, "the job ended before worker 1 checkpointed"
    assert model == windows_model(WORKER_RECORDS)
    first, restarted = named(children, "worker 1")
    assert restarted.announced == first.announced  # the same host:port: the feeder knows it
    assert Counter(r for window in windows for r in window).keys() == set(range(WORKER_RECORDS))  # at least once
    assert all(child.process.poll() is not None for child in children)


@pytest.mark.timeout(300)
def test_with_durability_a_worker_whose_code_raises_is_not_restarted(children: list[RecordingChild]) -> None:
    records = ["x" if n == 4_000 else "a" for n in range(10_000)]  # the 2,001st record of worker 0
    stream = transform(records, FailOnX(), "const:0", "add", 2, 2, progress=False, durable=True)

    with pytest.raises(JobFailed) as failed:
        list(stream)

    assert str(failed.value) == "worker 0 failed in on_recv: ValueError: bad record x (record 2001: 'x')"
    assert len(named(children, "worker 0")) == 1  # not restarted
    assert all(child.process.poll() is not None for child in children)


@pytest.mark.timeout(300)
def test_a_given_data_dir_is_kept_with_a_dir_per_shard(tmp_path: Path, children: list[RecordingChild]) -> None:
    items = list(transform(range(1000), Exactness(), "const:0", "add", 1, 2, progress=False, data_dir=tmp_path))

    assert {param_id: value for param_id, value in (i.value for i in items if isinstance(i, Right))} == (
        expected_model(1000)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "shard-0", "shard-1"]
    assert all(any((tmp_path / f"shard-{i}").iterdir()) for i in range(2))
    assert sum(isinstance(item, Left) for item in items) == 1000


@pytest.mark.timeout(300)
def test_a_shard_whose_port_was_taken_meanwhile_fails_the_job_naming_the_port(
    children: list[RecordingChild],
) -> None:
    stream = transform(range(10 * RECORDS), Exactness(), "const:0", "add", 2, 2, progress=False, durable=True)
    taken = socket.socket()
    # The killed shard's connections linger in TIME_WAIT; grpc binds over them the same way.
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        with pytest.raises(JobFailed) as failed:
            for seen, _item in enumerate(stream):
                if seen == 10:
                    (shard,) = named(children, "shard 0")
                    assert shard.announced is not None
                    host, port = shard.announced.rsplit(":", 1)
                    os.kill(shard.process.pid, signal.SIGKILL)
                    shard.process.wait()
                    # The restart starts a new interpreter first: the port is taken long before it binds.
                    taken.bind((host, int(port)))
                    taken.listen()
    finally:
        taken.close()
        stream.close()

    assert str(failed.value).startswith(f"shard 0 cannot be restarted on {shard.announced}: ")
    assert "\n" not in str(failed.value)
    assert all(child.process.poll() is not None for child in children)


def shard_child(parent: int, shard: int) -> int:
    """The pid of the child of `parent` that serves `shard` (its command line says so)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == parent and b"psserver" in argv and argv[argv.index(b"--shard") + 1] == str(shard).encode():
            return int(proc.name)
    raise AssertionError(f"no shard {shard} among the children of {parent}")


@pytest.mark.timeout(300)
def test_psclient_run_durable_restarts_a_killed_shard_and_writes_the_exact_model(
    tmp_path: Path, procs: Processes
) -> None:
    lines = [f"w{n % 97} w{n % 5}" for n in range(RECORDS)]
    data, out, model_path = tmp_path / "words.txt", tmp_path / "out.jsonl", tmp_path / "model.jsonl"
    data.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    argv = [
        sys.executable, "-m", "psclient", "run", "--logic", "logics:WordCount", "--input", str(data),
        "--format", "lines", "--init", "const:0", "--workers", "2", "--shards", "2", "--durable",
        "--max-restarts", "1", "--output", str(out), "--model", str(model_path), "--no-progress",
    ]  # fmt: skip
    process, stderr_path = procs.popen(argv)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (out.exists() and out.stat().st_size > 0) and process.poll() is None:
        assert time.monotonic() < deadline, "no output within the timeout"
        time.sleep(0.01)
    os.kill(shard_child(process.pid, 0), signal.SIGKILL)

    process.communicate(timeout=RUN_TIMEOUT_S)

    stderr = stderr_path.read_text(encoding="utf-8")
    assert process.returncode == 0, stderr
    assert "shard 0 at 127.0.0.1:" in stderr and "reconnecting" in stderr  # the kill came mid-job
    model = {row["id"]: row["value"] for row in map(json.loads, model_path.read_text().splitlines())}
    assert model == Counter(word for line in lines for word in line.split())
    assert len(out.read_text().splitlines()) == RECORDS
