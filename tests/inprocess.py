"""A whole cluster in the test process: real shard and worker services over loopback gRPC.

Starting a shard or worker process costs seconds (a new interpreter and its
imports); a property test that runs hundreds of jobs cannot pay that per job.
Here the very servicers `psserver` serves (psserver.__main__.shard_servicer:
plain, clocked or with a server logic) run on one event loop thread as aio
servers on 127.0.0.1 port 0, and each worker is the real `WorkerRuntime` with
its own I/O loop and Exchange streams, behind the real Worker service (Feed,
Outputs, Status) as `psworker` serves it without --input. A client drives the
job through those RPCs, as `transform` does; nothing is called around the wire.

What a process would own is per cluster here: `stop` ends every server,
stream, loop and thread it started, and `leftovers` says if any did not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from psclient.consistency import parse_consistency
from psclient.rpc import serving
from psclient.rpc.connection import EventLoopThread
from psclient.rpc.serving import BoundAioServer, BoundServer, build_aio_server
from psclient.specs import make_init, make_update
from psclient.wire.proto import shard_pb2_grpc
from psserver import ServerLogic
from psserver.__main__ import SERVICE_NAME, shard_servicer
from psserver.logic import LogicStore
from psserver.service import ShardServicer
from psserver.store import ParameterStore
from psworker import WorkerLogic
from psworker.runtime import WorkerRuntime
from psworker.service import OutputBuffer, build_worker_server

HOST = "127.0.0.1"
# Seconds in-flight RPCs get when a server stops (psserver and psworker give 5; a
# finished job has none, and a failed one need not wait).
STOP_GRACE_S = 0.5
START_TIMEOUT_S = 10.0
FD_DIR = "/proc/self/fd"


@dataclass(frozen=True)
class GrpcLimits:
    """gRPC limits of every channel and server a job opens (psclient.rpc.serving's options).

    `max_message_bytes` replaces MAX_MESSAGE_BYTES on both sides. `window_bytes`
    sets the HTTP/2 flow-control window (gRPC's "lookahead" with its automatic
    growth, the BDP probe, turned off), so a reader that does not read stops the
    writer after that many bytes.
    """

    max_message_bytes: int | None = None
    window_bytes: int | None = None

    def options(self) -> list[tuple[str, int]]:
        options = []
        if self.max_message_bytes is not None:
            options += [
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
            ]
        if self.window_bytes is not None:
            options += [("grpc.http2.lookahead_bytes", self.window_bytes), ("grpc.http2.bdp_probe", 0)]
        return options


@contextlib.contextmanager
def grpc_limits(limits: GrpcLimits) -> Iterator[None]:
    """Apply `limits` to every channel and server opened meanwhile, then restore the defaults.

    The option lists are changed in place: every module that imported them (the
    worker's shard connections, the clients, the server factories) reads them
    when it opens a channel or builds a server.
    """
    extra = limits.options()
    names = {name for name, _ in extra}
    saved = [(options, list(options)) for options in (serving.CHANNEL_OPTIONS, serving.SERVER_OPTIONS)]
    for options, kept in saved:
        options[:] = [option for option in kept if option[0] not in names] + extra
    try:
        yield
    finally:
        for options, kept in saved:
            options[:] = kept


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir(FD_DIR)}


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"{FD_DIR}/{fd}")
    except OSError:
        return "closed since"


@dataclass
class _Shard:
    servicer: ShardServicer
    bound: BoundAioServer


@dataclass
class _Worker:
    runtime: WorkerRuntime
    outputs: OutputBuffer
    bound: BoundServer
    thread: threading.Thread
    done: threading.Event = field(default_factory=threading.Event)


class InProcessCluster:
    """`num_shards` shards and `num_workers` workers of one job, in this process.

    `logic` and `server_logic` are factories: each worker and each shard gets
    its own instance, as each process would. The workers are configured as
    psworker's flags would (`pull_limit`, `max_batch`, `linger_s`,
    `consistency`); like a LocalCluster's, they give up on a broken shard
    stream at once (shard_timeout 0).
    """

    def __init__(
        self,
        logic: Callable[[], WorkerLogic],
        num_workers: int = 1,
        num_shards: int = 1,
        *,
        init: str = "const:0",
        update: str = "add",
        server_logic: Callable[[], ServerLogic] | None = None,
        consistency: str = "async",
        pull_limit: int | None = None,
        max_batch: int = serving.DEFAULT_BATCH_MAX_KEYS,
        linger_s: float = serving.DEFAULT_BATCH_LINGER_MS / 1000,
    ):
        self.logic, self.num_workers, self.num_shards = logic, num_workers, num_shards
        self.init, self.update = make_init(init), make_update(update)
        self.server_logic = server_logic
        self.consistency = consistency
        staleness = parse_consistency(consistency)
        self.clocks = None if staleness is None else (staleness, num_workers)
        if self.clocks is not None and server_logic is not None:
            raise ValueError("a server logic answers pulls itself: it cannot run under bsp or ssp (psserver refuses)")
        self.pull_limit, self.max_batch, self.linger_s = pull_limit, max_batch, linger_s
        self._baseline = set(threading.enumerate())
        self._fds = open_fds()
        self._loop: EventLoopThread | None = None
        self.shards: list[_Shard] = []
        self.workers: list[_Worker] = []

    @property
    def servers(self) -> list[str]:
        return [shard.bound.address for shard in self.shards]

    @property
    def worker_addresses(self) -> list[str]:
        return [worker.bound.address for worker in self.workers]

    # -- starting ----------------------------------------------------------------

    def start(self) -> None:
        try:
            self._loop = EventLoopThread("shards")
            for index in range(self.num_shards):
                self.shards.append(self._loop.run(self._start_shard(index), timeout=START_TIMEOUT_S))
            for index in range(self.num_workers):
                self.workers.append(self._start_worker(index))
        except BaseException:
            self.stop()
            raise

    def _store(self, index: int) -> ParameterStore:
        if self.server_logic is None:
            return ParameterStore(self.init, self.update)
        store = LogicStore(self.server_logic(), "in-process", self.init, self.update, index, self.num_shards)
        store.open()
        return store

    async def _start_shard(self, index: int) -> _Shard:
        servicer = shard_servicer(self._store(index), index, self.num_shards, None, self.clocks)
        bound = build_aio_server(
            lambda server: shard_pb2_grpc.add_ParameterShardServicer_to_server(servicer, server),
            [SERVICE_NAME],
            HOST,
            0,
        )
        await bound.server.start()
        await bound.set_serving(True)
        return _Shard(servicer, bound)

    def _start_worker(self, index: int) -> _Worker:
        outputs = OutputBuffer()
        runtime = WorkerRuntime(
            self.logic(),
            self.servers,
            index,
            self.num_workers,
            emit=outputs.put,
            pull_limit=self.pull_limit,
            max_batch=self.max_batch,
            linger_s=self.linger_s,
            shard_timeout=0.0,
            job_id=f"inproc{id(self):x}",
            pending_outputs=outputs.pending,
            consistency=self.consistency,
        )
        bound = build_worker_server(runtime, outputs, HOST, 0)
        try:
            runtime.connect()
            bound.server.start()
            bound.set_serving(True)
        except BaseException:
            bound.server.stop(None).wait()
            raise
        worker = _Worker(runtime, outputs, bound, threading.Thread())

        def run_logic() -> None:  # as psworker's _serve_feed: the error stays in runtime.error
            try:
                runtime.run()
            except Exception:
                pass
            finally:
                outputs.close()
                worker.done.set()

        worker.thread = threading.Thread(target=run_logic, name=f"logic-{index}", daemon=True)
        worker.thread.start()
        return worker

    # -- stopping ----------------------------------------------------------------

    def stop(self) -> None:
        """Stop every worker and shard, whatever state the job is in, and their threads."""
        for worker in self.workers:
            if not worker.done.is_set():
                worker.runtime.fail(f"worker {worker.runtime.worker_index}: the in-process cluster was stopped")
        for worker in self.workers:
            worker.thread.join(timeout=30)
            worker.bound.set_serving(False)
            worker.bound.server.stop(STOP_GRACE_S).wait()
        self.workers = []
        if self._loop is not None:
            if self.shards:
                with contextlib.suppress(Exception):
                    self._loop.run(self._stop_shards(), timeout=30)
            self._loop.close()
            self._loop = None
        self.shards = []

    async def _stop_shards(self) -> None:
        for shard in self.shards:
            await shard.bound.set_serving(False)
            shard.servicer.stop_streams()
        await asyncio.gather(*(shard.bound.server.stop(STOP_GRACE_S) for shard in self.shards))

    def leftovers(self, wait_s: float = 5.0) -> list[str]:
        """What was opened since this cluster was made and is still open: the names of
        threads still alive, and file descriptors (sockets) still open, after waiting up
        to `wait_s` for them to end."""
        deadline = time.monotonic() + wait_s
        while True:
            threads = [t.name for t in threading.enumerate() if t not in self._baseline and t.is_alive()]
            fds = open_fds() - self._fds
            if not (threads or fds) or time.monotonic() >= deadline:
                return sorted(threads) + [f"fd {fd} ({_fd_target(fd)})" for fd in sorted(fds)]
            time.sleep(0.05)

    def __enter__(self) -> InProcessCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
