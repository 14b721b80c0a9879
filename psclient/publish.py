"""`psclient publish`: a file's records into a Redis stream or a NATS JetStream stream.

One line of the file is one entry: the Redis entry's field `record` (XADD), or
the body of one JetStream message; the workers that read the stream
(`psworker --input redis://...` or `nats://...`) decode it by their
`--format`, as they would read the line from the file. The lines are sent as
they are, so a malformed one reaches the workers, whose `--on-error` decides.
A JetStream stream that does not exist yet is created, listening on the
subject the messages are published to (`?subject=S`; default: the stream's
name), with file storage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from psclient.errors import StreampsError

# Entries sent per round trip (a Redis pipeline; JetStream acks awaited together).
PUBLISH_BATCH = 500
CONNECT_TIMEOUT_S = 5.0
# How long a batch of JetStream messages may wait for their acks (a server that died).
ACK_TIMEOUT_S = 30.0


class PublishError(StreampsError):
    """The stream cannot be reached or written: one line, naming it."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    stream: str
    subject: str
    username: str | None
    password: str | None
    shown: str  # the URL without its password, for messages


def parse_target(url: str) -> Target:
    """redis://[USER:PASSWORD@]HOST[:PORT]/STREAM or nats://[...]HOST[:PORT]/STREAM[?subject=S]."""
    parts = urlsplit(url)
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    if parts.scheme not in ("redis", "nats"):
        raise PublishError(f"--to {shown}: expected redis://HOST:PORT/STREAM or nats://HOST:PORT/STREAM")
    stream = unquote(parts.path.lstrip("/"))
    if not parts.hostname or not stream:
        raise PublishError(f"--to {shown}: expected {parts.scheme}://HOST:PORT/STREAM")
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    # The workers' own options (group, durable, end, ...) may stay in a URL copied from --input.
    subject = query.get("subject", stream) if parts.scheme == "nats" else stream
    try:
        port = parts.port or (6379 if parts.scheme == "redis" else 4222)
    except ValueError as exc:
        raise PublishError(f"--to {shown}: {exc}") from None
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return Target(parts.scheme, parts.hostname, port, stream, subject, username, password, shown)


def _batches(records: Iterable[bytes]) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for record in records:
        batch.append(record)
        if len(batch) >= PUBLISH_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def publish(url: str, records: Iterable[bytes], progress: Callable[[int], None] | None = None) -> int:
    """Append every record to the stream at `url`, in order; return how many were sent."""
    target = parse_target(url)
    if target.scheme == "redis":
        return _publish_redis(target, records, progress)
    return asyncio.run(_publish_nats(target, records, progress))


def _publish_redis(target: Target, records: Iterable[bytes], progress: Callable[[int], None] | None) -> int:
    import redis

    client = redis.Redis(
        host=target.host,
        port=target.port,
        username=target.username,
        password=target.password,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
    )
    sent = 0
    try:
        for batch in _batches(records):
            pipeline = client.pipeline(transaction=False)
            for record in batch:
                pipeline.xadd(target.stream, {"record": record})
            results = pipeline.execute(raise_on_error=False)
            errors = [result for result in results if isinstance(result, Exception)]
            sent += len(results) - len(errors)
            if errors:
                raise errors[0]
            if progress is not None:
                progress(sent)
    except redis.ConnectionError as exc:
        # A pipeline cut short may have written part of its batch: say so, for a rerun.
        where = f"cannot reach Redis at {target.host}:{target.port}" if not sent else f"after {sent} records"
        more = f" (up to {PUBLISH_BATCH} more may have been written)" if sent else ""
        raise PublishError(f"--to {target.shown}: {where}: {exc}{more}") from None
    except redis.RedisError as exc:
        raise PublishError(f"--to {target.shown}: {type(exc).__name__}: {exc} (after {sent} records)") from None
    finally:
        client.close()
    return sent


async def _reported_by_the_caller(_error: Exception) -> None:
    """nats-py's own error callback prints a traceback; what fails here is raised as one line."""


async def _publish_nats(target: Target, records: Iterable[bytes], progress: Callable[[int], None] | None) -> int:
    import nats
    import nats.errors
    import nats.js.errors

    try:
        nc = await nats.connect(
            servers=[f"nats://{target.host}:{target.port}"],
            user=target.username,
            password=target.password,
            connect_timeout=CONNECT_TIMEOUT_S,
            max_reconnect_attempts=1,  # with none, a refused first connect is retried for good
            reconnect_time_wait=0.1,
            error_cb=_reported_by_the_caller,
        )
    except (nats.errors.NoServersError, OSError, TimeoutError) as exc:
        raise PublishError(f"--to {target.shown}: cannot reach NATS at {target.host}:{target.port}: {exc}") from None
    sent = 0
    try:
        js = nc.jetstream()
        try:
            await js.stream_info(target.stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(name=target.stream, subjects=[target.subject])
        for batch in _batches(records):
            # Published together, acked together: the order of one subject is the order sent.
            acks = [await js.publish_async(target.subject, record, wait_stall=ACK_TIMEOUT_S) for record in batch]
            try:
                await asyncio.wait_for(asyncio.gather(*acks), ACK_TIMEOUT_S)
            except TimeoutError:
                raise PublishError(
                    f"--to {target.shown}: JetStream acknowledged no message for {ACK_TIMEOUT_S:g} s "
                    f"(after {sent} records; up to {len(batch)} more may have been written)"
                ) from None
            sent += len(batch)
            if progress is not None:
                progress(sent)
    except (nats.errors.Error, TimeoutError) as exc:
        raise PublishError(f"--to {target.shown}: {type(exc).__name__}: {exc} (after {sent} records)") from None
    finally:
        await nc.close()
    return sent
