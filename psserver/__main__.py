"""`psserver`: run one shard until SIGTERM or SIGINT."""

from __future__ import annotations

import sys

import click

from psclient.errors import SpecError
from psclient.serving import StopSignal, announce, configure_logging
from psserver.service import build_shard_server
from psserver.specs import make_init, make_update
from psserver.store import ParameterStore

# Seconds in-flight RPCs get to finish after SIGTERM before they are cancelled.
STOP_GRACE_S = 5.0


@click.command(context_settings={"show_default": True})
@click.option(
    "--shard",
    type=click.IntRange(min=0),
    required=True,
    envvar="STREAMPS_SHARD",
    show_envvar=True,
    help="This shard's index.",
)
@click.option(
    "--num-shards",
    type=click.IntRange(min=1),
    required=True,
    envvar="STREAMPS_NUM_SHARDS",
    show_envvar=True,
    help="Shards in the cluster.",
)
@click.option("--host", default="127.0.0.1", envvar="STREAMPS_HOST", show_envvar=True, help="Address to bind.")
@click.option(
    "--port",
    type=click.IntRange(min=0, max=65535),
    default=0,
    envvar="STREAMPS_PORT",
    show_envvar=True,
    help="Port to bind; 0 picks a free one.",
)
@click.option(
    "--init",
    "init_spec",
    default="zeros:1",
    envvar="STREAMPS_INIT",
    show_envvar=True,
    help="Parameter init: zeros:DIM, normal:DIM[,std=S][,seed=N], "
    "uniform:DIM[,low=A][,high=B][,seed=N], const:V, module:attr.",
)
@click.option(
    "--update",
    "update_spec",
    default="add",
    envvar="STREAMPS_UPDATE",
    show_envvar=True,
    help="Parameter update: add, replace, max, min, module:attr.",
)
@click.option("--log-level", default="INFO", envvar="STREAMPS_LOG_LEVEL", show_envvar=True)
def main(shard: int, num_shards: int, host: str, port: int, init_spec: str, update_spec: str, log_level: str) -> None:
    """Serve one shard of the parameter server."""
    if shard >= num_shards:
        click.echo(f"psserver: error: --shard {shard} must be below --num-shards {num_shards}", err=True)
        sys.exit(2)
    log = configure_logging(f"shard {shard}", log_level)
    try:
        store = ParameterStore(make_init(init_spec), make_update(update_spec))
        bound, _ = build_shard_server(store, shard, num_shards, host, port)
    except (SpecError, OSError) as exc:
        click.echo(f"psserver: error: {exc}", err=True)
        sys.exit(2)
    stop = StopSignal()
    bound.server.start()
    bound.set_serving(True)
    announce(bound)
    log.info("serving shard %d/%d on %s (init %s, update %s)", shard, num_shards, bound.address, init_spec, update_spec)
    try:
        stop.wait()
    finally:
        bound.set_serving(False)
        bound.server.stop(STOP_GRACE_S).wait()
        log.info("stopped")


if __name__ == "__main__":
    main()
