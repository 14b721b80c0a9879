"""Custom server logic: a shard whose pulls and pushes go to the user's ServerLogic.

Without `psserver --logic` a shard folds pushes into its store with the update
function and answers pulls from it (psserver.store); none of this module runs.
With a logic, the shard still checks and deduplicates every push by its
(worker_id, seq) watermark or its origins (psserver.origins) first, then hands
each (id, delta) of a push that is new to `on_push_recv`, in arrival order, and
each id of a pull to `on_pull_recv` with the pulling worker's index. The logic
keeps its own state and answers a pull with `ps.answer_pull(id, value,
worker_index)`, at once or later (a lock server answers when the lock frees,
from the `on_push_recv` of the push that frees it). A pull's answer leaves once
every one of its ids was answered; the answers behind it on the same stream
wait for it, so a worker still gets its answers in the order it asked.

Every callback runs on the shard's event loop, one at a time: a logic needs no
lock, and must not block (the shard serves nothing meanwhile).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from psclient.errors import WireError
from psclient.plugins import load_instance
from psclient.specs import InitFn, UpdateFn, UserFunctionError
from psclient.wire.codec import ALLOWED_KINDS, DecodedBatch, encode_values, row_values
from psclient.wire.partition import Id
from psclient.wire.proto import tensor_pb2
from psclient.wire.records import pack
from psserver.store import ParameterStore

P = TypeVar("P")
SOut = TypeVar("SOut")

Finish = Callable[[list[tensor_pb2.ParamBatch]], None]


class ServerHandle(Generic[P, SOut]):
    """What a ServerLogic's callbacks get as `ps`: the shard's place, answers, outputs."""

    def __init__(self, shard_index: int, num_shards: int, init: InitFn):
        self.shard_index = shard_index
        self.num_shards = num_shards
        self._init = init
        # The ids of pulls not answered yet, by (id, worker index), oldest first: each
        # entry is the waiting pull and the place of that id in it.
        self._waiting: dict[tuple[Id, int], deque[tuple[_Pull, int]]] = {}
        self.outputs: list[bytes] = []

    def answer_pull(self, param_id: Id, value: P, worker_index: int) -> None:
        """Answer the oldest waiting pull of `param_id` by worker `worker_index` with `value`."""
        key = (param_id, worker_index)
        queue = self._waiting.get(key)
        # A pull whose stream ended (the worker sends it again on a new one) takes no answer.
        while queue and queue[0][0].dropped:
            queue.popleft()
        if not queue:
            self._waiting.pop(key, None)
            raise ValueError(f"no pull of id {param_id!r} by worker {worker_index} is waiting for an answer")
        pull, place = queue.popleft()
        if not queue:
            del self._waiting[key]
        pull.fill(place, value)

    def output(self, out: SOut) -> None:
        """Emit one of the job's Right values (msgpack-encodable: plain data, tuples, arrays)."""
        try:
            self.outputs.append(pack(out))
        except Exception as exc:
            raise TypeError(f"output of type {type(out).__name__} cannot be encoded: {exc}") from None

    def init(self, param_id: Id) -> Any:
        """The shard's initial value of `param_id` (psserver --init, transform's param_init)."""
        values = self._init.batch([param_id])
        return row_values(values)[0] if isinstance(values, np.ndarray) else values[0]

    def waiting(self) -> int:
        """How many pulled ids wait for an answer."""
        return sum(not pull.dropped for queue in self._waiting.values() for pull, _ in queue)

    def _expect(self, pull: _Pull, place: int, param_id: Id, worker_index: int) -> None:
        self._waiting.setdefault((param_id, worker_index), deque()).append((pull, place))


class ServerLogic(Generic[P, SOut]):
    """A shard's own handling of pulls and pushes (`psserver --logic`, `transform(ps_logic=)`)."""

    def open(self, ps: ServerHandle[P, SOut]) -> None:
        """Optional; once, before the shard serves."""

    def on_pull_recv(self, param_id: Id, worker_index: int, ps: ServerHandle[P, SOut]) -> None:
        """Worker `worker_index` pulls `param_id`: answer with `ps.answer_pull`, now or later."""
        raise NotImplementedError

    def on_push_recv(self, param_id: Id, delta: P, ps: ServerHandle[P, SOut]) -> None:
        """A delta for `param_id` (each push once, whatever the retries)."""
        raise NotImplementedError

    def close(self, ps: ServerHandle[P, SOut]) -> None:
        """Optional; once, at the end of the job, before its outputs are read."""


