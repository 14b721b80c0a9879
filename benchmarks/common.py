"""Shared pieces of the benchmarks: timing, shard processes, tables, machine facts."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from importlib import metadata

from psclient.children import START_TIMEOUT_S, ChildProcess, child_env, shard_argv


def rate(work: Callable[[], int], min_seconds: float = 0.3, max_rounds: int = 100_000) -> float:
    """Units per second of `work` (which returns the units it did), run for at least `min_seconds`."""
    work()  # warm up: first-touch allocation, connection set-up
    units = 0
    start = time.perf_counter()
    rounds = 0
    while True:
        units += work()
        rounds += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or rounds >= max_rounds:
            return units / elapsed


@contextmanager
def shard_processes(
    num_shards: int, init: str, update: str = "add", *extra: str, log_level: str = "WARNING"
) -> Iterator[list[ChildProcess]]:
    """Start `num_shards` psserver processes on loopback (`extra`: more flags); always stop them."""
    env = child_env()
    children = [
        ChildProcess(f"shard {i}", shard_argv(i, num_shards, init, update, log_level, *extra), env)
        for i in range(num_shards)
    ]
    try:
        for child in children:
            child.bound_address = child.address(START_TIMEOUT_S)  # type: ignore[attr-defined]
        yield children
    finally:
        for child in children:
            child.stop()


def addresses(children: list[ChildProcess]) -> list[str]:
    return [child.bound_address for child in children]  # type: ignore[attr-defined]


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (also readable in a terminal)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


def si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.1f}"


def machine_facts() -> list[str]:
    cpu = platform.processor() or platform.machine()
    with suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    packages = []
    for name in ("grpcio", "protobuf", "numpy", "ray", "redis"):
        try:
            packages.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            packages.append(f"{name} (not installed)")
    redis_version = "not installed"
    with suppress(OSError, IndexError):
        redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores",
        f"- Python {platform.python_version()} on {platform.system()} {platform.release()}",
        f"- Packages: {', '.join(packages)}; redis-server {redis_version}",
    ]
