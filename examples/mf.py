"""What the matrix-factorization examples share: the SGD step, the rows it works on, parking.

The step (Funk's SVD, as Surprise implements it), on a rating with error `err`:

    user_vector, item_vector += lr * (err * item_vector - reg * user_vector),
                                lr * (err * user_vector - reg * item_vector)   (both from the old values)

`sgd_step` is that step on plain vectors (examples/online_mf.py). A biased model
(`mean + user_bias + item_bias + user_vector . item_vector`) holds a user as the
working row [vector, bias, 1] and an item as [vector, 1, bias] (float64), so that
one dot product gives `vector . vector + user_bias + item_bias` and the same step
updates vectors and biases together (`biased_step` puts the two constant 1s
back). On the shards an item of such a model is [vector, bias] (`item_rows`,
`item_values` convert). examples/online_biased_mf.py, offline_mf.py and
benchmarks/mf_common.py use these.

Records are `(user, item, stars, ...)`, partitioned by user: a user's row lives
in exactly one worker and never travels; items live on the shards.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from examples.settings import env
from psclient import transform
from psworker import ParameterServerClient, WorkerLogic, with_pull_limit

Client = ParameterServerClient[np.ndarray, Any]

MIN_STARS, MAX_STARS = 1.0, 5.0
PRIOR_MEAN = 3.0  # the mean a worker assumes before it has seen a rating


@dataclass
class Hyper:
    """A factor model's hyperparameters; the defaults are the biased model's, tuned on the seeded
    80/20 split of MovieLens 100K (test RMSE about 0.91 after 10 epochs): a larger step than
    Surprise's default (0.005) needs a larger L2 (0.02 there) to stay stable, and converges in
    half the epochs."""

    rank: int = 50
    lr: float = 0.03
    reg: float = 0.1
    init_std: float = 0.1
    seed: int = 1
    epochs: int = 10


def transform_by_user(
    records: Iterable[Any],
    logic: WorkerLogic,
    init: str,
    workers: int,
    shards: int,
    pull_limit: int | None = None,
    consistency: str = "async",
) -> Iterator[Any]:
    """`transform` for a factor model: records partitioned by user, `add` updates, an optional pull limit."""
    return iter(
        transform(
            records,
            with_pull_limit(logic, pull_limit) if pull_limit else logic,
            init,
            "add",
            workers,
            shards,
            partition_by=operator.itemgetter(0),
            consistency=consistency,
        )
    )


def rmse(squared_sum: float, count: int) -> float:
    return math.sqrt(squared_sum / count) if count else float("nan")


def sgd_step(user: np.ndarray, item: np.ndarray, err: float, lr: float, reg: float) -> None:
    """One SGD step with L2 on a rating's user and item vectors, in place, both from the old values."""
    scale, decay = lr * err, 1.0 - lr * reg
    user_step = scale * item
    item *= decay
    item += scale * user
    user *= decay
    user += user_step


def biased_step(user: np.ndarray, item: np.ndarray, err: float, lr: float, reg: float) -> None:
    """`sgd_step` on working rows [vector, bias, 1] and [vector, 1, bias]: vectors and biases together."""
    sgd_step(user, item, err, lr, reg)
    user[-1] = 1.0
    item[-2] = 1.0


def user_row(rank: int, init_std: float, seed: int, user: int) -> np.ndarray:
    """A new user's [vector, bias, 1]: the vector from (seed, user) alone, the bias 0."""
    row = np.empty(rank + 2)
    row[:rank] = np.random.default_rng([seed, int(user) & 0xFFFF_FFFF]).normal(0.0, init_std, rank)
    row[rank:] = (0.0, 1.0)
    return row


def item_rows(values: np.ndarray) -> np.ndarray:
    """Item parameters [vector, bias] (one, or one per row) as working rows [vector, 1, bias]."""
    values = np.asarray(values)
    rank = values.shape[-1] - 1
    rows = np.ones((*values.shape[:-1], rank + 2))
    rows[..., :rank] = values[..., :rank]
    rows[..., rank + 1] = values[..., rank]
    return rows


