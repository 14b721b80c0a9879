"""Top-K recommendation over workers: exactly the brute-force top K of a trained MF model."""

from __future__ import annotations

import functools
import operator
from typing import Any

import numpy as np
import pytest

from examples.datasets import DatasetError
from examples.movielens_mf import Hyper, load_split, run_offline
from examples.topk import TopK, brute_force_top_k, merge, top_k
from psworker.testing import InProcessClient

USERS = [1, 13, 100, 405, 655, 943]  # light and heavy raters of MovieLens 100K
K = 10


def assert_same_ranking(found: list[Any], expected: list[Any]) -> None:
    for ranked, brute in zip(found, expected, strict=True):
        assert [item for item, _ in ranked] == [item for item, _ in brute]
        np.testing.assert_allclose([s for _, s in ranked], [s for _, s in brute], rtol=1e-9, atol=1e-12)


@pytest.mark.timeout(180)
def test_top_k_over_workers_equals_brute_force_on_a_trained_model() -> None:
    try:
        train, test = load_split()
    except DatasetError as exc:
        pytest.skip(f"MovieLens 100K unavailable: {exc}")
    model = run_offline(train, test, Hyper(epochs=2), emit_users=True, eval_every_epoch=False)
    queries = np.stack([model.users[user][:-1] for user in USERS])
    rated = [{item for user, item, *_ in train if user == query} for query in USERS]

    found = top_k(model.items, queries, K, exclude=rated, workers=3, shards=2)

    expected = brute_force_top_k(model.items, queries, K, rated)
    assert_same_ranking(found, expected)
    assert all(len(ranked) == K for ranked in found)
    assert all(not {item for item, _ in ranked} & seen for ranked, seen in zip(found, rated, strict=True))


def test_ties_go_to_the_smaller_item_id_locally_and_in_the_merge() -> None:
    # Item i scores i % 10 for the first query and -(i % 10) for the second: many ties.
    items = {i: np.array([i % 10, 0.0, 0.0], dtype=np.float32) for i in range(40)}
    queries = np.array([[1.0, 0.0], [-1.0, 0.0]])
    workers = [TopK(queries, k=6) for _ in range(3)]
    clients = [InProcessClient(functools.partial(operator.getitem, items), "replace") for _ in workers]

    for position, item in enumerate(sorted(items, reverse=True)):  # round robin, largest ids first
        workers[position % 3].on_recv(item, clients[position % 3])
    for logic, client in zip(workers, clients, strict=True):
        logic.on_input_end(client)
        for item in reversed(client.pending):  # answered after the input ends, smallest ids first
            logic.on_pull_recv(item, items[item], client)
        assert client.model == {}, "top-K never pushes"
    found = merge([out for client in clients for out in client.outputs], len(queries), 6)

    assert [[item for item, _ in ranked] for ranked in found] == [[9, 19, 29, 39, 8, 18], [0, 10, 20, 30, 1, 11]]
    assert_same_ranking(found, brute_force_top_k(items, queries, 6))


def test_k_larger_than_a_share_and_an_empty_share() -> None:
    items = {i: np.array([float(i), 0.0], dtype=np.float32) for i in range(5)}
    init = functools.partial(operator.getitem, items)
    logic, client = TopK(np.array([[1.0], [-1.0]]), k=10), InProcessClient(init, "replace")
    empty, empty_client = TopK(np.array([[1.0], [-1.0]]), k=10), InProcessClient(init, "replace")

    outputs, _ = client.run(logic, items)
    empty_outputs, empty_model = empty_client.run(empty, [])

    assert outputs == [(0, [(4, 4.0), (3, 3.0), (2, 2.0), (1, 1.0), (0, 0.0)]),
                              (1, [(0, 0.0), (1, -1.0), (2, -2.0), (3, -3.0), (4, -4.0)])]  # fmt: skip
    assert empty_outputs == [(0, []), (1, [])]
    assert empty_model == {}
