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
wait for it, so a worker still gets its answers in the order it asked. A value
that is not a number or numeric array is refused at once: answer_pull raises
TypeError in the callback that called it, and the pull fails with that
callback's error line, rather than waiting for an answer that cannot be sent.

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
# What fails a pull whose answer was refused, with the one line its worker gets.
Refuse = Callable[[str], None]


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
        # Pulls whose answer answer_pull refused since the running callback began, each with
        # why: the callback's error line then fails them too (LogicStore._call).
        self.refused: list[tuple[_Pull, Exception]] = []

    def answer_pull(self, param_id: Id, value: P, worker_index: int) -> None:
        """Answer the oldest waiting pull of `param_id` by worker `worker_index` with `value`,
        a number or a numeric array (anything else raises TypeError here, and that pull fails)."""
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
        try:
            array = answer_array(param_id, value, worker_index)
        except TypeError as exc:
            # Checked here, not when the pull's last id is answered: the error belongs to
            # this callback, and the pull (maybe another worker's) must not wait for good.
            pull.dropped = True
            self.refused.append((pull, exc))
            raise
        pull.fill(place, array)

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


def answer_array(param_id: Id, value: Any, worker_index: int) -> np.ndarray:
    """`value` as an answer carries it: a numeric array of its own. Copied, as the logic may
    change its array or list in place before the pull's last id is answered."""
    try:
        array = np.array(value)
    except Exception:  # a ragged nesting of sequences, say
        got = f"a {type(value).__name__} that is not one array (ragged, or of mixed kinds)"
    else:
        if array.dtype.kind in ALLOWED_KINDS:
            return array
        got = f"a {type(value).__name__} of dtype {array.dtype}"
    raise TypeError(
        f"answer_pull for id {param_id!r} of worker {worker_index} got {got}, not a number or numeric array"
    )


def load_server_logic(spec: str) -> ServerLogic:
    """The ServerLogic that `spec` (`module:attr` or a shipped `@PATH`) names: a subclass,
    a factory or an instance. SpecError, one line naming the spec, otherwise."""
    logic: ServerLogic = load_instance(spec, ServerLogic, what="server logic")
    return logic


class _Pull:
    """One pull request waiting for its ids' answers."""

    __slots__ = ("dropped", "finish", "ids", "key", "left", "refuse", "values")

    def __init__(self, ids: list[Id], finish: Finish, refuse: Refuse | None = None):
        self.ids = ids
        self.values: list[np.ndarray | None] = [None] * len(ids)
        self.left = len(ids)
        self.finish = finish
        self.refuse = refuse
        self.dropped = False  # its stream ended, or an answer was refused: it takes no more
        self.key: Any = None  # how the service knows it when its worker sends it again

    def fill(self, place: int, array: np.ndarray) -> None:
        self.values[place] = array
        self.left -= 1
        if not self.left:
            # Every value is a numeric array (answer_array): encoding cannot fail here.
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
            self._refuse(callback, param_id)
            raise UserFunctionError(self._failure(callback, param_id, exc)) from exc
        if self.handle.refused:  # the logic caught answer_pull's TypeError and went on
            self._refuse(callback, param_id)

    def _failure(self, callback: str, param_id: Id | None, exc: Exception) -> str:
        where = f"{self._name}.{callback}" + (f" for id {param_id!r}" if param_id is not None else "")
        # The shard is named by whoever reports it (its log lines, the worker or client that called it).
        return f"server logic {where} failed: {type(exc).__name__}: {exc}"

    def _refuse(self, callback: str, param_id: Id | None) -> None:
        """Fail the pulls whose answer the callback gave was refused, with the callback's line."""
        refused, self.handle.refused = self.handle.refused, []
        for pull, exc in refused:
            if pull.refuse is not None:
                pull.refuse(self._failure(callback, param_id, exc))

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

    def pull_logic(self, ids: list[Id], worker_index: int, finish: Finish, refuse: Refuse | None = None) -> _Pull:
        """Ask the logic for `ids`; `finish` gets the answer's batches once every id has one,
        or `refuse` the line to fail the pull with if the logic answers one with a bad value."""
        pull = _Pull(ids, finish, refuse)
        if not ids:
            finish([])
            return pull
        on_pull = self.logic.on_pull_recv
        handle = self.handle
        try:
            for place, param_id in enumerate(ids):
                if pull.dropped:  # an answer to it was refused: it fails, and its other ids with it
                    break
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
