"""Which input record every pull and push of a restartable worker belongs to.

A restarted worker replays the records after its checkpoint, and its pushes
leave in other batches than the first time: a seq no longer names the same
pushes. So a restartable worker (`--checkpoint-dir`) names each push by its
origin instead: the input position of the record whose callbacks made it
(0 for `open`, the last position + 1 for `on_input_end`). A shard applies a
record's pushes once, whichever run sends them (shard.proto, PushOrigin).

For that, a record's pushes to a shard must leave in the same parts in every
run. What `on_recv` pushes (or `open`, or `on_input_end`: a record's first
callback) leaves when it returns, and before any pull it makes after pushing,
so that the pull sees those pushes (the guarantee of `pull`): a part at each
such point. What the answers' callbacks push is held until the record
finishes (every pull it made, in whichever callback, is answered) and leaves
as its last part. The answers of different shards arrive in either order, so
a cut between them would not fall at the same place in every run: a pull made
in an answer's callback does not see what the record pushed in answers'
callbacks, nor does a pull of another record. That is the price of pushes
that can be replayed exactly once. Parts are numbered per record.

The origin of each answered pull comes from what was pulled: per shard, the
ids in the order they were pulled (which is the order the shard gets them,
queued or not), with their origins.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from psclient.wire.codec import encode_id_array, encode_values
from psclient.wire.partition import Id, shard_of
from psclient.wire.proto import shard_pb2, tensor_pb2
from psworker.batching import ShardBuffers


class OriginTracker:
    def __init__(self, buffers: ShardBuffers):
        self._buffers = buffers
        self._num_shards = buffers.num_shards
        # The record whose callback runs now, and whether that callback is its first
        # (on_recv, open, on_input_end: one callback, so its cuts are the same in every run).
        self.current = 0
        self._first = False
        # One past the highest origin entered so far: where finished_below stands
        # when no record is in progress.
        self.frontier = 0
        # Records in progress: unanswered pulls, plus one while a callback of theirs runs.
        self._pending: dict[int, int] = {}
        # Per shard, what was pulled in order: [origin, ids] runs (ids a list, or an array slice).
        self._pulled: list[deque[list[Any]]] = [deque() for _ in range(self._num_shards)]
        # Pushes held per record, in call order: (ids, deltas, chunk) with chunk True for push_many.
        self._held: dict[int, list[tuple[Any, Any, bool]]] = {}
        self._parts: dict[int, int] = {}

    # -- callbacks --------------------------------------------------------------

    def enter(self, origin: int, *, first: bool = False) -> None:
        """A callback of `origin` starts: its `first` (on_recv, open, on_input_end), or an answer's."""
        self.current = origin
        self._first = first
        self._pending[origin] = self._pending.get(origin, 0) + 1
        if origin >= self.frontier:
            self.frontier = origin + 1

    def leave(self, origin: int, answered: int = 0) -> None:
        """A callback of `origin` returned, having taken `answered` of its answers."""
        left = self._pending[origin] - 1 - answered
        if left:
            self._pending[origin] = left
            if self._first:
                self.release(origin)
            return
        # Released while the record still counts as unfinished: a flush the release
        # sets off must not tell the shard it has finished, or its part would come
        # after that news and be skipped as already applied.
        self.release(origin)
        del self._pending[origin]
        self._parts.pop(origin, None)

    def finished_below(self) -> int:
        pending = self._pending
        return min(pending) if pending else self.frontier

    @property
    def idle(self) -> bool:
        return not self._pending and not self._held

    # -- pulls --------------------------------------------------------------------

    def pulled(self, param_id: Id) -> None:
        origin = self.current
        if self._first and origin in self._held:
            self.release(origin)
        self._pending[origin] += 1
        runs = self._pulled[shard_of(param_id, self._num_shards)]
        if runs and runs[-1][0] == origin and isinstance(runs[-1][1], list):
            runs[-1][1].append(param_id)
        else:
            runs.append([origin, [param_id]])

    def pulled_chunk(self, chunk: np.ndarray) -> None:
        origin = self.current
        if self._first and origin in self._held:
            self.release(origin)
        self._pending[origin] += len(chunk)
        for shard, positions in self._buffers.shard_positions(chunk):
            self._pulled[shard].append([origin, chunk if positions is None else chunk[positions]])

    def origins_of(self, shard: int, ids: list[Id] | np.ndarray) -> np.ndarray:
        """The origin of each of `ids`, one answer of the shard: its oldest unanswered pulls."""
        runs = self._pulled[shard]
        count = len(ids)
        origins: list[int] = []
        lengths: list[int] = []
        pieces: list[Any] = []
        while count:
            origin, run_ids = runs[0]
            taken = min(count, len(run_ids))
            if taken == len(run_ids):
                runs.popleft()
            else:
                runs[0][1] = run_ids[taken:]
            origins.append(origin)
            lengths.append(taken)
            pieces.append(run_ids[:taken])
            count -= taken
        by_key = np.repeat(np.asarray(origins, dtype=np.int64), lengths)
        asked = [i for piece in pieces for i in (piece.tolist() if isinstance(piece, np.ndarray) else piece)]
        answered = ids.tolist() if isinstance(ids, np.ndarray) else ids
        if answered == asked:
            return by_key
        # The shard grouped the answer (by dtype and shape, ints before strs): match by id.
        queues: dict[Id, deque[int]] = {}
        for param_id, origin in zip(asked, by_key.tolist(), strict=True):
            queues.setdefault(param_id, deque()).append(origin)
        return np.fromiter((queues[i].popleft() for i in answered), dtype=np.int64, count=len(answered))

    # -- pushes ---------------------------------------------------------------------

    def hold(self, param_id: Id, delta: Any) -> None:
        self._held.setdefault(self.current, []).append((param_id, delta, False))

    def hold_chunk(self, chunk: np.ndarray, deltas: np.ndarray) -> None:
        self._held.setdefault(self.current, []).append((chunk, deltas, True))

    def release(self, origin: int) -> None:
        """Send what `origin` holds as its next part, to each shard in one go."""
        held = self._held.pop(origin, None)
        if not held:
            return
        part = self._parts.get(origin, 0)
        self._parts[origin] = part + 1
        tag = shard_pb2.PushOrigin(position=origin, part=part)
        batches: list[list[tensor_pb2.ParamBatch]] = [[] for _ in range(self._num_shards)]
        single_ids: list[list[Id]] = [[] for _ in range(self._num_shards)]
        single_deltas: list[list[Any]] = [[] for _ in range(self._num_shards)]
        keys = [0] * self._num_shards

        def encode_singles(shard: int) -> None:
            if single_ids[shard]:  # before a later push_many: the shard applies them in call order
                batches[shard].extend(encode_values(single_ids[shard], single_deltas[shard]))
                keys[shard] += len(single_ids[shard])
                single_ids[shard], single_deltas[shard] = [], []

        for ids, deltas, chunk in held:
            if not chunk:
                shard = shard_of(ids, self._num_shards)
                single_ids[shard].append(ids)
                single_deltas[shard].append(deltas)
                continue
            for shard, positions in self._buffers.shard_positions(ids):
                encode_singles(shard)
                part_ids = ids if positions is None else ids[positions]
                batches[shard].append(encode_id_array(part_ids, deltas if positions is None else deltas[positions]))
                keys[shard] += len(part_ids)
        for shard in range(self._num_shards):
            encode_singles(shard)
            if batches[shard]:
                self._buffers.add_part(shard, tag, batches[shard], keys[shard])
