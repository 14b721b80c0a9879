"""Passive-aggressive classification (Crammer et al. 2006) on sparse features.

One parameter per feature, kept on the shards: a float for a binary model, a
vector with one entry per label for a multiclass model (init `const:0.0`, or
`zeros:K`; update `add`). A record is `(features, label)`; `features` is a
dict `{feature_id: value}` or a pair `(indices, values)` (lists or numpy
arrays); feature ids are ints or strs. Zero values are skipped: only the
features present in a record travel.

For each record the worker pulls the weights of its features (one
`ps.pull_many`, answered in `on_pull_recv_many`) and parks the record until
every pull is answered; then it predicts, outputs
`(epoch, label, predicted label)` (made before learning from the record: in the
first pass, a prequential evaluation), computes the PA step tau and pushes
`tau * y * x` as deltas (one `ps.push_many`). With `y` in {-1, +1}, the margin loss
`l = max(0, 1 - y w.x)` and `s = ||x||^2`:

    PA      tau = l / s
    PA-I    tau = min(C, l / s)
    PA-II   tau = l / (s + 1 / (2 C))

The intercept is the parameter INTERCEPT_ID, a feature whose value is always 1:
it gets the same step as the weights but is left out of `||x||^2`, as in
scikit-learn's SGDClassifier. Multiclass models are one-vs-rest by default,
each label its own binary PA (what SGDClassifier does), all labels in one
vector per feature; `multiclass="crammer"` is the paper's single-vector
multiclass update instead (the right label's vector moves towards x, the
highest-scoring wrong one away, tau computed with `2 ||x||^2`).

A worker works through its records in order, `window` at a time (default 1: a
record's pulls go out after the pushes of the one before, so each prediction
sees every update this worker made, and the other workers' updates up to its
pull). Weights pulled for a record in flight are shared by the records in
flight with it and updated locally as they learn. Passes: with `epochs=E`, the
worker keeps its records and, when its input ends, goes through them E-1 more
times, in the same order (the driver feeds the data once).

Bounded lead (`max_lead=N`, off by default): each worker counts the records it
has learned from in a clock parameter (CLOCK_PREFIX + worker index, push-only
for its owner) and pulls the other workers' clocks with every record. A worker
more than N records ahead of the slowest one puts the record back and pulls
the clocks alone until that one catches up (a finished worker adds DONE to its
clock, so nobody waits for it). Without it, on 2 shared cores one worker ran up
to 500 records (half a pass) ahead of the other, which reorders the stream the
model learns from; with N=1 the workers stay within a record or two of each
other, as when scikit-learn reads the records in their order.

Averaged model (`average=True`): next to each delta `d` of step `s` (the
record's place in the stream, from the clocks, or estimated), the learner
pushes `s * d` to a push-only accumulator `average_id(id)`; `averaged_model`
turns final weights and accumulators into the mean of the weights after every
step, which is scikit-learn's `average=True` (ASGD), at no extra round trip.

Run on scikit-learn's breast_cancer and digits and river's phishing data, on 2
workers x 2 shards, next to scikit-learn's SGDClassifier with the PA learning
rates on the same split and passes (PassiveAggressiveClassifier is deprecated
since scikit-learn 1.8 in favour of SGDClassifier(loss="hinge", penalty=None,
learning_rate="pa1"|"pa2", eta0=C)); the three variants train side by side in
one job per data set (SideBySide):

    python examples/passive_aggressive.py [--dataset all] [--variant all] [--plot curve.png]

Test accuracy on a stratified 75/25 split (seed 0), standardized with the
training statistics, 5 passes in the data's order, C=0.01, max_lead 1 (one run,
scikit-learn 1.9.1; the tests check every row within 0.01, but one):

    data set       model   final: ours  sklearn   averaged: ours  sklearn
    breast_cancer  PA           0.951    0.951            0.965    0.965
    breast_cancer  PA-I         0.958    0.958            0.944    0.944
    breast_cancer  PA-II        0.958    0.958            0.958    0.958
    digits         PA           0.940    0.936            0.967    0.967
    digits         PA-I         0.942    0.942            0.964    0.964
    digits         PA-II        0.942    0.942            0.971    0.969
    phishing       PA           0.866    0.869            0.885    0.885
    phishing       PA-I         0.888    0.891            0.891    0.888
    phishing       PA-II        0.872    0.872            0.891    0.891

In one process (InProcessPS) the logic makes scikit-learn's updates exactly
(weights equal to ~1e-15). The exception is the final model of plain PA on
phishing: over our runs it scored 0.850 to 0.866, 0.3 to 1.9 points under
scikit-learn's 0.869. Its steps are unbounded, so its last weights depend on
the last few records and their order: scikit-learn itself, on 10 shuffled
orders of the same data, scores 0.832 +- 0.044, and any asynchrony (2 workers
learning 2 records from the same weights) moves it. Its averaged model is
within 0.01. With an unbounded lead (`--max-lead -1`) phishing PA misses by 2
to 3 points and PA-II by up to 2.

As a worker plugin (jsonl records `[features, label]`):

    psclient run --logic examples.passive_aggressive:PassiveAggressive --init const:0.0 --update add ...

with hyperparameters from the environment: STREAMPS_PA_VARIANT (PA, PA-I,
PA-II), STREAMPS_PA_C, STREAMPS_PA_CLASSES (comma-separated labels; default
0,1; more than two needs `--init zeros:K`), STREAMPS_PA_EPOCHS,
STREAMPS_PA_MULTICLASS (ovr, crammer), STREAMPS_PA_WINDOW, STREAMPS_PA_AVERAGE,
STREAMPS_PA_MAX_LEAD.

This module also holds what examples/logistic_regression.py shares with it: the
sparse record machinery (SparseLinearLearner), the data sets, the driver and
the learning-curve plot.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import math
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from psclient import Left, Right, transform
from psworker import ParameterServerClient, WorkerLogic
from psworker.testing import InProcessClient

Id = int | str
Record = tuple[Any, Any]  # (features, label)
Prediction = tuple[int, Any, Any]  # (epoch, label, predicted label)
Client = ParameterServerClient[Any, Prediction]

INTERCEPT_ID = "__intercept__"
AVERAGE_PREFIX = "__avg__:"
CLOCK_PREFIX = "__clock__:"
DONE = 2.0**40  # added to a worker's clock when it has no record left
VARIANTS = ("PA", "PA-I", "PA-II")
DEFAULT_C = 1.0
DEFAULT_CLASSES = (0, 1)
# What the example runs with: C small enough that PA-I and PA-II differ from PA.
EXAMPLE_C = 0.01
EXAMPLE_EPOCHS = 5
EXAMPLE_MAX_LEAD = 1
DATASETS = ("breast_cancer", "digits", "phishing")
SPLIT_SEED = 0
TEST_SIZE = 0.25


# -- the PA step ------------------------------------------------------------------


def canonical_variant(name: str) -> str:
    """'PA', 'PA-I' or 'PA-II' from any common spelling (pa1, PA-1, pa-ii, ...)."""
    key = name.strip().upper().replace("_", "-").replace(" ", "")
    aliases = {"PA": "PA", "PA0": "PA", "PA-I": "PA-I", "PA1": "PA-I", "PA-1": "PA-I", "PAI": "PA-I"}
    aliases |= {"PA-II": "PA-II", "PA2": "PA-II", "PA-2": "PA-II", "PAII": "PA-II"}
    if key not in aliases:
        raise ValueError(f"unknown PA variant {name!r}: use one of {', '.join(VARIANTS)}")
    return aliases[key]


def pa_tau(variant: str, loss: Any, sqnorm: float, C: float = DEFAULT_C) -> Any:
    """The PA step size for a margin loss (a float, or an array of losses) and ||x||^2.

    PA: l / s; PA-I: min(C, l / s); PA-II: l / (s + 1 / (2 C)). With s = 0 the
    step of PA and PA-I is 0 (x carries no information; scikit-learn skips such
    a record too).
    """
    loss = np.asarray(loss, dtype=np.float64)
    if variant == "PA-II":
        tau = loss / (sqnorm + 0.5 / C)
    elif sqnorm == 0.0:
        tau = np.zeros_like(loss)
    elif variant == "PA":
        tau = loss / sqnorm
    elif variant == "PA-I":
        tau = np.minimum(C, loss / sqnorm)
    else:
        raise ValueError(f"unknown PA variant {variant!r}")
    return float(tau) if tau.ndim == 0 else tau


# -- records ----------------------------------------------------------------------


def _as_id(feature: Any) -> Id:
    if isinstance(feature, str):
        return feature
    if isinstance(feature, (int, np.integer)) and not isinstance(feature, bool):
        return int(feature)
    raise ValueError(f"feature id {feature!r} is neither an int nor a str")


def sparse_features(features: Any) -> tuple[list[Id], np.ndarray]:
    """(ids, values) of the non-zero features: from a dict, or an (indices, values) pair.

    Repeated ids are summed; zero values are dropped.
    """
    if isinstance(features, dict):
        names: Iterable[Any] = features.keys()
        raw: Any = list(features.values())
    elif isinstance(features, (tuple, list)) and len(features) == 2:
        names, raw = features
        if isinstance(names, np.ndarray):
            names = names.tolist()
    else:
        raise ValueError(
            f"features must be a dict {{id: value}} or a pair (indices, values), got {type(features).__name__}"
        )
    values = np.asarray(raw, dtype=np.float64).reshape(-1)
    ids = [_as_id(name) for name in names]
    if len(ids) != len(values):
        raise ValueError(f"{len(ids)} feature ids but {len(values)} values")
    if len(set(ids)) != len(ids):  # rare: merge repeated ids
        merged: dict[Id, float] = {}
        for feature, value in zip(ids, values.tolist(), strict=True):
            merged[feature] = merged.get(feature, 0.0) + value
        ids, values = list(merged), np.fromiter(merged.values(), dtype=np.float64, count=len(merged))
    keep = values != 0.0
    if not keep.all():
        ids = [feature for feature, kept in zip(ids, keep.tolist(), strict=True) if kept]
        values = values[keep]
    return ids, values


def split_record(record: Any) -> tuple[Any, Any]:
    """(features, label) of a record: a pair, or a dict with features/x and label/y."""
    if isinstance(record, dict):
        features = record.get("features", record.get("x"))
        label = record.get("label", record.get("y"))
        if features is None or label is None:
            raise ValueError("a dict record needs 'features' (or 'x') and 'label' (or 'y')")
        return features, label
    if isinstance(record, (tuple, list)) and len(record) == 2:
        return record[0], record[1]
    raise ValueError(f"a record is (features, label), got {type(record).__name__}")


def _parse_label(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text


def _env(prefix: str, name: str, cast: Callable[[str], Any], default: Any) -> Any:
    text = os.environ.get(f"STREAMPS_{prefix}_{name}")
    return default if text is None or text == "" else cast(text)


def _flag(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def _classes_from_text(text: str) -> tuple[Any, ...]:
    return tuple(_parse_label(part.strip()) for part in text.split(",") if part.strip())


class VectorZeros:
    """A float64 zero vector of `dim` entries for every id: the multiclass init."""

    def __init__(self, dim: int):
        self.dim = dim

    def __call__(self, param_id: Id) -> np.ndarray:
        return np.zeros(self.dim, dtype=np.float64)


def param_init_for(classes: Sequence[Any]) -> Any:
    """The shards' init for a model over these classes: a float, or one entry per label."""
    return "const:0.0" if len(classes) <= 2 else VectorZeros(len(classes))


