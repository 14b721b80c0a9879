"""Shared fixtures: real service processes on 127.0.0.1 with port 0, always torn down.

`procs` is a registry of child processes that is emptied at teardown (SIGTERM,
then SIGKILL), whatever the test did. `start_shards` starts `psserver`
processes the way a user would and returns their addresses in shard order.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from stream_servers import nats_server, redis_server  # noqa: F401  (fixtures of the stream sources' tests)

from psclient.children import shard_argv
from psclient.wire.proto import shard_pb2, shard_pb2_grpc

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
LISTENING = "listening on "


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: `logics` (tests/) and the packages importable."""
    env = dict(os.environ)
    paths = [str(TESTS_DIR), str(ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Service:
    """A started child process and (for servers) the address it announced."""

    process: subprocess.Popen[str]
    address: str
    stderr_path: Path


def terminate(process: subprocess.Popen[str]) -> None:
    """Send SIGTERM once (a second one is never needed and must not be relied on)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)


def reap(process: subprocess.Popen[str]) -> None:
    """Wait for a terminated process; SIGKILL it after STOP_TIMEOUT_S; close its pipes."""
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


class Processes:
    """Starts children and remembers them, so that teardown can stop them all."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.started: list[subprocess.Popen[str]] = []
        self._count = 0

    def popen(self, argv: Sequence[str], *, stdout: int | None = subprocess.PIPE) -> tuple[subprocess.Popen[str], Path]:
        """Start `argv` with cwd=tests/, stderr to a file; return the process and that file."""
        self._count += 1
        stderr_path = self.workdir / f"child-{self._count}.stderr"
        with stderr_path.open("w", encoding="utf-8") as stderr:
            process = subprocess.Popen(
                list(argv), stdout=stdout, stderr=stderr, env=child_env(), cwd=TESTS_DIR, text=True
            )
        self.started.append(process)
        return process, stderr_path

    def start_server(self, argv: Sequence[str]) -> Service:
        """Start a service and wait for its `listening on HOST:PORT` line."""
        process, stderr_path = self.popen(argv)
        assert process.stdout is not None
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:  # keep reading, so the child never blocks on a full pipe
            assert process.stdout is not None
            with contextlib.suppress(ValueError, OSError):  # teardown may close the pipe first
                for line in process.stdout:
                    lines.put(line)
            lines.put("")

        threading.Thread(target=pump, daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                raise AssertionError(f"{argv[2]} did not announce an address: {stderr_path.read_text()}") from None
            if not line:
                process.wait(timeout=STOP_TIMEOUT_S)
                raise AssertionError(f"{argv[2]} exited with {process.returncode}: {stderr_path.read_text()}")
            if line.startswith(LISTENING):
                return Service(process, line[len(LISTENING) :].strip(), stderr_path)

    def stop_all(self) -> None:
        for process in self.started:
            terminate(process)
        for process in self.started:
            reap(process)
        self.started = []


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    registry = Processes(tmp_path)
    try:
        yield registry
    finally:
        registry.stop_all()


def psserver_argv(shard: int, num_shards: int, init: str, update: str) -> list[str]:
    return shard_argv(shard, num_shards, init, update)


StartShards = Callable[..., list[str]]


@pytest.fixture
def start_shards(procs: Processes) -> StartShards:
    """`start_shards(n, init=..., update=...)`: n psserver processes; their addresses in shard order."""

    def start(num_shards: int, init: str = "const:0", update: str = "add") -> list[str]:
        return [procs.start_server(psserver_argv(i, num_shards, init, update)).address for i in range(num_shards)]

    return start


@pytest.fixture
def shard_stub(start_shards: StartShards) -> Iterator[Callable[..., shard_pb2_grpc.ParameterShardStub]]:
    """`shard_stub(init=..., update=...)`: the generated stub of one fresh single shard."""
    channels: list[grpc.Channel] = []

    def make(init: str = "zeros:2", update: str = "add") -> shard_pb2_grpc.ParameterShardStub:
        (address,) = start_shards(1, init=init, update=update)
        channel = grpc.insecure_channel(address)
        channels.append(channel)
        grpc.channel_ready_future(channel).result(timeout=START_TIMEOUT_S)
        return shard_pb2_grpc.ParameterShardStub(channel)

    try:
        yield make
    finally:
        for channel in channels:
            channel.close()


def push_once(stub: shard_pb2_grpc.ParameterShardStub, request: shard_pb2.PushRequest) -> shard_pb2.PushAck:
    """Send one PushRequest on a fresh Push stream and return its ack (or raise grpc.RpcError)."""
    (ack,) = list(stub.Push(iter([request]), timeout=30))
    return ack


PSWORKER_RUN_TIMEOUT_S = 120


def run_psworker(procs: Processes, *args: str, servers: str = "127.0.0.1:1") -> tuple[int, list[str], list[str]]:
    """Run psworker to its end; return (exit code, stdout lines, stderr lines)."""
    argv = [sys.executable, "-m", "psworker", "--servers", servers, "--log-level", "WARNING", *args]
    process, stderr_path = procs.popen(argv)
    stdout, _ = process.communicate(timeout=PSWORKER_RUN_TIMEOUT_S)
    return process.returncode, stdout.splitlines(), stderr_path.read_text(encoding="utf-8").splitlines()


def error_line(stderr: list[str]) -> str:
    """The one `psworker: error:` line, which must end stderr."""
    errors = [line for line in stderr if line.startswith("psworker: error:")]
    assert len(errors) == 1, stderr
    assert stderr[-1] == errors[0], stderr
    return errors[0]


@pytest.fixture
def streams() -> Iterator[list[Any]]:
    """Raw Exchange streams a test opens (tests/shard_streams.py Stream), all closed at teardown."""
    opened: list[Any] = []
    try:
        yield opened
    finally:
        for stream in opened:
            stream.close()


def text_file(path: Path, lines: Iterable[str]) -> Path:
    """Write `lines` (each ended by a newline) to `path`: a test's input file."""
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path
