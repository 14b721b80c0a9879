"""A whole job on an embedded local cluster: `transform` and `psclient run`.

Each starts a LocalCluster (psclient/local.py), streams the records through
it, and yields every output and then the final model; a failure names the
child whose death caused it (its pid and signal) rather than the broken
stream that showed it.
"""

from __future__ import annotations

import numbers
import tempfile
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path
from typing import Any

from psclient.cluster import Cluster, WorkerReported
from psclient.consistency import parse_consistency
from psclient.either import Left, Right
from psclient.errors import JobFailed, StreampsError
from psclient.local import DEFAULT_MAX_RESTARTS, LocalCluster, check_batching
from psclient.model_files import write_model_files
from psclient.plugins import ship
from psclient.progress import JobProgress
from psclient.specs import check_specs
from psclient.wire.partition import Id

# After a stream broke, how long to look for the child whose death broke it: the
# socket closes as the process dies, a moment before it can be reaped.
DEATH_NOTICE_S = 2.0
# A worker's own report of a failure (of a shard, say) comes well after a death
# behind it, so a short look is enough.
REPORTED_DEATH_NOTICE_S = 0.25


def run_local_job(
    records: Iterable[Any],
    logic_spec: str,
    init_spec: str,
    update_spec: str,
    num_workers: int,
    num_shards: int,
    *,
    iteration_wait_time: float | None = None,
    partition_by: Callable[[Any], Hashable] | None = None,
    pull_limit: int | None = None,
    on_error: str = "fail",
    progress: bool | None = None,
    model_files: list[Path] | None = None,
    shard_timeout: float | None = None,
    durable: bool = False,
    data_dir: Path | None = None,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    batch_max_keys: int | None = None,
    batch_linger_ms: float | None = None,
    ps_logic_spec: str | None = None,
    consistency: str = "async",
    snapshot_every: float | None = None,
    snapshot_dir: Path | None = None,
    live: bool = True,
    stop: threading.Event | None = None,
) -> Iterator[Left[Any] | Right[Any]]:
    """Start a local cluster, run the job, yield its stream, tear everything down.

    `progress` shows a live bar on stderr (None: when stderr is a terminal). If a
    child dies (a signal, the out-of-memory killer, a crash), JobFailed names it
    and how it ended, rather than the broken stream it leaves behind. With
    `durable` (or a `data_dir`), a dead shard or worker is restarted up to
    `max_restarts` times in the job instead (see LocalCluster). With `snapshot_every`,
    the shards' model snapshots come among the outputs (unless not `live`: then only
    in their files). Once `stop` is set, the input ends after the records read so
    far: the job ends as if its input had, with every one of them in the model.
    """
    bar = JobProgress(progress)  # before any child starts: nothing to clean up if it fails
    cluster = LocalCluster(
        logic_spec,
        init_spec,
        update_spec,
        num_workers,
        num_shards,
        pull_limit=pull_limit,
        on_error=on_error,
        model_files=model_files,
        shard_timeout=shard_timeout,
        durable=durable,
        data_dir=data_dir,
        max_restarts=max_restarts,
        batch_max_keys=batch_max_keys,
        batch_linger_ms=batch_linger_ms,
        ps_logic_spec=ps_logic_spec,
        consistency=consistency,
        snapshot_every=snapshot_every,
        snapshot_dir=snapshot_dir,
    )
    try:
        with (
            cluster,
            Cluster(cluster.servers, cluster.workers, restarts=cluster if cluster.durable else None) as client,
        ):
            records = bar.count(records)
            try:
                for item in client.stream(
                    records,
                    partition_by=partition_by,
                    iteration_wait_time=iteration_wait_time,
                    server_logic=ps_logic_spec is not None,
                    live=live and snapshot_every is not None,
                    stop=stop,
                ):
                    if isinstance(item, Left):
                        bar.output()
                    yield item
            except StreampsError as exc:
                reported = isinstance(exc, WorkerReported)
                wait = REPORTED_DEATH_NOTICE_S if reported else DEATH_NOTICE_S
                died = cluster.unexpected_exit(count_worker_exits=not reported, wait=wait)
                if died:
                    raise JobFailed(died) from exc
                raise
    finally:
        bar.close()


