"""The one matrix-factorization job every implementation in bench_mf runs.

Online biased matrix factorization over MovieLens 100K in timestamp order: for
each rating, predict `mean + user_bias + item_bias + user_vector . item_vector`
(clipped to 1..5), record the error (prequential: the prediction is made
before the rating is learned), then take one SGD step with L2 regularization
on both sides. `mean` is the running mean of the ratings the process has
learned from. Item parameters live wherever the implementation keeps them, as
RANK+1 float32 ([vector, bias], init `normal:RANK+1`); users stay in the
process that owns them (records partitioned by user), so they never travel.

Implementations differ only in where item parameters live and how stale a copy
a rating may be trained on: a window of W ratings (peers) or W unanswered
pulls (streamps' pull limit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from examples.datasets import movielens_100k
from examples.mf import (
    MAX_STARS,
    MIN_STARS,
    PRIOR_MEAN,
    Hyper,
    ParkByItem,
    biased_init_spec,
    biased_step,
    item_values,
    user_row,
)
from psworker import ParameterServerClient, WorkerLogic, with_pull_limit

Client = ParameterServerClient[np.ndarray, float]

HYPER = Hyper(rank=16, lr=0.02, reg=0.02, init_std=0.1, seed=1)
# The item parameter: the vector, then the bias.
PARAM_DIM = HYPER.rank + 1
INIT_SPEC = biased_init_spec(HYPER.rank, HYPER.init_std, HYPER.seed)
# The staleness bounds every implementation is run at: ratings per peer window,
# and streamps' pull limit.
WINDOWS = (64, 256, 1_024)
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


class Ratings:
    """The stream as three parallel sequences (users, items, stars), in timestamp order."""

    def __init__(self, users: np.ndarray, items: np.ndarray, stars: np.ndarray):
        self.users, self.items, self.stars = users, items, stars

    def __len__(self) -> int:
        return len(self.users)

    def records(self) -> list[tuple[int, int, float]]:
        return list(zip(self.users.tolist(), self.items.tolist(), self.stars.tolist(), strict=True))

    def head(self, count: int) -> Ratings:
        return Ratings(self.users[:count], self.items[:count], self.stars[:count])

    def partition(self, workers: int) -> list[Ratings]:
        """Each worker's share, by user, by the rule streamps' `partition_by` applies to int keys."""
        owner = np.mod(self.users, workers)
        return [Ratings(self.users[owner == w], self.items[owner == w], self.stars[owner == w]) for w in range(workers)]


def movielens_by_time(data_dir: Path = DATA_DIR) -> Ratings:
    """MovieLens 100K sorted by timestamp (ties in file order)."""
    rated = movielens_100k(data_dir)
    order = np.argsort(np.array([stamp for *_, stamp in rated]), kind="stable")
    columns = np.array([rating[:3] for rating in rated], dtype=np.float64)[order]
    return Ratings(columns[:, 0].astype(np.int64), columns[:, 1].astype(np.int64), columns[:, 2])


def item_init(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """The shards' init for these items: every implementation starts from the same values."""
    from psclient.specs import make_init

    return np.asarray(make_init(INIT_SPEC).batch(np.asarray(ids, dtype=np.int64)), dtype=np.float32)


def item_deltas(rows: np.ndarray, before: np.ndarray) -> np.ndarray:
    """What to push for working rows (examples.mf.item_rows) that started as `before`: float32 deltas."""
    return (item_values(rows) - item_values(before)).astype(np.float32)


# A working item row is [vector, 1, bias] (examples.mf.item_rows); these columns hold the parameter.
_PARAM_COLUMNS = np.r_[0 : HYPER.rank, HYPER.rank + 1]


def item_row(value: np.ndarray) -> np.ndarray:
    """One item parameter as a working row: `item_rows` of one, with plain slices."""
    rank = HYPER.rank
    row = np.empty(rank + 2)
    row[:rank] = value[:rank]
    row[rank] = 1.0
    row[rank + 1] = value[rank]
    return row


def item_delta(row: np.ndarray, value: np.ndarray) -> np.ndarray:
    """`item_deltas` of one working row that started as parameter `value` (the same float32 bits)."""
    return (row[_PARAM_COLUMNS] - value).astype(np.float32)


class Learner:
    """One process's users and running mean, and the per-rating step every implementation runs."""

    def __init__(self) -> None:
        self.users: dict[int, np.ndarray] = {}
        self.seen = 0
        self.total = 0.0

    def user(self, user: int) -> np.ndarray:
        row = self.users.get(user)
        if row is None:
            row = self.users[user] = user_row(HYPER.rank, HYPER.init_std, HYPER.seed, user)
        return row

    def step(self, user: int, stars: float, item: np.ndarray) -> float:
        """Predict, then learn from the rating in place (`item` is a working row); the prediction's error."""
        row = self.user(user)
        mean = self.total / self.seen if self.seen else PRIOR_MEAN
        raw = mean + float(row @ item)
        biased_step(row, item, stars - raw, HYPER.lr, HYPER.reg)
        self.seen += 1
        self.total += stars
        return min(max(raw, MIN_STARS), MAX_STARS) - stars


class StreamMF(ParkByItem):
    """The job written the natural way for streamps.

    on_recv parks the rating and pulls its item (a rating for an item already
    on its way joins that wait: examples.mf.ParkByItem); on_pull_recv trains the
    parked ratings against the worker's copy of the item, outputs each error and
    pushes the item's delta.
    """

    def __init__(self) -> None:
        super().__init__()
        self.learner = Learner()

    def on_pull_recv(self, param_id: Any, param_value: np.ndarray, ps: Client) -> None:
        row, step = item_row(param_value), self.learner.step
        for user, stars in self.waiting.pop(param_id):
            ps.output(step(user, stars, row))
        ps.push(param_id, item_delta(row, param_value))


def stream_mf(pull_limit: int) -> WorkerLogic:
    return with_pull_limit(StreamMF(), pull_limit)


def rmse(errors: Sequence[float] | np.ndarray) -> float:
    errors = np.asarray(errors, dtype=np.float64)
    return math.sqrt(float(np.mean(errors * errors)))
