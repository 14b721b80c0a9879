"""Where a worker's records come from: a file or stdin (`files.py`), a Redis stream
(`redis_streams.py`), a NATS JetStream stream (`jetstream.py`), a source of the user's
own (`--input module:attr`), or without `--input` the Feed RPC (`feed.py`). Each is a
`Source` (`base.py`). A pump (`pump.py`) reads all but Feed into the worker's input
queue; Feed's calls push their records into it themselves (`FeedSource`)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from psclient.errors import SpecError
from psclient.plugins import load_object
from psworker.sources.base import Chunk, Source, SourceContext, SourceError
from psworker.sources.feed import FeedSource

__all__ = [
    "Chunk",
    "FeedSource",
    "Source",
    "SourceContext",
    "SourceError",
    "is_stream",
    "open_source",
    "stream_group",
    "stream_job_id",
]

# module:attr, both dotted names: a user's source (a path that exists is a file first).
_PLUGIN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
STREAM_SCHEMES = ("redis://", "nats://")


def is_stream(spec: str) -> bool:
    return spec.startswith(STREAM_SCHEMES)


def stream_group(spec: str) -> str:
    """The consumer group (Redis) or durable (NATS) name a stream's `--input` gives (the last
    one given, as the sources read it)."""
    query = parse_qs(urlsplit(spec).query)
    return (query.get("group") or query.get("durable") or [""])[-1]


def stream_job_id(spec: str) -> str:
    """The job id a stream's workers take without --job-id: `GROUP.STREAM`. The stream is in it
    because the shards know a worker's pushes by its id and the entry's position: two jobs that
    share a group name on two streams must not look like one worker to them."""
    return f"{stream_group(spec)}.{unquote(urlsplit(spec).path.lstrip('/'))}"


def open_source(spec: str, context: SourceContext) -> Source:
    """The source `--input spec` names, opened; SourceError (one line) when it cannot be."""
    source: Source
    if spec.startswith("redis://"):
        from psworker.sources.redis_streams import RedisStreamSource

        source = RedisStreamSource(spec, context)
    elif spec.startswith("nats://"):
        from psworker.sources.jetstream import JetStreamSource

        source = JetStreamSource(spec, context)
    elif _PLUGIN.fullmatch(spec) and not Path(spec).exists():
        try:
            factory = load_object(spec, what="--input")
        except SpecError as exc:
            raise SourceError(str(exc)) from exc
        if not callable(factory):
            raise SourceError(f"--input {spec!r} is not a Source subclass or a factory of one")
        try:
            made = factory(context)
        except Exception as exc:  # a user's constructor can raise anything
            raise SourceError(f"--input {spec!r}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(made, Source):
            raise SourceError(f"--input {spec!r} returned a {type(made).__qualname__}, not a Source")
        source = made
    else:
        from psworker.sources.files import FileSource

        source = FileSource(spec, context)
    source.open()
    return source
