"""The plugin API: what a user writes (`WorkerLogic`), what it is handed (`ParameterServerClient`),
and how a worker loads the one its `--logic` names (`load_logic`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from psclient.plugins import load_instance
from psclient.wire.partition import Id

T = TypeVar("T")  # a training record
P = TypeVar("P")  # a parameter value: numpy array or Python number
WOut = TypeVar("WOut")  # what the logic outputs
P_contra = TypeVar("P_contra", contravariant=True)
WOut_contra = TypeVar("WOut_contra", contravariant=True)


class ParameterServerClient(Protocol[P_contra, WOut_contra]):
    """The runtime's handle, passed to every callback. Calls return at once.

    Pulls and pushes are per key; the runtime coalesces them into one batch
    per shard and sends them in the background.
    """

    worker_index: int
    num_workers: int
    num_shards: int

    def pull(self, param_id: Id) -> None:
        """Ask for a parameter; its value arrives later in `on_pull_recv`.

        A pull issued after a push of the same id sees that push.
        """
        ...

    def push(self, param_id: Id, delta: P_contra) -> None:
        """Fold `delta` into a parameter with the shard's update function."""
        ...

    def pull_many(self, ids: np.ndarray | Sequence[Id]) -> None:
        """Pull every id of `ids` (an int array, or a sequence of str ids) at once.

        The same as `pull` of each id, in order (n ids count as n pulls
        against the pull limit), without Python work per int id: the ids are
        split by shard and packed as arrays. Answers arrive in
        `on_pull_recv_many` (by default: `on_pull_recv` per id).
        """
        ...

    def push_many(self, ids: np.ndarray | Sequence[Id], deltas: Any) -> None:
        """Push `deltas[i]` to `ids[i]`: the same as `push` of each pair, in order.

        `deltas` is a numeric array whose first axis has one row per id (a
        1-D array for scalar parameters). The whole call is refused, and
        nothing of it sent, when a row is not finite or the shapes disagree.
        """
        ...

    def output(self, out: WOut_contra) -> None:
        """Emit a result: it reaches the client as `Left(out)`."""
        ...

    def advance_clock(self) -> None:
        """Advance this worker's logical clock by one (e.g. once per epoch or mini-batch).

        Under --consistency ssp:S (bsp: S = 0), the answers to this worker's pulls
        wait while its clock is more than S ahead of the slowest unfinished worker.
        Advance it where the logic does not wait on such an answer (in on_recv at
        an epoch boundary, or in on_input_end), so the slowest worker always
        reaches its next advance. Under async it only counts.
        """
        ...


class WorkerLogic(Generic[T, P, WOut]):
    """Subclass this. All callbacks of one worker run on one thread: no locks needed.

    `on_recv` and `on_pull_recv` are required. `open`, `on_input_end` and
    `close` are optional hooks with do-nothing defaults: most online learners
    have nothing to set up, nothing left to do when the input ends, and nothing
    to release. `on_pull_recv_many` is optional too: its default hands every
    answer to `on_pull_recv`, which is all a per-key logic needs.
    """

    def open(self) -> None:
        """Called once, before the first record."""

    def on_recv(self, data: T, ps: ParameterServerClient[P, WOut]) -> None:
        """Called once per input record."""
        raise NotImplementedError(f"{type(self).__name__} must implement on_recv")

    def on_pull_recv(self, param_id: Id, param_value: P, ps: ParameterServerClient[P, WOut]) -> None:
        """Called once per answered pull, with the parameter's current value."""
        raise NotImplementedError(f"{type(self).__name__} must implement on_pull_recv")

    def on_pull_recv_many(
        self, ids: np.ndarray | list[str], values: np.ndarray, ps: ParameterServerClient[P, WOut]
    ) -> None:
        """Called with a batch of answered pulls: `values[i]` is the value of `ids[i]`.

        Optional: the default calls `on_pull_recv` per id. A logic that
        defines it gets every answer here, those of `pull` too, one call per
        answered batch: `ids` an int64 array or a list of str ids (a batch
        holding both kinds comes in two calls), `values` one writable array
        whose first axis follows `ids` (a 1-D array for scalar parameters;
        values of different dtypes or shapes come in separate calls, and in a
        restartable worker, the answers to different records' pulls). Define
        it to vectorize what the logic does with the answers of `pull_many`.
        """
        scalars = values.ndim == 1
        rows = values.tolist() if scalars else values
        for param_id, value in zip(ids.tolist() if isinstance(ids, np.ndarray) else ids, rows, strict=True):
            self.on_pull_recv(param_id, value, ps)

    def on_input_end(self, ps: ParameterServerClient[P, WOut]) -> None:
        """Called once, when this worker's input is exhausted. May pull and push
        (further epochs, a final flush); the worker finishes after what it starts."""

    def close(self) -> None:
        """Called once, after the worker is quiescent."""

    def state(self) -> Any:
        """What a restartable worker (`psworker --checkpoint-dir`) checkpoints of this logic.

        Optional: the default, None, suits a logic that keeps nothing from one
        record to the next. A logic that does (a window of records, counters,
        a local model) returns it as plain data: numbers, strings, bytes,
        lists, tuples, dicts and numpy arrays. It is called at a quiescent
        point, when every pull is answered and every push acknowledged.
        """
        return None

    def restore(self, state: Any) -> None:
        """Take back what `state` returned, in a worker restarted from its checkpoint.

        Called after `open`, before the first record. The default takes back None
        (a stateless logic) and refuses anything else.
        """
        if state is not None:
            raise NotImplementedError(f"{type(self).__name__} returns a state() but does not define restore()")