def load_server_logic(spec: str) -> ServerLogic:
    """The ServerLogic that `spec` (`module:attr` or a shipped `@PATH`) names: a subclass,
    a factory or an instance. SpecError, one line naming the spec, otherwise."""
    logic: ServerLogic = load_instance(spec, ServerLogic, what="server logic")
    return logic


class _Pull:
    """One pull request waiting for its ids' answers."""

    __slots__ = ("dropped", "finish", "ids", "left", "values")

    def __init__(self, ids: list[Id], finish: Finish):
        self.ids = ids
        self.values: list[Any] = [None] * len(ids)
        self.left = len(ids)
        self.finish = finish
        self.dropped = False  # its stream ended before it was answered

    def fill(self, place: int, value: Any) -> None:
        array = np.asarray(value)
        if array.dtype.kind not in ALLOWED_KINDS:
            raise TypeError(f"answer_pull got {type(value).__name__} of dtype {array.dtype} for id {self.ids[place]!r}")
        # Copied now: the logic may change its array in place before the pull's last id is answered.
        self.values[place] = array.copy() if isinstance(value, np.ndarray) else value
        self.left -= 1
        if not self.left:
            self.finish(encode_values(self.ids, self.values))


class LogicStore(ParameterStore):
    """The shard's store when a logic holds the parameters: pushes go to the logic,
    pulls wait for its answers, and it stores (and snapshots) nothing itself."""

    def __init__(self, logic: ServerLogic, spec: str, init: InitFn, update: UpdateFn, shard: int, num_shards: int):
        super().__init__(init, update)
        self.logic = logic
        self.spec = spec
        self.shard = shard
        self.handle: ServerHandle[Any, Any] = ServerHandle(shard, num_shards, init)
        self._name = type(logic).__qualname__
        self.closed = False

    def _call(self, callback: str, param_id: Id | None, function: Callable[..., None], *args: Any) -> None:
        try:
            function(*args)
        except Exception as exc:  # user code can raise anything
            where = f"{self._name}.{callback}" + (f" for id {param_id!r}" if param_id is not None else "")
            # The shard is named by whoever reports it (its log lines, the worker or client that called it).
            raise UserFunctionError(f"server logic {where} failed: {type(exc).__name__}: {exc}") from exc

    def open(self) -> None:
        self._call("open", None, self.logic.open, self.handle)

    def close(self) -> None:
        """The logic's close(ps), once; later calls do nothing."""
        if not self.closed:
            self.closed = True
            self._call("close", None, self.logic.close, self.handle)

    def push_rows(self, batches: Sequence[DecodedBatch]) -> None:
        on_push = self.logic.on_push_recv
        handle = self.handle
        for batch in batches:
            if batch.values is None:
                raise WireError("batch carries ids but no values")
            for param_id, delta in zip(batch.ids(), row_values(batch.values), strict=True):
                self._call("on_push_recv", param_id, on_push, param_id, delta, handle)

    def pull_logic(self, ids: list[Id], worker_index: int, finish: Finish) -> _Pull:
        """Ask the logic for `ids`; `finish` gets the answer's batches once every id has one."""
        pull = _Pull(ids, finish)
        if not ids:
            finish([])
            return pull
        on_pull = self.logic.on_pull_recv
        handle = self.handle
        try:
            for place, param_id in enumerate(ids):
                handle._expect(pull, place, param_id, worker_index)
                self._call("on_pull_recv", param_id, on_pull, param_id, worker_index, handle)
        except BaseException:
            pull.dropped = True  # its stream ends: no later answer may go to it
            raise
        return pull

    def __len__(self) -> int:
        return 0

    def chunk_rows(self, max_rows: int) -> Iterator[list[DecodedBatch]]:
        return iter(())

    def pull_rows(self, int_ids: np.ndarray, str_ids: list[str]) -> list[DecodedBatch]:
        raise WireError("a shard with a server logic answers pulls through it")  # see LogicShardServicer
