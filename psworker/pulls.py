"""A worker's pulls under its pull limit: which are out, which wait their turn.

At most `limit` pulls are out (buffered or sent, not yet answered); further
pulls wait in a queue in call order, and leave, oldest first, as answers free
their slots. While any wait or the limit is reached, the logic takes no new
input record. Answers are always taken, so no limit can deadlock, down to 1.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from psclient.wire.partition import Id
from psworker.batching import ShardBuffers


class PullWindow:
    def __init__(self, limit: int, buffers: ShardBuffers):
        self.limit = limit
        self._buffers = buffers
        self.in_flight = 0
        self._queue: deque[Id | np.ndarray] = deque()  # single ids and pull_many chunks (slices are views)
        self.queued = 0

    def pull(self, param_id: Id) -> None:
        if self.in_flight < self.limit:
            self.in_flight += 1
            self._buffers.pull(param_id)
        else:
            self._queue.append(param_id)
            self.queued += 1

    def pull_chunk(self, chunk: np.ndarray) -> None:
        """Pull every id of `chunk` (an int64 or object array): as many as there is room for now."""
        count = len(chunk)
        room = self.limit - self.in_flight
        if room <= 0 or self._queue:
            self._queue.append(chunk)
            self.queued += count
            return
        if count > room:  # the rest waits for answers, as single pulls do
            self._queue.append(chunk[room:])
            self.queued += count - room
            chunk = chunk[:room]
        self.in_flight += len(chunk)
        self._buffers.pull_chunk(chunk)

    def answered(self, count: int) -> None:
        """`count` pulls were answered: their slots go to the oldest waiting pulls."""
        self.in_flight -= count
        if self._queue:
            self._release(count)

    def _release(self, slots: int) -> None:
        queue = self._queue
        while slots > 0 and queue:
            head = queue[0]
            if not isinstance(head, np.ndarray):
                queue.popleft()
                taken = 1
                self._buffers.pull(head)
            elif slots == 1:  # the common case at a small limit: no array work for one id
                taken = 1
                if len(head) == 1:
                    queue.popleft()
                else:
                    queue[0] = head[1:]
                self._buffers.pull(head[:1].tolist()[0])  # a Python int or str, whatever the chunk holds
            else:
                taken = min(slots, len(head))
                if taken == len(head):
                    queue.popleft()
                else:
                    queue[0] = head[taken:]
                self._buffers.pull_chunk(head[:taken])
            slots -= taken
            self.in_flight += taken
            self.queued -= taken

    @property
    def input_may_flow(self) -> bool:
        return self.in_flight < self.limit and not self._queue

    @property
    def settled(self) -> bool:
        """No pull is out or waiting."""
        return self.in_flight == 0 and not self._queue
