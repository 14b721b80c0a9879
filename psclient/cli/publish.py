"""`psclient publish`: a file's lines into a Redis stream or a JetStream stream, one record each."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import BinaryIO

import click

from psclient.cli.options import env, fail


def _lines(handle: BinaryIO, skip_header: bool, limit: int | None) -> Iterator[bytes]:
    """The file's non-empty lines without their line ends, as bytes (sent as they are)."""
    sent = 0
    for number, line in enumerate(handle, start=1):
        if skip_header and number == 1:
            continue
        record = line.rstrip(b"\r\n")
        if not record:
            continue
        if limit is not None and sent >= limit:
            return
        sent += 1
        yield record


@click.command()
@click.option("--input", "input_path", required=True, help="Records file, one a line (- for stdin).")
@click.option(
    "--to",
    "url",
    required=True,
    **env("PUBLISH_TO"),
    help="redis://HOST:PORT/STREAM (XADD, field `record`) or nats://HOST:PORT/STREAM[?subject=S] (a JetStream "
    "stream, created on the subject when missing); a worker's --input URL works as it is.",
)
@click.option("--skip-header", is_flag=True, help="Leave out the file's first line (a CSV header).")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Publish at most this many records.")
def publish(input_path: str, url: str, skip_header: bool, limit: int | None) -> None:
    """Publish a file's records to a stream that workers read (psworker --input redis://... or nats://...)."""
    from psclient.publish import PublishError, parse_target
    from psclient.publish import publish as publish_records

    try:
        target = parse_target(url)
        started = time.monotonic()
        if input_path == "-":
            sent = publish_records(url, _lines(sys.stdin.buffer, skip_header, limit))
        else:
            with open(input_path, "rb") as handle:
                sent = publish_records(url, _lines(handle, skip_header, limit))
    except OSError as exc:
        fail(f"--input {input_path}: {exc.strerror or exc}")
    except PublishError as exc:
        fail(str(exc))
    elapsed = time.monotonic() - started
    click.echo(
        f"psclient: published {sent} records to {target.scheme} stream {target.stream} at {target.host}:{target.port}"
        f" in {elapsed:.1f} s",
        err=True,
    )
