"""The shard service with a server logic (psserver.logic): answers that may come later.

A stream is read and its requests handled in order as they come, as with a
data dir (psserver.durable_service, whose pipelining this reuses): a push is
deduplicated and handed to the logic at once, and a pull is handed to the
logic, whose answers fill it in. A second task sends the answers in request
order, each once it is complete. So a pull waiting for a lock holds back only
the answers behind it on its own stream, never the reading: the push that
frees the lock, on this stream or another, is still read and applied.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from psclient.wire.proto import shard_pb2, tensor_pb2
from psserver.durable_service import DurableShardServicer
from psserver.logic import LogicStore

# Bytes of outputs per LogicOutputs chunk: well under gRPC's 4 MiB message limit.
OUTPUT_CHUNK_BYTES = 1 << 20


class LogicShardServicer(DurableShardServicer):
    def __init__(self, store: LogicStore, shard: int, num_shards: int):
        super().__init__(store, shard, num_shards)
        self.logic_store = store

    async def _start_pull(
        self, request: shard_pb2.PullRequest, response: shard_pb2.PullResponse, context: grpc.aio.ServicerContext
    ) -> asyncio.Future[None]:
        """Hand the pull to the logic; the future is done once `response` holds every answer."""
        op = self._metrics["pull"]
        started = time.perf_counter()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def finish(batches: list[tensor_pb2.ParamBatch]) -> None:
            response.batches.extend(batches)
            op.observe(started, len(ids), sum(len(b.values.data) for b in batches))
            done.set_result(None)

        response.request_id = request.request_id
        try:
            ids = self._decode(request.keys, with_values=False).ids()
            self.logic_store.pull_logic(ids, request.worker_index, finish)
        except Exception as exc:
            op.errors.inc()
            await self._abort(context, exc)
        self._pull_requests += 1
        self._pulled_keys += len(ids)
        return done

    async def _answer_pull(
        self, request: shard_pb2.PullRequest, context: grpc.aio.ServicerContext
    ) -> shard_pb2.PullResponse:
        # The Pull stream: one request at a time, as without a logic.
        if request.after_seq and self._watermarks.get(request.worker_id, 0) < request.after_seq:
            await self._await_push(request.worker_id, request.after_seq, context)
        response = shard_pb2.PullResponse()
        done = await self._start_pull(request, response, context)
        await self._wait(lambda: asyncio.shield(done), context)
        return response

    async def _exchange_answer(
        self, request: shard_pb2.ExchangeRequest, context: grpc.aio.ServicerContext
    ) -> tuple[asyncio.Future[None] | None, shard_pb2.ExchangeResponse]:
        """Push before pull, as without a logic; the answer goes once the pull's future is done."""
        ack, _ = await self._apply_push(request.push, context) if request.HasField("push") else (None, None)
        response = shard_pb2.ExchangeResponse(ack=ack)
        if not request.HasField("pull"):
            return None, response
        response.pull.SetInParent()
        return await self._start_pull(request.pull, response.pull, context), response

    async def Info(self, request: shard_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> shard_pb2.InfoResponse:
        response = await super().Info(request, context)
        response.logic = self.logic_store.spec
        return response

    async def LogicOutputs(
        self, request: shard_pb2.LogicOutputsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.LogicOutputChunk]:
        try:
            self.logic_store.close()
        except Exception as exc:
            await self._abort(context, exc)
        chunk: list[bytes] = []
        size = 0
        for out in self.logic_store.handle.outputs:
            if chunk and size + len(out) > OUTPUT_CHUNK_BYTES:
                yield shard_pb2.LogicOutputChunk(outputs=chunk)
                chunk, size = [], 0
            chunk.append(out)
            size += len(out)
        if chunk:
            yield shard_pb2.LogicOutputChunk(outputs=chunk)