def _spec(obj: Any, directory: Path, name: str) -> str:
    return obj if isinstance(obj, str) else ship(obj, directory, name)


def transform(
    training_data: Iterable[Any],
    worker_logic: Any,
    param_init: Callable[[Id], Any] | str,
    param_update: Callable[[Any, Any], Any] | str,
    worker_parallelism: int = 1,
    ps_parallelism: int = 1,
    iteration_wait_time: float | None = None,
    *,
    partition_by: Callable[[Any], Hashable] | None = None,
    progress: bool | None = None,
    model: Iterable[tuple[Id, Any]] | None = None,
    shard_timeout: float | None = None,
    durable: bool = False,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    data_dir: str | Path | None = None,
    batch_max_keys: int | None = None,
    batch_linger_ms: float | None = None,
    ps_logic: Any = None,
    consistency: str = "async",
    snapshot_every: float | None = None,
    snapshot_dir: str | Path | None = None,
) -> Iterator[Left[Any] | Right[Any]]:
    """Run `worker_logic` over `training_data` on an embedded local cluster.

    Yields `Left(output)` for every worker output as it arrives, then, once every
    worker has finished, `Right((id, value))` for every parameter. When the
    iterator is exhausted or closed, every child process is gone.

    `worker_logic` is a WorkerLogic instance (each worker gets a copy) or a
    zero-argument factory; `param_init` and `param_update` are built-in spec
    strings or callables. Callables are shipped to the children with cloudpickle
    through private local files; nothing is pickled over the network.

    `progress` shows a live bar of outputs and records on stderr, like `psclient
    run` (None: when stderr is a terminal). If a child process dies, JobFailed
    names it: "worker 1 (pid N) was killed by signal 9 (SIGKILL)". Without
    `durable` the cluster restarts no child, so a worker gives up on a broken
    shard stream at once; `shard_timeout` makes it reconnect and resend for that
    many seconds instead (`psworker --shard-timeout`).

    `durable=True` gives each shard a data dir (`psserver --data-dir`: a log of
    acked pushes and snapshots) in a temporary directory removed at the end, or
    under `data_dir` (which implies `durable`), kept. A shard that dies is then
    restarted on its port from its data dir, at most `max_restarts` times in the
    job; its workers reconnect and resend (`shard_timeout` defaults to 60 s), and
    the model is exactly the fault-free one. So is a worker that dies of a signal
    or a crash, from its checkpoint (`psworker --checkpoint-dir`), and the records
    fed to it since are fed again: their outputs come again (at least once), their
    pushes count once. One more death fails the job with JobFailed naming the
    child; a worker whose own code fails is not restarted.

    `model` warm-starts the job (transformWithModelLoad): an iterable of (id,
    value) pairs, such as the `Right`s of an earlier job. Each shard loads its
    share (`psserver --load`) before any worker starts; ids never pushed keep
    their values, and the others fold this job's deltas into them.

    `batch_max_keys` and `batch_linger_ms` are each worker's `--batch-max-keys`
    and `--batch-linger-ms`: a worker sends a shard one message once its buffer
    holds that many keys, or once a buffered key has waited that many
    milliseconds (0: at once). None keeps the workers' default (4,096 keys, 2 ms).

    `ps_logic` gives every shard a server logic (`psserver --logic`): a
    psserver.ServerLogic subclass, factory or instance (each shard gets its own,
    shipped like `worker_logic`), or a `module:Class` string. The logic handles
    the pulls and pushes and keeps its own state (`param_init` is still what its
    `ps.init(id)` gives); the job's `Right` values are then what it passed to
    `ps.output`, after its close(ps), shard by shard. It cannot be combined
    with `durable`, `data_dir` or `model`.

    `consistency` is "async" (the default: no worker waits for another), "bsp",
    or "ssp:S": a shard holds back the answers to the pulls of a worker whose
    clock (`ps.advance_clock()`) is more than S ahead of the slowest unfinished
    worker's (bsp: S = 0). It cannot be combined with `ps_logic` or `durable`.

    `snapshot_every` makes each shard snapshot its model every that many seconds
    in which a push arrived (`psserver --snapshot-every`) and once more at the end:
    the snapshots come among the outputs as they are taken, each shard's as a run
    of `Right((id, value))`, before the final model; for an endless
    `training_data`, the model as it trains. Their files (what `model=` and
    `psserver --load` read) go to `snapshot_dir`, kept, or to a temporary one.

    Raises ValueError (SpecError) at once, before any process starts, for an init
    or update spec the shards would refuse, or batching knobs the workers would.
    """
    # Not a generator itself, so that a bad spec fails the call, not the first next().
    check_specs(param_init, param_update)
    check_batching(batch_max_keys, batch_linger_ms)
    if ps_logic is not None and (durable or data_dir is not None or model is not None):
        what = "model" if model is not None else "durable or data_dir"
        raise ValueError(f"ps_logic cannot be combined with {what}: a server logic keeps its own state")
    if snapshot_every is not None:
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, numbers.Real) or not snapshot_every > 0:
            raise ValueError(f"snapshot_every must be a positive number of seconds, not {snapshot_every!r}")
        if ps_logic is not None:
            raise ValueError("snapshot_every cannot be combined with ps_logic: a server logic keeps its own state")
    if parse_consistency(consistency) is not None and (ps_logic is not None or durable or data_dir is not None):
        what = "ps_logic" if ps_logic is not None else "durable or data_dir"
        raise ValueError(f"consistency {consistency!r} cannot be combined with {what}")
    return _transform_job(
        training_data,
        worker_logic,
        param_init,
        param_update,
        worker_parallelism,
        ps_parallelism,
        iteration_wait_time=iteration_wait_time,
        partition_by=partition_by,
        progress=progress,
        model=model,
        shard_timeout=shard_timeout,
        durable=durable,
        max_restarts=max_restarts,
        data_dir=Path(data_dir) if data_dir is not None else None,
        batch_max_keys=batch_max_keys,
        batch_linger_ms=batch_linger_ms,
        ps_logic=ps_logic,
        consistency=consistency,
        snapshot_every=snapshot_every,
        snapshot_dir=Path(snapshot_dir) if snapshot_dir is not None else None,
    )


