"""What the stream sources share: their URL's parts and options, and the ack bookkeeping."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from psclient.inputs import MalformedRecord, decode_record
from psclient.wire.partition import key_bucket
from psworker.checks import short_repr
from psworker.sources.base import SourceContext, SourceError

# Entries (messages) asked for in one read.
DEFAULT_COUNT = 256
# How long one read waits for entries: the longest a stop or an ack waits on a quiet stream.
READ_WAIT_S = 0.2


@dataclass
class StreamSpec:
    url: str
    host: str
    port: int
    stream: str
    username: str | None
    password: str | None
    options: dict[str, str]
    # End the input when nothing arrived for this long (`end=idle:SECONDS`); None: run until stopped.
    idle_end_s: float | None
    count: int


def parse_stream_url(url: str, default_port: int, name_option: str, allowed: Iterable[str]) -> StreamSpec:
    """SCHEME://[USER:PASSWORD@]HOST[:PORT]/STREAM?NAME_OPTION=...[&end=idle:S][&count=N][&...]"""
    parts = urlsplit(url)
    stream = unquote(parts.path.lstrip("/"))
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # no password in messages
    if not parts.hostname or not stream:
        raise SourceError(f"--input {shown}: expected {parts.scheme}://HOST:PORT/STREAM?{name_option}=NAME")
    query = {key: values[-1] for key, values in parse_qs(parts.query, keep_blank_values=True).items()}
    known = {name_option, "end", "count", *allowed}
    unknown = sorted(set(query) - known)
    if unknown:
        raise SourceError(f"--input {shown}: unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})")
    if not query.get(name_option):
        raise SourceError(f"--input {shown}: needs ?{name_option}=NAME")
    idle_end_s = None
    if "end" in query:
        kind, _, seconds = query["end"].partition(":")
        try:
            idle_end_s = float(seconds)
        except ValueError:
            idle_end_s = math.nan
        if kind != "idle" or not (idle_end_s > 0 and math.isfinite(idle_end_s)):
            raise SourceError(f"--input {shown}: end={query['end']}: expected end=idle:SECONDS (a number > 0)")
    try:
        count = int(query.get("count", DEFAULT_COUNT))
        port = parts.port or default_port
    except ValueError as exc:
        raise SourceError(f"--input {shown}: {exc}") from None
    if count < 1:
        raise SourceError(f"--input {shown}: count must be >= 1")
    return StreamSpec(
        shown,
        parts.hostname,
        port,
        stream,
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
        query,
        idle_end_s,
        count,
    )


def share_of(record: Any, fallback: int, context: SourceContext, where: str) -> tuple[int, Any]:
    """Under --partition-key: the worker that takes `record` (by the rule a file's records
    follow, psclient.wire.partition.key_bucket), and the record, a MalformedRecord when it has
    no such key. A malformed record goes to worker `fallback` modulo the number of workers, so
    that one worker reports it."""
    key, workers = context.partition_key, context.num_workers
    assert key is not None
    if isinstance(record, MalformedRecord):
        return fallback % workers, record
    try:
        if isinstance(record, dict):
            return key_bucket(record[key], workers), record
        if isinstance(record, tuple | list):
            return key_bucket(record[int(key)], workers), record
    except (KeyError, IndexError, ValueError, TypeError):
        pass
    return fallback % workers, MalformedRecord(f"{where}: no partition key {key!r} in {short_repr(record)}")


def decode(data: bytes | None, fmt: str, where: str) -> Any:
    """The record an entry carries, or a MalformedRecord naming the entry."""
    if data is None:
        return MalformedRecord(f"{where}: no field 'record'")
    try:
        return decode_record(data, fmt)
    except MalformedRecord as exc:
        return MalformedRecord(f"{where}: {exc}")


class Unacked:
    """What was read and not yet acknowledged, in position order: (position, handle)."""

    def __init__(self) -> None:
        self._items: deque[tuple[int, Any]] = deque()

    def add(self, position: int, handle: Any) -> None:
        self._items.append((position, handle))

    def through(self, position: int) -> list[Any]:
        """Take the handles at or below `position`."""
        items, taken = self._items, []
        while items and items[0][0] <= position:
            taken.append(items.popleft()[1])
        return taken
