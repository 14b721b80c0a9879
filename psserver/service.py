"""The ParameterShard gRPC service: one shard's pulls, pushes, snapshots and info."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence

import grpc
import numpy as np

from psclient._proto import shard_pb2, shard_pb2_grpc, tensor_pb2
from psclient.codec import decode_batch, encode_rows
from psclient.errors import WireError
from psclient.partition import Id, shard_of, shards_of_ints
from psclient.serving import BoundServer, build_server
from psserver.store import ParameterStore

log = logging.getLogger("streamps.shard")

# A pull that names after_seq waits this long for that push to arrive on the
# worker's Push stream. The worker sends the push first, so only a failed or
# rejected push stream makes it wait: then the pull fails instead of hanging.
AFTER_SEQ_TIMEOUT_S = 60.0
MAX_IDS_PER_BATCH = 1 << 20
DEFAULT_SNAPSHOT_ROWS = 16_384


def encode_groups(groups: Sequence[tuple[Sequence[Id], np.ndarray]]) -> list[tensor_pb2.ParamBatch]:
    return [encode_rows(ids, values) for ids, values in groups]


class ShardServicer(shard_pb2_grpc.ParameterShardServicer):
    def __init__(self, store: ParameterStore, shard: int, num_shards: int):
        self.store = store
        self.shard = shard
        self.num_shards = num_shards
        # One lock serializes the store; the condition on it wakes pulls that
        # wait for a push (read-your-writes across the Pull and Push streams).
        self._lock = threading.Condition()
        self._watermarks: dict[str, int] = {}
        self._started = time.monotonic()
        self._pull_requests = self._pulled_keys = 0
        self._push_requests = self._pushed_keys = 0

    # -- helpers ------------------------------------------------------------

    def _decode_ids(self, batch: tensor_pb2.ParamBatch, with_values: bool) -> tuple[list[Id], np.ndarray | None]:
        decoded = decode_batch(batch, with_values=with_values)
        if len(decoded) > MAX_IDS_PER_BATCH:
            raise WireError(f"batch of {len(decoded)} ids exceeds the limit of {MAX_IDS_PER_BATCH}")
        if len(decoded.int_ids) and np.any(shards_of_ints(decoded.int_ids, self.num_shards) != self.shard):
            raise WireError(f"batch holds int ids that do not belong to shard {self.shard}")
        for param_id in decoded.str_ids:
            if shard_of(param_id, self.num_shards) != self.shard:
                raise WireError(f"id {param_id!r} does not belong to shard {self.shard}")
        return decoded.ids(), decoded.values

    @staticmethod
    def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, WireError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.exception("request failed")
        context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    # -- RPCs ---------------------------------------------------------------

    def Pull(
        self, request_iterator: Iterator[shard_pb2.PullRequest], context: grpc.ServicerContext
    ) -> Iterator[shard_pb2.PullResponse]:
        for request in request_iterator:
            try:
                ids, _ = self._decode_ids(request.keys, with_values=False)
                worker_id, after_seq = request.worker_id, request.after_seq
                with self._lock:
                    if after_seq and not self._lock.wait_for(
                        lambda: self._watermarks.get(worker_id, 0) >= after_seq,  # noqa: B023 (called at once)
                        timeout=AFTER_SEQ_TIMEOUT_S,
                    ):
                        context.abort(
                            grpc.StatusCode.FAILED_PRECONDITION,
                            f"push seq {request.after_seq} of worker {request.worker_id} never arrived",
                        )
                    groups = self.store.pull(ids)
                    self._pull_requests += 1
                    self._pulled_keys += len(ids)
                batches = encode_groups(groups)
            except Exception as exc:
                self._abort(context, exc)
            yield shard_pb2.PullResponse(request_id=request.request_id, batches=batches)

    def Push(
        self, request_iterator: Iterator[shard_pb2.PushRequest], context: grpc.ServicerContext
    ) -> Iterator[shard_pb2.PushAck]:
        for request in request_iterator:
            if not request.worker_id or request.seq == 0:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a push needs a worker_id and a seq >= 1")
            try:
                decoded = [self._decode_ids(b, with_values=True) for b in request.batches]
                with self._lock:
                    if request.seq <= self._watermarks.get(request.worker_id, 0):
                        duplicate = True
                    else:
                        self.store.push(decoded)  # type: ignore[arg-type]
                        self._watermarks[request.worker_id] = request.seq
                        self._push_requests += 1
                        self._pushed_keys += sum(len(ids) for ids, _ in decoded)
                        self._lock.notify_all()
                        duplicate = False
            except Exception as exc:
                self._abort(context, exc)
            yield shard_pb2.PushAck(seq=request.seq, duplicate=duplicate)

    def Snapshot(
        self, request: shard_pb2.SnapshotRequest, context: grpc.ServicerContext
    ) -> Iterator[shard_pb2.SnapshotChunk]:
        max_rows = request.max_rows_per_chunk or DEFAULT_SNAPSHOT_ROWS
        with self._lock:
            chunks = self.store.chunks(max_rows)
            groups = next(chunks, None)
        while groups is not None:
            yield shard_pb2.SnapshotChunk(batches=encode_groups(groups))
            with self._lock:
                groups = next(chunks, None)

    def Info(self, request: shard_pb2.InfoRequest, context: grpc.ServicerContext) -> shard_pb2.InfoResponse:
        with self._lock:
            return shard_pb2.InfoResponse(
                shard=self.shard,
                num_shards=self.num_shards,
                num_params=len(self.store),
                init_spec=self.store.init.spec,
                update_spec=self.store.update.spec,
                watermarks=dict(self._watermarks),
                pull_requests=self._pull_requests,
                pulled_keys=self._pulled_keys,
                push_requests=self._push_requests,
                pushed_keys=self._pushed_keys,
                uptime_seconds=time.monotonic() - self._started,
            )


def build_shard_server(
    store: ParameterStore, shard: int, num_shards: int, host: str, port: int
) -> tuple[BoundServer, ShardServicer]:
    servicer = ShardServicer(store, shard, num_shards)
    name = shard_pb2.DESCRIPTOR.services_by_name["ParameterShard"].full_name
    bound = build_server(
        lambda server: shard_pb2_grpc.add_ParameterShardServicer_to_server(servicer, server), [name], host, port
    )
    return bound, servicer