# -- the shared worker logic -------------------------------------------------------


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
    records this worker may be ahead of the slowest one (None: unbounded).
    `predictions`: output (epoch, label, predicted label) for every record.
    """

    def __init__(
        self,
        classes: Sequence[Any] = DEFAULT_CLASSES,
        *,
        epochs: int = 1,
        window: int = 1,
        fit_intercept: bool = True,
        average: bool = False,
        max_lead: int | None = None,
        predictions: bool = True,
    ):
        self.classes = tuple(classes)
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be at least two distinct labels, got {self.classes!r}")
        if epochs < 1 or window < 1:
            raise ValueError("epochs and window must be >= 1")
        self.multiclass = len(self.classes) > 2
        self.class_index = {label: k for k, label in enumerate(self.classes)}
        self.epochs = epochs
        self.window = window
        self.fit_intercept = fit_intercept
        self.average = average
        if max_lead is not None and max_lead < 0:
            raise ValueError("max_lead must be >= 0 (or None: unbounded)")
        self.max_lead = max_lead
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
            for ids, x, label in self._kept:
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
            counts = [_clock_count(self._weights[param_id]) for param_id in clocks]
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


def clock_id(worker: int) -> str:
    """Worker `worker`'s clock: how many records it has learned from (+ DONE once it has finished)."""
    return f"{CLOCK_PREFIX}{worker}"


