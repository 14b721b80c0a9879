"""Top-K recommendation from a trained matrix factorization model, spread over the workers.

The model is the one examples/movielens_mf.py trains: one parameter per item,
`[item vector, item bias]`, and a vector per user. The score of an item for a
user is `user_vector . item_vector + item_bias`: the predicted rating without the
terms that are the same for every item (global mean, user bias), so the same
ranking.

The job:

- the shards hold the item parameters: a fresh cluster whose `param_init`
  looks each item up in the trained model (so a pull returns the trained value);
- the input records are the item ids, spread over the workers (round robin):
  each worker pulls the items of its share and scores each one for every query
  user at once (one matrix-vector product), keeping a bounded heap of its best K
  per user;
- when its input has ended and every pull is answered, a worker outputs its
  local top K per user, `(query, [(item, score), ...])`;
- the client merges the local lists into the global top K.

Order: higher score first, and for equal scores the smaller item id. Items the
user has rated can be left out (`exclude`).

    python examples/topk.py [--users 1,2,3] [--k 10] [--epochs 5]

trains the model on MovieLens 100K (2 workers x 2 shards), runs the top-K job
on it and checks the result against a brute-force top K (numpy, all items).
"""

from __future__ import annotations

import argparse
import functools
import heapq
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from psclient import Left, transform
from psworker import ParameterServerClient, WorkerLogic

Ranked = list[tuple[Any, float]]  # (item, score), best first
Client = ParameterServerClient[np.ndarray, tuple[int, Ranked]]


def ranking_key(item: Any, score: float) -> tuple[float, Any]:
    """Sorts best first: higher score, then smaller item id."""
    return (-score, item)


class TopK(WorkerLogic[Any, np.ndarray, tuple[int, Ranked]]):
    """Local top K of this worker's items for each query vector.

    `queries` is a (users, rank) array of user vectors; `exclude[q]` holds the
    items not to recommend to query q (e.g. the ones the user rated).
    """

    def __init__(self, queries: np.ndarray, k: int, exclude: Sequence[set[Any]] | None = None):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.queries = np.asarray(queries, dtype=np.float64)
        self.k = k
        self.exclude = list(exclude) if exclude is not None else [set() for _ in range(len(self.queries))]
        # One min-heap per query of (score, -item): the root is the worst kept entry.
        # Int ids only: -item turns "smaller id wins a tie" into "larger key stays".
        self.heaps: list[list[tuple[float, int]]] = [[] for _ in range(len(self.queries))]
        self.unanswered = 0
        self.input_ended = False

    def on_recv(self, data: Any, ps: Client) -> None:
        self.unanswered += 1
        ps.pull(int(data))

    def on_pull_recv(self, param_id: Any, param_value: np.ndarray, ps: Client) -> None:
        value = np.asarray(param_value, dtype=np.float64)
        scores = self.queries @ value[:-1] + value[-1]
        for query, score in enumerate(scores.tolist()):
            if param_id in self.exclude[query]:
                continue
            entry = (score, -param_id)
            heap = self.heaps[query]
            if len(heap) < self.k:
                heapq.heappush(heap, entry)
            elif entry > heap[0]:
                heapq.heapreplace(heap, entry)
        self.unanswered -= 1
        if self.input_ended and self.unanswered == 0:
            self._emit(ps)

    def on_input_end(self, ps: Client) -> None:
        self.input_ended = True
        if self.unanswered == 0:
            self._emit(ps)

    def _emit(self, ps: Client) -> None:
        for query, heap in enumerate(self.heaps):
            ranked = sorted(((-negated, score) for score, negated in heap), key=lambda e: ranking_key(*e))
            ps.output((query, ranked))


def merge(local_lists: Iterable[tuple[int, Ranked]], queries: int, k: int) -> list[Ranked]:
    """The global top K per query from the workers' local top-K lists."""
    pooled: list[Ranked] = [[] for _ in range(queries)]
    for query, ranked in local_lists:
        pooled[query].extend((item, score) for item, score in ranked)
    return [sorted(entries, key=lambda e: ranking_key(*e))[:k] for entries in pooled]


def _model_value(items: Mapping[Any, np.ndarray], param_id: Any) -> np.ndarray:
    return items[param_id]


def top_k(
    items: Mapping[int, np.ndarray],
    queries: np.ndarray,
    k: int,
    *,
    exclude: Sequence[set[Any]] | None = None,
    workers: int = 2,
    shards: int = 2,
) -> list[Ranked]:
    """The top K items per query vector, computed by `workers` workers over `shards` shards."""
    logic = TopK(queries, k, exclude)
    stream = transform(
        sorted(items),
        logic,
        functools.partial(_model_value, dict(items)),  # the shards start with the trained model
        "replace",
        workers,
        shards,
    )
    local = [out.value for out in stream if isinstance(out, Left)]
    return merge(local, len(queries), k)


def brute_force_top_k(
    items: Mapping[int, np.ndarray], queries: np.ndarray, k: int, exclude: Sequence[set[Any]] | None = None
) -> list[Ranked]:
    """All scores at once with numpy, sorted by (score descending, item id)."""
    ids = np.array(sorted(items))
    values = np.stack([np.asarray(items[i], dtype=np.float64) for i in ids])
    scores = np.asarray(queries, dtype=np.float64) @ values[:, :-1].T + values[:, -1]
    result = []
    for query, row in enumerate(scores):
        order = np.lexsort((ids, -row))
        skip = exclude[query] if exclude is not None else set()
        best = [(int(ids[j]), float(row[j])) for j in order if int(ids[j]) not in skip][:k]
        result.append(best)
    return result


def main(argv: list[str] | None = None) -> None:
    from examples.movielens_mf import Hyper, load_split, run_offline

    parser = argparse.ArgumentParser(description="Top-K recommendations from a trained MF model, on streamps.")
    parser.add_argument("--users", default="1,100,500", help="comma-separated MovieLens user ids")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the MF model trained first")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args(argv)
    users = [int(u) for u in args.users.split(",")]

    train, test = load_split()
    started = time.monotonic()
    model = run_offline(train, test, Hyper(epochs=args.epochs), emit_users=True, eval_every_epoch=False)
    print(f"trained MF ({args.epochs} epochs, test RMSE {model.test[-1]:.4f}) in {time.monotonic() - started:.1f} s")
    queries = np.stack([model.users[u][:-1] for u in users])
    rated = [{i for u, i, *_ in train if u == user} for user in users]

    started = time.monotonic()
    found = top_k(model.items, queries, args.k, exclude=rated, workers=args.workers, shards=args.shards)
    print(f"top {args.k} over {len(model.items):,} items for {len(users)} users in {time.monotonic() - started:.1f} s")
    expected = brute_force_top_k(model.items, queries, args.k, rated)
    for user, ranked, brute in zip(users, found, expected, strict=True):
        check = "= brute force" if [i for i, _ in ranked] == [i for i, _ in brute] else "DIFFERS from brute force"
        print(f"user {user}: {', '.join(f'{i} ({score:.2f})' for i, score in ranked)}  [{check}]")


if __name__ == "__main__":
    main()
