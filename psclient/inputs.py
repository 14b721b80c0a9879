"""Reading records from a file or stdin: jsonl, csv, tsv or plain lines.

Worker I of W takes records I, I+W, I+2W, ... (round robin over the records of
the file), or, with a partition key, the records whose key maps to I (the same
stable rule as parameter ids; see psclient.wire.partition). Both rules need no
coordination: every worker reads the whole file and keeps its share.

csv and tsv records are tuples; a field that reads as an int or a float becomes
one, so `1,42,3.5` arrives as `(1, 42, 3.5)`. A line whose field count differs
from the first line's is malformed.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from psclient.wire.partition import key_bucket

FORMATS = ("jsonl", "csv", "tsv", "lines")


class MalformedRecord(ValueError):
    """A line that cannot be parsed; the message names the file and line."""


def _number_or_text(field: str) -> int | float | str:
    try:
        return int(field)
    except ValueError:
        pass
    try:
        return float(field)
    except ValueError:
        return field


@contextmanager
def _open(path: str) -> Iterator[TextIO]:
    if path == "-":
        yield sys.stdin
    else:
        with Path(path).open(encoding="utf-8", newline="") as handle:
            yield handle


def _parse(path: str, fmt: str, skip_header: bool) -> Iterator[tuple[int, Any]]:
    """(line number, record or MalformedRecord) for every record of the file."""
    name = "stdin" if path == "-" else path
    with _open(path) as handle:
        if fmt == "lines":
            for number, line in enumerate(handle, start=1):
                if number == 1 and skip_header:
                    continue
                yield number, line.rstrip("\r\n")
        elif fmt == "jsonl":
            for number, line in enumerate(handle, start=1):
                if (number == 1 and skip_header) or not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield (
                        number,
                        MalformedRecord(f"{name} line {number}: malformed JSON: {exc.msg} at column {exc.colno}"),
                    )
        else:
            reader = csv.reader(handle, delimiter="," if fmt == "csv" else "\t")
            width = None
            for row in reader:
                number = reader.line_num
                if (number == 1 and skip_header) or not row:
                    continue
                if width is None:
                    width = len(row)
                if len(row) != width:
                    yield number, MalformedRecord(f"{name} line {number}: expected {width} fields, found {len(row)}")
                    continue
                yield number, tuple(_number_or_text(field) for field in row)


def decode_record(data: bytes, fmt: str) -> Any:
    """One record from one stream entry or message by `fmt`, as a line of a file in that
    format is read; MalformedRecord (saying what is wrong, not where) when it cannot be."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedRecord(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if fmt == "lines":
        return text
    if fmt == "jsonl":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise MalformedRecord(f"malformed JSON: {exc.msg} at column {exc.colno}") from None
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    try:
        rows = list(csv.reader([text], delimiter="," if fmt == "csv" else "\t", strict=True))
    except csv.Error as exc:
        raise MalformedRecord(f"malformed {fmt}: {exc}") from None
    if len(rows) != 1 or not rows[0]:
        raise MalformedRecord(f"expected one {fmt} row, found {len(rows)}")
    return tuple(_number_or_text(field) for field in rows[0])


@dataclass
class InputSpec:
    path: str
    fmt: str = "jsonl"
    partition_key: str | None = None
    skip_header: bool = False


def _key_of(record: Any, key: str, name: str, number: int) -> Any:
    try:
        if isinstance(record, dict):
            return record[key]
        if isinstance(record, tuple | list):
            return record[int(key)]
    except (KeyError, IndexError, ValueError):
        pass
    raise MalformedRecord(f"{name} line {number}: no partition key {key!r} in {record!r}")


def read_share(spec: InputSpec, worker_index: int, num_workers: int) -> Iterator[tuple[int, Any]]:
    """This worker's (line number, record) pairs; MalformedRecord values mark bad lines.

    A malformed line is reported by the worker that takes it round robin, so
    exactly one worker reports it.
    """
    if spec.fmt not in FORMATS:
        raise ValueError(f"unknown format {spec.fmt!r}: use one of {', '.join(FORMATS)}")
    name = "stdin" if spec.path == "-" else spec.path
    for index, (number, record) in enumerate(_parse(spec.path, spec.fmt, spec.skip_header)):
        round_robin_owner = index % num_workers
        if isinstance(record, MalformedRecord) or spec.partition_key is None:
            if round_robin_owner == worker_index:
                yield number, record
            continue
        try:
            key = _key_of(record, spec.partition_key, name, number)
        except MalformedRecord as exc:
            if round_robin_owner == worker_index:
                yield number, exc
            continue
        if key_bucket(key, num_workers) == worker_index:
            yield number, record
