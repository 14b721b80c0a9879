"""What every streamps gRPC server and channel shares: options, limits, health, reflection,
and the wait for a server that is still starting (`ready_channel`).

A server factory binds and returns; it never starts or exits. The caller's
`main()` owns `start()`, the SIGTERM/SIGINT handler and the graceful stop
(with psclient.cli.process, which sets up the process around the server).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import _async as health_aio  # the package's aio servicer (health.aio)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from psclient.errors import ShardError
from psclient.rpc.errors import describe_rpc_error
from psclient.rpc.security import Security
from psclient.rpc.security import current as current_security

# One push or pull batch of 16,384 ids x 1,024 float32 is 64 MiB; allow a bit
# more so the largest batch the runtime builds always fits in one message.
MAX_MESSAGE_BYTES = 128 * 1024 * 1024

# A worker sends a shard its buffered pulls and pushes as one message once they
# hold this many keys, or once the oldest has waited this long (psworker/batching.py);
# `--batch-max-keys` and `--batch-linger-ms` set them. Kept here, where both the
# worker runtime and the command lines that start workers read them.
DEFAULT_BATCH_MAX_KEYS = 4_096
DEFAULT_BATCH_LINGER_MS = 2.0

# How long to wait for a server to accept a connection before giving up.
DEFAULT_CONNECT_TIMEOUT_S = 15.0

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Long-lived streams between workers and shards: ping every 30 s so a dead
    # peer is noticed, but not so often that servers answer GOAWAY (too_many_pings).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),  # port 0 must really be a free port, never a shared one
]

# The sync servers (a worker's Feed, Outputs and Status) hold a pool thread per open
# stream for its whole life: size the pool for many concurrent clients.
DEFAULT_MAX_WORKERS = 256


def _health_status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class _Bound:
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class BoundServer(_Bound):
    server: grpc.Server
    health: health.HealthServicer

    def set_serving(self, serving: bool) -> None:
        self.health.set("", _health_status(serving))


@dataclass
class BoundAioServer(_Bound):
    """An aio server, bound; `start`, `set_serving` and `stop` are coroutines."""

    server: grpc.aio.Server
    health: health_aio.HealthServicer

    async def set_serving(self, serving: bool) -> None:
        await self.health.set("", _health_status(serving))


def build_aio_server(
    register: Callable[[grpc.aio.Server], None], service_names: Sequence[str], host: str, port: int
) -> BoundAioServer:
    """Create and bind an aio server with health and reflection; raise if the port is taken.

    Call on the event loop that will run it.
    """
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=current_security().server_interceptors(aio=True))
    register(server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return BoundAioServer(host=host, port=_bind(server, host, port), server=server, health=health_servicer)


def build_server(
    register: Callable[[grpc.Server], None],
    service_names: Sequence[str],
    host: str,
    port: int,
    max_workers: int = DEFAULT_MAX_WORKERS,
) -> BoundServer:
    """Create and bind a server with health and reflection; raise if the port is taken."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=max_workers - 4,  # leave room for health checks
        interceptors=current_security().server_interceptors(aio=False),
    )
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    bound = BoundServer(host=host, port=_bind(server, host, port), server=server, health=health_servicer)
    bound.set_serving(False)
    return bound


def open_channel(address: str, security: Security | None = None) -> grpc.Channel:
    """A channel with the standard options and this process's (or the given) security."""
    return (security or current_security()).channel(address, CHANNEL_OPTIONS)


def _retry_reason(exc: grpc.RpcError, what: str) -> str:
    """Why a failed health check is worth repeating ("refused", "reset", "unresolved", "no answer"), or raise.

    A refused connection is a server still starting, and a name that does not
    resolve yet is one Kubernetes has not published yet (it publishes a pod's
    DNS name only once the pod is ready), and a reset connection is a server that
    died as it accepted: all heal by waiting. Any other failure
    to connect (a TLS handshake that fails, plaintext against TLS) will not, so
    it is reported at once.
    """
    detail = exc.details() or ""
    code = exc.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer"  # this attempt learned nothing: the lookup or the connect is still under way
    if code == grpc.StatusCode.UNAVAILABLE:
        lowered = detail.lower()
        if "resolving" in lowered or "resolution" in lowered:  # "errors resolving H:P", "DNS resolution failed for H:P"
            return "unresolved"
        if "refused" in lowered:
            return "refused"
        if "reset by peer" in lowered:  # a server killed as it accepted: a supervisor restarts it
            return "reset"
        raise ShardError(
            f"{what}: cannot connect ({detail}); check that both sides agree on TLS "
            "(--tls-ca/--tls-cert/--tls-key) and the token"
        ) from None
    raise ShardError(f"{what}: {describe_rpc_error(exc)}") from None


def _host(address: str) -> str:
    target = address.split("///")[-1]  # dns:///name:port
    host, colon, port = target.rpartition(":")
    return host.strip("[]") if colon and port.isdigit() else target


def ready_channel(address: str, what: str, timeout: float, security: Security | None = None) -> grpc.Channel:
    """A channel to `address` whose server answers its health check.

    Waits up to `timeout` for a server that refuses connections or whose name
    does not resolve yet; raises ShardError naming `what` and the reason. A
    health Check (rather than channel_ready_future) leaves no polling thread
    behind that could trip over the channel being closed later.
    """
    deadline = time.monotonic() + timeout
    pause = 0.05
    channel = open_channel(address, security)
    known = "no answer"  # what the last attempt that learned something said
    try:
        while True:
            try:
                health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=max(deadline - time.monotonic(), 0.01)
                )
                return channel
            except grpc.RpcError as exc:
                reason = _retry_reason(exc, what)
            # The last attempt often ends at the deadline with a lookup still under
            # way: the earlier ones know better why the server was not reached.
            if reason != "no answer":
                known = reason
            left = deadline - time.monotonic()
            if left <= 0:
                if known == "unresolved":
                    raise ShardError(f"{what}: the name {_host(address)} did not resolve within {timeout:g} s")
                raise ShardError(f"{what} is unreachable (no answer after {timeout:g} s)")
            time.sleep(min(pause, left))
            pause = min(pause * 2, 1.0)
            if reason == "unresolved":
                # A channel whose lookup failed retries it on its own backoff, which
                # grows to minutes; a new channel looks the name up again now.
                channel.close()
                channel = open_channel(address, security)
    except BaseException:
        channel.close()
        raise


def _bind(server: grpc.Server | grpc.aio.Server, host: str, port: int) -> int:
    """Bind with TLS when this process has a certificate; raise OSError if the port is taken."""
    credentials = current_security().server_credentials()
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    return bound
