"""gRPC failures as the one-line errors users see, and how a stopping shard says so."""

from __future__ import annotations

import grpc

from psclient.errors import ShardError


def describe_rpc_error(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'UNKNOWN'}: {details}"


# A shard that stops ends its open streams with UNAVAILABLE and details ending so.
SHUTTING_DOWN = "is shutting down"


def shutting_down_details(shard: int) -> str:
    return f"shard {shard} {SHUTTING_DOWN}"


def stream_error(what: str, exc: grpc.RpcError) -> ShardError:
    """A failed stream to the shard `what` as one line; a clean stop of the shard says just that."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    if code == grpc.StatusCode.UNAVAILABLE and details.endswith(SHUTTING_DOWN):
        return ShardError(f"{what} {SHUTTING_DOWN}")
    return ShardError(f"{what} failed: {describe_rpc_error(exc)}")