def item_values(rows: np.ndarray) -> np.ndarray:
    """The inverse of `item_rows`: [vector, bias]."""
    return np.delete(rows, -2, axis=-1)


def predict(users: np.ndarray, item: np.ndarray, mean: float) -> np.ndarray:
    """Ratings of one item by rows of users, unclipped."""
    return mean + users @ item


def clip_stars(value: float) -> float:
    return min(max(value, MIN_STARS), MAX_STARS)


def biased_init_spec(rank: int, init_std: float, seed: int) -> str:
    """The shards' init for the items of a biased model of this rank: [vector, bias]."""
    return f"normal:{rank + 1},std={init_std},seed={seed}"


class ParkByItem(WorkerLogic[Any, np.ndarray, Any]):
    """Pulls a rating's item and parks the rating until the answer comes (`on_pull_recv`).

    Ratings for an item whose pull is already on its way join that wait: they
    are learned together, against one copy of the item, whose change is pushed
    once. `self.waiting` maps item -> [(user, stars)] parked on its pull.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.waiting: dict[Any, list[tuple[Any, float]]] = {}

    def on_recv(self, data: Any, ps: Client) -> None:
        user, item, stars = data[0], data[1], float(data[2])
        parked = self.waiting.get(item)
        if parked is None:
            self.waiting[item] = [(user, stars)]
            ps.pull(item)
        else:
            parked.append((user, stars))


class FactorModel(WorkerLogic[Any, np.ndarray, Any]):
    """Hyperparameters and the worker's local users of a factor model.

    Arguments left as None come from STREAMPS_MF_<NAME> environment variables,
    or else from the class's DEFAULTS.
    """

    DEFAULTS = Hyper()

    def __init__(
        self,
        rank: int | None = None,
        lr: float | None = None,
        reg: float | None = None,
        init_std: float | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        defaults = self.DEFAULTS
        self.rank = rank if rank is not None else env("MF", "RANK", int, defaults.rank)
        self.lr = lr if lr is not None else env("MF", "LR", float, defaults.lr)
        self.reg = reg if reg is not None else env("MF", "REG", float, defaults.reg)
        self.init_std = init_std if init_std is not None else env("MF", "INIT_STD", float, defaults.init_std)
        self.seed = seed if seed is not None else env("MF", "SEED", int, defaults.seed)
        self.users: dict[Any, np.ndarray] = {}


class BiasedMF(FactorModel):
    """The biased model's local users and mean, and training one item's ratings.

    `mean` is fixed when given (or STREAMPS_MF_MEAN is set), else the running
    mean of the labels the worker has trained on.
    """

    def __init__(self, *args: Any, mean: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fixed_mean = mean if mean is not None else env("MF", "MEAN", float, None)
        self.label_sum = 0.0
        self.label_count = 0

    @property
    def mean(self) -> float:
        if self.fixed_mean is not None:
            return self.fixed_mean
        return self.label_sum / self.label_count if self.label_count else PRIOR_MEAN

    def user(self, user: Any) -> np.ndarray:
        row = self.users.get(user)
        if row is None:
            row = self.users[user] = user_row(self.rank, self.init_std, self.seed, user)
        return row

    def item(self, param_id: Any, value: np.ndarray) -> np.ndarray:
        if np.shape(value) != (self.rank + 1,):
            raise ValueError(
                f"item {param_id} has shape {np.shape(value)}, expected ({self.rank + 1},): start the shards "
                f"with --init {biased_init_spec(self.rank, self.init_std, self.seed)}"
            )
        return item_rows(value)

    def train(self, item: np.ndarray, ratings: Iterable[tuple[Any, float]]) -> float:
        """SGD over (user, label) ratings of one item; returns the sum of squared errors."""
        squared = 0.0
        lr, reg = self.lr, self.reg
        for user, label in ratings:
            row = self.user(user)
            err = label - self.mean - float(row @ item)
            biased_step(row, item, err, lr, reg)
            squared += err * err
        return squared
