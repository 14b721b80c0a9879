"""The in-process limit: one Python process, item rows in one numpy table, no network, no staleness."""

from __future__ import annotations

import time

from benchmarks.mf_common import Learner, Ratings, item_init, rmse
from examples.mf import item_rows


def run(data: Ratings) -> tuple[float, float]:
    """(ratings per second, prequential RMSE)."""
    users, items, stars = data.users.tolist(), data.items.tolist(), data.stars.tolist()
    start = time.perf_counter()
    table = item_rows(item_init(range(max(items) + 1)))
    step = Learner().step
    errors = [step(user, rating, table[item]) for user, item, rating in zip(users, items, stars, strict=True)]
    elapsed = time.perf_counter() - start
    return len(errors) / elapsed, rmse(errors)
