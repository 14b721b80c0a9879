"""The sample inputs of the conformance jobs (tests/test_conformance.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

TEXT = [
    "The parameter server keeps the model; the workers keep the data.",
    "A worker reads its records, pulls the parameters it needs, and pushes back what it learned.",
    "",
    "The server adds the pushes up, so every worker sees the work of every other worker.",
    "When the input ends, the workers finish, and the model is what the servers hold.",
]


def ratings(n: int = 120, *, held_out_every: int = 0) -> list[tuple[Any, ...]]:
    """n synthetic ratings over 12 users x 20 items; every `held_out_every`-th one marked held out."""
    from examples.synthetic_ratings import synthetic_ratings

    out = list(synthetic_ratings(n, users=12, items=20, seed=5))
    if held_out_every:
        return [(*r, (i % held_out_every) == held_out_every - 1) for i, r in enumerate(out)]
    return out


def sparse_records(n: int = 60, classes: int = 2, features: int = 12) -> list[tuple[dict[str, float], int]]:
    """n records ({feature: value}, label) with a few nonzero features each, seeded."""
    rng = np.random.default_rng(11)
    records = []
    for _ in range(n):
        label = int(rng.integers(classes))
        present = rng.choice(features, size=4, replace=False)
        x = {f"f{j}": float(np.round(rng.normal(label - (classes - 1) / 2, 1.0), 3)) for j in sorted(present)}
        records.append((x, label))
    return records
