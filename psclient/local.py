"""The embedded local cluster behind `transform` and `psclient run`.

It starts the shards and workers as child processes on loopback, with the very
command lines a deployment uses (`python -m psserver ...`, `python -m psworker
...`), reads the address each one prints, and always takes them all down again.
"""

from __future__ import annotations

import math
import numbers
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from psclient.children import START_TIMEOUT_S, ChildProcess, child_env, shard_argv, worker_argv
from psclient.consistency import consistency_name, parse_consistency
from psclient.errors import JobFailed, StreampsError
from psclient.rpc.serving import DEFAULT_CONNECT_TIMEOUT_S

# Without durability a local cluster restarts no shard, so its workers give up on
# a broken shard stream at once (`psworker --shard-timeout 0`) rather than wait for it.
LOCAL_SHARD_TIMEOUT_S = 0.0
# With durability a dead shard is restarted, which takes a new interpreter's start
# and the shard's recovery: its workers wait that long (psworker's own default).
DURABLE_SHARD_TIMEOUT_S = 60.0
DEFAULT_MAX_RESTARTS = 3
# How often the cluster looks for a dead child to restart.
WATCH_INTERVAL_S = 0.05
# A worker that ended with an exit code of its own is not restarted: 0, it finished;
# 1, it reported its failure (user code raised); 2, it refused its command line.
WORKER_EXIT_CODES = (0, 1, 2)
NOT_RESTARTED = "a worker that fails with its own error is not restarted"


def check_batching(batch_max_keys: int | None, batch_linger_ms: float | None) -> None:
    """Refuse batching knobs psworker would refuse (`--batch-max-keys`, `--batch-linger-ms`),
    before any child starts; None leaves the workers' default."""
    if batch_max_keys is not None and (
        isinstance(batch_max_keys, bool) or not isinstance(batch_max_keys, numbers.Integral) or batch_max_keys < 1
    ):
        raise ValueError(f"batch_max_keys must be an int of 1 or more, not {batch_max_keys!r}")
    if batch_linger_ms is not None and (
        isinstance(batch_linger_ms, bool)
        or not isinstance(batch_linger_ms, numbers.Real)
        or not (math.isfinite(batch_linger_ms) and batch_linger_ms >= 0)
    ):
        raise ValueError(f"batch_linger_ms must be a finite number of 0 or more, not {batch_linger_ms!r}")


