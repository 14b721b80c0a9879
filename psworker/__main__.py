"""`psworker`: run one worker of a job, fed from a source (psworker/sources): `--input`, or the Feed RPC.
How it runs on it: psworker/running.py."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

import click

from psclient.cli.options import (
    batch_options,
    connect_timeout_option,
    consistency_option,
    env,
    fail,
    input_options,
    listen_options,
    logic_option,
    on_error_option,
    open_output,
    process_options,
    pull_limit_option,
    security_options,
    split_addresses,
)
from psclient.cli.process import configure_logging, start_metrics
from psclient.errors import SpecError
from psclient.wire.records import to_json_compatible, unpack
from psworker.checkpoints import DEFAULT_CHECKPOINT_EVERY, CheckpointError
from psworker.logic import load_logic, with_pull_limit
from psworker.metrics import register as register_metrics
from psworker.running import run_on_source, serve_feed
from psworker.runtime import DEFAULT_SHARD_TIMEOUT_S, WorkerRuntime, new_job_id
from psworker.service import OutputBuffer
from psworker.sources import Source, SourceContext, SourceError, is_stream, open_source, stream_job_id
from psworker.sources.feed import FeedSource

# It becomes part of every push's worker id, which shards keep and report (Info).
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _check_job_id(_context: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not JOB_ID.fullmatch(value):
        raise click.BadParameter(f"{value!r}: 1 to 64 letters, digits, '.', '_' or '-', first a letter or digit")
    return value


def _json_writer(handle: TextIO) -> Callable[[Any], None]:
    def write(out: Any) -> None:
        handle.write(json.dumps(to_json_compatible(out)) + "\n")

    return write


def _flush(handle: TextIO) -> None:
    handle.flush()
    with contextlib.suppress(OSError):  # a pipe or a terminal: flushed is all there is
        os.fsync(handle.fileno())


@click.command("psworker", context_settings={"show_default": True})
@logic_option
@click.option("--servers", required=True, **env("SERVERS"), help="Shard addresses H:P,H:P,... in shard order.")
@click.option("--worker-index", type=click.IntRange(min=0), required=True, **env("WORKER_INDEX"))
@click.option("--num-workers", type=click.IntRange(min=1), required=True, **env("NUM_WORKERS"))
@input_options(
    required=False,
    input_help="Records file, - for stdin, redis://HOST:PORT/STREAM?group=G, nats://HOST:PORT/STREAM?durable=NAME "
    "or module:attr (a Source of your own). Without it, serve the Feed RPC.",
)
@click.option(
    "--output",
    "output_path",
    default=None,
    **env("OUTPUT"),
    help="Write outputs as JSON lines here (- for stdout). Default: stdout with --input, else the Outputs RPC.",
)
@listen_options
@pull_limit_option
@batch_options
@consistency_option
@on_error_option
@connect_timeout_option("shard")
@click.option(
    "--shard-timeout",
    type=click.FloatRange(min=0),
    default=DEFAULT_SHARD_TIMEOUT_S,
    **env("SHARD_TIMEOUT"),
    help="Seconds to wait for a shard that stopped answering (reconnecting and resending meanwhile) "
    "before failing; 0 fails at once when its stream breaks.",
)
@click.option(
    "--job-id",
    default=None,
    callback=_check_job_id,
    **env("JOB_ID"),
    help="The job this worker belongs to; with --worker-index it names the worker to the shards, "
    "the same across restarts. Default: a stream's group (durable) name, else a random one.",
)
@click.option(
    "--checkpoint-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    **env("CHECKPOINT_DIR"),
    help="Make the worker restartable: checkpoint its input position and logic state here, and resume "
    "from it when started again with the same --job-id and index; the shards apply replayed pushes once.",
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=DEFAULT_CHECKPOINT_EVERY,
    **env("CHECKPOINT_EVERY"),
    help="With --checkpoint-dir: records between checkpoints (each waits for every pull and push in flight).",
)
@process_options
@security_options
def main(
    logic_spec: str,
    servers: str,
    worker_index: int,
    num_workers: int,
    input_path: str | None,
    fmt: str,
    partition_key: str | None,
    skip_header: bool,
    output_path: str | None,
    host: str,
    port: int,
    pull_limit: int | None,
    batch_max_keys: int,
    batch_linger_ms: float,
    consistency: str,
    on_error: str,
    connect_timeout: float,
    shard_timeout: float,
    job_id: str | None,
    checkpoint_dir: Path | None,
    checkpoint_every: int,
    log_level: str,
    log_format: str,
    metrics_port: int | None,
) -> None:
    """Run one worker: read records, call the logic, pull and push parameters."""
    if worker_index >= num_workers:
        fail(f"--worker-index {worker_index} must be below --num-workers {num_workers}", 2)
    log = configure_logging(f"worker {worker_index}", log_level, log_format)
    try:
        logic = load_logic(logic_spec)
        if pull_limit is not None:
            logic = with_pull_limit(logic, pull_limit)
    except SpecError as exc:
        fail(str(exc), 2)
    # Named by the group (durable) and the stream they read, a restarted one reads on as the same consumer.
    if (
        input_path is not None
        and is_stream(input_path)
        and not (job_id or JOB_ID.fullmatch(job_id := stream_job_id(input_path)))
    ):
        fail(f"--input {input_path}: give a --job-id (GROUP.STREAM cannot name the workers)", 2)
    if checkpoint_dir is not None:
        _check_restartable(checkpoint_dir, input_path, job_id)
    job_id = job_id or new_job_id()
    source: Source | None = None
    if input_path is not None:
        context = SourceContext(worker_index, num_workers, f"{job_id}-w{worker_index}", fmt, partition_key, skip_header)
        try:
            source = open_source(input_path, context)
        except SourceError as exc:
            fail(str(exc), 2)
    if output_path is None and input_path is not None:
        output_path = "-"
    try:
        start_metrics(metrics_port, host)
    except OSError as exc:
        fail(f"cannot serve metrics on port {metrics_port}: {exc}", 2)
    with ExitStack() as stack:
        outputs = OutputBuffer()
        # A restartable worker (a stream's too) adds to its outputs: a restart delivers those of the records
        # it replays again.
        out = open_output(stack, output_path, append=checkpoint_dir is not None or (source is not None and source.acks))
        emit = _json_writer(out) if out is not None else outputs.put
        try:
            runtime = WorkerRuntime(
                logic,
                split_addresses(servers),
                worker_index,
                num_workers,
                emit=emit,
                on_error=on_error,
                max_batch=batch_max_keys,
                linger_s=batch_linger_ms / 1000,
                position_name=(source or FeedSource).position_name,
                connect_timeout=connect_timeout,
                shard_timeout=shard_timeout,
                job_id=job_id,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every=checkpoint_every,
                flush_outputs=functools.partial(_flush, out) if out is not None else None,
                pending_outputs=outputs.pending if out is None else None,
                consistency=consistency,
                track_origins=source is not None and source.acks,
            )
        except CheckpointError as exc:
            fail(f"worker {worker_index}: {exc}", 2)
        if runtime.resumed is not None and runtime.resumed.outputs_pending:
            # Outputs of records the checkpoint covers that no reader took: delivered before any new one.
            pending = runtime.resumed.outputs_pending
            if out is None:
                outputs.restore(pending)
            else:  # checkpointed serving Outputs, started again with --output: they go to the file
                for data in pending:
                    emit(unpack(data))
        if metrics_port is not None:
            register_metrics(worker_index, runtime.counters)
        if source is not None:
            stop = run_on_source(runtime, source)
        else:
            stop = serve_feed(runtime, outputs, host, port, to_file=output_path is not None)
    if stop.signum is not None:
        log.info(
            "stopped on %s: took no more input; processed %d records, %d outputs%s",
            signal.Signals(stop.signum).name,
            runtime.records,
            runtime.outputs,
            f"; checkpointed after {runtime.position_name} {runtime.inputs.last_taken}" if checkpoint_dir else "",
        )
    else:
        log.info("finished: %d records, %d outputs", runtime.records, runtime.outputs)


def _check_restartable(checkpoint_dir: Path, input_path: str | None, job_id: str | None) -> None:
    """A restart resumes under the same worker id, from input it can read again."""
    if job_id is None:
        fail("--checkpoint-dir needs --job-id: a restarted worker resumes under the same id", 2)
    if input_path == "-":
        # Fed through Feed instead, the feeder resends what follows the checkpoint (Status.next_position).
        fail("--checkpoint-dir needs an --input file or Feed, not stdin: a restarted worker reads on "
             "from its checkpoint", 2)  # fmt: skip
    try:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"--checkpoint-dir {checkpoint_dir}: {exc}", 2)


if __name__ == "__main__":
    main()
