"""TLS, mutual TLS and bearer tokens for every streamps channel and server.

One `Security` per process, set once by each command line (psclient.cli.options, from
`--tls-cert`, `--tls-key`, `--tls-ca`, `--auth-token-file`) or passed to
`connect()`:

- a server with a certificate and key serves TLS; with a CA as well it also
  requires a client certificate signed by that CA (mutual TLS);
- a client with a CA speaks TLS and verifies the server against the CA; with a
  certificate and key it presents them (for mutual TLS);
- with a token, clients send `authorization: Bearer <token>` on every call and
  servers reject any call without exactly that token with UNAUTHENTICATED. The
  standard health service stays open, so orchestrators can probe it.

The token is read from a file, never taken on the command line or logged.
"""

from __future__ import annotations

import collections
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from psclient.errors import SpecError

_HEALTH_PREFIX = "/grpc.health.v1.Health/"
_DENIED = "missing or wrong bearer token"


@dataclass(frozen=True)
class Security:
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_ca: bytes | None = None
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_files(
        cls, cert: str | None = None, key: str | None = None, ca: str | None = None, token_file: str | None = None
    ) -> Security:
        """Read the material; SpecError names a missing or unusable file."""
        if bool(cert) != bool(key):
            raise SpecError("--tls-cert and --tls-key go together")

        def read(path: str | None, what: str) -> bytes | None:
            if not path:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise SpecError(f"cannot read {what} {path}: {exc.strerror}") from None

        token = None
        raw = read(token_file, "--auth-token-file")
        if raw is not None:
            token = raw.decode("utf-8", errors="strict").strip()
            if not token:
                raise SpecError(f"--auth-token-file {token_file} is empty")
        return cls(read(cert, "--tls-cert"), read(key, "--tls-key"), read(ca, "--tls-ca"), token)

    @property
    def uses_tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def describe(self) -> str:
        parts = []
        if self.tls_cert:
            parts.append("mutual TLS" if self.tls_ca else "TLS")
        elif self.tls_ca:
            parts.append("TLS client")
        if self.token:
            parts.append("bearer token")
        return ", ".join(parts) or "plaintext, no token"

    # -- servers ------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls_key, self.tls_cert)], root_certificates=self.tls_ca, require_client_auth=self.tls_ca is not None
        )

    def server_interceptors(self, aio: bool) -> list[Any]:
        if not self.token:
            return []
        return [_AioTokenCheck(self.token) if aio else _TokenCheck(self.token)]

    # -- clients ------------------------------------------------------------

    def channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        if self.uses_tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.tls_ca, private_key=self.tls_key, certificate_chain=self.tls_cert
            )
            channel = grpc.secure_channel(address, credentials, options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        if self.token:
            channel = grpc.intercept_channel(channel, _TokenSender(self.token))
        return channel

    def aio_channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        """An asyncio channel; its calls carry the token through `call_metadata()`.

        Call on the event loop that will use it.
        """
        if self.uses_tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.tls_ca, private_key=self.tls_key, certificate_chain=self.tls_cert
            )
            return grpc.aio.secure_channel(address, credentials, options=options)
        return grpc.aio.insecure_channel(address, options=options)

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call on an `aio_channel` sends: the bearer token, if any."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


_default = Security()


def configure(security: Security) -> None:
    """Set this process's security (command-line mains call this once)."""
    global _default
    _default = security


def current() -> Security:
    return _default


# -- token interceptors ---------------------------------------------------------


def _expected(token: str) -> bytes:
    return f"Bearer {token}".encode()


def _authorized(metadata: Any, expected: bytes) -> bool:
    given = dict(metadata or ()).get("authorization", "")
    return hmac.compare_digest(str(given).encode(), expected)


def _denying(handler: grpc.RpcMethodHandler, deny: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` whose behaviour is `deny`."""
    if handler.unary_unary:
        make = grpc.unary_unary_rpc_method_handler
    elif handler.unary_stream:
        make = grpc.unary_stream_rpc_method_handler
    elif handler.stream_unary:
        make = grpc.stream_unary_rpc_method_handler
    else:
        make = grpc.stream_stream_rpc_method_handler
    return make(
        deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


class _TokenCheck(grpc.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = _expected(token)

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(_HEALTH_PREFIX):
            return handler
        if _authorized(details.invocation_metadata, self._expected):
            return handler

        def deny(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

        return _denying(handler, deny)


class _AioTokenCheck(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = _expected(token)

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_HEALTH_PREFIX):
            return handler
        if _authorized(details.invocation_metadata, self._expected):
            return handler

        async def deny(_request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

        return _denying(handler, deny)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ["method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"]
    ),
    grpc.ClientCallDetails,
):
    """Call details with the token added (gRPC's own class cannot be built directly)."""


class _TokenSender(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> _CallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._with_token(details), request_iterator)
