"""`psclient publish`: a file's lines into a Redis stream or a JetStream stream, one record each."""

from __future__ import annotations

import csv
import io
import sys
import time
from collections.abc import Iterator
from typing import TextIO

import click

from psclient.cli.options import env, fail
from psclient.inputs import FORMATS


def _entries(handle: TextIO, fmt: str, skip_header: bool) -> Iterator[str]:
    """One entry per record, as a worker reading the file by `fmt` would see the records: every
    line for `lines`, the non-blank ones for `jsonl`, every row (quoted line breaks and all,
    written back as one line) for `csv` and `tsv`."""
    if fmt in ("lines", "jsonl"):
        for number, line in enumerate(handle, start=1):
            record = line.rstrip("\r\n")
            if not (number == 1 and skip_header) and (fmt == "lines" or record.strip()):
                yield record
        return
    delimiter = "," if fmt == "csv" else "\t"
    reader = csv.reader(handle, delimiter=delimiter)
    row_text = io.StringIO()
    writer = csv.writer(row_text, delimiter=delimiter, lineterminator="")
    for row in reader:
        if (reader.line_num == 1 and skip_header) or not row:
            continue
        row_text.seek(0)
        row_text.truncate()
        writer.writerow(row)
        yield row_text.getvalue()


def _limited(entries: Iterator[str], limit: int | None) -> Iterator[bytes]:
    for count, entry in enumerate(entries):
        if limit is not None and count >= limit:
            return
        yield entry.encode()


@click.command()
@click.option(
    "--input", "input_path", required=True, default=None, **env("INPUT"), help="Records file, or - for stdin."
)
@click.option(
    "--to",
    "url",
    required=True,
    **env("PUBLISH_TO"),
    help="redis://HOST:PORT/STREAM (XADD, field `record`) or nats://HOST:PORT/STREAM[?subject=S] (a JetStream "
    "stream, created on the subject when missing); a worker's --input URL works as it is.",
)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="jsonl", **env("FORMAT"), help="Input format.")
@click.option("--skip-header", is_flag=True, **env("SKIP_HEADER"), help="Ignore the first line of the input.")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Publish at most this many records.")
def publish(input_path: str, url: str, fmt: str, skip_header: bool, limit: int | None) -> None:
    """Publish a file's records to a stream that workers read (psworker --input redis://... or nats://...),
    one entry per record as a worker reading the file by --format would see them."""
    from psclient.publish import PublishError, parse_target
    from psclient.publish import publish as publish_records

    try:
        target = parse_target(url)
        started = time.monotonic()
        if input_path == "-":
            sent = publish_records(url, _limited(_entries(sys.stdin, fmt, skip_header), limit))
        else:
            with open(input_path, encoding="utf-8", newline="") as handle:
                sent = publish_records(url, _limited(_entries(handle, fmt, skip_header), limit))
    except OSError as exc:
        fail(f"--input {input_path}: {exc.strerror or exc}")
    except (UnicodeDecodeError, csv.Error) as exc:
        fail(f"--input {input_path}: not {fmt} text: {exc}")
    except PublishError as exc:
        fail(str(exc))
    elapsed = time.monotonic() - started
    click.echo(
        f"psclient: published {sent} records to {target.scheme} stream {target.stream} at {target.host}:{target.port}"
        f" in {elapsed:.1f} s",
        err=True,
    )
