"""SparseLinearLearner: a linear model over sparse features, learnt record by record.

For each record the worker pulls the weights of its features (one
`ps.pull_many`, answered in `on_pull_recv_many`) and parks the record until
every pull is answered; then it predicts, outputs `(epoch, label, predicted
label)` (made before learning from the record: in the first pass, a
prequential evaluation), asks the subclass for the deltas (`update`) and pushes
them (one `ps.push_many`).

A worker works through its records in order, `window` at a time (default 1: a
record's pulls go out after the pushes of the one before, so each prediction
sees every update this worker made, and the other workers' updates up to its
pull). Weights pulled for a record in flight are shared by the records in
flight with it and updated locally as they learn. Passes: with `epochs=E`, the
worker keeps its records and, when its input ends, goes through them E-1 more
times (the driver feeds the data once): in the same order, or with
`shuffle=SEED` each pass in a fresh order, `pass_order(SEED, worker, pass, n)`
(scikit-learn's `shuffle=True, random_state=SEED`, but the first pass stays
the stream's order, and each worker shuffles its own records).

Bounded lead (`max_lead=N`, 1 by default): each worker counts the records it has learned
from in its clock parameter (`clock_id`) and pulls the other workers' clocks
with every record. A worker more than N records ahead of the slowest one puts
the record back and pulls the clocks alone until that one catches up (a
finished worker adds DONE to its clock, so nobody waits for it). Without it,
one worker can run far ahead of the other, which reorders the stream the model
learns from.

Averaged model (`average=True`, the default): next to each delta `d` of step `s` (the
record's place in the stream, from the clocks, or estimated), the learner
pushes `s * d` to `average_id(id)`; `averaged_model` turns final weights and
accumulators into scikit-learn's `average=True` (ASGD) model, at no extra round
trip.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from examples.linear_model import (
    DEFAULT_CLASSES,
    DONE,
    INTERCEPT_ID,
    Id,
    Prediction,
    Record,
    average_id,
    clock_count,
    clock_id,
    sparse_features,
    split_record,
)
from examples.settings import env, flag, labels
from psworker import ParameterServerClient, WorkerLogic

Client = ParameterServerClient[Any, Prediction]

# The settings of the results in examples/RESULTS.md: 5 passes, the averaged model too, and
# workers within a record of each other (unbounded, one worker ran half a pass ahead of the
# other on 2 shared cores, which reorders the stream the model learns from).
DEFAULT_EPOCHS = 5
DEFAULT_AVERAGE = True
DEFAULT_MAX_LEAD = 1  # records a worker may be ahead of the slowest one; negative: unbounded


def pass_order(seed: int, worker: int, epoch: int, records: int) -> np.ndarray:
    """The order in which a worker with `shuffle=seed` goes through its `records` records in pass `epoch` (>= 2)."""
    return np.random.default_rng([seed, worker, epoch]).permutation(records)


@dataclass(slots=True)
class _InFlight:
    place: int  # in this worker's stream of records (all passes)
    epoch: int
    ids: list[Id]
    x: np.ndarray
    label: Any
    missing: int
    probe: bool = False  # a read of the clocks alone, not a record


class SparseLinearLearner(WorkerLogic[Record, Any, Prediction]):
    """A linear model over sparse features, one parameter per feature, learnt record by record.

    Subclasses say how a record becomes (ids, x) (`featurize`) and how the
    model learns from it (`update`); this class does the pulling, parking,
    predicting, outputting, pushing and the passes.

    `classes`: the labels (two: binary, a float per feature; more: a vector).
    `epochs`: passes over this worker's records. `window`: records in flight.
    `average`: also push the accumulators of the averaged model. `max_lead`:
    records this worker may be ahead of the slowest one (negative: unbounded).
    `shuffle`: the seed of a fresh order for each pass after the first (None:
    the same order). `predictions`: output (epoch, label, predicted label).
    """

    # Subclasses name their settings' prefix: what they are not given comes from
    # STREAMPS_<ENV_PREFIX>_<NAME> (examples/settings.py), else from the defaults.
    ENV_PREFIX = ""

    def __init__(
        self,
        classes: Sequence[Any] | None = None,
        *,
        epochs: int | None = None,
        window: int | None = None,
        average: bool | None = None,
        max_lead: int | None = None,
        shuffle: int | None = None,
        fit_intercept: bool = True,
        predictions: bool = True,
    ):
        self.classes = tuple(classes if classes is not None else self.setting("CLASSES", labels, DEFAULT_CLASSES))
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be at least two distinct labels, got {self.classes!r}")
        self.epochs = epochs if epochs is not None else self.setting("EPOCHS", int, DEFAULT_EPOCHS)
        self.window = window if window is not None else self.setting("WINDOW", int, 1)
        if self.epochs < 1 or self.window < 1:
            raise ValueError("epochs and window must be >= 1")
        self.multiclass = len(self.classes) > 2
        self.class_index = {label: k for k, label in enumerate(self.classes)}
        self.fit_intercept = fit_intercept
        self.average = average if average is not None else self.setting("AVERAGE", flag, DEFAULT_AVERAGE)
        lead = max_lead if max_lead is not None else self.setting("MAX_LEAD", int, DEFAULT_MAX_LEAD)
        self.max_lead = None if lead < 0 else lead  # None: unbounded
        self.shuffle = shuffle if shuffle is not None else self.setting("SHUFFLE", int, None)
        self.predictions = predictions
        self.lead_waits = 0  # times a record was put back because this worker was too far ahead
        self._learned = 0  # records learned from, by this worker
        self._input_ended = False
        self._done = False
        self._clock_ids: list[str] | None = None
        # A clock has the shape of every other parameter (one signature per shard keeps the shards
        # on their fast path): a float, or a vector of which every entry counts.
        self._clock_unit: Any = np.ones(len(self.classes)) if self.multiclass else 1.0
        self._probing = False  # waiting for the slowest worker: clocks pulled, no record started
        # (place in this worker's stream, epoch, ids, x, label) of the records not started yet;
        # records put back (bounded lead) wait in `_retry`, by place, and go first.
        self._queue: deque[tuple[int, int, list[Id], np.ndarray, Any]] = deque()
        self._retry: list[tuple[int, int, list[Id], np.ndarray, Any]] = []
        self._queued = 0
        self._kept: list[tuple[list[Id], np.ndarray, Any]] = []
        self._in_flight: dict[int, _InFlight] = {}
        self._next_rid = 0
        self._weights: dict[Id, Any] = {}  # current values of the weights the records in flight use
        self._refs: dict[Id, int] = {}  # how many records in flight use each weight
        self._waiting: dict[Id, list[int]] = {}  # pulled weight -> records waiting for it

    def setting(self, name: str, cast: Callable[[str], Any], default: Any) -> Any:
        return env(self.ENV_PREFIX, name, cast, default) if self.ENV_PREFIX else default

    # -- what subclasses define --

    def featurize(self, features: Any) -> tuple[list[Id], np.ndarray]:
        """Parameter ids and values of a record's features (the intercept last, if fitted)."""
        ids, x = sparse_features(features)
        if self.fit_intercept:
            ids.append(INTERCEPT_ID)
            x = np.append(x, 1.0)
        return ids, x

    def update(self, x: np.ndarray, weights: np.ndarray, scores: Any, label: Any) -> np.ndarray | None:
        """The deltas (rows like `weights`) to push after seeing `label`, or None for none."""
        raise NotImplementedError

    # -- the model, locally --

    def scores(self, x: np.ndarray, weights: np.ndarray) -> Any:
        """w.x: a float (binary) or one score per label."""
        return x @ weights

    def label_of(self, scores: Any) -> Any:
        if self.multiclass:
            return self.classes[int(np.argmax(scores))]
        return self.classes[1] if scores > 0.0 else self.classes[0]

    def sign(self, label: Any) -> float:
        """+1.0 for the second class, -1.0 for the first (binary models)."""
        if label not in self.class_index:
            raise ValueError(f"label {label!r} is not one of the classes {self.classes!r}")
        return 1.0 if self.class_index[label] == 1 else -1.0

    def index(self, label: Any) -> int:
        try:
            return self.class_index[label]
        except KeyError:
            raise ValueError(f"label {label!r} is not one of the classes {self.classes!r}") from None

    def zero_weight(self) -> Any:
        return np.zeros(len(self.classes)) if self.multiclass else 0.0

    def predict(self, model: dict[Id, Any], features: Any) -> Any:
        """The label a trained model (id -> value, e.g. from the Right stream) gives to `features`."""
        ids, x = self.featurize(features)
        zero = self.zero_weight()
        weights = np.asarray([model.get(i, zero) for i in ids], dtype=np.float64)
        return self.label_of(self.scores(x, weights))

    # -- the WorkerLogic callbacks --

    def on_recv(self, data: Record, ps: Client) -> None:
        features, label = split_record(data)
        ids, x = self.featurize(features)
        if self.epochs > 1:
            self._kept.append((ids, x, label))
        self._queue.append((self._queued, 1, ids, x, label))
        self._queued += 1
        self._pump(ps)

    def on_input_end(self, ps: Client) -> None:
        for epoch in range(2, self.epochs + 1):
            order = range(len(self._kept)) if self.shuffle is None else pass_order(
                self.shuffle, ps.worker_index, epoch, len(self._kept)
            )  # fmt: skip
            for k in order:
                ids, x, label = self._kept[k]
                self._queue.append((self._queued, epoch, ids, x, label))
                self._queued += 1
        self._kept = []
        self._input_ended = True
        self._pump(ps)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Client) -> None:
        ready: list[int] = []
        self._answered(param_id, param_value, ready)
        self._learn_ready(ready, ps)

    def on_pull_recv_many(self, ids: Any, values: np.ndarray, ps: Client) -> None:
        """A batch of answers: the records they complete learn, oldest first, once the batch is in."""
        ready: list[int] = []
        rows = values.tolist() if values.ndim == 1 else values
        for param_id, value in zip(ids.tolist() if isinstance(ids, np.ndarray) else ids, rows, strict=True):
            self._answered(param_id, value, ready)
        self._learn_ready(ready, ps)

    def _answered(self, param_id: Id, value: Any, ready: list[int]) -> None:
        self._weights[param_id] = value
        for rid in self._waiting.pop(param_id):
            record = self._in_flight[rid]
            record.missing -= 1
            if record.missing == 0:
                ready.append(rid)

    def _learn_ready(self, ready: list[int], ps: Client) -> None:
        for rid in sorted(ready):  # oldest first
            self._learn(self._in_flight.pop(rid), ps)
        self._pump(ps)

    # -- the machinery --

    def _clocks(self, ps: Client) -> list[str]:
        """The other workers' clock ids, when the lead is bounded."""
        if self._clock_ids is None:
            bounded = self.max_lead is not None and ps.num_workers > 1
            others = [j for j in range(ps.num_workers) if j != ps.worker_index] if bounded else []
            self._clock_ids = [clock_id(j) for j in others]
        return self._clock_ids

    def _pump(self, ps: Client) -> None:
        """Start queued records while fewer than `window` are in flight; say so when all is done."""
        clocks = self._clocks(ps)
        while (self._retry or self._queue) and len(self._in_flight) < self.window and not self._probing:
            place, epoch, ids, x, label = heapq.heappop(self._retry) if self._retry else self._queue.popleft()
            rid = self._next_rid
            self._next_rid += 1
            record = _InFlight(place, epoch, ids, x, label, 0)
            pulls: list[Id] = []
            for param_id in ids:
                self._refs[param_id] = self._refs.get(param_id, 0) + 1
                if param_id in self._weights:
                    continue
                self._wait_for(param_id, rid, pulls)
                record.missing += 1
            for param_id in clocks:  # always a fresh read: never from the cache
                self._refs[param_id] = self._refs.get(param_id, 0) + 1
                self._wait_for(param_id, rid, pulls)
                record.missing += 1
            if pulls:  # the record's weights in one call: split by shard and packed by the runtime
                ps.pull_many(pulls)
            if record.missing:
                self._in_flight[rid] = record
            else:  # every weight is already here (window > 1)
                self._learn(record, ps)
        if self._input_ended and not self._queue and not self._retry and not self._in_flight and not self._done:
            self._done = True
            if clocks:  # the others need not wait for this worker any more
                ps.push(clock_id(ps.worker_index), DONE * self._clock_unit)

    def _probe(self, ps: Client) -> None:
        """Pull the other workers' clocks alone; `_learn` looks at them when they arrive."""
        rid = self._next_rid
        self._next_rid += 1
        pulls: list[Id] = []
        for param_id in self._clocks(ps):
            self._refs[param_id] = self._refs.get(param_id, 0) + 1
            self._wait_for(param_id, rid, pulls)
        if pulls:
            ps.pull_many(pulls)
        self._in_flight[rid] = _InFlight(-1, 0, [], np.empty(0), None, len(self._clocks(ps)), probe=True)

    def _wait_for(self, param_id: Id, rid: int, pulls: list[Id]) -> None:
        """Record `rid` waits for `param_id`; it joins `pulls` unless a pull of it is already out."""
        waiting = self._waiting.get(param_id)
        if waiting is None:
            self._waiting[param_id] = [rid]
            pulls.append(param_id)
        else:
            waiting.append(rid)

    def _release(self, ids: Iterable[Id]) -> None:
        for param_id in ids:
            refs = self._refs[param_id] - 1
            if refs:
                self._refs[param_id] = refs
            else:
                del self._refs[param_id]
                self._weights.pop(param_id, None)

    def _learn(self, record: _InFlight, ps: Client) -> None:
        ids = record.ids
        clocks = self._clocks(ps)
        if clocks:
            counts = [clock_count(self._weights[param_id]) for param_id in clocks]
            running = [count for count, done in counts if not done]
            ahead = bool(running) and self._learned - min(running) > self.max_lead  # type: ignore[operator]
            if record.probe:
                self._release(clocks)
                self._probing = ahead
                if ahead:
                    self._probe(ps)
                return
            if ahead:
                # Too far ahead of the slowest worker: put the record back, and read only the
                # clocks until it has caught up (a probe); then the record starts afresh.
                self._release(ids)
                self._release(clocks)
                heapq.heappush(self._retry, (record.place, record.epoch, ids, record.x, record.label))
                self.lead_waits += 1
                if not self._probing:
                    self._probing = True
                    self._probe(ps)
                return
            step = self._learned + sum(count for count, _ in counts) + 1
        else:  # this record's place in the whole stream, as far as a worker can tell (round robin)
            step = self._learned * ps.num_workers + ps.worker_index + 1
        current = [self._weights[param_id] for param_id in ids]
        weights = np.asarray(current, dtype=np.float64)
        scores = self.scores(record.x, weights)
        if self.predictions:
            ps.output((record.epoch, record.label, self.label_of(scores)))
        deltas = self.update(record.x, weights, scores, record.label)
        self._learned += 1
        if deltas is not None:
            if self.multiclass:  # the parameters' own dtype, as pulled
                deltas = deltas.astype(np.result_type(*current), copy=False)
            updated = weights + deltas
            for param_id, value in zip(ids, updated.tolist() if not self.multiclass else updated, strict=True):
                self._weights[param_id] = value
            ps.push_many(ids, deltas)
            if self.average:
                ps.push_many([average_id(param_id) for param_id in ids], step * deltas)
        if clocks:
            ps.push(clock_id(ps.worker_index), self._clock_unit)
        self._release(ids)
        self._release(clocks)