def crashed(child: ChildProcess) -> bool:
    """The child died of a signal (SIGKILL, a segfault) or exited as psworker never does:
    a restart may help."""
    code = child.process.returncode
    return code is not None and (code < 0 or code not in WORKER_EXIT_CODES)


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
        batch_max_keys: int | None = None,
        batch_linger_ms: float | None = None,
        ps_logic_spec: str | None = None,
        consistency: str = "async",
        snapshot_every: float | None = None,
        snapshot_dir: Path | None = None,
    ):
        if num_workers < 1 or num_shards < 1:
            raise ValueError("a cluster needs at least one worker and one shard")
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be 0 or more, not {max_restarts}")
        check_batching(batch_max_keys, batch_linger_ms)
        self.logic_spec, self.init_spec, self.update_spec = logic_spec, init_spec, update_spec
        self.num_workers, self.num_shards = num_workers, num_shards
        self.pull_limit, self.on_error, self.log_level = pull_limit, on_error, log_level
        self.model_files = model_files  # one per shard: its --load
        # Each worker's --batch-max-keys and --batch-linger-ms; None: psworker's default.
        self.batch_max_keys, self.batch_linger_ms = batch_max_keys, batch_linger_ms
        self.ps_logic_spec = ps_logic_spec  # every shard's --logic
        self.consistency = consistency_name(parse_consistency(consistency))  # every child's --consistency
        # Every shard's --snapshot-every, and its --snapshot-dir (None: one in the cluster's temp dir).
        self.snapshot_every, self.snapshot_dir = snapshot_every, snapshot_dir
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
        self.worker_children: list[ChildProcess] = []
        # Children being restarted, by name: their new process does not listen yet.
        self._restarting: set[str] = set()
        self.servers: list[str] = []
        self.workers: list[str] = []
        self._owned_dir: Path | None = None
        # Set once a shard died past max_restarts or could not be restarted: the job's cause.
        self.failure: str | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._waiters: list[threading.Thread] = []  # one per restart: it waits for the new child's address

    def _shard_argv(self, shard: int, port: int = 0) -> list[str]:
        extra = ["--load", str(self.model_files[shard])] if self.model_files else []
        if self.durable:
            extra += ["--data-dir", str(self._shard_dir(shard))]
        if self.ps_logic_spec is not None:
            extra += ["--logic", self.ps_logic_spec]
        if self.consistency != "async":
            extra += ["--consistency", self.consistency, "--num-workers", str(self.num_workers)]
        if self.snapshot_every is not None:
            extra += ["--snapshot-every", repr(float(self.snapshot_every)), "--snapshot-dir", str(self._models_dir())]
        return shard_argv(shard, self.num_shards, self.init_spec, self.update_spec, self.log_level, *extra, port=port)

    def _models_dir(self) -> Path:
        if self.snapshot_dir is not None:
            return self.snapshot_dir
        parent = self.data_dir if self.data_dir is not None else self._owned_dir
        assert parent is not None
        return parent / "models"

    def _shard_dir(self, shard: int) -> Path:
        parent = self.data_dir if self.data_dir is not None else self._owned_dir
        assert parent is not None
        return parent / f"shard-{shard}"

    def _worker_argv(self, worker: int, port: int = 0) -> list[str]:
        extra = ["--pull-limit", str(self.pull_limit)] if self.pull_limit else []
        if self.batch_max_keys is not None:
            extra += ["--batch-max-keys", str(int(self.batch_max_keys))]
        if self.batch_linger_ms is not None:
            extra += ["--batch-linger-ms", repr(float(self.batch_linger_ms))]
        if self.consistency != "async":
            extra += ["--consistency", self.consistency]
        if self.durable:
            extra += ["--checkpoint-dir", str(self._checkpoint_dir())]
            extra += ["--connect-timeout", f"{self._worker_connect_timeout():g}"]
        return worker_argv(
            self.logic_spec, self.servers, worker, self.num_workers, "--port", str(port), "--on-error", self.on_error,
            "--shard-timeout", f"{self.shard_timeout:g}", "--job-id", self.job_id, *extra, log_level=self.log_level,
        )  # fmt: skip

    def _worker_connect_timeout(self) -> float:
        """How long a worker waits for each shard as it starts. A restarted worker of a durable
        cluster may start while a shard is being restarted too: it waits for it as long as a
        running worker would (--shard-timeout), not less."""
        return max(DEFAULT_CONNECT_TIMEOUT_S, self.shard_timeout) if self.durable else DEFAULT_CONNECT_TIMEOUT_S

    def _checkpoint_dir(self) -> Path:
        parent = self.data_dir if self.data_dir is not None else self._owned_dir
        assert parent is not None
        return parent / "checkpoints"

    def start(self) -> None:
        env = child_env()
        try:
            if self.data_dir is None and (
                self.durable or (self.snapshot_every is not None and self.snapshot_dir is None)
            ):
                self._owned_dir = Path(tempfile.mkdtemp(prefix="streamps-data-"))
            if self.durable:
                for i in range(self.num_shards):
                    self._shard_dir(i).mkdir(parents=True, exist_ok=True)
                # Checkpoints of an earlier job in a kept data dir are another job's (another
                # job id): this one's workers start afresh.
                shutil.rmtree(self._checkpoint_dir(), ignore_errors=True)
                self._checkpoint_dir().mkdir()
            self.shards = [ChildProcess(f"shard {i}", self._shard_argv(i), env) for i in range(self.num_shards)]
            self.children.extend(self.shards)
            self.servers = [shard.address(START_TIMEOUT_S) for shard in self.shards]
            workers = [ChildProcess(f"worker {i}", self._worker_argv(i), env) for i in range(self.num_workers)]
            self.worker_children = workers
            self.children.extend(workers)
            self.workers = [worker.address(START_TIMEOUT_S) for worker in workers]
            if self.durable:
                self._watcher = threading.Thread(target=self._watch, args=(env,), name="children", daemon=True)
                self._watcher.start()
        except BaseException:
            self.stop()
            raise

    def _watch(self, env: dict[str, str]) -> None:
        """Restart a shard that died on the same port with the same data dir (its workers
        reconnect and resend), and a worker that crashed on the same port with the same
        checkpoint dir (its feeder resends what followed its checkpoint, psclient/replay.py).
        Past max_restarts, or if the port was taken, fail the job.

        This thread only notices deaths and starts the new processes; each waits for its
        address on a thread of its own. A restarted worker announces itself only once it
        reached every shard, so a shard that dies meanwhile must be restarted while the
        worker waits for it, not after."""
        while not self._stopping.wait(WATCH_INTERVAL_S):
            for kind, children in (("shard", self.shards), ("worker", self.worker_children)):
                for index, child in enumerate(children):
                    if self.failure is not None:
                        return
                    reason = child.exit_reason()
                    if reason is None or (kind == "worker" and not crashed(child)):
                        continue
                    if not self._restart(kind, index, reason, env):
                        return

    def _restart(self, kind: str, index: int, reason: str, env: dict[str, str]) -> bool:
        """Start `kind index` again (it died of `reason`) and wait for its address on a
        thread; False when the job failed or the cluster is stopping."""
        children, addresses = (self.shards, self.servers) if kind == "shard" else (self.worker_children, self.workers)
        address = addresses[index]
        port = int(address.rsplit(":", 1)[1])
        name = f"{kind} {index}"
        with self._lock:
            if self._stopping.is_set() or self.failure is not None:
                return False
            if name in self._restarting:
                return True  # its waiting thread has not let go of it yet
            if self.restarts >= self.max_restarts:
                give_up = f"{reason}; no restart left (max_restarts={self.max_restarts})"
            else:
                give_up = None
                self.restarts += 1
                old = children[index]
                argv = self._shard_argv(index, port) if kind == "shard" else self._worker_argv(index, port)
                new = ChildProcess(name, argv, env)
                children[index] = new
                self.children[self.children.index(old)] = new
                self._restarting.add(name)
                waiter = threading.Thread(
                    target=self._await_restart, args=(new, address), name=f"restart {name}", daemon=True
                )
                self._waiters.append(waiter)
        if give_up is not None:
            self._fail(give_up)
            return False
        waiter.start()
        return True

    def _await_restart(self, new: ChildProcess, address: str) -> None:
        """Wait until the restarted child `new` listens on `address`; fail the job if it cannot."""
        port = address.rsplit(":", 1)[1]
        # A worker announces itself once it reached every shard, which may be restarting too.
        timeout = START_TIMEOUT_S + (self._worker_connect_timeout() if new.name.startswith("worker ") else 0.0)
        try:
            restarted = new.address(timeout)
        except StreampsError as exc:
            if self._stopping.is_set() or self.failure is not None:
                return
            if new.process.poll() is not None and crashed(new):
                # Killed again while it started: the watcher restarts it (one more restart).
                return
            self._fail(f"{new.name} cannot be restarted on {address}: {exc}")
            return
        finally:
            with self._lock:
                self._restarting.discard(new.name)
        if restarted.rsplit(":", 1)[1] != port:  # cannot happen with a fixed --port; never mislead clients
            self._fail(f"{new.name} was restarted on {restarted}, not on {address}")

    def wait_for_worker(self, index: int, timeout: float) -> bool:
        """Wait until worker `index` serves (it never died, or it was restarted): True; False
        if it finished and exited. JobFailed, one line, when it will not serve again: it
        failed with its own error, the job failed, or `timeout` passed."""
        deadline = time.monotonic() + timeout
        name = f"worker {index}"
        while True:
            if self.failure is not None:
                raise JobFailed(self.failure)
            if self._stopping.is_set():
                raise JobFailed(f"{name}: the local cluster was stopped")
            with self._lock:
                child, restarting = self.worker_children[index], name in self._restarting
            code = child.process.poll()
            if not restarting and code is None:
                return True
            if not restarting and code is not None and not crashed(child):
                if code == 0:
                    return False
                raise JobFailed(f"{child.exit_reason()}; {NOT_RESTARTED}")
            if time.monotonic() >= deadline:
                raise JobFailed(f"{name} was not restarted within {timeout:g} s")
            time.sleep(WATCH_INTERVAL_S / 2)

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
                if self.durable and (is_shard or crashed(child)):
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
            self._watcher.join()
            self._watcher = None
        for child in self.children:
            child.stop()
        # A restart in progress sees its child stopped and gives up at once.
        for waiter in self._waiters:
            waiter.join()
        self._waiters = []
        self.children = []
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
