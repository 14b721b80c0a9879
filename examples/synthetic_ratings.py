"""A deterministic synthetic rating stream: low rank plus noise, like a small MovieLens.

Hidden user and item factors of rank `true_rank` give each (user, item) pair a
score; a rating is `mean + score + noise`, rounded to a whole star and clipped to
1..5. Users are drawn uniformly and items by a Zipf-like popularity (a few items
get many ratings, most get few), so the stream has the skew of real ratings.

The stream depends only on its arguments: the same seed gives the same ratings,
in the same order, in every process and on every machine, and the first N
ratings of a longer stream are the N ratings of a shorter one.

    python examples/synthetic_ratings.py --ratings 10000 > ratings.csv   # user,item,rating
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import numpy as np

USERS = 943
ITEMS = 1682
TRUE_RANK = 8
MEAN = 3.6
NOISE_STD = 0.4
POPULARITY_SKEW = 0.8
_CHUNK = 8192  # ratings drawn per numpy call; fixed, so prefixes stay stable

Rating = tuple[int, int, int]


def synthetic_ratings(
    n: int,
    *,
    users: int = USERS,
    items: int = ITEMS,
    true_rank: int = TRUE_RANK,
    noise_std: float = NOISE_STD,
    seed: int = 0,
) -> Iterator[Rating]:
    """Yield `n` ratings `(user, item, stars)` as plain Python ints."""
    rng = np.random.default_rng(seed)
    # Factor scale chosen so that the score has unit variance before noise.
    scale = true_rank**-0.25
    user_factors = rng.normal(0.0, scale, (users, true_rank))
    item_factors = rng.normal(0.0, scale, (items, true_rank))
    popularity = 1.0 / np.arange(1, items + 1) ** POPULARITY_SKEW
    popularity /= popularity.sum()
    item_of_rank = rng.permutation(items)  # the popular items are not simply the low ids
    produced = 0
    while produced < n:
        user = rng.integers(0, users, _CHUNK)
        item = item_of_rank[rng.choice(items, _CHUNK, p=popularity)]
        score = np.einsum("nk,nk->n", user_factors[user], item_factors[item])
        stars = np.clip(np.rint(MEAN + score + rng.normal(0.0, noise_std, _CHUNK)), 1, 5).astype(np.int64)
        take = min(_CHUNK, n - produced)
        yield from zip(user[:take].tolist(), item[:take].tolist(), stars[:take].tolist(), strict=True)
        produced += take


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic rating stream as csv: user,item,rating.")
    parser.add_argument("--ratings", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--header", action="store_true", help="write a user,item,rating header line first")
    args = parser.parse_args(argv)
    out = sys.stdout
    if args.header:
        out.write("user,item,rating\n")
    for user, item, stars in synthetic_ratings(args.ratings, seed=args.seed):
        out.write(f"{user},{item},{stars}\n")


if __name__ == "__main__":
    main()
