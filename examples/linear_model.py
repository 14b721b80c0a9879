"""Sparse linear models: records, parameter ids, and the averaged model.

A record is `(features, label)`; `features` is a dict `{feature_id: value}` or
a pair `(indices, values)` (lists or numpy arrays), feature ids ints or strs.
Each feature is one parameter on the shards: a float for a binary model, a
vector with one entry per label for a multiclass one (`param_init_for`).

Besides the weights, a SparseLinearLearner may keep two kinds of parameters of
its own, told apart by their str ids: `__avg__:<id>`, the accumulator of the
averaged model (`average=True`), and `__clock__:<worker>`, a worker's count of
records learned (`max_lead`). `split_model` separates them from the weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

Id = int | str
Record = tuple[Any, Any]  # (features, label)
Prediction = tuple[int, Any, Any]  # (epoch, label, predicted label)

INTERCEPT_ID = "__intercept__"
AVERAGE_PREFIX = "__avg__:"
CLOCK_PREFIX = "__clock__:"
DONE = 2.0**40  # added to a worker's clock when it has no record left
DEFAULT_CLASSES = (0, 1)


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


class VectorZeros:
    """A float64 zero vector of `dim` entries for every id: the multiclass init."""

    def __init__(self, dim: int):
        self.dim = dim

    def __call__(self, param_id: Id) -> np.ndarray:
        return np.zeros(self.dim, dtype=np.float64)


def param_init_for(classes: Sequence[Any]) -> Any:
    """The shards' init for a model over these classes: a float, or one entry per label."""
    return "const:0.0" if len(classes) <= 2 else VectorZeros(len(classes))


def clock_id(worker: int) -> str:
    """Worker `worker`'s clock: how many records it has learned from (+ DONE once it has finished)."""
    return f"{CLOCK_PREFIX}{worker}"


def clock_count(value: Any) -> tuple[float, bool]:
    """(records learned, finished) from a clock's value (a float, or a vector of equal entries)."""
    count = float(np.asarray(value).flat[0])
    return (count - DONE, True) if count >= DONE else (count, False)


def average_id(param_id: Id) -> str:
    """The push-only accumulator of `param_id` for the averaged model (see `averaged_model`)."""
    return f"{AVERAGE_PREFIX}{param_id}"


def is_own(param_id: Id) -> bool:
    """True for the learner's own parameters (accumulators and clocks), False for the model's weights."""
    return isinstance(param_id, str) and param_id.startswith((AVERAGE_PREFIX, CLOCK_PREFIX))


def split_model(params: dict[Id, Any]) -> tuple[dict[Id, Any], dict[Id, Any]]:
    """(weights, the learner's own parameters) of a job's final parameters (e.g. its Right stream,
    or the file `psclient run --model` wrote)."""
    weights = {param_id: value for param_id, value in params.items() if not is_own(param_id)}
    return weights, {param_id: value for param_id, value in params.items() if is_own(param_id)}


def averaged_model(params: dict[Id, Any], steps: int | None = None) -> dict[Id, Any]:
    """The average of the weights after each of `steps` updates, from the final weights and accumulators.

    `params`: a job's final parameters, weights and accumulators (and clocks: ignored). `steps`:
    the updates made, the records times the passes; None takes it from the clocks, which count
    the records every worker learned from (a job with `max_lead`).

    With w_t the weights after step t = w_T - (sum of the deltas of steps after t),
    sum over t of w_t = (T + 1) w_T - sum over steps s of s * delta_s, and each
    learner pushes s * delta_s to `average_id(id)` next to delta_s: no pull, no
    extra round trip. This is scikit-learn's `average=True` (ASGD) model. On a
    cluster s is the worker's estimate of the record's place in the stream.
    """
    weights, own = split_model(params)
    if steps is None:
        clocks = [value for param_id, value in own.items() if str(param_id).startswith(CLOCK_PREFIX)]
        if not clocks:
            raise ValueError("averaged_model: no clocks among the parameters; give steps (records x passes)")
        steps = round(sum(clock_count(value)[0] for value in clocks))
    averaged: dict[Id, Any] = {}
    for param_id, value in weights.items():
        weighted = own.get(average_id(param_id), 0.0)
        mean = ((steps + 1) * np.asarray(value, dtype=np.float64) - weighted) / steps
        averaged[param_id] = float(mean) if mean.ndim == 0 else mean
    return averaged
