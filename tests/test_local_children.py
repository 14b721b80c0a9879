"""transform's child processes: a child that dies is named with how it ended, and a long
job shows the same progress bar as `psclient run`."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import Processes
from logics import Exactness

import psclient.local
from psclient import JobFailed, Left, transform

RUN_TIMEOUT_S = 120


class RecordingChild(psclient.local.ChildProcess):
    """A ChildProcess that remembers itself, so that a test can find a child's pid."""

    started: ClassVar[list[psclient.local.ChildProcess]] = []

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        RecordingChild.started.append(self)


@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> list[psclient.local.ChildProcess]:
    RecordingChild.started = []
    monkeypatch.setattr(psclient.local, "ChildProcess", RecordingChild)
    return RecordingChild.started


def pid_of(children: list[psclient.local.ChildProcess], name: str) -> int:
    (child,) = [child for child in children if child.name == name]
    return child.process.pid


def kill_after_first_outputs(stream: Any, children: list[psclient.local.ChildProcess], name: str) -> None:
    """Read the stream; SIGKILL child `name` once 10 outputs arrived; read on to its end."""
    seen = 0
    for item in stream:
        seen += isinstance(item, Left)
        if seen == 10:
            os.kill(pid_of(children, name), signal.SIGKILL)


@pytest.mark.timeout(180)
def test_a_worker_killed_by_a_signal_is_named_with_its_pid(children: list[psclient.local.ChildProcess]) -> None:
    stream = transform(range(1_000_000), Exactness(), "const:0", "add", 2, 1, progress=False)

    with pytest.raises(JobFailed) as failed:
        kill_after_first_outputs(stream, children, "worker 1")

    assert str(failed.value) == f"worker 1 (pid {pid_of(children, 'worker 1')}) was killed by signal 9 (SIGKILL)"
    assert all(child.process.poll() is not None for child in children)


@pytest.mark.timeout(180)
def test_a_shard_killed_by_a_signal_is_named_with_its_pid(children: list[psclient.local.ChildProcess]) -> None:
    stream = transform(range(1_000_000), Exactness(), "const:0", "add", 2, 2, progress=False)

    with pytest.raises(JobFailed) as failed:
        kill_after_first_outputs(stream, children, "shard 0")

    assert str(failed.value) == f"shard 0 (pid {pid_of(children, 'shard 0')}) was killed by signal 9 (SIGKILL)"


@pytest.mark.timeout(180)
def test_a_shard_that_exits_is_named_with_its_code_and_last_error_line(
    children: list[psclient.local.ChildProcess],
) -> None:
    def init_that_dies_on_s66(param_id: Any) -> int:  # record 66 pushes to "s66"
        if param_id == "s66":
            print("MemoryError: cannot grow the table for id s66", file=sys.stderr, flush=True)
            os._exit(1)
        return 0

    with pytest.raises(JobFailed) as failed:
        list(transform(range(100), Exactness(), init_that_dies_on_s66, "add", 1, 1, progress=False))

    pid = pid_of(children, "shard 0")
    assert str(failed.value) == f"shard 0 (pid {pid}) exited with code 1: MemoryError: cannot grow the table for id s66"


# -- progress -----------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_transform_shows_the_progress_bar_when_asked(capfd: pytest.CaptureFixture[str]) -> None:
    items = list(transform(range(300), Exactness(), "const:0", "add", 2, 1, progress=True))

    stderr = capfd.readouterr().err
    assert sum(isinstance(item, Left) for item in items) == 300
    final = stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert re.match(r"outputs: 300 \[[0-9:]+, .*records=300\]$", final), final


@pytest.mark.timeout(180)
def test_transform_shows_no_bar_when_stderr_is_not_a_terminal(capfd: pytest.CaptureFixture[str]) -> None:
    items = list(transform(range(300), Exactness(), "const:0", "add", 2, 1))

    assert sum(isinstance(item, Left) for item in items) == 300
    assert "outputs:" not in capfd.readouterr().err


@pytest.mark.timeout(180)
def test_psclient_run_progress_is_the_same_bar(tmp_path: Path, procs: Processes) -> None:
    data = tmp_path / "words.txt"
    data.write_text("".join(f"w{n} w{n % 5}\n" for n in range(301)), encoding="utf-8")
    argv = [
        sys.executable, "-m", "psclient", "run", "--logic", "logics:WordCount", "--input", str(data),
        "--format", "lines", "--init", "const:0", "--progress", "--output", str(tmp_path / "out.jsonl"),
    ]  # fmt: skip
    process, stderr_path = procs.popen(argv)

    process.communicate(timeout=RUN_TIMEOUT_S)

    lines = stderr_path.read_text(encoding="utf-8").replace("\r", "\n").strip().splitlines()
    assert process.returncode == 0, lines
    bar = [line for line in lines if line.startswith("outputs:")][-1]
    assert re.match(r"outputs: 301 \[[0-9:]+, .*records=301\]$", bar), bar
