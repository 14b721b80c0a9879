"""Init and update specs: built-ins, module:attr plugins, and deterministic random inits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import child_env

from psclient import SpecError
from psserver.specs import make_init, make_update

IDS = [0, 1, -5, 2**63 - 1, "a", "ünï"]


def test_zeros_has_the_shape_and_float32() -> None:
    rows = make_init("zeros:4x3").batch([1, "b"])

    assert rows.dtype == np.float32
    assert rows.shape == (2, 4, 3)
    assert not rows.any()


@pytest.mark.parametrize(("spec", "value"), [("const:3", 3), ("const:-2", -2), ("const:2.5", 2.5), ("const:1e3", 1e3)])
def test_const_is_int_when_it_parses_as_int(spec: str, value: float) -> None:
    rows = make_init(spec).batch([1, "x"])

    assert [(type(v), v) for v in np.asarray(rows).tolist()] == [(type(value), value)] * 2


@pytest.mark.parametrize("spec", ["normal:4,seed=7", "normal:2x2,std=0.5,seed=1", "uniform:3,low=-2,high=2,seed=9"])
def test_random_inits_are_deterministic_per_seed_and_id(spec: str) -> None:
    first = make_init(spec).batch(IDS)
    again = make_init(spec).batch(IDS)
    one_by_one = np.stack([make_init(spec).batch([i])[0] for i in reversed(IDS)][::-1])

    assert first.dtype == np.float32
    assert first.tobytes() == again.tobytes() == one_by_one.tobytes()
    assert len({row.tobytes() for row in first}) == len(IDS), "two ids got the same vector"


def test_random_inits_are_the_same_in_another_process() -> None:
    code = (
        "import json, sys; from psserver.specs import make_init; "
        "print(make_init(sys.argv[1]).batch(json.loads(sys.argv[2])).tobytes().hex())"
    )
    spec = "normal:5,std=2,seed=11"

    other = subprocess.run(
        [sys.executable, "-c", code, spec, json.dumps(IDS)],
        env=child_env(PYTHONHASHSEED="123"), capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip

    assert other == make_init(spec).batch(IDS).tobytes().hex()


def test_seed_changes_the_values() -> None:
    assert make_init("normal:8,seed=1").batch([3]).tobytes() != make_init("normal:8,seed=2").batch([3]).tobytes()


def test_normal_and_uniform_have_their_parameters() -> None:
    ids = list(range(2_000))

    normal = make_init("normal:10,std=0.5,seed=3").batch(ids).astype(np.float64)
    uniform = make_init("uniform:10,low=-3,high=-1,seed=3").batch(ids)
    default_uniform = make_init("uniform:10").batch(ids)

    assert abs(normal.mean()) < 0.02
    assert abs(normal.std() - 0.5) < 0.02
    assert uniform.min() >= -3 and uniform.max() < -1
    assert abs(uniform.mean() + 2) < 0.02
    assert default_uniform.min() >= 0 and default_uniform.max() < 1


def test_module_attr_specs_load_callables() -> None:
    init = make_init("builtins:abs")
    update = make_update("operator:mul")

    assert init.batch([-4, 5]) == [4, 5]
    assert update.scalar is not None
    assert update.scalar(6, 7) == 42


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("zeros", "unknown init"),
        ("zeros:", "unknown init"),
        ("zeros:3x", "dimension"),
        ("zeros:-1", "non-negative"),
        ("normal:4,foo=1", "unknown option"),
        ("normal:4,std=abc", "bad value"),
        ("const:abc", "not a number"),
        ("nosuchmodule:fn", "no module named 'nosuchmodule'"),
        ("math:nosuch", "no attribute"),
        ("math:pi", "not callable"),
        ("bogus", "unknown init"),
    ],
)
def test_bad_init_specs_raise_spec_error(spec: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        make_init(spec)


@pytest.mark.parametrize(("spec", "message"), [("sum", "unknown update"), ("nosuchmodule:fn", "no module")])
def test_bad_update_specs_raise_spec_error(spec: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        make_update(spec)
