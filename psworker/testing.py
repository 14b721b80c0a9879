"""A test kit for WorkerLogic classes: an in-process client and `check_logic`.

`InProcessClient` runs a logic in this process against a shard's store, one
callback at a time, with the same init and update specs and the same delta
checks as the runtime. `check_logic(logic, records)` runs the conformance checks the bundled
logics go through (serializable, ends on a finite input, fine with an empty
input, deterministic) on a user's own logic.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import cloudpickle
import numpy as np

from psclient.specs import make_init, make_update
from psclient.wire.codec import DecodedBatch, as_value_array, group_values, row_values, split_ids
from psclient.wire.partition import Id, check_id
from psserver.store import ParameterStore
from psworker.checks import check_delta, check_deltas, id_groups
from psworker.logic import WorkerLogic, pull_limit_of, receives_many

__all__ = ["InProcessClient", "LogicCheckFailed", "LogicDidNotEnd", "canonical", "check_logic"]


class LogicDidNotEnd(RuntimeError):
    """A logic kept pulling past the client's bound on answered pulls."""


class LogicCheckFailed(AssertionError):
    """One check of `check_logic` failed; the message names it."""


def _to_ids(ids: np.ndarray | Sequence[Id]) -> list[Id]:
    """The ids of a batch call, checked as the runtime checks them, as Python ids in order."""
    groups = id_groups(ids)
    id_list: list[Id] = [None] * sum(len(chunk) for chunk, _ in groups)  # type: ignore[list-item]
    for chunk, rows in groups:
        if rows is None:
            return chunk.tolist()  # one chunk holds every id, in order
        for row, param_id in zip(rows.tolist(), chunk.tolist(), strict=True):
            id_list[row] = param_id
    return id_list


class _Model(Mapping[Id, Any]):
    """A live view of a store's parameters as the runtime hands values out: Python
    scalars, or writable arrays. Setting a parameter stands for other workers' pushes."""

    def __init__(self, client: InProcessClient):
        self._client = client
        self._store = client.store

    def __getitem__(self, param_id: Id) -> Any:
        if param_id not in self._store:
            raise KeyError(param_id)
        return _values(self._store, [param_id])[0]

    def __setitem__(self, param_id: Id, value: Any) -> None:
        int_ids, str_ids, _ = split_ids([check_id(param_id)])
        self._store.put(DecodedBatch(int_ids, str_ids, as_value_array(value)[None]))
        self._client._pushes += 1

    def __contains__(self, param_id: object) -> bool:
        return param_id in self._store

    def __iter__(self) -> Iterator[Id]:
        return iter(self._store.ids())

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return repr(dict(self))

    def copy(self) -> dict[Id, Any]:
        """Every parameter, in order of creation."""
        ids = self._store.ids()
        return dict(zip(ids, _values(self._store, ids), strict=True))


def _values(store: ParameterStore, ids: list[Id]) -> list[Any]:
    """The values of `ids` (created if absent), in order, each its own copy, as the
    runtime's `on_pull_recv` gets them: Python scalars, or writable arrays."""
    groups = store.pull(ids)
    if len(groups) == 1:  # in the order asked
        return row_values(groups[0][1])
    rows = {param_id: row for group_ids, array in groups for param_id, row in zip(group_ids, array, strict=True)}
    return [rows[param_id].item() if rows[param_id].ndim == 0 else np.array(rows[param_id]) for param_id in ids]


