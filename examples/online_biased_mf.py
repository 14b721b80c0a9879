"""Online biased matrix factorization: one pass over a rating stream, prequential.

The biased model of examples/mf.py (`mean + user_bias + item_bias + user_vector
. item_vector`, items on the shards as [vector, bias], users in their worker)
learnt in one pass: for every rating `(user, item, stars)` the worker outputs
`(prediction, stars)` before it learns from it (prequential evaluation). Ratings
for an item whose pull is on its way wait for it and are learned together,
against one copy of the item; its change is pushed once. `mean` is the running
mean of the ratings the worker has learned from, unless given.

    python examples/movielens_mf.py --mode online [--split time] [--plot curve.png]

As a worker plugin: `--logic examples.online_biased_mf:OnlineBiasedMF`, shards
started with `--init normal:RANK+1,...` (`biased_init_spec`), records
partitioned by user; hyperparameters from STREAMPS_MF_RANK, _LR, _REG,
_INIT_STD, _SEED, _MEAN.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from examples.mf import (
    BiasedMF,
    Client,
    Hyper,
    ParkByItem,
    biased_init_spec,
    biased_step,
    clip_stars,
    item_values,
    transform_by_user,
)
from examples.references import running_means
from psclient import Left


class OnlineBiasedMF(ParkByItem, BiasedMF):
    """One pass, prequential: outputs (prediction, stars) for each rating before learning from it."""

    def on_pull_recv(self, param_id: Any, param_value: np.ndarray, ps: Client) -> None:
        item = self.item(param_id, param_value)
        before = item.copy()
        lr, reg = self.lr, self.reg
        for user, stars in self.waiting.pop(param_id):
            row = self.user(user)
            mean, dot = self.mean, float(row @ item)
            ps.output((clip_stars(mean + dot), stars))
            biased_step(row, item, stars - mean - dot, lr, reg)
            self.label_sum += stars
            self.label_count += 1
        ps.push(param_id, (item_values(item) - item_values(before)).astype(np.float32))


@dataclass
class OnlineResult:
    predicted: np.ndarray
    actual: np.ndarray
    seconds: float

    @property
    def rmse(self) -> float:
        return math.sqrt(float(np.mean((self.predicted - self.actual) ** 2)))

    @property
    def baseline_rmse(self) -> float:
        """Predicting the mean of all the stream's ratings (a baseline that has seen the future)."""
        return float(np.std(self.actual))

    @property
    def running_mean_rmse(self) -> float:
        """Predicting each rating by the mean of those output before it: the prequential baseline."""
        return math.sqrt(float(np.mean((running_means(self.actual) - self.actual) ** 2)))


def run_online(
    ratings: Sequence[Any], hyper: Hyper, *, workers: int = 2, shards: int = 2, pull_limit: int | None = None
) -> OnlineResult:
    """One prequential pass of OnlineBiasedMF over `ratings` with `transform`."""
    logic = OnlineBiasedMF(hyper.rank, hyper.lr, hyper.reg, hyper.init_std, hyper.seed)
    predicted, actual = [], []
    started = time.monotonic()
    init = biased_init_spec(hyper.rank, hyper.init_std, hyper.seed)
    stream = transform_by_user(ratings, logic, init, workers, shards, pull_limit)
    for out in stream:
        if isinstance(out, Left):
            predicted.append(out.value[0])
            actual.append(out.value[1])
    return OnlineResult(np.array(predicted), np.array(actual), time.monotonic() - started)
