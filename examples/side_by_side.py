"""Several logics on the same stream in one job, each with its own parameters (SideBySide).

The way to compare models (PA, PA-I, PA-II) on equal terms, and cheaply: each
record costs one round trip for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from examples.linear_model import Id
from psworker import WorkerLogic


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
