"""A two-worker job reading one stream, shared by the Redis and JetStream sources' tests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from conftest import Processes
from test_shard_restarts import start_shard

from psclient import Cluster
from psclient.children import worker_argv

WORKERS = 2
SHARDS = 2
JOB = "job13"


class StreamJob:
    """Two workers of logics:Exactness (job JOB) reading the stream at `url`, on two fresh shards."""

    def __init__(self, procs: Processes, tmp_path: Path, url: str, *extra: str):
        self.procs, self.tmp_path, self.url, self.extra = procs, tmp_path, url, extra
        self.servers = [start_shard(procs, index).address for index in range(SHARDS)]
        self.workers = [self.start(index) for index in range(WORKERS)]

    def start(self, index: int) -> subprocess.Popen[str]:
        argv = worker_argv(
            "logics:Exactness", self.servers, index, WORKERS, "--input", self.url, "--job-id", JOB,
            "--output", str(self.tmp_path / f"out-{index}.jsonl"), *self.extra, log_level="INFO",
        )  # fmt: skip
        process, _ = self.procs.popen(argv, stdout=subprocess.DEVNULL)
        return process

    def wait(self) -> None:
        for index, worker in enumerate(self.workers):
            assert worker.wait(timeout=120) == 0, f"worker {index} failed: {self.logs()}"

    def logs(self) -> str:
        return "\n".join(path.read_text() for path in sorted(self.tmp_path.glob("child-*.stderr")))

    def written(self, index: int) -> int:
        """Outputs worker `index` wrote (before it acknowledged their entries)."""
        path = self.tmp_path / f"out-{index}.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def model(self) -> dict[Any, Any]:
        with Cluster(self.servers) as cluster:
            return dict(cluster.snapshot())

    def outputs(self) -> list[list[int]]:
        return [
            json.loads(line)
            for index in range(WORKERS)
            for line in (self.tmp_path / f"out-{index}.jsonl").read_text().splitlines()
        ]