def load_logic(spec: str) -> WorkerLogic:
    """The WorkerLogic that `spec` names, checked to be one.

    `spec` is `module:attr` (or a shipped `@PATH`), whose attr is a WorkerLogic
    subclass (made with no arguments), a factory that returns a WorkerLogic, or
    an instance. SpecError, one line naming the spec, when the module or attr is
    missing, when it is of another type, or when making the logic raises.
    """
    return load_instance(spec, WorkerLogic, what="logic")


class _PullLimited(WorkerLogic[T, P, WOut]):
    """A logic with a bound on unanswered pulls; every callback goes to the wrapped one."""

    def __init__(self, inner: WorkerLogic[T, P, WOut], limit: int):
        self.inner = inner
        self.pull_limit = limit

    def open(self) -> None:
        self.inner.open()

    def on_recv(self, data: T, ps: ParameterServerClient[P, WOut]) -> None:
        self.inner.on_recv(data, ps)

    def on_pull_recv(self, param_id: Id, param_value: P, ps: ParameterServerClient[P, WOut]) -> None:
        self.inner.on_pull_recv(param_id, param_value, ps)

    def on_pull_recv_many(
        self, ids: np.ndarray | list[str], values: np.ndarray, ps: ParameterServerClient[P, WOut]
    ) -> None:
        self.inner.on_pull_recv_many(ids, values, ps)

    def on_input_end(self, ps: ParameterServerClient[P, WOut]) -> None:
        self.inner.on_input_end(ps)

    def close(self) -> None:
        self.inner.close()


def with_pull_limit(logic: WorkerLogic[T, P, WOut], limit: int) -> WorkerLogic[T, P, WOut]:
    """Bound `logic`'s unanswered pulls by `limit` (>= 1).

    Pulls beyond the limit wait in a queue, and the worker takes no new input
    record while the limit is reached. Answers are always drained, so no bound
    can deadlock, down to 1.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"pull limit must be an int >= 1, got {limit!r}")
    return _PullLimited(logic, limit)


def pull_limit_of(logic: WorkerLogic) -> int | None:
    return getattr(logic, "pull_limit", None)


def unwrapped(logic: WorkerLogic) -> WorkerLogic:
    """The user's logic inside any `with_pull_limit` wrappers (whose callbacks only pass on)."""
    while isinstance(logic, _PullLimited):
        logic = logic.inner
    return logic


def receives_many(logic: WorkerLogic) -> bool:
    """Whether `logic` defines its own `on_pull_recv_many` (else answers go to `on_pull_recv` one by one)."""
    return type(unwrapped(logic)).on_pull_recv_many is not WorkerLogic.on_pull_recv_many
