"""Real redis-server and nats-server (JetStream) processes on 127.0.0.1 for the stream
sources' tests, each in a temporary directory, always stopped at teardown.

The binaries come from Debian's packages (`make test` installs them when missing and it
runs as root; so does the fixture). A test is skipped, saying why, only where they cannot be
installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 20.0
PACKAGES = {"redis-server": "redis-server", "nats-server": "nats-server"}


def ensure_binary(name: str) -> str:
    """The path of `name`, installed from Debian's package when missing and we may."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{name} is not installed and cannot be (needs root and apt-get: apt-get install {PACKAGES[name]})")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", PACKAGES[name]]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            pytest.skip(f"{name} could not be installed: {' '.join(argv)}: {done.stderr.strip()[-300:]}")
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if not found:
        pytest.skip(f"{name}: package {PACKAGES[name]} installed no such binary")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}: {log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise AssertionError(f"server did not listen on port {port}: {log.read_text(errors='replace')}")


@dataclass
class StreamServer:
    process: subprocess.Popen[bytes]
    port: int
    directory: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _start(argv: list[str], port: int, directory: Path) -> StreamServer:
    log = directory / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=directory)
    server = StreamServer(process, port, directory)
    try:
        wait_for_port(process, port, log)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[StreamServer]:
    """A redis-server without persistence on a free port."""
    binary = ensure_binary("redis-server")
    directory = tmp_path / "redis"
    directory.mkdir()
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(directory)]  # fmt: skip
    server = _start(argv, port, directory)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[StreamServer]:
    """A nats-server with JetStream, its store in a temporary directory, on a free port."""
    binary = ensure_binary("nats-server")
    directory = tmp_path / "nats"
    directory.mkdir()
    port = free_port()
    argv = [binary, "-js", "-sd", str(directory / "store"), "-a", "127.0.0.1", "-p", str(port)]
    server = _start(argv, port, directory)
    try:
        yield server
    finally:
        server.stop()
