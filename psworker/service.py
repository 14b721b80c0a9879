"""The Worker gRPC service: Feed records in (to the worker's FeedSource: psworker/sources/feed.py),
stream Outputs out, report Status."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import grpc

from psclient.errors import JobFailed, WireError
from psclient.rpc.serving import BoundServer, build_server
from psclient.wire.proto import worker_pb2, worker_pb2_grpc
from psclient.wire.records import pack
from psworker.runtime import State, WorkerRuntime
from psworker.sources.feed import FeedSource

OUTPUT_CHUNK = 1_024
# Feed requests read ahead of the input queue, and how often a call waiting for its next
# one checks for a stop.
FEED_READ_AHEAD = 2
FEED_STOP_POLL_S = 0.1
_NO_MORE = object()
# Bytes of outputs per chunk, at most (but at least one output): large outputs then
# come in several messages rather than one over gRPC's message size limit.
OUTPUT_CHUNK_BYTES = 1 << 20
# How long the Outputs stream lets a partial chunk fill before it sends it: one
# message per output would cost the worker more than the outputs themselves.
OUTPUT_LINGER_S = 0.005


class OutputBuffer:
    """Encoded outputs waiting for the Outputs stream. Unbounded: the logic
    never blocks on a slow (or absent) subscriber."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: deque[bytes] = deque()
        self._closed = False
        self.delivered = threading.Event()  # set once a subscriber has read everything
        self.subscription = threading.Lock()  # held by the one Outputs stream reading

    def put(self, out: object) -> None:
        """Queue one output; called from one thread only (the logic's)."""
        data = pack(out)  # raises WireError inside the user's callback: a clear message
        items = self._items
        # No lock for the append: with one putter, the reader (which checks under
        # the lock before it waits) is woken whenever it may be waiting for this.
        items.append(data)
        count = len(items)
        if count == 1 or count == OUTPUT_CHUNK:
            with self._cond:
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, timeout: float) -> list[bytes] | None:
        """Up to OUTPUT_CHUNK outputs and OUTPUT_CHUNK_BYTES; [] on timeout; None when closed and drained."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            if self._items and len(self._items) < OUTPUT_CHUNK and not self._closed:
                self._cond.wait(OUTPUT_LINGER_S)  # woken early by a full chunk or by close
            if not self._items:
                return None if self._closed else []
            items = self._items
            chunk = [items.popleft()]
            size = len(chunk[0])
            while items and len(chunk) < OUTPUT_CHUNK and size + len(items[0]) <= OUTPUT_CHUNK_BYTES:
                size += len(items[0])
                chunk.append(items.popleft())
            return chunk

    def pending(self) -> list[bytes]:
        """The outputs no reader has taken yet, in order: what a restartable worker's
        checkpoint keeps, since the records they came from are not replayed. Called on the
        logic's thread (the one putter), so none is added meanwhile."""
        with self._cond:
            return list(self._items)

    def restore(self, pending: list[bytes]) -> None:
        """Put back the outputs a checkpoint kept, before the logic makes any new one."""
        with self._cond:
            self._items.extendleft(reversed(pending))
            self._cond.notify_all()


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, runtime: WorkerRuntime, outputs: OutputBuffer, feed: FeedSource):
        self.runtime = runtime
        self.outputs = outputs
        self.feed = feed

    def Feed(
        self, request_iterator: Iterator[worker_pb2.FeedRequest], context: grpc.ServicerContext
    ) -> worker_pb2.FeedResponse:
        feed = self.feed
        accepted = 0
        end = False
        try:
            for request in self._requests(request_iterator, context):
                accepted += feed.push(request.records)
                end = end or request.end_of_input
        except WireError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"record {accepted + 1} of this call: {exc}")
        except JobFailed as exc:
            # OUT_OF_RANGE: a stop on a signal ended the input (feeding past its end), not a failure.
            code = grpc.StatusCode.OUT_OF_RANGE if feed.stopped else grpc.StatusCode.FAILED_PRECONDITION
            context.abort(code, str(exc))
        if end:
            feed.end()
        return worker_pb2.FeedResponse(accepted=accepted)

    def _requests(
        self, request_iterator: Iterator[worker_pb2.FeedRequest], context: grpc.ServicerContext
    ) -> Iterator[worker_pb2.FeedRequest]:
        """The call's requests, read on a thread of their own, so that a stop on a signal ends
        a call that waits for its next request too: with OUT_OF_RANGE and the stop's reason."""
        ahead: queue.Queue[Any] = queue.Queue(maxsize=FEED_READ_AHEAD)

        def read() -> None:
            try:
                for request in request_iterator:
                    ahead.put(request)
                ahead.put(_NO_MORE)
            except Exception as exc:  # the client went away: the handler raises it as before
                ahead.put(exc)

        threading.Thread(target=read, name="feed-reader", daemon=True).start()
        while True:
            try:
                item = ahead.get(timeout=FEED_STOP_POLL_S)
            except queue.Empty:
                reason = self.feed.stop_reason
                if reason is not None:
                    context.abort(grpc.StatusCode.OUT_OF_RANGE, reason)
                continue
            if item is _NO_MORE:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def Outputs(
        self, request: worker_pb2.OutputsRequest, context: grpc.ServicerContext
    ) -> Iterator[worker_pb2.OutputChunk]:
        if not self.outputs.subscription.acquire(blocking=False):
            context.abort(grpc.StatusCode.ALREADY_EXISTS, "another client is reading this worker's outputs")
        try:
            while context.is_active():
                chunk = self.outputs.take(timeout=0.5)
                if chunk is None:
                    break
                if chunk:
                    yield worker_pb2.OutputChunk(outputs=chunk)
            else:
                return
            self.outputs.delivered.set()
            if self.runtime.state is State.FAILED:
                context.abort(grpc.StatusCode.ABORTED, self.runtime.error or "worker failed")
        finally:
            self.outputs.subscription.release()

    def Status(self, request: worker_pb2.StatusRequest, context: grpc.ServicerContext) -> worker_pb2.StatusResponse:
        runtime = self.runtime
        counters = runtime.counters()
        return worker_pb2.StatusResponse(
            state=worker_pb2.StatusResponse.State.ValueType(runtime.state.value),
            worker_index=runtime.worker_index,
            num_workers=runtime.num_workers,
            error=runtime.error or "",
            uptime_seconds=time.monotonic() - runtime.started,
            next_position=self.feed.next_position,
            checkpoint_position=runtime.checkpoint_position,
            **{name: value for name, value in counters.items() if name in _STATUS_FIELDS},
        )


# The counters a StatusResponse carries (the queue depths are for the metrics endpoint only).
_STATUS_FIELDS = frozenset(worker_pb2.StatusResponse.DESCRIPTOR.fields_by_name)


def build_worker_server(
    runtime: WorkerRuntime, outputs: OutputBuffer, host: str, port: int, feed: FeedSource | None = None
) -> BoundServer:
    """The Worker service on `host:port`, its Feed calls pushing into `feed` (by default a new FeedSource)."""
    servicer = WorkerServicer(runtime, outputs, feed or FeedSource(runtime))
    name = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
    return build_server(
        lambda server: worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server), [name], host, port
    )
