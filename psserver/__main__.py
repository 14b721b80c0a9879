"""`psserver`: run one shard until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import click

from psclient.cli.options import (
    consistency_option,
    env,
    fail,
    listen_options,
    process_options,
    security_options,
    spec_options,
)
from psclient.cli.process import StopSignal, announce, configure_logging, start_metrics
from psclient.consistency import consistency_name, parse_consistency
from psclient.errors import SpecError
from psclient.rpc.security import current as current_security
from psclient.rpc.serving import build_aio_server
from psclient.specs import UserFunctionError, make_init, make_update
from psclient.wire.proto import shard_pb2, shard_pb2_grpc
from psserver.clocks import DEFAULT_HOLD_TIMEOUT_S, ClockedShardServicer
from psserver.durability import DEFAULT_SNAPSHOT_INTERVAL_S, DataDirError, Durability
from psserver.durable_service import DurableShardServicer
from psserver.logic import LogicStore, load_server_logic
from psserver.logic_service import LogicShardServicer
from psserver.memory import pin_mmap_threshold
from psserver.model_snapshots import DEFAULT_KEEP, ModelSnapshots, SnapshotPlan
from psserver.service import STOP_DRAIN_S, STOP_IDLE_S, ShardServicer
from psserver.store import ParameterStore
from psserver.warmstart import LoadError, load_model

# Seconds in-flight RPCs get to finish after SIGTERM before they are cancelled.
STOP_GRACE_S = 5.0
SERVICE_NAME = shard_pb2.DESCRIPTOR.services_by_name["ParameterShard"].full_name


def shard_servicer(
    store: ParameterStore,
    shard: int,
    num_shards: int,
    durability: Durability | None,
    clocks: tuple[int, int] | None = None,
    hold_timeout: float = DEFAULT_HOLD_TIMEOUT_S,
) -> ShardServicer:
    """The servicer for this store, data dir and consistency (`clocks`: (staleness, num_workers))."""
    if isinstance(store, LogicStore):
        return LogicShardServicer(store, shard, num_shards)
    if clocks is not None:
        staleness, num_workers = clocks
        return ClockedShardServicer(
            store,
            shard,
            num_shards,
            durability,
            consistency=consistency_name(staleness),
            staleness=staleness,
            num_workers=num_workers,
            hold_timeout=hold_timeout,
        )
    if durability is None:
        return ShardServicer(store, shard, num_shards)
    return DurableShardServicer(store, shard, num_shards, durability)


async def serve(
    store: ParameterStore,
    shard: int,
    num_shards: int,
    host: str,
    port: int,
    durability: Durability | None,
    clocks: tuple[int, int] | None = None,
    hold_timeout: float = DEFAULT_HOLD_TIMEOUT_S,
    snapshot_plan: SnapshotPlan | None = None,
) -> None:
    """Serve until stopped; `clocks` is (staleness, num_workers) for a consistency other than async,
    `snapshot_plan` where and how often to snapshot the model (--snapshot-every)."""
    log = logging.getLogger("streamps")
    servicer = shard_servicer(store, shard, num_shards, durability, clocks, hold_timeout)
    model_snapshots = None
    if snapshot_plan is not None:
        model_snapshots = servicer.model_snapshots = ModelSnapshots(store, shard, snapshot_plan, servicer.push_count)
    if durability is not None:
        try:
            durability.start()
        except OSError as exc:  # the snapshot of a --load model, or the first log segment
            fail(f"shard {shard} cannot write to its data dir {durability.directory}: {exc}", 1)
    try:
        bound = build_aio_server(
            lambda server: shard_pb2_grpc.add_ParameterShardServicer_to_server(servicer, server),
            [SERVICE_NAME],
            host,
            port,
        )
    except OSError as exc:
        fail(str(exc), 2)
    stop = StopSignal()
    await bound.server.start()
    await bound.set_serving(True)
    announce(bound)
    log.info("security: %s", current_security().describe())
    log.info(
        "serving shard %d/%d on %s (init %s, update %s%s)",
        shard,
        num_shards,
        bound.address,
        store.init.spec,
        store.update.spec,
        f", server logic {store.spec}" if isinstance(store, LogicStore) else "",
    )
    if clocks is not None:
        log.info("consistency %s over %d workers", consistency_name(clocks[0]), clocks[1])
    if durability is not None:
        log.info(
            "data dir %s (%s; snapshots every %g s)",
            durability.directory,
            "fsync before each ack" if durability.durable else "no fsync",
            durability.snapshot_interval,
        )
    if model_snapshots is not None:
        log.info("model snapshots every %g s to %s", model_snapshots.every, model_snapshots.directory)
    snapshots = asyncio.ensure_future(durability.run_snapshots()) if durability is not None else None
    periodic = asyncio.ensure_future(model_snapshots.run()) if model_snapshots is not None else None
    ended = 0
    final = ""
    try:
        while not stop.is_set() and (durability is None or durability.wal.error is None):
            await asyncio.sleep(StopSignal.POLL_S)
    finally:
        await bound.set_serving(False)
        ended = servicer.stop_streams()
        if model_snapshots is not None and periodic is not None:
            # The final model once the job's streams applied what reached them, sent
            # to the watchers before the server's stop cancels their calls.
            model_snapshots.stop()
            await periodic
            await servicer.streams_ended(STOP_DRAIN_S + STOP_IDLE_S)
            final = await model_snapshots.finish()
        # Waits for the streams, which apply and ack what reaches them, then end.
        await bound.server.stop(STOP_GRACE_S)
        if durability is not None and snapshots is not None:
            durability.stop_snapshots()
            await snapshots
            if durability.wal.error is None and stop.is_set():
                final += await _final_snapshot(durability)
            await durability.close()
    if durability is not None and durability.wal.error is not None:
        # Pushes it applied may be missing from the log: only a restart (recovery) is safe.
        fail(f"shard {shard} cannot write its log in {durability.directory}: {durability.wal.error}")
    cause = signal.Signals(stop.signum).name if stop.signum is not None else "request"
    log.info("stopped on %s; ended %d open streams%s", cause, ended, final)


async def _final_snapshot(durability: Durability) -> str:
    """Snapshot what the shard holds, so that a restart replays no log; say so for the stop line."""
    if not durability.changed_since_snapshot():
        return "; nothing logged since the last snapshot"
    try:
        params, size = await durability.snapshot(quiet=True)
    except OSError as exc:  # the log still holds every acked push: the restart replays it
        logging.getLogger("streamps").error("final snapshot to %s failed: %s", durability.directory, exc)
        return "; no final snapshot (the log is kept)"
    return f"; snapshot of {params} parameters ({size} bytes), log emptied"


@click.command("psserver", context_settings={"show_default": True})
@click.option("--shard", type=click.IntRange(min=0), required=True, **env("SHARD"), help="This shard's index.")
@click.option(
    "--num-shards", type=click.IntRange(min=1), required=True, **env("NUM_SHARDS"), help="Shards in the cluster."
)
@listen_options
@spec_options
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),  # checked by the shard, which says what is wrong in one line
    default=None,
    **env("DATA_DIR"),
    help="Keep a write-ahead log and snapshots here and recover from them on start (the directory must exist).",
)
@click.option(
    "--durable/--no-durable",
    default=None,
    **env("DURABLE"),
    help="With --data-dir: fsync the log before acknowledging a push (default), or only write it "
    "(survives a killed shard, not a crashed machine).",
)
@click.option(
    "--snapshot-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    **env("SNAPSHOT_INTERVAL"),
    help=f"With --data-dir: seconds between snapshots, after which the log is truncated "
    f"[default: {DEFAULT_SNAPSHOT_INTERVAL_S:g}].",
)
@click.option(
    "--load",
    "load_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    **env("LOAD"),
    help="Start from this model (JSON lines of psclient snapshot); ids of other shards are skipped. "
    "Ignored when --data-dir already holds a shard's state.",
)
@click.option(
    "--snapshot-every",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    **env("SNAPSHOT_EVERY"),
    help="Every this many seconds in which a push arrived, write the model to --snapshot-dir as a file "
    "--load reads and stream it to Watch callers (Cluster.stream shows it as Right values); and once more at a stop.",
)
@click.option(
    "--snapshot-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    **env("SNAPSHOT_DIR"),
    help="With --snapshot-every: where the model files go (created if missing) [default: DATA_DIR/models].",
)
@click.option(
    "--snapshot-keep",
    type=click.IntRange(min=1),
    default=DEFAULT_KEEP,
    **env("SNAPSHOT_KEEP"),
    help="With --snapshot-every: how many of this shard's newest model files to keep.",
)
@click.option(
    "--logic",
    "logic_spec",
    default=None,
    # Not STREAMPS_LOGIC: that is the workers' --logic, set for every pod of a deployment.
    **env("SERVER_LOGIC"),
    help="A ServerLogic (module:Class, a factory or an instance) that handles this shard's pulls and pushes "
    "and keeps its own state, instead of the store with --init and --update.",
)
@consistency_option
@click.option(
    "--num-workers",
    type=click.IntRange(min=1),
    default=None,
    **env("NUM_WORKERS"),
    help="Workers in the job: needed with a --consistency other than async.",
)
@click.option(
    "--hold-timeout",
    type=click.FloatRange(min=0),
    default=DEFAULT_HOLD_TIMEOUT_S,
    **env("HOLD_TIMEOUT"),
    help="With --consistency bsp|ssp:S: seconds a pull may stay held back by a worker that has no stream "
    "to the shard (killed, or never started) before the pull fails with one line naming it; 0: wait for good.",
)
@process_options
@security_options
def main(
    shard: int,
    num_shards: int,
    host: str,
    port: int,
    init_spec: str,
    update_spec: str,
    data_dir: Path | None,
    durable: bool | None,
    snapshot_interval: float | None,
    load_path: Path | None,
    snapshot_every: float | None,
    snapshot_dir: Path | None,
    snapshot_keep: int,
    logic_spec: str | None,
    consistency: str,
    num_workers: int | None,
    hold_timeout: float,
    log_level: str,
    log_format: str,
    metrics_port: int | None,
) -> None:
    """Serve one shard of the parameter server."""
    if shard >= num_shards:
        fail(f"--shard {shard} must be below --num-shards {num_shards}", 2)
    if data_dir is None and (durable is not None or snapshot_interval is not None):
        flag = "--snapshot-interval" if snapshot_interval is not None else "--durable/--no-durable"
        fail(f"{flag} needs --data-dir", 2)
    if logic_spec is not None and (data_dir is not None or load_path is not None):
        fail(f"--logic cannot be used with {'--data-dir' if data_dir is not None else '--load'}: "
             "a server logic keeps its own state, which the shard does not log or load", 2)  # fmt: skip
    clocks = _clocks(consistency, num_workers, logic_spec is not None)
    snapshot_plan = _snapshot_plan(snapshot_every, snapshot_dir, snapshot_keep, data_dir, logic_spec is not None)
    try:
        init, update = make_init(init_spec), make_update(update_spec)
        store = ParameterStore(init, update)
        if logic_spec is not None:
            store = LogicStore(load_server_logic(logic_spec), logic_spec, init, update, shard, num_shards)
    except SpecError as exc:
        fail(str(exc), 2)
    configure_logging(f"shard {shard}", log_level, log_format)
    if isinstance(store, LogicStore):
        try:
            store.open()
        except UserFunctionError as exc:
            fail(f"shard {shard}: {exc}", 1)
    pin_mmap_threshold()
    durability = None
    if data_dir is not None:
        durability = _open_data_dir(
            data_dir, store, shard, num_shards, durable is not False, snapshot_interval or DEFAULT_SNAPSHOT_INTERVAL_S
        )
    if load_path is not None and not (durability is not None and durability.recovered):
        try:
            load_model(load_path, store, shard, num_shards)
        except LoadError as exc:
            fail(str(exc), 2)
    elif load_path is not None:
        logging.getLogger("streamps").warning("--load %s ignored: %s holds this shard's state", load_path, data_dir)
    try:
        start_metrics(metrics_port, host)
    except OSError as exc:
        fail(f"cannot serve metrics on port {metrics_port}: {exc}", 2)
    if snapshot_plan is not None:
        try:  # after the data dir's checks: its models/ is made only in a data dir that is there
            snapshot_plan.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            fail(f"--snapshot-dir {snapshot_plan.directory}: {exc.strerror or exc}", 2)
    asyncio.run(serve(store, shard, num_shards, host, port, durability, clocks, hold_timeout, snapshot_plan))


def _snapshot_plan(
    every: float | None, directory: Path | None, keep: int, data_dir: Path | None, with_logic: bool
) -> SnapshotPlan | None:
    """Where and how often to snapshot the model; exit 2 for a bad combination."""
    if every is None:
        if directory is not None:
            fail("--snapshot-dir needs --snapshot-every SECONDS", 2)
        return None
    if with_logic:
        fail("--snapshot-every cannot be used with --logic: a server logic keeps its own state", 2)
    if directory is None:
        if data_dir is None:
            fail("--snapshot-every needs --snapshot-dir DIR (or --data-dir, whose models/ it then uses)", 2)
        directory = data_dir / "models"
    return SnapshotPlan(directory, every, keep)


def _clocks(consistency: str, num_workers: int | None, with_logic: bool) -> tuple[int, int] | None:
    """(staleness, num_workers) of a consistency other than async; exit 2 for a bad combination."""
    staleness = parse_consistency(consistency)
    if staleness is None:
        return None
    if num_workers is None:
        fail(f"--consistency {consistency} needs --num-workers (the job's number of workers)", 2)
    if with_logic:
        fail("--consistency other than async cannot be used with --logic: a server logic answers pulls itself", 2)
    return staleness, num_workers


def _open_data_dir(
    data_dir: Path, store: ParameterStore, shard: int, num_shards: int, durable: bool, snapshot_interval: float
) -> Durability:
    """Lock the data dir and recover the shard's state from it (exit 2 for an unusable dir)."""
    try:
        durability = Durability(
            data_dir, store, shard, num_shards, durable=durable, snapshot_interval=snapshot_interval
        )
    except (DataDirError, OSError) as exc:
        fail(str(exc) if isinstance(exc, DataDirError) else f"--data-dir {data_dir}: {exc}", 2)
    try:
        durability.recover()
    except DataDirError as exc:
        fail(str(exc))
    except Exception as exc:  # an unreadable file, a record that no longer applies
        fail(f"cannot recover from --data-dir {data_dir}: {type(exc).__name__}: {exc}")
    return durability


if __name__ == "__main__":
    main()
