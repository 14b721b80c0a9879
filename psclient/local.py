"""The embedded local cluster behind `transform` and `psclient run`.

It starts the shards and workers as child processes on loopback, with the very
command lines a deployment uses (`python -m psserver ...`, `python -m psworker
...`), reads the address each one prints, and always takes them all down again.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from psclient.children import START_TIMEOUT_S, ChildProcess, child_env, shard_argv, worker_argv
from psclient.errors import StreampsError

# Without durability a local cluster restarts no shard, so its workers give up on
# a broken shard stream at once (`psworker --shard-timeout 0`) rather than wait for it.
LOCAL_SHARD_TIMEOUT_S = 0.0
# With durability a dead shard is restarted, which takes a new interpreter's start
# and the shard's recovery: its workers wait that long (psworker's own default).
DURABLE_SHARD_TIMEOUT_S = 60.0
DEFAULT_MAX_RESTARTS = 3
# How often the cluster looks for a dead shard to restart.
WATCH_INTERVAL_S = 0.05
NOT_RESTARTED = "a local cluster restarts shards, not workers"


class LocalCluster:
    """`num_shards` shards and `num_workers` workers as child processes on 127.0.0.1."""

    def __init__(
        self,
        logic_spec: str,
        init_spec: str,
        update_spec: str,
        num_workers: int = 1,
        num_shards: int = 1,
        *,
        pull_limit: int | None = None,
        on_error: str = "fail",
        log_level: str = "WARNING",
        model_files: list[Path] | None = None,
        shard_timeout: float | None = None,
        job_id: str | None = None,
        durable: bool = False,
        data_dir: Path | None = None,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
    ):
        if num_workers < 1 or num_shards < 1:
            raise ValueError("a cluster needs at least one worker and one shard")
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be 0 or more, not {max_restarts}")
        self.logic_spec, self.init_spec, self.update_spec = logic_spec, init_spec, update_spec
        self.num_workers, self.num_shards = num_workers, num_shards
        self.pull_limit, self.on_error, self.log_level = pull_limit, on_error, log_level
        self.model_files = model_files  # one per shard: its --load
        # A data dir of the user's makes the shards durable too; it is kept.
        self.durable = durable or data_dir is not None
        self.data_dir = data_dir
        self.max_restarts = max_restarts if self.durable else 0
        self.restarts = 0
        if shard_timeout is None:
            shard_timeout = DURABLE_SHARD_TIMEOUT_S if self.durable else LOCAL_SHARD_TIMEOUT_S
        self.shard_timeout = shard_timeout
        # One job id for all its workers: worker i is `{job_id}-w{i}` to the shards.
        self.job_id = job_id or uuid.uuid4().hex[:12]
        self.children: list[ChildProcess] = []
        self.shards: list[ChildProcess] = []
        self.servers: list[str] = []
        self.workers: list[str] = []
        self._owned_dir: Path | None = None
        # Set once a shard died past max_restarts or could not be restarted: the job's cause.
        self.failure: str | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def _shard_argv(self, shard: int, port: int = 0) -> list[str]:
        extra = ["--load", str(self.model_files[shard])] if self.model_files else []
        if self.durable:
            extra += ["--data-dir", str(self._shard_dir(shard))]
        return shard_argv(shard, self.num_shards, self.init_spec, self.update_spec, self.log_level, *extra, port=port)

    def _shard_dir(self, shard: int) -> Path:
        parent = self.data_dir if self.data_dir is not None else self._owned_dir
        assert parent is not None
        return parent / f"shard-{shard}"

    def start(self) -> None:
        env = child_env()
        try:
            if self.durable:
                if self.data_dir is None:
                    self._owned_dir = Path(tempfile.mkdtemp(prefix="streamps-data-"))
                for i in range(self.num_shards):
                    self._shard_dir(i).mkdir(parents=True, exist_ok=True)
            self.shards = [ChildProcess(f"shard {i}", self._shard_argv(i), env) for i in range(self.num_shards)]
            self.children.extend(self.shards)
            self.servers = [shard.address(START_TIMEOUT_S) for shard in self.shards]
            extra = ["--pull-limit", str(self.pull_limit)] if self.pull_limit else []
            workers = [
                ChildProcess(
                    f"worker {i}",
                    worker_argv(
                        self.logic_spec,
                        self.servers,
                        i,
                        self.num_workers,
                        "--port",
                        "0",
                        "--on-error",
                        self.on_error,
                        "--shard-timeout",
                        f"{self.shard_timeout:g}",
                        "--job-id",
                        self.job_id,
                        *extra,
                        log_level=self.log_level,
                    ),
                    env,
                )
                for i in range(self.num_workers)
            ]
            self.children.extend(workers)
            self.workers = [worker.address(START_TIMEOUT_S) for worker in workers]
            if self.durable:
                self._watcher = threading.Thread(target=self._watch_shards, args=(env,), name="shards", daemon=True)
                self._watcher.start()
        except BaseException:
            self.stop()
            raise

    def _watch_shards(self, env: dict[str, str]) -> None:
        """Restart a shard that died on the same port with the same data dir; its workers
        reconnect and resend. Past max_restarts, or if the port was taken, fail the job."""
        while not self._stopping.wait(WATCH_INTERVAL_S):
            for index, shard in enumerate(self.shards):
                reason = shard.exit_reason()
                if reason is None:
                    continue
                if self.restarts >= self.max_restarts:
                    self._fail(f"{reason}; no restart left (max_restarts={self.max_restarts})")
                    return
                if not self._restart(index, env):
                    return

    def _restart(self, index: int, env: dict[str, str]) -> bool:
        address = self.servers[index]
        port = int(address.rsplit(":", 1)[1])
        with self._lock:
            if self._stopping.is_set():
                return False
            self.restarts += 1
            old = self.shards[index]
            new = ChildProcess(f"shard {index}", self._shard_argv(index, port), env)
            self.shards[index] = new
            self.children[self.children.index(old)] = new
        try:
            restarted = new.address(START_TIMEOUT_S)
        except StreampsError as exc:
            if not self._stopping.is_set():
                self._fail(f"shard {index} cannot be restarted on {address}: {exc}")
            return False
        if restarted.rsplit(":", 1)[1] != str(port):  # cannot happen with a fixed --port; never mislead workers
            self._fail(f"shard {index} was restarted on {restarted}, not on {address}")
            return False
        return True

    def _fail(self, reason: str) -> None:
        """Record why the job failed and end the workers, which would wait for the shard,
        so that the stream breaks now and the job names this cause."""
        with self._lock:
            self.failure = reason
            for child in self.children:
                if not child.name.startswith("shard "):
                    child.kill()

    def unexpected_exit(self, *, count_worker_exits: bool, wait: float = 0.0) -> str | None:
        """Which child ended on its own and how, looking for up to `wait` seconds; else None.

        A shard never ends on its own, nor does any child by a signal we did not
        send: either is the cause of whatever failed. A worker that finished its
        share exits with 0, and one that reported its own failure through its
        stream exits with 1 once it was read: `count_worker_exits` says whether
        a worker's non-zero exit is news.
        """
        deadline = time.monotonic() + wait
        while True:
            if self.failure is not None:
                return self.failure
            for child in list(self.children):
                reason = child.exit_reason()
                if reason is None:
                    continue
                code = child.process.returncode
                is_shard = child.name.startswith("shard ")
                if is_shard and self.durable:
                    continue  # restarted, or given up on: then `failure` says so
                if code < 0 or is_shard or (count_worker_exits and code > 0):
                    return f"{reason}; {NOT_RESTARTED}" if self.durable else reason
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL after a grace period)."""
        with self._lock:
            self._stopping.set()
            for child in self.children:  # all at once, then wait for each
                child.terminate()
        if self._watcher is not None:
            # A restart in progress sees its child stopped and gives up at once.
            self._watcher.join()
            self._watcher = None
        for child in self.children:
            child.stop()
        self.children = []
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
