"""The one matrix-factorization workload every row (c) implementation runs.

The same synthetic stream (examples.synthetic_ratings), the same initial item
vectors (the shards' `normal:RANK,std,seed` init), the same user vectors, and
the same per-rating SGD step as examples.online_mf.OnlineMF: predict with the
running mean plus the dot product, output the prediction, then step both
vectors with L2 regularization. Peers differ only in where item vectors live.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from examples.online_mf import MAX_STARS, MIN_STARS, PRIOR_MEAN, OnlineMF, item_init_spec
from examples.synthetic_ratings import synthetic_ratings

RATINGS = 100_000
RANK = 16
LR = 0.05
REG = 0.02
INIT_STD = 0.1
SEED = 1
INIT_SPEC = item_init_spec(RANK, INIT_STD, SEED)
# Ratings a peer worker handles between one batched pull and one batched push.
PEER_BATCH = 256

Rating = tuple[int, int, float]


def ratings(count: int = RATINGS) -> list[Rating]:
    return list(synthetic_ratings(count, seed=SEED))


def item_init() -> Callable[[Sequence[int]], np.ndarray]:
    """The shards' init function, so every peer starts from the same item vectors."""
    from psclient.specs import make_init

    return make_init(INIT_SPEC).batch  # type: ignore[return-value]


def new_logic() -> OnlineMF:
    return OnlineMF(rank=RANK, lr=LR, reg=REG, init_std=INIT_STD, seed=SEED)


class Learner:
    """User vectors and the running mean of one worker, and the per-rating step."""

    def __init__(self) -> None:
        self.logic = new_logic()  # reuse its user-vector init: same vectors as OnlineMF

    def step(self, user: Any, stars: float, item_vector: np.ndarray) -> float:
        """Predict, then learn in place (item_vector and the user's vector); return the prediction."""
        logic = self.logic
        user_vector = logic.user_vector(user)
        mean = logic.total / logic.seen if logic.seen else PRIOR_MEAN
        raw = mean + float(user_vector @ item_vector)
        error = stars - raw
        user_step = LR * (error * item_vector - REG * user_vector)
        item_vector += LR * (error * user_vector - REG * item_vector)
        user_vector += user_step
        logic.seen += 1
        logic.total += stars
        return min(max(raw, MIN_STARS), MAX_STARS)

    def run_batch(self, batch: Iterable[Rating], items: dict[int, np.ndarray]) -> list[tuple[float, float]]:
        """Process ratings against local copies `items` (updated in place)."""
        return [(self.step(user, stars, items[item]), stars) for user, item, stars in batch]


def tail_rmse(predictions: Sequence[tuple[float, float]], fraction: float = 0.1) -> float:
    tail = predictions[-max(1, int(len(predictions) * fraction)) :]
    return math.sqrt(sum((p - r) ** 2 for p, r in tail) / len(tail))


def partition_by_user(data: Sequence[Rating], workers: int) -> list[list[Rating]]:
    from psclient.partition import key_bucket

    parts: list[list[Rating]] = [[] for _ in range(workers)]
    for rating in data:
        parts[key_bucket(rating[0], workers)].append(rating)
    return parts
