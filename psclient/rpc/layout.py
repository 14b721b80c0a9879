"""The connect-time checks of a cluster's shards: each one's Info against its place in the list.

Ids are routed by a shard's place in the server list; a shard started with
another index or count must be named before the first record reaches it.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from psclient.errors import ShardError
from psclient.rpc.errors import describe_rpc_error
from psclient.wire.proto import shard_pb2, shard_pb2_grpc


def fetch_info(channel: grpc.Channel, what: str, timeout: float) -> shard_pb2.InfoResponse:
    """The shard's Info (its index and count among others); ShardError if it has none."""
    try:
        return shard_pb2_grpc.ParameterShardStub(channel).Info(shard_pb2.InfoRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        raise info_error(what, exc) from None


def info_error(what: str, exc: grpc.RpcError) -> ShardError:
    """A failed Info call to the shard `what` as one line."""
    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
        return ShardError(f"{what} is not a shard (it does not serve the ParameterShard service)")
    return ShardError(f"{what}: {describe_rpc_error(exc)}")


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def layout_problems(
    servers: Sequence[str], infos: Sequence[shard_pb2.InfoResponse | None], listed_as: str = "servers"
) -> list[tuple[int, str]]:
    """(place in `servers`, message) for every shard whose Info disagrees with its place.

    Ids are routed by their place in the list, modulo its length: a shard started
    with another index or count would accept some pushes and refuse others as
    not its own, mid-job. Wrong counts come first, then two shards claiming one
    index, then shards listed out of order: the first is the likeliest cause.
    `None` stands for a shard that did not answer.
    """
    count = len(servers)
    listed = f"{count} address" if count == 1 else f"{count} addresses"
    known = [(place, address, info) for place, (address, info) in enumerate(zip(servers, infos, strict=True)) if info]
    problems = [
        (place,
         f"{listed_as} lists {listed} but the shard at {address} says it is shard {info.shard} of {info.num_shards}")
        for place, address, info in known
        if info.num_shards != count
    ]  # fmt: skip
    claimed: dict[int, str] = {}
    for place, address, info in known:
        if info.num_shards != count:
            continue
        if info.shard in claimed:
            message = (
                f"{listed_as}: the shards at {claimed[info.shard]} and {address} both say they are shard "
                f"{info.shard} of {count} (each shard needs its own --shard)"
            )
            problems.append((place, message))
        claimed.setdefault(info.shard, address)
    reported = {place for place, _ in problems}
    problems.extend(
        (place, f"{listed_as}: the {_ordinal(place + 1)} address {address} is shard {info.shard} of {count}, "
                f"expected shard {place}")
        for place, address, info in known
        if place not in reported and info.num_shards == count and info.shard != place
    )  # fmt: skip
    return problems


def check_layout(servers: Sequence[str], infos: Sequence[shard_pb2.InfoResponse], listed_as: str = "servers") -> None:
    """Raise ShardError naming the first shard whose Info disagrees with its place in `servers`."""
    problems = layout_problems(servers, infos, listed_as)
    if problems:
        raise ShardError(problems[0][1])