def _clock_count(value: Any) -> tuple[float, bool]:
    """(records learned, finished) from a clock's value (a float, or a vector of equal entries)."""
    count = float(np.asarray(value).flat[0])
    return (count - DONE, True) if count >= DONE else (count, False)


def average_id(param_id: Id) -> str:
    """The push-only accumulator of `param_id` for the averaged model (see `averaged_model`)."""
    return f"{AVERAGE_PREFIX}{param_id}"


def averaged_model(model: dict[Id, Any], steps: int) -> dict[Id, Any]:
    """The average of the weights after each of `steps` updates, from the final weights.

    With w_t the weights after step t = w_T - (sum of the deltas of steps after t),
    sum over t of w_t = (T + 1) w_T - sum over steps s of s * delta_s, and each
    learner pushes s * delta_s to `average_id(id)` next to delta_s: no pull, no
    extra round trip. This is scikit-learn's `average=True` (ASGD) model. On a
    cluster s is the worker's estimate of the record's place in the stream.
    """
    averaged: dict[Id, Any] = {}
    for param_id, value in model.items():
        if isinstance(param_id, str) and param_id.startswith(AVERAGE_PREFIX):
            continue
        weighted = model.get(average_id(param_id), 0.0)
        mean = ((steps + 1) * np.asarray(value, dtype=np.float64) - weighted) / steps
        averaged[param_id] = float(mean) if mean.ndim == 0 else mean
    return averaged