class InProcessClient:
    """The runtime's handle, in this process: parameters in a shard's store, pulls answered in order.

    The parameters live in a `ParameterStore`, the one a shard serves from, made
    from the same `param_init` and `param_update` (the specs and callables
    `transform` takes): a parameter is created on its first pull or push, and a
    push the shard would refuse (a delta of another shape, a user update that
    returns no number) raises here. Deltas are checked as the runtime checks
    them. Pulls are queued and answered after the callback that issued them
    returns, never inside it. `max_answers` bounds the pulls answered in one
    `drain`, so a logic that pulls forever raises LogicDidNotEnd instead of
    hanging. Answers go to `on_pull_recv_many` where the runtime would send
    them there, one call per signature (dtype and shape) and per kind of id as
    the runtime makes them; `one_by_one=True` sends every answer to
    `on_pull_recv` instead, each value read when its turn comes (a strictly
    sequential schedule, for reference runs). `model` is a live view of the
    parameters.
    """

    def __init__(
        self,
        param_init: str | Callable[[Id], Any] = "const:0",
        param_update: str | Callable[[Any, Any], Any] = "add",
        *,
        worker_index: int = 0,
        num_workers: int = 1,
        num_shards: int = 1,
        max_answers: int | None = None,
        one_by_one: bool = False,
    ):
        self.worker_index = worker_index
        self.num_workers = num_workers
        self.num_shards = num_shards
        self.store = ParameterStore(make_init(param_init), make_update(param_update))
        self.model = _Model(self)
        self.max_answers = max_answers
        self.one_by_one = one_by_one
        self.outputs: list[Any] = []
        # Each entry is one call: (ids, from_many).
        self._pulls: deque[tuple[list[Id], bool]] = deque()
        self._pushes = 0  # pushes made, or parameters set, so far
        self.clock = 0  # how often the logic called advance_clock

    # -- the handle -------------------------------------------------------------------

    def pull(self, param_id: Id) -> None:
        self._pulls.append(([check_id(param_id)], False))

    def push(self, param_id: Id, delta: Any) -> None:
        param_id = check_id(param_id)
        check_delta(param_id, delta)
        self.store.push(group_values([param_id], [delta]))
        self._pushes += 1

    def pull_many(self, ids: np.ndarray | Sequence[Id]) -> None:
        id_list = _to_ids(ids)
        if id_list:
            self._pulls.append((id_list, True))

    def push_many(self, ids: np.ndarray | Sequence[Id], deltas: Any) -> None:
        id_list = _to_ids(ids)
        array = check_deltas(id_list, deltas, len(id_list))
        self.store.push([(id_list, array)])
        self._pushes += 1

    def output(self, out: Any) -> None:
        self.outputs.append(out)

    def advance_clock(self) -> None:
        # One worker in one process: nothing to wait for, only the count to check.
        self.clock += 1

    # -- parameters -------------------------------------------------------------------

    def value(self, param_id: Id) -> Any:
        """The parameter's current value (created with the init on first use)."""
        return _values(self.store, [param_id])[0]

    # -- answering --------------------------------------------------------------------

    @property
    def pending(self) -> list[Id]:
        """The pulls not answered yet, in order."""
        return [param_id for ids, _ in self._pulls for param_id in ids]

    @property
    def queued_calls(self) -> int:
        """The pull calls queued now (a `pull_many` is one call)."""
        return len(self._pulls)

    def answer_one(self, logic: WorkerLogic) -> int:
        """Answer the oldest queued pull call; return how many ids it answered (0: none queued)."""
        if not self._pulls:
            return 0
        ids, from_many = self._pulls.popleft()
        limit = pull_limit_of(logic)
        if limit is not None and len(ids) > limit:  # the runtime sends at most `limit` of them at once
            self._pulls.appendleft((ids[limit:], from_many))
            ids = ids[:limit]
        if self.one_by_one or not (from_many or receives_many(logic)):
            # Each value as it is when its turn comes: read again after a push.
            values, start, pushes = [], 0, -1
            for k, param_id in enumerate(ids):
                if pushes != self._pushes:
                    values, start, pushes = _values(self.store, ids[k:]), k, self._pushes
                logic.on_pull_recv(param_id, values[k - start], self)
            return len(ids)
        # As a shard answers: one batch per signature; as the runtime delivers a
        # batch: its int ids in one call, its str ids in another.
        int_ids, str_ids, _ = split_ids(ids)
        for batch in self.store.pull_rows(int_ids, str_ids):
            array = np.array(batch.values)
            ints = len(batch.int_ids)
            if ints:
                logic.on_pull_recv_many(batch.int_ids.copy(), array[:ints], self)
            if batch.str_ids:
                logic.on_pull_recv_many(batch.str_ids, array[ints:], self)
        return len(ids)

    def drain(self, logic: WorkerLogic) -> int:
        """Answer pulls (those the answers cause too) until none is left; return how many."""
        answered = 0
        while self._pulls:
            if self.max_answers is not None and answered >= self.max_answers:
                raise LogicDidNotEnd(
                    f"{type(logic).__name__} still pulls after {answered} answered pulls "
                    f"(pending: {self.pending[:5]}): it does not end"
                )
            answered += self.answer_one(logic)
        return answered

    def run(self, logic: WorkerLogic, records: Iterable[Any]) -> tuple[list[Any], dict[Id, Any]]:
        """open, on_recv per record (draining answers between records), on_input_end, drain, close.

        Returns (outputs, model): what the logic output, and every parameter (a dict,
        in order of creation).
        """
        logic.open()
        for record in records:
            logic.on_recv(record, self)
            self.drain(logic)
        logic.on_input_end(self)
        self.drain(logic)
        logic.close()
        return self.outputs, self.model.copy()


