"""`psserver`: run one shard until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

import click

from psclient._proto import shard_pb2, shard_pb2_grpc
from psclient.errors import SpecError
from psclient.security import current as current_security
from psclient.security import security_options
from psclient.serving import LOG_FORMATS, StopSignal, announce, build_aio_server, configure_logging, start_metrics
from psclient.specs import make_init, make_update
from psserver.memory import pin_mmap_threshold
from psserver.service import ShardServicer
from psserver.store import ParameterStore

# Seconds in-flight RPCs get to finish after SIGTERM before they are cancelled.
STOP_GRACE_S = 5.0
SERVICE_NAME = shard_pb2.DESCRIPTOR.services_by_name["ParameterShard"].full_name


def env(name: str) -> dict[str, Any]:
    return {"envvar": f"STREAMPS_{name}", "show_envvar": True}


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
        click.echo(f"psserver: error: {exc}", err=True)
        sys.exit(2)
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


@click.command(context_settings={"show_default": True})
@click.option("--shard", type=click.IntRange(min=0), required=True, **env("SHARD"), help="This shard's index.")
@click.option(
    "--num-shards", type=click.IntRange(min=1), required=True, **env("NUM_SHARDS"), help="Shards in the cluster."
)
@click.option("--host", default="127.0.0.1", **env("HOST"), help="Address to bind.")
@click.option(
    "--port", type=click.IntRange(min=0, max=65535), default=0, **env("PORT"), help="Port to bind; 0 picks a free one."
)
@click.option(
    "--init",
    "init_spec",
    default="zeros:1",
    **env("INIT"),
    help="Parameter init: zeros:DIM, normal:DIM[,std=S][,seed=N], "
    "uniform:DIM[,low=A][,high=B][,seed=N], const:V, module:attr.",
)
@click.option(
    "--update",
    "update_spec",
    default="add",
    **env("UPDATE"),
    help="Parameter update: add, replace, max, min, module:attr.",
)
@click.option("--log-level", default="INFO", **env("LOG_LEVEL"))
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", **env("LOG_FORMAT"))
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    **env("METRICS_PORT"),
    help="Serve Prometheus metrics on this port (0 picks one).",
)
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
        click.echo(f"psserver: error: --shard {shard} must be below --num-shards {num_shards}", err=True)
        sys.exit(2)
    try:
        store = ParameterStore(make_init(init_spec), make_update(update_spec))
    except SpecError as exc:
        click.echo(f"psserver: error: {exc}", err=True)
        sys.exit(2)
    configure_logging(f"shard {shard}", log_level, log_format)
    pin_mmap_threshold()
    try:
        start_metrics(metrics_port, host)
    except OSError as exc:
        click.echo(f"psserver: error: cannot serve metrics on port {metrics_port}: {exc}", err=True)
        sys.exit(2)
    asyncio.run(serve(store, shard, num_shards, host, port))


if __name__ == "__main__":
    main()