class PassiveAggressive(SparseLinearLearner):
    """PA, PA-I or PA-II classification; binary, or multiclass (one-vs-rest or Crammer's).

    Arguments left as None come from STREAMPS_PA_<NAME> environment variables,
    or else from the defaults (PA-I, C=1, classes 0 and 1, one pass).
    """

    def __init__(
        self,
        variant: str | None = None,
        C: float | None = None,
        classes: Sequence[Any] | None = None,
        *,
        epochs: int | None = None,
        multiclass: str | None = None,
        window: int | None = None,
        average: bool | None = None,
        max_lead: int | None = None,
        fit_intercept: bool = True,
        predictions: bool = True,
    ):
        super().__init__(
            classes if classes is not None else _env("PA", "CLASSES", _classes_from_text, DEFAULT_CLASSES),
            epochs=epochs if epochs is not None else _env("PA", "EPOCHS", int, 1),
            window=window if window is not None else _env("PA", "WINDOW", int, 1),
            average=average if average is not None else _env("PA", "AVERAGE", _flag, False),
            max_lead=max_lead if max_lead is not None else _env("PA", "MAX_LEAD", int, None),
            fit_intercept=fit_intercept,
            predictions=predictions,
        )
        self.variant = canonical_variant(variant if variant is not None else _env("PA", "VARIANT", str, "PA-I"))
        self.C = C if C is not None else _env("PA", "C", float, DEFAULT_C)
        if self.variant == "PA":
            self.C = math.inf
        elif not self.C > 0:
            raise ValueError(f"C must be > 0, got {self.C}")
        self.multiclass_rule = multiclass if multiclass is not None else _env("PA", "MULTICLASS", str, "ovr")
        if self.multiclass_rule not in ("ovr", "crammer"):
            raise ValueError(f"multiclass must be 'ovr' or 'crammer', got {self.multiclass_rule!r}")

    def update(self, x: np.ndarray, weights: np.ndarray, scores: Any, label: Any) -> np.ndarray | None:
        features = x[:-1] if self.fit_intercept else x
        sqnorm = float(features @ features)
        if not self.multiclass:
            y = self.sign(label)
            loss = max(0.0, 1.0 - y * scores)
            tau = pa_tau(self.variant, loss, sqnorm, self.C) if loss > 0.0 else 0.0
            return x * (tau * y) if tau != 0.0 else None
        k = self.index(label)
        if self.multiclass_rule == "ovr":
            signs = np.full(len(self.classes), -1.0)
            signs[k] = 1.0
            losses = np.maximum(0.0, 1.0 - signs * scores)
            if not losses.any():
                return None
            step = pa_tau(self.variant, losses, sqnorm, self.C) * signs
            return np.outer(x, step) if step.any() else None
        rivals = np.array(scores, dtype=np.float64)
        rivals[k] = -np.inf
        r = int(np.argmax(rivals))
        loss = max(0.0, 1.0 - (scores[k] - scores[r]))
        tau = pa_tau(self.variant, loss, 2.0 * sqnorm, self.C) if loss > 0.0 else 0.0
        if tau == 0.0:
            return None
        step = np.zeros(len(self.classes))
        step[k], step[r] = tau, -tau
        return np.outer(x, step)