# -- check_logic ----------------------------------------------------------------------


def canonical(value: Any) -> Hashable:
    """A hashable, exact form of an output or parameter: arrays by dtype, shape and bytes."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, np.generic):
        return ("numpy", value.dtype.str, value.tobytes())
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, dict):
        return ("dict", tuple(sorted(((canonical(k), canonical(v)) for k, v in value.items()), key=repr)))
    if isinstance(value, set | frozenset):
        return ("set", tuple(sorted((canonical(v) for v in value), key=repr)))
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(canonical(v) for v in value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__, canonical(dataclasses.asdict(value)))
    return (type(value).__name__, value)


def _make(logic: Any) -> WorkerLogic:
    made = logic if isinstance(logic, WorkerLogic) else logic()
    if not isinstance(made, WorkerLogic):
        raise LogicCheckFailed(f"check_logic: {logic!r} is not a WorkerLogic, nor a factory of one")
    return made


def check_logic(
    logic: Any,
    records: Iterable[Any],
    *,
    param_init: str | Callable[[Id], Any] = "const:0",
    param_update: str | Callable[[Any, Any], Any] = "add",
    summary: Callable[[Any], bool] = lambda _out: False,
    max_answers: int = 100_000,
) -> None:
    """Check a WorkerLogic (instance, class or factory) the way the bundled logics are checked.

    1. serializable: it survives the cloudpickle round trip `transform` ships it
       with (a callable init or update too);
    2. ends on `records`: it takes every record and stops pulling (at most
       `max_answers` pulls answered per step), leaving at least one parameter;
    3. ends on an empty input, creating no parameter and outputting nothing
       but end-of-input summaries (outputs for which `summary(out)` is true);
    4. deterministic: two runs give the same outputs, in the same order, and
       the same model.

    Each run uses a fresh copy of the shipped logic. Raises LogicCheckFailed
    (an AssertionError) with a one-line message naming the failed check.
    """
    records = list(records)
    name = getattr(logic, "__name__", type(logic).__name__)

    def fail(check: str, why: str) -> LogicCheckFailed:
        return LogicCheckFailed(f"check_logic: {name} is not {check}: {why}")

    try:
        shipped = cloudpickle.dumps(logic)
        cloudpickle.loads(shipped)
        for fn in (param_init, param_update):
            if not isinstance(fn, str):
                cloudpickle.loads(cloudpickle.dumps(fn))
    except Exception as exc:
        raise fail("serializable", f"the cloudpickle round trip raised {exc!r}") from exc
    expected = type(_make(logic))
    if type(_make(cloudpickle.loads(shipped))) is not expected:
        raise fail("serializable", f"the round trip gives no {expected.__name__}")

    def run(data: list[Any], check: str) -> tuple[list[Any], dict[Id, Any]]:
        client = InProcessClient(param_init, param_update, max_answers=max_answers)
        try:
            return client.run(_make(cloudpickle.loads(shipped)), data)
        except LogicDidNotEnd as exc:
            raise fail(check, str(exc)) from exc
        except Exception as exc:  # the logic's own error, or a delta the runtime refuses
            raise fail(check, f"it raised {exc!r}") from exc

    outputs, model = run(records, "ending on a finite input")
    if records and not model:
        raise fail("ending on a finite input", f"it left no parameter after {len(records)} records")

    empty_outputs, empty_model = run([], "fine with an empty input")
    if empty_model:
        raise fail("fine with an empty input", f"it created parameters {list(empty_model)[:5]} without any input")
    others = [out for out in empty_outputs if not summary(out)]
    if others:
        raise fail("fine with an empty input", f"it output more than end-of-input summaries: {others[:5]}")

    again_outputs, again_model = run(records, "deterministic")
    differ = [
        k
        for k in [*model, *(k for k in again_model if k not in model)]
        if k not in model or k not in again_model or canonical(model[k]) != canonical(again_model[k])
    ]
    if differ:
        raise fail("deterministic", f"two runs give different models (ids {differ[:5]})")
    if [canonical(o) for o in outputs] != [canonical(o) for o in again_outputs]:
        same_multiset = Counter(map(canonical, outputs)) == Counter(map(canonical, again_outputs))
        what = "outputs in another order" if same_multiset else "different outputs"
        raise fail("deterministic", f"two runs give {what}")
