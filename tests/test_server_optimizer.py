"""examples/server_optimizer.py: Adagrad kept by the shards, fed raw gradients."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import pytest

from benchmarks.mf_common import movielens_by_time
from examples.server_optimizer import DEFAULT_LR, ServerAdagrad, prequential_rmse
from psclient import Left, Right, transform
from psworker import WorkerLogic


class PushGradients(WorkerLogic):
    """Each record (id, gradient) is pushed; at the end every id is pulled and output."""

    def __init__(self) -> None:
        self.ids: list[Any] = []

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.push(data[0], data[1])
        self.ids.append(data[0])

    def on_input_end(self, ps: Any) -> None:
        for param_id in dict.fromkeys(self.ids):
            ps.pull(param_id)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        ps.output((param_id, param_value))


@pytest.mark.timeout(120)
def test_adagrad_on_the_shard_gives_the_values_worked_out_by_hand() -> None:
    records = [(0, 2.0), (1, -4.0), (0, 1.0)]
    job = transform(records, PushGradients, "const:1", "add", ps_logic=partial(ServerAdagrad, 0.5, 0.0))
    items = list(job)

    # id 0: squares 4, value 1 - 0.5 * 2 / 2 = 0.5; then squares 5, value 0.5 - 0.5 * 1 / sqrt(5).
    # id 1: squares 16, value 1 - 0.5 * -4 / 4 = 1.5.
    expected = {0: 0.5 - 0.5 * 1.0 / math.sqrt(5.0), 1: 1.5}
    assert dict(item.value for item in items if isinstance(item, Right)) == expected
    # A pull after the pushes (read-your-writes) is answered with the same values.
    assert dict(tuple(item.value) for item in items if isinstance(item, Left)) == expected


@pytest.mark.timeout(600)
def test_adagrad_on_raw_gradients_beats_sgd_deltas_on_movielens(capsys: pytest.CaptureFixture[str]) -> None:
    data = movielens_by_time()
    setup: dict[str, Any] = {"workers": 2, "shards": 2, "pull_limit": 256}

    sgd, sgd_s = prequential_rmse(data, adagrad_lr=None, **setup)
    adagrad, adagrad_s = prequential_rmse(data, adagrad_lr=DEFAULT_LR, **setup)

    with capsys.disabled():
        print(
            f"\n[server optimizer] ml-100k online MF, prequential RMSE: SGD deltas {sgd:.4f} ({sgd_s:.1f} s), "
            f"raw gradients with Adagrad on the shards (lr {DEFAULT_LR:g}) {adagrad:.4f} ({adagrad_s:.1f} s)"
        )
    assert adagrad < sgd < 1.0
