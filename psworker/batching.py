"""A worker's per-shard buffers of pulls and pushes, and when each leaves.

One buffer per shard holds the pulls and pushes the logic made since the
last flush, in call order: single ids and values as lists, `pull_many` and
`push_many` chunks as arrays (already split by shard with numpy). A flush
sends the shard one Exchange message: the pushes as one PushRequest (with the
next seq), the pulls as one PullRequest. The shard applies the push before it
answers the pull, which gives read-your-writes.

A buffer leaves when it holds `max_batch` keys, when it has waited `linger_s`
(`--batch-max-keys`, `--batch-linger-ms`), or when the logic runs out of work
(`flush_idle`, Nagle's rule), so the batch size follows the load. A linger of 0
sends every buffer after each record's callback and after the callbacks of each
answered message: no Nagle wait. What the logic does with answers, and how many pulls
may be out, is psworker/loop.py's and psworker/pulls.py's business; this module only
counts what each shard still owes: answers to pull requests, acks to pushes.

It also keeps every message a shard has not answered yet, whole, in the order
it was sent: a shard answers one stream's messages one by one, in order, so the
oldest is always the next answered and is dropped then. After the stream broke,
`unanswered` is what goes again, as it was: every unacknowledged push with its
own seq, in seq order, and every unanswered pull behind the pushes it followed.
The shard's watermark for this worker makes a push it did apply a duplicate,
acknowledged and not applied twice.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from psclient.errors import ShardError
from psclient.wire.codec import INT_IDS_DTYPE, encode_id_array, encode_keys, encode_values
from psclient.wire.partition import Id, shard_of, split_by_shard, split_int_ids
from psclient.wire.proto import shard_pb2, tensor_pb2


class ShardBuffers:
    def __init__(
        self,
        num_shards: int,
        worker_id: str,
        send: Callable[[int, shard_pb2.ExchangeRequest], None],
        *,
        max_batch: int,
        min_batch: int,
        linger_s: float,
        worker_index: int = 0,
    ):
        self.num_shards = num_shards
        self.worker_id = worker_id
        self.worker_index = worker_index  # on every pull, for a shard's server logic
        self.max_batch = max_batch
        self.min_batch = min_batch
        self.linger_s = linger_s
        self._send = send
        # Single ids, and chunks of pull_many (int64 or object arrays: slices are views).
        self._pull_ids: list[list[Id]] = [[] for _ in range(num_shards)]
        self._pull_chunks: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
        self._pull_chunk_keys = [0] * num_shards
        # A shard's pushes, in call order: encoded batches (push_many chunks, and the
        # single pushes made before them), then the single pushes since.
        self._push_batches: list[list[tensor_pb2.ParamBatch]] = [[] for _ in range(num_shards)]
        self._push_batch_keys = [0] * num_shards
        self._push_ids: list[list[Id]] = [[] for _ in range(num_shards)]
        self._push_deltas: list[list[Any]] = [[] for _ in range(num_shards)]
        # A restartable worker's pushes come in parts, one origin per batch (psworker/origins.py);
        # set with the callable that says where its records stand.
        self.finished_below: Callable[[], int] | None = None
        self._push_origins: list[list[shard_pb2.PushOrigin]] = [[] for _ in range(num_shards)]
        # The worker's logical clock (psworker/clocks.py), sent with every pull.
        self.clock = 0
        # When the oldest buffered key came in; None while every buffer is empty.
        self.buffered_since: float | None = None
        self._seqs = [0] * num_shards
        self._request_id = 0
        # What the shards still owe: answers to pull requests, acks of push batches.
        self.pulls_out = [0] * num_shards
        self.unacked_by_shard = [0] * num_shards
        self.unacked = 0
        # Every message sent to a shard and not answered yet, oldest first (see the module doc).
        self._unanswered: list[deque[shard_pb2.ExchangeRequest]] = [deque() for _ in range(num_shards)]
        # Since when a shard owes an answer and has sent none (None: it owes nothing):
        # how long it has been silent, for the shard timeout.
        self.silent_since: list[float | None] = [None] * num_shards

    # -- adding ----------------------------------------------------------------

    def pull(self, param_id: Id) -> None:
        shard = shard_of(param_id, self.num_shards)
        buffer = self._pull_ids[shard]
        buffer.append(param_id)
        if self.buffered_since is None:
            self.buffered_since = time.monotonic()
        if len(buffer) >= self.max_batch:
            self.flush_shard(shard)

    def pull_chunk(self, chunk: np.ndarray) -> None:
        if self.buffered_since is None:
            self.buffered_since = time.monotonic()
        for shard, positions in self.shard_positions(chunk):
            part = chunk if positions is None else chunk[positions]
            while len(part):
                room = self.max_batch - len(self._pull_ids[shard]) - self._pull_chunk_keys[shard]
                self._pull_chunks[shard].append(part[:room])
                self._pull_chunk_keys[shard] += min(room, len(part))
                part = part[room:]
                if self._pull_chunk_keys[shard] + len(self._pull_ids[shard]) >= self.max_batch:
                    self.flush_shard(shard)

    def push(self, param_id: Id, delta: Any) -> None:
        shard = shard_of(param_id, self.num_shards)
        ids = self._push_ids[shard]
        ids.append(param_id)
        self._push_deltas[shard].append(delta)
        if self.buffered_since is None:
            self.buffered_since = time.monotonic()
        if len(ids) + self._push_batch_keys[shard] >= self.max_batch:
            self.flush_shard(shard)

    def push_chunk(self, chunk: np.ndarray, deltas: np.ndarray) -> None:
        """Push `deltas[i]` to `chunk[i]` (an int64 or object array of ids)."""
        if self.buffered_since is None and len(chunk):
            self.buffered_since = time.monotonic()
        for shard, positions in self.shard_positions(chunk):
            part_ids = chunk if positions is None else chunk[positions]
            part_deltas = deltas if positions is None else deltas[positions]
            while len(part_ids):
                room = self.max_batch - len(self._push_ids[shard]) - self._push_batch_keys[shard]
                self._encode_push_chunk(shard, part_ids[:room], part_deltas[:room])
                part_ids, part_deltas = part_ids[room:], part_deltas[room:]
                if len(self._push_ids[shard]) + self._push_batch_keys[shard] >= self.max_batch:
                    self.flush_shard(shard)

    def shard_positions(self, chunk: np.ndarray) -> list[tuple[int, np.ndarray | None]]:
        """(shard, positions in chunk) of every shard owning some of `chunk`; None: all of it."""
        if self.num_shards == 1:
            return [(0, None)]
        if chunk.dtype == object:
            split = split_by_shard(chunk.tolist(), self.num_shards)
            return [(shard, np.asarray(positions, dtype=np.intp)) for shard, positions in enumerate(split) if positions]
        return list(split_int_ids(chunk, self.num_shards))

    def _encode_push_chunk(self, shard: int, ids: np.ndarray, deltas: np.ndarray) -> None:
        batches = self._push_batches[shard]
        singles = self._push_ids[shard]
        if singles:  # encoded first: the shard applies a flush's pushes in the order they were made
            batches.extend(encode_values(singles, self._push_deltas[shard]))
            self._push_batch_keys[shard] += len(singles)
            self._push_ids[shard], self._push_deltas[shard] = [], []
        batches.append(encode_id_array(ids, deltas))
        self._push_batch_keys[shard] += len(ids)

    def add_part(
        self, shard: int, origin: shard_pb2.PushOrigin, batches: list[tensor_pb2.ParamBatch], keys: int
    ) -> None:
        """A restartable worker's pushes of one record's part: they leave in one message."""
        if self.buffered_since is None:
            self.buffered_since = time.monotonic()
        if self._push_batch_keys[shard] and self._push_batch_keys[shard] + keys > self.max_batch:
            self.flush_shard(shard)
        self._push_batches[shard].extend(batches)
        self._push_origins[shard].extend([origin] * len(batches))
        self._push_batch_keys[shard] += keys
        if self._push_batch_keys[shard] >= self.max_batch:
            self.flush_shard(shard)

    # -- what the shards answer ----------------------------------------------------

    def answered(self, shard: int) -> None:
        """The answer to one of the shard's pull requests reached the logic."""
        self.pulls_out[shard] -= 1

    def received(self, shard: int, response: shard_pb2.ExchangeResponse) -> None:
        """The shard answered its oldest unanswered message: drop it, count its ack.

        A duplicate ack (a resent push the shard had applied) counts the same. An
        answer that does not match that message is a broken promise of order,
        which resending could only make worse: ShardError.
        """
        unanswered = self._unanswered[shard]
        if not unanswered:
            raise ShardError("it answered a message that was never sent")
        request = unanswered[0]
        if response.HasField("ack") != request.HasField("push") or response.HasField("pull") != request.HasField(
            "pull"
        ):
            raise ShardError("its answer does not match the message it answers")
        if request.HasField("push") and response.ack.seq != request.push.seq:
            raise ShardError(f"it acknowledged push seq {response.ack.seq} where seq {request.push.seq} was due")
        if request.HasField("pull") and response.pull.request_id != request.pull.request_id:
            raise ShardError(
                f"it answered pull request {response.pull.request_id} where request {request.pull.request_id} was due"
            )
        unanswered.popleft()
        self.silent_since[shard] = time.monotonic() if unanswered else None
        if request.HasField("push"):
            self.unacked -= 1
            self.unacked_by_shard[shard] -= 1

    def unanswered(self, shard: int) -> list[shard_pb2.ExchangeRequest]:
        """The messages to send the shard again, in the order they were sent."""
        return list(self._unanswered[shard])

    def owes(self, shard: int) -> int:
        """How many messages the shard has not answered."""
        return len(self._unanswered[shard])

    # -- flushing ----------------------------------------------------------------

    def send_clock(self, clock: int, finished: bool) -> None:
        """Flush every shard's buffer with the worker's clock (now `clock`) or that it finished
        attached. The pulls in the buffers keep the clock they were made at."""
        for shard in range(self.num_shards):
            told = shard_pb2.WorkerClock(worker_index=self.worker_index, clock=clock, finished=finished)
            self.flush_shard(shard, told)
        self.buffered_since = None

    def tell_clock(self, shard: int, *, finished: bool = False, started: bool = False) -> None:
        """Send the shard the worker's clock alone, leaving the buffers be."""
        told = shard_pb2.WorkerClock(
            worker_index=self.worker_index, clock=self.clock, finished=finished, started=started
        )
        self._queue(shard, shard_pb2.ExchangeRequest(clock=told))

    def resumed(self, shard: int) -> list[shard_pb2.ExchangeRequest]:
        """What a new stream to the shard carries: every unanswered message (`unanswered`), after
        a clock message with the clock the worker had when it made the oldest of them. The shard
        holds every push made before that clock, so a shard that restarted (and forgot, or lost
        what was not logged) learns at once how far the worker is, before the rest goes again."""
        unanswered = self._unanswered[shard]
        clock = self.clock
        for request in unanswered:
            if request.HasField("clock"):  # what travels with an advance was made before it
                clock = request.clock.clock - (0 if request.clock.finished else 1)
                break
            if request.HasField("pull"):
                clock = request.pull.clock
                break
        told = shard_pb2.WorkerClock(worker_index=self.worker_index, clock=max(clock, 0))
        if not unanswered:
            self.silent_since[shard] = time.monotonic()
        unanswered.appendleft(shard_pb2.ExchangeRequest(clock=told))
        return list(unanswered)

    def flush_shard(self, shard: int, clock: shard_pb2.WorkerClock | None = None) -> None:
        # The push and the pulls leave in one message; the shard applies the push
        # before it answers the pulls, which gives read-your-writes.
        push = pull = None
        ids, batches = self._push_ids[shard], self._push_batches[shard]
        if ids or batches:
            deltas = self._push_deltas[shard]
            self._push_ids[shard], self._push_deltas[shard] = [], []
            self._push_batches[shard], self._push_batch_keys[shard] = [], 0
            self._seqs[shard] += 1
            self.unacked += 1
            self.unacked_by_shard[shard] += 1
            if ids:  # single pushes made after the last push_many (earlier ones are in batches)
                batches.extend(encode_values(ids, deltas))
            push = shard_pb2.PushRequest(worker_id=self.worker_id, seq=self._seqs[shard], batches=batches)
            if self.finished_below is not None:
                push.origins.extend(self._push_origins[shard])
                push.finished_below = self.finished_below()
                self._push_origins[shard] = []
        pulls, chunks = self._pull_ids[shard], self._pull_chunks[shard]
        if pulls or chunks:
            self._pull_ids[shard], self._pull_chunks[shard], self._pull_chunk_keys[shard] = [], [], 0
            self._request_id += 1
            self.pulls_out[shard] += 1
            if chunks and all(chunk.dtype != object for chunk in chunks) and not any(type(i) is str for i in pulls):
                keys = encode_id_array(np.concatenate([*chunks, np.asarray(pulls, dtype=INT_IDS_DTYPE)]))
            else:
                keys = encode_keys(pulls + [param_id for chunk in chunks for param_id in chunk.tolist()])
            pull = shard_pb2.PullRequest(request_id=self._request_id, keys=keys, worker_index=self.worker_index)
            if self.clock:  # only advance_clock moves it: under async the pull is as it was
                pull.clock = self.clock
        if push is not None or pull is not None or clock is not None:
            request = shard_pb2.ExchangeRequest(push=push, pull=pull)
            if clock is not None:
                request.clock.CopyFrom(clock)
            self._queue(shard, request)

    def _queue(self, shard: int, request: shard_pb2.ExchangeRequest) -> None:
        unanswered = self._unanswered[shard]
        if not unanswered:
            self.silent_since[shard] = time.monotonic()
        unanswered.append(request)
        self._send(shard, request)

    def flush_all(self) -> None:
        if self.buffered_since is not None:
            self.buffered_since = None
            for shard in range(self.num_shards):
                self.flush_shard(shard)

    def flush_idle(self) -> float | None:
        """Flush what should leave now that the logic has nothing to do.

        Nagle's rule, per shard: buffers go out at once to a shard with nothing
        outstanding; a shard still answering earlier requests gets them when
        the linger ends, so that the answers coming back (which free pull
        slots) add to the batch meanwhile. Without this, a worker blocked at
        its pull limit sends one key per request and the requests queue up.
        An idle shard's pulls wait too, up to the linger, while they are fewer
        than `min_batch` and other shards' answers are due: those answers
        bring more pulls, and a message costs more (gRPC's work on both ends)
        than the keys in it. With no answer due, everything goes at once.
        Returns how long the rest may still wait, or None when nothing is left.
        """
        since = self.buffered_since
        if since is None:
            return None
        waited = time.monotonic() - since
        if waited >= self.linger_s:
            self.flush_all()
            return None
        waiting = False
        answers_due = any(self.pulls_out)
        for shard in range(self.num_shards):
            buffered_pulls = len(self._pull_ids[shard]) + self._pull_chunk_keys[shard]
            if not buffered_pulls and not (self._push_ids[shard] or self._push_batches[shard]):
                continue
            if buffered_pulls:
                idle_shard = self.pulls_out[shard] == 0 and (buffered_pulls >= self.min_batch or not answers_due)
            else:
                idle_shard = self.unacked_by_shard[shard] == 0
            if idle_shard:
                self.flush_shard(shard)
            else:
                waiting = True
        if not waiting:
            self.buffered_since = None
            return None
        return self.linger_s - waited

    def flush_if_lingering(self) -> None:
        since = self.buffered_since
        if since is not None and time.monotonic() - since >= self.linger_s:
            self.flush_all()

    def flush_pushes(self, shard: int) -> None:
        """Send the shard's buffered pushes and keep its pulls (draining after a failure)."""
        pulls, self._pull_ids[shard] = self._pull_ids[shard], []
        chunks, self._pull_chunks[shard] = self._pull_chunks[shard], []
        keys, self._pull_chunk_keys[shard] = self._pull_chunk_keys[shard], 0
        self.flush_shard(shard)
        self._pull_ids[shard], self._pull_chunks[shard], self._pull_chunk_keys[shard] = pulls, chunks, keys
