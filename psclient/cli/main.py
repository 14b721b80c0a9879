"""`psclient`: run a job locally, dump a model, show a cluster, feed remote workers."""

from __future__ import annotations

import importlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from psclient.cli.options import (
    batch_options,
    connect_timeout_option,
    consistency_option,
    env,
    fail,
    input_options,
    logic_option,
    on_error_option,
    open_output,
    options,
    pull_limit_option,
    security_options,
    spec_options,
    split_addresses,
)
from psclient.cli.publish import publish
from psclient.either import Left, Right
from psclient.errors import SpecError, StreampsError
from psclient.inputs import InputSpec, MalformedRecord, read_share
from psclient.rpc.serving import open_channel


def _on_first_call(module: str, name: str) -> Any:
    """`module.name`, imported when first called: `psclient health` runs as a container
    probe every few seconds, often on a loaded host, and needs none of these."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    return call


if TYPE_CHECKING:
    from psclient.cluster import Cluster
    from psclient.jobs import run_local_job
    from psclient.rpc.errors import describe_rpc_error
    from psclient.rpc.layout import layout_problems
    from psclient.wire.records import to_json_compatible
else:
    Cluster = _on_first_call("psclient.cluster", "Cluster")
    run_local_job = _on_first_call("psclient.jobs", "run_local_job")
    to_json_compatible = _on_first_call("psclient.wire.records", "to_json_compatible")
    describe_rpc_error = _on_first_call("psclient.rpc.errors", "describe_rpc_error")
    layout_problems = _on_first_call("psclient.rpc.layout", "layout_problems")


def _write_json(handle: TextIO | None, obj: Any) -> None:
    if handle is not None:
        handle.write(json.dumps(to_json_compatible(obj)) + "\n")


def _records(spec: InputSpec, on_error: str) -> Iterator[Any]:
    for _, record in read_share(spec, 0, 1):
        if isinstance(record, MalformedRecord):
            if on_error == "skip":
                click.echo(f"psclient: warning: {record}; skipped", err=True)
                continue
            raise StreampsError(str(record))
        yield record


def _partition_by(spec: InputSpec) -> Callable[[Any], Any] | None:
    key = spec.partition_key
    if key is None:
        return None
    return lambda record: record[key] if isinstance(record, dict) else record[int(key)]


def _check_specs(init_spec: str, update_spec: str) -> None:
    """Refuse a spec the shards would refuse, before any process starts (exit code 2, like psserver)."""
    from psclient.specs import check_specs  # the shards' own parser; only `run` needs it

    try:
        check_specs(init_spec, update_spec)
    except SpecError as exc:
        fail(str(exc), 2)


with_input_options = options(input_options(), on_error_option)


@click.group("psclient", context_settings={"show_default": True})
def main() -> None:
    """Drive streamps jobs and clusters."""


@main.command()
@logic_option
@with_input_options
@spec_options
@click.option("--workers", type=click.IntRange(min=1), default=1, **env("WORKERS"), help="Worker processes.")
@click.option("--shards", type=click.IntRange(min=1), default=1, **env("SHARDS"), help="Shard processes.")
@pull_limit_option
@batch_options
@consistency_option
@click.option(
    "--iteration-wait-time",
    type=float,
    default=None,
    **env("ITERATION_WAIT_TIME"),
    help="End the input after this many seconds without a record.",
)
@click.option(
    "--output", "output_path", default="-", **env("OUTPUT"), help="Worker outputs as JSON lines (- for stdout)."
)
@click.option("--model", "model_path", default=None, **env("MODEL"), help="Final parameters as JSON lines {id, value}.")
@click.option(
    "--ps-logic",
    default=None,
    **env("PS_LOGIC"),
    help="A ServerLogic (module:Class) for every shard (psserver --logic); --model then gets its outputs, "
    "one JSON line each.",
)
@click.option(
    "--progress/--no-progress", default=None, help="Live progress on stderr (default: when stderr is a terminal)."
)
@click.option(
    "--durable",
    is_flag=True,
    help="Give each shard a data dir (a temporary one) and restart a shard that dies on its port.",
)
@click.option(
    "--max-restarts",
    type=click.IntRange(min=0),
    default=3,
    help="With --durable: shard and worker restarts allowed in the job; one more death fails it.",
)
@click.option(
    "--snapshot-every",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    **env("SNAPSHOT_EVERY"),
    help="Every shard writes its model to --snapshot-dir every this many seconds in which a push arrived "
    "(psserver --snapshot-every): the model of an endless job (stdin) while it trains.",
)
@click.option(
    "--snapshot-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    **env("SNAPSHOT_DIR"),
    help="With --snapshot-every: where the shards' model files go (created if missing).",
)
def run(
    logic_spec: str,
    input_path: str,
    fmt: str,
    partition_key: str | None,
    skip_header: bool,
    on_error: str,
    init_spec: str,
    update_spec: str,
    workers: int,
    shards: int,
    pull_limit: int | None,
    batch_max_keys: int,
    batch_linger_ms: float,
    consistency: str,
    iteration_wait_time: float | None,
    output_path: str,
    model_path: str | None,
    ps_logic: str | None,
    progress: bool | None,
    durable: bool,
    max_restarts: int,
    snapshot_every: float | None,
    snapshot_dir: Path | None,
) -> None:
    """Run a whole job on an embedded local cluster."""
    _check_specs(init_spec, update_spec)
    if ps_logic is not None and durable:
        fail("--ps-logic cannot be combined with --durable: a server logic keeps its own state", 2)
    if consistency != "async" and (ps_logic is not None or durable):
        fail(f"--consistency {consistency} cannot be combined with {'--ps-logic' if ps_logic else '--durable'}", 2)
    if (snapshot_every is None) != (snapshot_dir is None):
        fail("--snapshot-every and --snapshot-dir go together", 2)
    if snapshot_every is not None and ps_logic is not None:
        fail("--snapshot-every cannot be combined with --ps-logic: a server logic keeps its own state", 2)
    spec = InputSpec(input_path, fmt, partition_key, skip_header)
    if input_path != "-" and not Path(input_path).is_file():
        fail(f"--input {input_path}: no such file")
    outputs = params = 0
    fed = [0]
    started = time.monotonic()

    def counted(records: Iterator[Any]) -> Iterator[Any]:
        for record in records:
            fed[0] += 1
            yield record

    # SIGTERM ends the input after the records read so far: the job ends with them, its model written.
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stopping.set())
    try:
        with ExitStack() as stack:
            out, model = open_output(stack, output_path), open_output(stack, model_path)
            stream = run_local_job(
                counted(_records(spec, on_error)), logic_spec, init_spec, update_spec, workers, shards,
                iteration_wait_time=iteration_wait_time, partition_by=_partition_by(spec),
                pull_limit=pull_limit, on_error=on_error, progress=progress,
                batch_max_keys=batch_max_keys, batch_linger_ms=batch_linger_ms,
                durable=durable, max_restarts=max_restarts, ps_logic_spec=ps_logic, consistency=consistency,
                snapshot_every=snapshot_every, snapshot_dir=snapshot_dir, live=False, stop=stopping,
            )  # fmt: skip
            for item in stream:
                match item:
                    case Left(value):
                        outputs += 1
                        _write_json(out, value)
                    case Right(value) if ps_logic is not None:
                        params += 1
                        _write_json(model, value)
                    case Right((param_id, value)):
                        params += 1
                        _write_json(model, {"id": param_id, "value": value})
    except StreampsError as exc:
        fail(str(exc))
    elapsed = time.monotonic() - started
    click.echo(
        f"psclient: {'stopped by SIGTERM: ' if stopping.is_set() else ''}{fed[0]} records, {outputs} outputs, {params} "
        f"{'server logic outputs' if ps_logic is not None else 'parameters'} in {elapsed:.1f} s "
        f"({fed[0] / max(elapsed, 1e-9):,.0f} records/s)",
        err=True,
    )


@main.command()
@click.option("--servers", required=True, **env("SERVERS"), help="Shard addresses H:P,... in shard order.")
@click.option("--output", "output_path", default="-", **env("OUTPUT"), help="JSON lines {id, value} (- for stdout).")
@connect_timeout_option()
@security_options
def snapshot(servers: str, output_path: str, connect_timeout: float) -> None:
    """Dump every parameter of a running cluster as JSON lines."""
    count = 0
    try:
        cluster = Cluster(split_addresses(servers), connect_timeout=connect_timeout, servers_label="--servers")
        with ExitStack() as stack, cluster:
            out = open_output(stack, output_path)
            for param_id, value in cluster.snapshot():
                _write_json(out, {"id": param_id, "value": value})
                count += 1
    except StreampsError as exc:
        fail(str(exc))
    click.echo(f"psclient: {count} parameters", err=True)


def _status_rows(cluster: Cluster) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    infos = cluster.info()
    answered = [None if isinstance(info, Exception) else info for info in infos]
    # First problem per shard; a shard that disagrees with its place is shown as the
    # shard it says it is, so that the table shows what is really running.
    misplaced: dict[int, str] = {}
    for place, problem in layout_problems(cluster.servers, answered, "--servers"):
        misplaced.setdefault(place, problem)
    for place, info in enumerate(infos):
        if isinstance(info, Exception):
            rows.append({"node": f"shard {place}", "address": cluster.servers[place], "up": False, "detail": str(info)})
            continue
        rows.append({
            "node": f"shard {info.shard}", "address": cluster.servers[place], "up": True,
            "params": info.num_params, "keys": info.pulled_keys + info.pushed_keys,
            "uptime_s": round(info.uptime_seconds, 1),
            **({"detail": misplaced[place], "misplaced": True} if place in misplaced else {}),
        })  # fmt: skip
    for index, state in enumerate(cluster.status()):
        row = {"node": f"worker {index}", "address": cluster.workers[index]}
        if isinstance(state, Exception):
            rows.append({**row, "up": False, "detail": str(state)})
            continue
        rows.append({
            **row, "up": True, "state": ("?", "running", "finished", "failed")[state.state],
            "records": state.records, "outputs": state.outputs,
            # Work the worker has started and not finished: unanswered and queued
            # pulls, unacknowledged push batches.
            "lag": state.pulls_in_flight + state.pulls_queued + state.pushes_unacked,
            "uptime_s": round(state.uptime_seconds, 1),
            **({"detail": state.error} if state.error else {}),
        })  # fmt: skip
    return rows


def _add_rates(first: list[dict[str, Any]], second: list[dict[str, Any]], seconds: float) -> None:
    """records/s for workers, keys/s for shards, from two samples `seconds` apart."""
    for before, after in zip(first, second, strict=True):
        for counter, rate in (("records", "records/s"), ("keys", "keys/s")):
            if counter in before and counter in after:
                after[rate] = round((after[counter] - before[counter]) / seconds, 1)


STATUS_COLUMNS = [
    "node", "address", "up", "state", "params", "records", "records/s", "keys", "keys/s", "outputs", "lag",
    "uptime_s", "detail",
]  # fmt: skip


@main.command()
@click.option("--servers", default=None, **env("SERVERS"), help="Shard addresses H:P,...")
@click.option("--workers", default=None, **env("WORKERS_ADDRESSES"), help="Worker addresses H:P,...")
@click.option("--interval", type=float, default=1.0, help="Seconds between the two samples that give rates.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@security_options
def status(servers: str | None, workers: str | None, interval: float, as_json: bool) -> None:
    """Show every shard and worker of a running cluster: up, parameters, records, rates, lag."""
    with Cluster(split_addresses(servers), split_addresses(workers)) as cluster:
        first = _status_rows(cluster)
        time.sleep(interval)
        rows = _status_rows(cluster)
    _add_rates(first, rows, interval)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        columns = [c for c in STATUS_COLUMNS if any(c in row for row in rows)]
        table = [[str(row.get(c, "")) for c in columns] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in table)) if table else len(c) for i, c in enumerate(columns)]
        click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
        for r in table:
            click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    if any(not row["up"] or row.get("misplaced") for row in rows):
        sys.exit(1)


@main.command()
@click.option("--address", required=True, **env("HEALTH_ADDRESS"), help="H:P of a shard or worker.")
@click.option("--timeout", type=float, default=5.0, help="Seconds to wait for an answer.")
@security_options
def health(address: str, timeout: float) -> None:
    """Exit 0 if the server answers its gRPC health check with SERVING, else 1 (for container probes)."""
    with open_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            click.echo(f"psclient: {address}: {describe_rpc_error(exc)}", err=True)
            sys.exit(1)
    serving = answer.status == health_pb2.HealthCheckResponse.SERVING
    click.echo(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}")
    sys.exit(0 if serving else 1)


@main.command()
@click.option("--workers", required=True, **env("WORKERS_ADDRESSES"), help="Worker addresses H:P,... in worker order.")
@with_input_options
@click.option(
    "--output", "output_path", default="-", **env("OUTPUT"), help="Worker outputs as JSON lines (- for stdout)."
)
@click.option("--no-end", is_flag=True, help="Do not end the workers' input after this file (more feeds follow).")
@connect_timeout_option()
@security_options
def feed(
    workers: str,
    input_path: str,
    fmt: str,
    partition_key: str | None,
    skip_header: bool,
    on_error: str,
    output_path: str,
    no_end: bool,
    connect_timeout: float,
) -> None:
    """Feed a file to remote workers and stream their outputs."""
    spec = InputSpec(input_path, fmt, partition_key, skip_header)
    outputs = 0
    try:
        with ExitStack() as stack, Cluster([], split_addresses(workers), connect_timeout=connect_timeout) as cluster:
            out = open_output(stack, output_path)
            sent = cluster.feed(_records(spec, on_error), partition_by=_partition_by(spec), end_of_input=not no_end)
            if not no_end:
                for value in cluster.outputs():
                    _write_json(out, value)
                    outputs += 1
    except StreampsError as exc:
        fail(str(exc))
    click.echo(f"psclient: fed {sent} records, {outputs} outputs", err=True)


main.add_command(publish)

if __name__ == "__main__":
    main()
