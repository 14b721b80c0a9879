"""The in-process limit: one Python process, item vectors in one numpy table, no network."""

from __future__ import annotations

import time

import numpy as np

from benchmarks.mf_common import Learner, Rating, item_init, tail_rmse
from examples.synthetic_ratings import ITEMS


def run(data: list[Rating]) -> tuple[float, float]:
    """(ratings per second, RMSE of the last 10%)."""
    start = time.perf_counter()
    table = np.asarray(item_init()(list(range(ITEMS))), dtype=np.float32)
    learner = Learner()
    predictions = [(learner.step(user, stars, table[item]), stars) for user, item, stars in data]
    elapsed = time.perf_counter() - start
    return len(data) / elapsed, tail_rmse(predictions)