def _transform_job(
    training_data: Iterable[Any],
    worker_logic: Any,
    param_init: Callable[[Id], Any] | str,
    param_update: Callable[[Any, Any], Any] | str,
    worker_parallelism: int,
    ps_parallelism: int,
    *,
    iteration_wait_time: float | None,
    partition_by: Callable[[Any], Hashable] | None,
    progress: bool | None,
    model: Iterable[tuple[Id, Any]] | None,
    shard_timeout: float | None,
    durable: bool,
    max_restarts: int,
    data_dir: Path | None,
    batch_max_keys: int | None,
    batch_linger_ms: float | None,
    ps_logic: Any,
    consistency: str,
    snapshot_every: float | None,
    snapshot_dir: Path | None,
) -> Iterator[Left[Any] | Right[Any]]:
    with tempfile.TemporaryDirectory(prefix="streamps-") as tmp:
        directory = Path(tmp)
        model_files = write_model_files(model, ps_parallelism, directory) if model is not None else None
        yield from run_local_job(
            training_data,
            _spec(worker_logic, directory, "logic"),
            _spec(param_init, directory, "init"),
            _spec(param_update, directory, "update"),
            worker_parallelism,
            ps_parallelism,
            iteration_wait_time=iteration_wait_time,
            partition_by=partition_by,
            progress=progress,
            model_files=model_files,
            shard_timeout=shard_timeout,
            durable=durable,
            data_dir=data_dir,
            max_restarts=max_restarts,
            batch_max_keys=batch_max_keys,
            batch_linger_ms=batch_linger_ms,
            ps_logic_spec=_spec(ps_logic, directory, "ps_logic") if ps_logic is not None else None,
            consistency=consistency,
            snapshot_every=snapshot_every,
            snapshot_dir=snapshot_dir,
        )
