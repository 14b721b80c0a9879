"""gRPC failures as the one-line errors users see, how a stopping shard says so, and which
failures of a stream a new stream may heal."""

from __future__ import annotations

import grpc

from psclient.errors import ShardError


def describe_rpc_error(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'UNKNOWN'}: {details}"


# A shard that stops ends its open streams with UNAVAILABLE and details ending so.
SHUTTING_DOWN = "is shutting down"
# What grpc.aio reports for a write to a stream its peer has just ended.
WRITE_FAILED = "Internal error from Core"
# A stream or call ended so because the shard or the connection went away, not because the
# shard refused what it was sent: the same request may succeed on a new connection.
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


class StreamBroken(ShardError):
    """A stream to a shard broke (the shard stopped or died, the connection dropped): a new
    stream to the same address may carry on. Every other ShardError would happen again.
    `reason` is the message without the shard's name."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"{what} {reason}")
        self.reason = reason


def is_transient(exc: grpc.RpcError) -> bool:
    """Whether the failed call may succeed if made again on a new connection."""
    code = exc.code() if hasattr(exc, "code") else None
    if code == grpc.StatusCode.INTERNAL:
        return (exc.details() if hasattr(exc, "details") else "") == WRITE_FAILED
    return code in _TRANSIENT


def shutting_down_details(shard: int) -> str:
    return f"shard {shard} {SHUTTING_DOWN}"


def stream_error(what: str, exc: grpc.RpcError) -> ShardError:
    """A failed stream to the shard `what` as one line; a clean stop of the shard says just that.
    A StreamBroken when a new stream may heal it."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    if code == grpc.StatusCode.UNAVAILABLE and details.endswith(SHUTTING_DOWN):
        reason = SHUTTING_DOWN
    else:
        reason = f"failed: {describe_rpc_error(exc)}"
    return StreamBroken(what, reason) if is_transient(exc) else ShardError(f"{what} {reason}")


def unreachable_reason(exc: grpc.RpcError) -> str:
    """Why a connection attempt failed, short: gRPC's own details repeat themselves."""
    code = exc.code() if hasattr(exc, "code") else None
    details = ((exc.details() if hasattr(exc, "details") else "") or "").replace("\n", " ")
    if code == grpc.StatusCode.UNAVAILABLE and "refused" in details.lower():
        return "connection refused"
    if code == grpc.StatusCode.UNAVAILABLE and "resolv" in details.lower():
        return "the name did not resolve"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer"
    return describe_rpc_error(exc).replace("\n", " ")
