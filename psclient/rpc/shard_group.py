"""The blocking batch API over every shard of a cluster (`ShardGroup`).

Pull a list of ids, push a list of deltas: over a Pull and a Push stream per
shard, each batch is sliced by owning shard and the slices are sent concurrently.
"""

from __future__ import annotations

import itertools
import queue
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import numpy as np

from psclient.errors import ShardError
from psclient.rpc.errors import stream_error
from psclient.rpc.layout import check_layout, fetch_info
from psclient.rpc.security import Security
from psclient.rpc.serving import DEFAULT_CONNECT_TIMEOUT_S, ready_channel
from psclient.wire.codec import (
    INT_IDS_DTYPE,
    decode_batch,
    decode_rows,
    encode_id_array,
    encode_keys,
    encode_values,
)
from psclient.wire.partition import Id, check_id, split_by_shard, split_int_ids
from psclient.wire.proto import shard_pb2, shard_pb2_grpc, tensor_pb2

_END = object()


class _RequestStream:
    """The request side of a streaming call: gRPC's sender thread iterates it."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def put(self, request: Any) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(_END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            request = self._queue.get()
            if request is _END:
                return
            yield request


class _BlockingStreams:
    """Pull and Push streams to one shard whose answers the calling thread reads itself.

    Reading in the caller saves the hand-over to a reader thread and back, which
    is most of a blocking call's latency on loopback.
    """

    def __init__(self, shard: int, address: str, connect_timeout: float, security: Security | None):
        self.shard = shard
        self.address = address
        self._channel = ready_channel(address, self.describe(), connect_timeout, security)
        try:
            self.info = fetch_info(self._channel, self.describe(), connect_timeout)
        except ShardError:
            self._channel.close()
            raise
        stub = shard_pb2_grpc.ParameterShardStub(self._channel)
        self._pulls, self._pushes = _RequestStream(), _RequestStream()
        self._pull_answers = stub.Pull(iter(self._pulls))
        self._push_acks = stub.Push(iter(self._pushes))

    def describe(self) -> str:
        return f"shard {self.shard} at {self.address}"

    def send_pull(self, request: shard_pb2.PullRequest) -> None:
        self._pulls.put(request)

    def send_push(self, request: shard_pb2.PushRequest) -> None:
        self._pushes.put(request)

    def _next(self, answers: Any) -> Any:
        try:
            return next(answers)
        except grpc.RpcError as exc:
            raise stream_error(self.describe(), exc) from None
        except StopIteration:
            raise ShardError(f"{self.describe()} closed its stream") from None

    def pull_answer(self) -> shard_pb2.PullResponse:
        return self._next(self._pull_answers)

    def push_ack(self) -> shard_pb2.PushAck:
        return self._next(self._push_acks)

    def close(self) -> None:
        self._pulls.close()
        self._pushes.close()
        self._pull_answers.cancel()
        self._push_acks.cancel()
        self._channel.close()


class ShardGroup:
    """Blocking batch pulls and pushes against every shard of a cluster.

    A call sends its slice to every shard it touches at once, then collects the
    answers. Calls from several threads take turns (one lock). A pull after a
    push through the same group sees it. A shard that fails or goes away makes
    the call raise ShardError (a silent peer is found by the channel keepalive).
    Opening the group raises ShardError if a shard's own index or count
    disagrees with its place in `servers` (`servers_label` names that list).
    """

    def __init__(
        self,
        servers: Sequence[str],
        *,
        worker_id: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        security: Security | None = None,
        servers_label: str = "servers",
    ):
        self.servers = list(servers)
        self.worker_id = worker_id or f"client-{uuid.uuid4().hex[:12]}"
        self._lock = threading.Lock()
        self._request_ids = itertools.count(1)
        self._seqs = [0] * len(servers)
        self.connections: list[_BlockingStreams] = []
        try:
            for shard, address in enumerate(servers):
                self.connections.append(_BlockingStreams(shard, address, connect_timeout, security))
            check_layout(self.servers, [c.info for c in self.connections], servers_label)
        except BaseException:
            self.close()
            raise

    @property
    def num_shards(self) -> int:
        return len(self.servers)

    def _pull(self, slices: list[tuple[int, tensor_pb2.ParamBatch]]) -> list[shard_pb2.PullResponse]:
        """Send one pull per (shard, keys) and return the answers in the same order."""
        with self._lock:
            for shard, keys in slices:
                self.connections[shard].send_pull(
                    shard_pb2.PullRequest(
                        request_id=next(self._request_ids),
                        keys=keys,
                        worker_id=self.worker_id,
                        after_seq=self._seqs[shard],
                    )
                )
            return [self.connections[shard].pull_answer() for shard, _ in slices]

    def _push(self, slices: list[tuple[int, list[tensor_pb2.ParamBatch]]]) -> None:
        with self._lock:
            for shard, batches in slices:
                self._seqs[shard] += 1
                self.connections[shard].send_push(
                    shard_pb2.PushRequest(worker_id=self.worker_id, seq=self._seqs[shard], batches=batches)
                )
            for shard, _ in slices:
                self.connections[shard].push_ack()

    def pull(self, ids: Sequence[Id]) -> list[Any]:
        """Values of `ids` in the order given (arrays, or Python scalars)."""
        ids = [check_id(i) for i in ids]
        slices = [
            (shard, encode_keys([ids[p] for p in positions]))
            for shard, positions in enumerate(split_by_shard(ids, self.num_shards))
            if positions
        ]
        by_id: dict[Id, Any] = {}
        for answer in self._pull(slices):
            got_ids, values = decode_rows(answer.batches)
            by_id.update(zip(got_ids, values, strict=True))
        return [by_id[i] for i in ids]

    def push(self, ids: Sequence[Id], deltas: Sequence[Any]) -> None:
        """Apply deltas and wait until every shard acknowledged them."""
        ids = [check_id(i) for i in ids]
        if len(ids) != len(deltas):
            raise ValueError(f"{len(ids)} ids but {len(deltas)} deltas")
        self._push(
            [
                (shard, encode_values([ids[p] for p in positions], [deltas[p] for p in positions]))
                for shard, positions in enumerate(split_by_shard(ids, self.num_shards))
                if positions
            ]
        )

    # -- vectorized int-id batches: no per-key Python work ---------------------

    def _split_ints(self, ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(shard, positions) of every shard that owns some of `ids`."""
        if self.num_shards == 1:
            return [(0, np.arange(len(ids)))]
        return split_int_ids(ids, self.num_shards)

    def pull_array(self, ids: np.ndarray) -> np.ndarray:
        """Values of int `ids` stacked in one array, row i for ids[i].

        Every pulled parameter must share one dtype and shape (one table per shard).
        """
        ids = np.ascontiguousarray(ids, dtype=INT_IDS_DTYPE)
        split = self._split_ints(ids)
        answers = self._pull([(shard, encode_id_array(ids[positions])) for shard, positions in split])
        result: np.ndarray | None = None
        for (_, positions), answer in zip(split, answers, strict=True):
            if len(answer.batches) != 1:
                raise ShardError("pulled parameters differ in dtype or shape; use pull() for those")
            values = decode_batch(answer.batches[0], with_values=True).values
            assert values is not None
            if result is None:
                result = np.empty((len(ids), *values.shape[1:]), dtype=values.dtype)
            result[positions] = values
        return result if result is not None else np.empty((0,))

    def push_array(self, ids: np.ndarray, deltas: np.ndarray) -> None:
        """Apply deltas[i] to int ids[i]; returns once every shard acknowledged."""
        ids = np.ascontiguousarray(ids, dtype=INT_IDS_DTYPE)
        deltas = np.asarray(deltas)
        if deltas.shape[:1] != ids.shape:
            raise ValueError(f"{len(ids)} ids but deltas of shape {deltas.shape}")
        self._push(
            [
                (
                    shard,
                    [encode_id_array(ids[positions], deltas[positions])],
                )
                for shard, positions in self._split_ints(ids)
            ]
        )

    def close(self) -> None:
        for connection in self.connections:
            connection.close()
        self.connections = []

    def __enter__(self) -> ShardGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