# -- running a logic in this process ------------------------------------------------


class InProcessPS(InProcessClient):
    """Runs a WorkerLogic in this process against a dict, one callback at a time (add updates).

    Pulls are answered after the callback that issued them returns, in order,
    one id at a time (`on_pull_recv`, each value read when its turn comes):
    with `window=1` a SparseLinearLearner then makes exactly the sequential
    updates of a single-threaded library. For checks and reference curves.
    """

    def __init__(self, init: Callable[[Id], Any] | str, *, worker_index: int = 0, num_workers: int = 1):
        super().__init__(init, "add", worker_index=worker_index, num_workers=num_workers, one_by_one=True)

    @property
    def values(self) -> dict[Id, Any]:
        return self.model

    def answer_round(self, logic: WorkerLogic) -> int:
        """Answer the pulls pending now (not those their answers cause); return how many."""
        return sum(self.answer_one(logic) for _ in range(self.queued_calls))


# -- data ---------------------------------------------------------------------------


@dataclass
class Dataset:
    """A fixed, seeded, stratified train/test split, standardized with the train statistics.

    `X_*` are dense matrices (for scikit-learn), `train`/`test` the same rows as
    sparse records (features, label): (indices, values) arrays, or for phishing
    dicts keyed by feature name.
    """

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    feature_names: list[str] | None = None
    classes: tuple[Any, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.classes = tuple(np.unique(self.y_train).tolist())

    def _records(self, X: np.ndarray, y: np.ndarray) -> list[Record]:
        records: list[Record] = []
        for row, label in zip(X, y.tolist(), strict=True):
            (nonzero,) = np.nonzero(row)
            if self.feature_names is None:
                records.append(((nonzero.astype(np.int64), row[nonzero]), label))
            else:
                records.append(({self.feature_names[j]: float(row[j]) for j in nonzero}, label))
        return records

    @functools.cached_property
    def train(self) -> list[Record]:
        return self._records(self.X_train, self.y_train)

    @functools.cached_property
    def test(self) -> list[Record]:
        return self._records(self.X_test, self.y_test)


def load_dataset(name: str, seed: int = SPLIT_SEED, test_size: float = TEST_SIZE) -> Dataset:
    """breast_cancer, digits (scikit-learn's bundled copies) or phishing (river's); no download."""
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    names: list[str] | None = None
    if name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        X, y = load_breast_cancer(return_X_y=True)
    elif name == "digits":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
    elif name == "phishing":
        from river.datasets import Phishing

        rows = list(Phishing())
        names = list(rows[0][0])
        X = np.array([[float(x[n]) for n in names] for x, _ in rows])
        y = np.array([int(label) for _, label in rows])
    else:
        raise ValueError(f"unknown data set {name!r}: use one of {', '.join(DATASETS)}")
    X_train, X_test, y_train, y_test = train_test_split(
        X.astype(np.float64), y, test_size=test_size, random_state=seed, stratify=y
    )
    scaler = StandardScaler().fit(X_train)
    return Dataset(name, scaler.transform(X_train), y_train, scaler.transform(X_test), y_test, names)


# -- several models in one job -------------------------------------------------------


def namespaced_id(param_id: Id, model: int, models: int) -> Id:
    """Model `model`'s copy of `param_id`: ints stay ints (id * models + model), strs get a prefix."""
    if isinstance(param_id, str):
        return f"{model}:{param_id}"
    return param_id * models + model


def split_namespaced_id(param_id: Id, models: int) -> tuple[int, Id]:
    """(model, id) back from `namespaced_id`."""
    if isinstance(param_id, str):
        prefix, _, name = param_id.partition(":")
        return int(prefix), name
    original, model = divmod(param_id, models)
    return model, original


class _ModelClient:
    """What a learner inside SideBySide is handed: its ids namespaced, its outputs tagged."""

    __slots__ = ("_ps", "model", "models", "num_shards", "num_workers", "worker_index")

    def __init__(self, ps: Any, model: int, models: int):
        self._ps, self.model, self.models = ps, model, models
        self.worker_index, self.num_workers, self.num_shards = ps.worker_index, ps.num_workers, ps.num_shards

    def pull(self, param_id: Id) -> None:
        self._ps.pull(namespaced_id(param_id, self.model, self.models))

    def push(self, param_id: Id, delta: Any) -> None:
        self._ps.push(namespaced_id(param_id, self.model, self.models), delta)

    def pull_many(self, ids: Sequence[Id]) -> None:
        self._ps.pull_many([namespaced_id(param_id, self.model, self.models) for param_id in ids])

    def push_many(self, ids: Sequence[Id], deltas: Any) -> None:
        self._ps.push_many([namespaced_id(param_id, self.model, self.models) for param_id in ids], deltas)

    def output(self, out: Any) -> None:
        self._ps.output((self.model, out))


class SideBySide(WorkerLogic[Any, Any, tuple[int, Any]]):
    """Several logics on the same stream in one job, each with its own parameters.

    Learner m's ids are `namespaced_id(id, m, M)` on the shards and its outputs
    arrive as `(m, output)`. Each record costs one round trip for all of them:
    the way to compare models (PA, PA-I, PA-II) on equal terms, and cheaply.
    """

    def __init__(self, learners: Sequence[WorkerLogic]):
        self.learners = list(learners)
        self._clients: list[_ModelClient] | None = None

    def _for(self, ps: Any) -> list[_ModelClient]:
        if self._clients is None:
            self._clients = [_ModelClient(ps, m, len(self.learners)) for m in range(len(self.learners))]
        return self._clients

    def open(self) -> None:
        for learner in self.learners:
            learner.open()

    def on_recv(self, data: Any, ps: Any) -> None:
        for learner, client in zip(self.learners, self._for(ps), strict=True):
            learner.on_recv(data, client)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        model, original = split_namespaced_id(param_id, len(self.learners))
        self.learners[model].on_pull_recv(original, param_value, self._for(ps)[model])

    def on_pull_recv_many(self, ids: Any, values: np.ndarray, ps: Any) -> None:
        """Each learner gets its share of the batch, in one call."""
        shares: dict[int, tuple[list[Id], list[int]]] = {}
        for row, param_id in enumerate(ids.tolist() if isinstance(ids, np.ndarray) else ids):
            model, original = split_namespaced_id(param_id, len(self.learners))
            share = shares.setdefault(model, ([], []))
            share[0].append(original)
            share[1].append(row)
        for model, (originals, rows) in shares.items():
            self.learners[model].on_pull_recv_many(originals, values[rows], self._for(ps)[model])

    def on_input_end(self, ps: Any) -> None:
        for learner, client in zip(self.learners, self._for(ps), strict=True):
            learner.on_input_end(client)

    def close(self) -> None:
        for learner in self.learners:
            learner.close()


# -- the driver ------------------------------------------------------------------------


@dataclass
class Run:
    """What training one model gave: its outputs in arrival order, its final model, test accuracy."""

    label: str
    outputs: list[Prediction]
    model: dict[Id, Any]
    test_accuracy: float
    averaged_accuracy: float  # of the averaged model (nan unless the learner averages)
    seconds: float

    def correct(self) -> np.ndarray:
        return np.array([label == predicted for _, label, predicted in self.outputs], dtype=bool)

    def prequential_accuracy(self) -> float:
        """Accuracy of the first-pass predictions, each made before learning its record."""
        first = [label == predicted for epoch, label, predicted in self.outputs if epoch == 1]
        return float(np.mean(first)) if first else float("nan")


def accuracy_on(logic: SparseLinearLearner, model: dict[Id, Any], records: Sequence[Record]) -> float:
    hits = sum(logic.predict(model, features) == label for features, label in records)
    return hits / len(records) if records else float("nan")


def evaluate(
    label: str,
    logic: SparseLinearLearner,
    outputs: list[Prediction],
    model: dict[Id, Any],
    data: Dataset,
    seconds: float,
) -> Run:
    """Test accuracy of the final model and, if the learner averages, of the averaged one."""
    averaged = float("nan")
    if logic.average:
        averaged = accuracy_on(logic, averaged_model(model, len(data.train) * logic.epochs), data.test)
    return Run(label, outputs, model, accuracy_on(logic, model, data.test), averaged, seconds)


def train_distributed(
    factories: dict[str, Callable[[], SparseLinearLearner]],
    data: Dataset,
    workers: int = 2,
    shards: int = 2,
) -> dict[str, Run]:
    """Train every model on the training split in one job (2 workers x 2 shards by default), side by
    side; evaluate each final model on the test split in this process."""
    labels = list(factories)
    models = len(labels)
    started = time.monotonic()
    outputs: list[list[Prediction]] = [[] for _ in labels]
    params: list[dict[Id, Any]] = [{} for _ in labels]
    logic: Any = factories[labels[0]] if models == 1 else SideBySide([factories[label]() for label in labels])
    stream = transform(
        data.train,
        logic,
        param_init_for(data.classes),
        "add",
        worker_parallelism=workers,
        ps_parallelism=shards,
    )
    for item in stream:
        match item:
            case Left(output):
                if models == 1:
                    outputs[0].append(output)
                else:
                    outputs[output[0]].append(output[1])
            case Right((param_id, value)):
                model, original = (0, param_id) if models == 1 else split_namespaced_id(param_id, models)
                params[model][original] = value
    seconds = time.monotonic() - started
    return {
        label: evaluate(label, factories[label](), outputs[m], params[m], data, seconds)
        for m, label in enumerate(labels)
    }


def train_in_process(label: str, factory: Callable[[], SparseLinearLearner], data: Dataset) -> Run:
    """The same logic in this process, sequentially (InProcessPS): no asynchrony at all."""
    logic = factory()
    started = time.monotonic()
    outputs, model = InProcessPS(param_init_for(data.classes)).run(logic, data.train)
    return evaluate(label, logic, outputs, model, data, time.monotonic() - started)


def sklearn_pa(variant: str, C: float, epochs: int, average: bool = False) -> Any:
    """scikit-learn's equivalent: SGDClassifier with the PA learning rates (1.8+), no shuffling.

    PassiveAggressiveClassifier is deprecated since scikit-learn 1.8 and points
    here. Plain PA is pa1 with an unbounded step (eta0 must be finite: 1e300).
    """
    from sklearn.linear_model import SGDClassifier

    variant = canonical_variant(variant)
    rate, eta0 = {"PA": ("pa1", 1e300), "PA-I": ("pa1", C), "PA-II": ("pa2", C)}[variant]
    return SGDClassifier(
        loss="hinge",
        penalty=None,
        learning_rate=rate,
        eta0=eta0,
        max_iter=epochs,
        tol=None,
        shuffle=False,
        average=average,
    )


def sklearn_accuracy(estimator: Any, data: Dataset) -> float:
    """Fit on the training split in order and score on the test split."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(data.X_train, data.y_train)
    return float(estimator.score(data.X_test, data.y_test))


# -- the learning curve --------------------------------------------------------------


def moving_accuracy(correct: np.ndarray, window: int) -> np.ndarray:
    """Accuracy over the last `window` predictions (fewer at the start)."""
    sums = np.cumsum(correct, dtype=np.float64)
    counts = np.minimum(np.arange(1, len(correct) + 1), window)
    shifted = np.concatenate([np.zeros(window), sums])[: len(correct)]
    return (sums - shifted) / counts


def plot_learning_curves(
    path: str, title: str, panels: dict[str, list[tuple[Run, Run, float]]], train_sizes: dict[str, int]
) -> None:
    """One panel per data set: each model's accuracy over a moving window of its predictions,
    all passes in a row, on the cluster (solid) and in one process with no asynchrony (dotted:
    scikit-learn's own updates), with the test accuracies in the legend. matplotlib is imported
    here only: it is the optional `plot` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib, the `plot` extra: pip install -e '.[plot]'") from None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, runs) in zip(axes[0], panels.items(), strict=True):
        window = max(25, train_sizes[name] // 10)
        lowest = 1.0
        for index, (ours, sequential, reference) in enumerate(runs):
            color = colors[index % len(colors)]
            curve, baseline = moving_accuracy(ours.correct(), window), moving_accuracy(sequential.correct(), window)
            ax.plot(curve, color=color, label=f"{ours.label}: test {ours.test_accuracy:.3f} (sklearn {reference:.3f})")
            ax.plot(baseline, color=color, linestyle=":", linewidth=1.2)
            lowest = min(lowest, float(curve[window:].min(initial=1.0)), float(baseline[window:].min(initial=1.0)))
        for boundary in range(train_sizes[name], len(runs[0][0].outputs), train_sizes[name]):
            ax.axvline(boundary, color="0.75", linewidth=0.8)
        ax.plot([], [], color="0.4", linestyle=":", label="dotted: one process (= scikit-learn's updates)")
        ax.set_ylim(max(0.0, math.floor((lowest - 0.05) * 20) / 20), 1.005)
        ax.set_title(f"{name} ({train_sizes[name]} training records)")
        ax.set_xlabel("predictions in arrival order, all passes (grey lines: pass ends)")
        ax.set_ylabel(f"accuracy of the last {window} predictions")
        ax.legend(loc="lower right", fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}\nprequential accuracy over the stream: on the cluster (solid), in one process (dotted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the script -------------------------------------------------------------------------


def report_header(title: str) -> None:
    print(title)
    print(
        f"{'data set':<14}{'model':<7}{'final: ours':>12}{'sklearn':>9}{'diff':>8}"
        f"{'averaged: ours':>16}{'sklearn':>9}{'diff':>8}{'1st pass':>10}"
    )


def report_row(name: str, run: Run, reference: float, reference_averaged: float) -> None:
    print(
        f"{name:<14}{run.label:<7}{run.test_accuracy:>12.3f}{reference:>9.3f}{run.test_accuracy - reference:>+8.3f}"
        f"{run.averaged_accuracy:>16.3f}{reference_averaged:>9.3f}{run.averaged_accuracy - reference_averaged:>+8.3f}"
        f"{run.prequential_accuracy():>10.3f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Passive-aggressive classification on streamps, next to scikit-learn's SGDClassifier."
    )
    parser.add_argument("--dataset", choices=[*DATASETS, "all"], default="all")
    parser.add_argument("--variant", choices=[*VARIANTS, "all"], default="all")
    parser.add_argument("--C", type=float, default=EXAMPLE_C, help="aggressiveness of PA-I and PA-II")
    parser.add_argument("--epochs", type=int, default=EXAMPLE_EPOCHS, help="passes over the training data")
    parser.add_argument("--multiclass", choices=["ovr", "crammer"], default="ovr")
    parser.add_argument("--window", type=int, default=1, help="records in flight per worker")
    parser.add_argument(
        "--max-lead",
        type=int,
        default=EXAMPLE_MAX_LEAD,
        help="records a worker may be ahead of the slowest one (-1: unbounded)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--plot", metavar="PATH", help="write a learning-curve PNG (needs matplotlib)")
    args = parser.parse_args(argv)

    datasets = DATASETS if args.dataset == "all" else (args.dataset,)
    variants = VARIANTS if args.variant == "all" else (args.variant,)
    report_header(
        f"passive-aggressive, {args.epochs} passes, C={args.C}, multiclass {args.multiclass}, "
        f"{args.workers} workers x {args.shards} shards, the variants side by side in one job per data set.\n"
        f"Test accuracy next to SGDClassifier(loss='hinge', penalty=None, learning_rate='pa1' (PA: eta0=1e300, "
        f"PA-I: eta0=C) or 'pa2' (PA-II), shuffle=False, tol=None, max_iter=passes[, average=True]) on the same "
        f"split; 1st pass: prequential accuracy."
    )
    panels: dict[str, list[tuple[Run, Run, float]]] = {}
    sizes: dict[str, int] = {}
    for name in datasets:
        data = load_dataset(name)
        sizes[name] = len(data.train)
        factories: dict[str, Callable[[], SparseLinearLearner]] = {
            variant: functools.partial(
                PassiveAggressive,
                variant,
                args.C,
                data.classes,
                epochs=args.epochs,
                multiclass=args.multiclass,
                window=args.window,
                max_lead=None if args.max_lead < 0 else args.max_lead,
                average=True,
            )
            for variant in variants
        }
        runs = train_distributed(factories, data, args.workers, args.shards)
        for variant, run in runs.items():
            reference = sklearn_accuracy(sklearn_pa(variant, args.C, args.epochs), data)
            reference_averaged = sklearn_accuracy(sklearn_pa(variant, args.C, args.epochs, average=True), data)
            report_row(name, run, reference, reference_averaged)
            if args.plot:
                sequential = train_in_process(variant, factories[variant], data)
                panels.setdefault(name, []).append((run, sequential, reference))
        print(f"{'':<14}({next(iter(runs.values())).seconds:.1f} s for the job)", flush=True)
    if args.multiclass == "crammer":
        print("note: for digits, sklearn is one-vs-rest and ours Crammer's multiclass rule")
    if args.plot:
        plot_learning_curves(args.plot, f"passive-aggressive, C={args.C}", panels, sizes)
        print(f"learning curves written to {args.plot}")


if __name__ == "__main__":
    main()
