"""Python number semantics through a whole job: an int parameter given a float delta becomes a float."""

from __future__ import annotations

from typing import Any

import pytest

from psclient import Left, Right, transform
from psworker import WorkerLogic


class HalvesAndWholes(WorkerLogic):
    """Record r pushes r / 2 to "half" and r to "whole" (a float and an int in one batch)
    and pulls "untouched", which nobody pushes to."""

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.push("half", data / 2)
        ps.push("whole", data)
        ps.pull("untouched")

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        ps.output(param_value)


@pytest.mark.parametrize(
    ("init", "update"),
    [(lambda param_id: 0, lambda old, delta: old + delta), ("const:0", "add")],
    ids=["lambdas", "specs"],
)
@pytest.mark.timeout(180)
def test_float_deltas_make_an_int_parameter_a_float_and_no_other(init: Any, update: Any) -> None:
    items = list(transform(range(100), HalvesAndWholes, init, update, worker_parallelism=2, ps_parallelism=2))

    outputs = [item.value for item in items if isinstance(item, Left)]
    model = dict(item.value for item in items if isinstance(item, Right))
    assert {(type(v), v) for v in outputs} == {(int, 0)}
    assert {k: (type(v), v) for k, v in model.items()} == {
        "half": (float, 2475.0),
        "whole": (int, 4950),
        "untouched": (int, 0),
    }
