"""Driving a psserver with a server logic over raw Exchange streams, message by message."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

import grpc
from conftest import START_TIMEOUT_S, Processes, Service

from psclient.children import shard_argv
from psclient.wire.codec import decode_batch, decode_rows, encode_keys, encode_values
from psclient.wire.proto import shard_pb2, shard_pb2_grpc
from psclient.wire.records import unpack

TIMEOUT_S = 30.0


def start_logic_shard(procs: Processes, logic: str) -> shard_pb2_grpc.ParameterShardStub:
    return start_logic_service(procs, logic)[0]


def start_logic_service(procs: Processes, logic: str) -> tuple[shard_pb2_grpc.ParameterShardStub, Service]:
    service = procs.start_server(shard_argv(0, 1, "const:0", "add", "WARNING", "--logic", logic))
    channel = grpc.insecure_channel(service.address)
    grpc.channel_ready_future(channel).result(timeout=START_TIMEOUT_S)
    return shard_pb2_grpc.ParameterShardStub(channel), service


class Stream:
    """One Exchange stream driven by hand: send a message, read answers as they come.
    The whole stream has `timeout` seconds: a read that waits longer fails, never hangs."""

    def __init__(self, stub: shard_pb2_grpc.ParameterShardStub, timeout: float = TIMEOUT_S):
        self._requests: queue.Queue[shard_pb2.ExchangeRequest | None] = queue.Queue()
        self._responses = stub.Exchange(iter(self._requests.get, None), timeout=timeout)

    def send(
        self,
        *,
        push: tuple[int, list[Any], list[Any]] | None = None,
        pull: tuple[int, list[Any], int] | None = None,
        origin: int = 0,
        worker_id: str = "job-w0",
    ) -> None:
        """A message; a push with `origin` carries it as its record's position (a restartable worker's)."""
        request = shard_pb2.ExchangeRequest()
        if push is not None:
            seq, ids, deltas = push
            batches = encode_values(ids, deltas)
            request.push.CopyFrom(shard_pb2.PushRequest(worker_id=worker_id, seq=seq, batches=batches))
            if origin:
                request.push.origins.extend([shard_pb2.PushOrigin(position=origin, part=0)] * len(batches))
        if pull is not None:
            request_id, ids, worker_index = pull
            request.pull.CopyFrom(
                shard_pb2.PullRequest(request_id=request_id, keys=encode_keys(ids), worker_index=worker_index)
            )
        self._requests.put(request)

    def answers(self) -> Iterator[shard_pb2.ExchangeResponse]:
        return self._responses

    def close(self) -> None:
        self._requests.put(None)


def decode_rows_of(ids: list[Any], values: list[Any]) -> list[Any]:
    return [decode_batch(batch, with_values=True) for batch in encode_values(ids, values)]


def pulled(response: shard_pb2.ExchangeResponse) -> dict[Any, Any]:
    ids, values = decode_rows(response.pull.batches)
    return dict(zip(ids, values, strict=True))


def logic_outputs(stub: shard_pb2_grpc.ParameterShardStub) -> list[Any]:
    return [unpack(out) for chunk in stub.LogicOutputs(shard_pb2.LogicOutputsRequest()) for out in chunk.outputs]


def await_pull_requests(stub: shard_pb2_grpc.ParameterShardStub, count: int) -> None:
    """Wait until the shard has read `count` pull requests (so the next message comes after them)."""
    deadline = time.monotonic() + TIMEOUT_S
    while stub.Info(shard_pb2.InfoRequest()).pull_requests < count:
        assert time.monotonic() < deadline, f"the shard never read {count} pull requests"
        time.sleep(0.01)
