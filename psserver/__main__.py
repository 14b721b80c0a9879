"""`psserver`: run one shard until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

import click

from psclient.cli.options import env, fail, listen_options, process_options, security_options, spec_options
from psclient.cli.process import StopSignal, announce, configure_logging, start_metrics
from psclient.errors import SpecError
from psclient.rpc.security import current as current_security
from psclient.rpc.serving import build_aio_server
from psclient.specs import make_init, make_update
from psclient.wire.proto import shard_pb2, shard_pb2_grpc
from psserver.memory import pin_mmap_threshold
from psserver.service import ShardServicer
from psserver.store import ParameterStore

# Seconds in-flight RPCs get to finish after SIGTERM before they are cancelled.
STOP_GRACE_S = 5.0
SERVICE_NAME = shard_pb2.DESCRIPTOR.services_by_name["ParameterShard"].full_name


async def serve(store: ParameterStore, shard: int, num_shards: int, host: str, port: int) -> None:
    log = logging.getLogger("streamps")
    servicer = ShardServicer(store, shard, num_shards)
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
        "serving shard %d/%d on %s (init %s, update %s)",
        shard,
        num_shards,
        bound.address,
        store.init.spec,
        store.update.spec,
    )
    ended = 0
    try:
        while not stop.is_set():
            await asyncio.sleep(StopSignal.POLL_S)
    finally:
        await bound.set_serving(False)
        ended = servicer.stop_streams()
        await bound.server.stop(STOP_GRACE_S)
    cause = signal.Signals(stop.signum).name if stop.signum is not None else "request"
    log.info("stopped on %s; ended %d open streams", cause, ended)


@click.command("psserver", context_settings={"show_default": True})
@click.option("--shard", type=click.IntRange(min=0), required=True, **env("SHARD"), help="This shard's index.")
@click.option(
    "--num-shards", type=click.IntRange(min=1), required=True, **env("NUM_SHARDS"), help="Shards in the cluster."
)
@listen_options
@spec_options
@process_options
@security_options
def main(
    shard: int,
    num_shards: int,
    host: str,
    port: int,
    init_spec: str,
    update_spec: str,
    log_level: str,
    log_format: str,
    metrics_port: int | None,
) -> None:
    """Serve one shard of the parameter server."""
    if shard >= num_shards:
        fail(f"--shard {shard} must be below --num-shards {num_shards}", 2)
    try:
        store = ParameterStore(make_init(init_spec), make_update(update_spec))
    except SpecError as exc:
        fail(str(exc), 2)
    configure_logging(f"shard {shard}", log_level, log_format)
    pin_mmap_threshold()
    try:
        start_metrics(metrics_port, host)
    except OSError as exc:
        fail(f"cannot serve metrics on port {metrics_port}: {exc}", 2)
    asyncio.run(serve(store, shard, num_shards, host, port))


if __name__ == "__main__":
    main()
