"""A Redis stream as a source: `--input redis://HOST:PORT/STREAM?group=G`.

The job's workers form consumer group G (created at the start of the stream,
id 0, with the stream itself when either is missing); worker I reads as the
consumer `{job id}-w{I}` with XREADGROUP, so the group shares the entries among
the workers. An entry's field `record` carries one record, read by `--format`.
An entry is acknowledged (XACK) only once every push it caused is acknowledged
by the shards. A worker started again under the same name first reads the
entries it had taken and not acknowledged (its pending entries), then new
ones. Its pushes are named by entry id (see `position`), so the shards apply
those of an entry it takes again once (psserver/origins.py): the model is
exact however often a worker is killed.

Options: `end=idle:SECONDS` ends the input when no entry arrived for that
long (by default the job runs until it is stopped); `count=N` entries per read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import redis

from psworker.sources.base import Chunk, Source, SourceContext, SourceError
from psworker.sources.streams import READ_WAIT_S, Unacked, decode, parse_stream_url, share_of

DEFAULT_PORT = 6379
# An entry id is MS-SEQ; its position is MS * 2**SEQ_BITS + SEQ, which stays below 2**63
# (the shards' origins are int64) for millisecond times up to the year 2109.
SEQ_BITS = 21
ACK_BATCH = 1_000
CONNECT_TIMEOUT_S = 5.0


def position(entry_id: bytes) -> int:
    """The position an entry id names: increasing with the id, the same in every run."""
    ms, _, seq = entry_id.partition(b"-")
    millis, number = int(ms), int(seq or b"0")
    if number >= 1 << SEQ_BITS or millis >= 1 << (63 - SEQ_BITS):
        raise SourceError(f"entry id {entry_id.decode()} is beyond what a worker can name (MS < 2^42, SEQ < 2^21)")
    return (millis << SEQ_BITS) | number


class RedisStreamSource(Source):
    position_name = "entry"
    acks = True

    def __init__(self, url: str, context: SourceContext):
        self.spec = parse_stream_url(url, DEFAULT_PORT, "group", ())
        self.context = context
        self.group = self.spec.options["group"]
        if context.partition_key is not None:  # every worker reads it all, in a group of its own
            self.group = f"{self.group}-w{context.worker_index}"
        self.consumer = context.worker_id
        self.client: redis.Redis | None = None
        self._unacked = Unacked()

    def describe(self) -> str:
        return f"redis stream {self.spec.stream} at {self.spec.host}:{self.spec.port}"

    def _lost(self, exc: Exception) -> SourceError:
        return SourceError(f"--input {self.spec.url}: {type(exc).__name__}: {exc}")

    def open(self) -> None:
        spec = self.spec
        self.client = redis.Redis(
            host=spec.host,
            port=spec.port,
            username=spec.username,
            password=spec.password,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            protocol=2,
        )
        try:
            self.client.xgroup_create(spec.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):  # the group exists: read on where it stands
                raise self._lost(exc) from exc
        except redis.ConnectionError as exc:
            raise SourceError(f"--input {spec.url}: cannot reach Redis at {spec.host}:{spec.port}: {exc}") from exc
        except redis.RedisError as exc:
            raise self._lost(exc) from exc

    def _read(self, start: str, block_ms: int | None) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
        assert self.client is not None
        try:
            answer: Any = self.client.xreadgroup(
                self.group, self.consumer, {self.spec.stream: start}, count=self.spec.count, block=block_ms
            )
        except redis.RedisError as exc:
            raise self._lost(exc) from exc
        return answer[0][1] if answer else []

    def _chunk(self, entries: list[tuple[bytes, dict[bytes, bytes] | None]]) -> Chunk:
        chunk: Chunk = []
        done = []  # acknowledged at once
        context = self.context
        for entry_id, fields in entries:
            # Deleted (or trimmed) from the stream after it was read: a pending entry comes back
            # with no fields (None or {} by redis-py's version; XADD always writes one): nothing to do.
            if not fields:
                done.append(entry_id)
                continue
            at = position(entry_id)
            where = f"stream {self.spec.stream} entry {entry_id.decode()}"
            record = decode(fields.get(b"record"), context.fmt, where)
            if context.partition_key is not None:
                owner, record = share_of(record, at, context, where)
                if owner != context.worker_index:
                    done.append(entry_id)  # another worker's, which reads it in its own group
                    continue
            chunk.append((at, record))
            self._unacked.add(at, entry_id)
        if done:
            self._xack(done)
        return chunk

    def read(self) -> Iterator[Chunk]:
        # First the entries this consumer took in an earlier run and did not acknowledge.
        last = "0"
        while entries := self._read(last, None):
            yield self._chunk(entries)
            last = entries[-1][0].decode()
        idle_end_s = self.spec.idle_end_s
        last_entry = time.monotonic()
        while True:
            entries = self._read(">", int(READ_WAIT_S * 1000))
            if entries:
                yield self._chunk(entries)
                last_entry = time.monotonic()
                continue
            if idle_end_s is not None and time.monotonic() - last_entry >= idle_end_s:
                return
            yield []

    def _xack(self, ids: list[bytes]) -> None:
        assert self.client is not None
        try:
            for start in range(0, len(ids), ACK_BATCH):
                self.client.xack(self.spec.stream, self.group, *ids[start : start + ACK_BATCH])
        except redis.RedisError as exc:
            raise self._lost(exc) from exc

    def ack(self, position: int) -> None:
        ids = self._unacked.through(position)
        if ids:
            self._xack(ids)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
