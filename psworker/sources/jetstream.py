"""A NATS JetStream stream as a source: `--input nats://HOST:PORT/STREAM?durable=NAME`.

Worker I of W reads with its own durable pull consumer `NAME-wI` (created at the
start of the stream when missing; explicit acks) and takes the messages whose
stream sequence is I modulo W, acknowledging the others at once: each message
is one worker's, the same one in every run, so a message JetStream delivers
again (after `ack_wait`, or to a worker started again) goes back to the worker
whose pushes the shards already know (by stream sequence: psserver/origins.py)
and is applied once. A message's body carries one record, read by `--format`,
and is acknowledged only once every push it caused is acknowledged.

A worker started again first takes the messages its consumer had delivered and
not had acknowledged (JetStream delivers them again once their `ack_wait` ran
out), then new ones, so its positions keep increasing. Options: `end=idle:SECONDS`,
`count=N` (messages per fetch), `ack_wait=SECONDS` (default 30).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from psclient.rpc.connection import EventLoopThread
from psworker.sources.base import Chunk, Source, SourceContext, SourceError
from psworker.sources.streams import READ_WAIT_S, decode, parse_stream_url, share_of

log = logging.getLogger("streamps.worker")

DEFAULT_PORT = 4222
DEFAULT_ACK_WAIT_S = 30.0
CONNECT_TIMEOUT_S = 5.0
# Messages a consumer may have delivered and not had acknowledged: well above what a
# worker holds (its input queue and what waits for a quiescent point).
MAX_ACK_PENDING = 65_536
# How many ack_waits a restarted worker waits for its unacknowledged messages to come back.
REDELIVERY_WAITS = 3


class JetStreamSource(Source):
    position_name = "message"
    acks = True

    def __init__(self, url: str, context: SourceContext):
        self.spec = parse_stream_url(url, DEFAULT_PORT, "durable", ("ack_wait",))
        try:
            self.ack_wait = float(self.spec.options.get("ack_wait", DEFAULT_ACK_WAIT_S))
        except ValueError:
            self.ack_wait = math.nan
        if not (self.ack_wait > 0 and math.isfinite(self.ack_wait)):
            raise SourceError(f"--input {self.spec.url}: ack_wait must be a number of seconds > 0")
        self.context = context
        self.consumer = f"{self.spec.options['durable']}-w{context.worker_index}"
        self._io: EventLoopThread | None = None
        self._nc: Any = None
        self._sub: Any = None
        # Taken and not yet acknowledged, by stream sequence (increasing): the latest delivery.
        self._unacked: dict[int, Any] = {}
        self._last = 0  # the highest sequence handed on
        # A restarted worker's consumer had delivered up to this sequence, `_owed` of them unacked.
        self._delivered = 0
        self._owed = 0

    def describe(self) -> str:
        return f"JetStream stream {self.spec.stream} at {self.spec.host}:{self.spec.port}"

    def _run(self, coroutine: Any, timeout: float = CONNECT_TIMEOUT_S + 5) -> Any:
        assert self._io is not None
        return self._io.run(coroutine, timeout)

    def _lost(self, exc: BaseException) -> SourceError:
        return SourceError(f"--input {self.spec.url}: {type(exc).__name__}: {exc}".rstrip(": "))

    async def _on_error(self, exc: Exception) -> None:
        """The client's own errors: a failed call raises, and says it in one line."""
        log.debug("nats: %s: %s", type(exc).__name__, exc)

    def open(self) -> None:
        self._io = EventLoopThread("jetstream")
        try:
            self._run(self._open())
        except SourceError:
            raise
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise self._lost(exc) from exc

    async def _open(self) -> None:
        spec = self.spec
        try:
            self._nc = await nats.connect(
                servers=[f"nats://{spec.host}:{spec.port}"],
                user=spec.username,
                password=spec.password,
                connect_timeout=CONNECT_TIMEOUT_S,
                # One retry, soon: with none, nats-py retries a refused first connect forever.
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                error_cb=self._on_error,
            )
        except (nats.errors.NoServersError, OSError, TimeoutError) as exc:
            raise SourceError(f"--input {spec.url}: cannot reach NATS at {spec.host}:{spec.port}: {exc}") from exc
        js = self._nc.jetstream()
        try:
            await js.stream_info(spec.stream)
        except nats.js.errors.NotFoundError:
            raise SourceError(f"--input {spec.url}: no JetStream stream {spec.stream!r}") from None
        try:
            info = await js.consumer_info(spec.stream, self.consumer)
        except nats.js.errors.NotFoundError:
            config = ConsumerConfig(
                durable_name=self.consumer,
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait,
                max_ack_pending=MAX_ACK_PENDING,
            )
            info = await js.add_consumer(spec.stream, config)
        if info.num_ack_pending:
            self._delivered, self._owed = info.delivered.stream_seq, info.num_ack_pending
        self._sub = await js.pull_subscribe_bind(durable=self.consumer, stream=spec.stream)

    async def _fetch(self) -> list[Any]:
        try:
            return list(await self._sub.fetch(self.spec.count, timeout=READ_WAIT_S))
        except (nats.errors.TimeoutError, TimeoutError):  # nothing arrived meanwhile
            return []

    def read(self) -> Iterator[Chunk]:
        index = self.context.worker_index
        # By sequence: the old messages a restarted worker waits for, and the new ones meanwhile.
        again: dict[int, Any] = {}
        held: dict[int, Any] = {}
        owed, delivered = self._owed, self._delivered
        waiting_since = last_message = time.monotonic()
        idle_end_s = self.spec.idle_end_s
        while True:
            try:
                messages = self._run(self._fetch())
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                raise self._lost(exc) from exc
            if messages:
                last_message = time.monotonic()
            done = []  # acknowledged at once
            for msg in messages:
                seq = msg.metadata.sequence.stream
                if self._owner(seq, msg) != index:
                    done.append(msg)  # another worker's: its own consumer delivers it to it
                    if seq <= delivered:
                        again.setdefault(seq, None)
                elif seq in self._unacked:
                    self._unacked[seq] = msg  # delivered again while in hand: ack the latest delivery
                elif delivered < seq <= self._last:
                    done.append(msg)  # taken in this run and acknowledged already
                elif seq <= delivered:
                    again[seq] = msg
                else:
                    held[seq] = msg
            if done:
                self._ack(done)
            if owed and (len(again) >= owed or time.monotonic() - waiting_since >= REDELIVERY_WAITS * self.ack_wait):
                owed = 0  # every old one is back (or gone from the stream): they go first, in order
            if not owed and (again or held):
                ordered = [again[seq] for seq in sorted(again) if again[seq] is not None]
                ordered += [held[seq] for seq in sorted(held)]
                again, held = {}, {}
                if ordered:
                    yield [self._take(msg) for msg in ordered]
                    continue
            if idle_end_s is not None and not owed and time.monotonic() - last_message >= idle_end_s:
                return
            yield []

    def _where(self, seq: int) -> str:
        return f"stream {self.spec.stream} message {seq}"

    def _owner(self, seq: int, msg: Any) -> int:
        """The worker whose message it is: by sequence, or under --partition-key by its record's key."""
        context = self.context
        if context.partition_key is None:
            return seq % context.num_workers
        return share_of(decode(msg.data, context.fmt, self._where(seq)), seq, context, self._where(seq))[0]

    def _take(self, msg: Any) -> tuple[int, Any]:
        seq = msg.metadata.sequence.stream
        self._unacked[seq] = msg
        self._last = max(self._last, seq)
        record = decode(msg.data, self.context.fmt, self._where(seq))
        if self.context.partition_key is not None:  # a record without the key is malformed
            record = share_of(record, seq, self.context, self._where(seq))[1]
        return seq, record

    def _ack(self, messages: list[Any]) -> None:
        async def ack() -> None:
            for msg in messages:
                await msg.ack()
            await self._nc.flush()

        try:
            self._run(ack())
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise self._lost(exc) from exc

    def ack(self, position: int) -> None:
        done = [seq for seq in self._unacked if seq <= position]
        if done:
            self._ack([self._unacked.pop(seq) for seq in done])

    def close(self) -> None:
        if self._io is None:
            return
        if self._nc is not None:
            # Closing: what was acknowledged was flushed with the ack.
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                self._run(self._nc.close())
        self._io.close()
