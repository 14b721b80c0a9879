"""Init and update specs: built-ins, module:attr plugins, and deterministic random inits."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import StartShards, child_env

from psclient import ShardError, SpecError, connect
from psclient.specs import UserFunctionError, check_specs, make_init, make_update

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
        "import json, sys; from psclient.specs import make_init; "
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
        ("zeros:-1", "must be positive"),
        ("zeros:0", "must be positive"),
        ("zeros:4x0", "must be positive"),
        ("zeros:65536x65536", "exceeds 2,147,483,648 elements"),
        ("zeros:4,seed=1", r"unknown option 'seed=1' \(allowed: none\)"),
        ("normal:4,foo=1", "unknown option"),
        ("normal:4,std", "unknown option"),
        ("normal:4,std=abc", "bad value"),
        ("normal:3,std=-1", "std must be >= 0"),
        ("normal:3,std=nan", "bad value for std"),
        ("normal:3,seed=-1", "bad value for seed"),
        ("normal:3,seed=1.5", "bad value for seed"),
        ("normal:3,seed=1,seed=2", "seed given twice"),
        ("uniform:3,low=2,high=1", "low must be below high"),
        ("uniform:3,low=1,high=1", "low must be below high"),
        ("uniform:3,high=inf", "bad value for high"),
        ("uniform:3,low=x", "bad value for low"),
        ("const:abc", "not a finite number"),
        ("const:nan", "not a finite number"),
        ("const:1e999", "not a finite number"),
        ("const:9223372036854775808", "not a finite number"),
        ("const:1,2", "takes one number"),
        ("nosuchmodule:fn", "no module named 'nosuchmodule'"),
        ("math:nosuch", "no attribute"),
        ("math:pi", "not callable"),
        ("bogus", "unknown init"),
    ],
)
def test_bad_init_specs_raise_spec_error(spec: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        make_init(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sum", "unknown update"),
        ("Add", "unknown update"),
        ("nosuchmodule:fn", "no module"),
        ("math:pi", "not callable"),
    ],
)
def test_bad_update_specs_raise_spec_error(spec: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        make_update(spec)


def test_a_raising_init_is_named_with_the_id() -> None:
    init = make_init("logics:bad_init")

    with pytest.raises(UserFunctionError) as caught:
        init.batch([3, 7])

    assert str(caught.value) == "param_init logics:bad_init raised ZeroDivisionError('division by zero') for id 7"


def test_a_raising_callable_is_named_by_module_and_qualname() -> None:
    def init(param_id: object) -> int:
        raise KeyError(param_id)

    with pytest.raises(UserFunctionError) as caught:
        make_init(init).batch(["a"])

    assert str(caught.value) == (
        "param_init test_specs:test_a_raising_callable_is_named_by_module_and_qualname.<locals>.init "
        "raised KeyError('a') for id 'a'"
    )


@pytest.mark.timeout(120)
def test_a_shard_reports_a_raising_init_as_the_users_error(start_shards: StartShards) -> None:
    servers = start_shards(1, init="logics:bad_init")

    with connect(servers) as cluster, pytest.raises(ShardError) as caught:
        cluster.pull([3, 7])

    assert str(caught.value).endswith(
        "FAILED_PRECONDITION: param_init logics:bad_init raised ZeroDivisionError('division by zero') for id 7"
    )


@pytest.mark.timeout(120)
def test_a_shard_reports_a_raising_update_as_the_users_error(start_shards: StartShards) -> None:
    servers = start_shards(1, init="const:0", update="logics:bad_update")

    with connect(servers) as cluster:
        cluster.push([5, "a"], [2, 3])
        with pytest.raises(ShardError) as caught:
            cluster.push([5, "a"], [1, -1])
    with connect(servers) as cluster:
        model = dict(cluster.snapshot())

    assert str(caught.value).endswith(
        "FAILED_PRECONDITION: param_update logics:bad_update raised ValueError('negative delta -1') for id 'a'"
    )
    assert model == {5: 2, "a": 3}


def test_check_specs_raises_value_error_for_what_a_shard_would_refuse() -> None:
    check_specs(lambda param_id: 0, lambda old, delta: old + delta)
    check_specs("normal:4,std=0.1,seed=3", "max")

    with pytest.raises(ValueError, match="init 'uniform:3,low=2,high=1': low must be below high"):
        check_specs("uniform:3,low=2,high=1", "add")
    with pytest.raises(ValueError, match="unknown update 'sum'"):
        check_specs("zeros:2", "sum")


@pytest.mark.parametrize(
    ("init", "update", "message"),
    [
        ("uniform:3,low=2,high=1", "add", "low must be below high"),
        ("normal:3,std=-1", "add", "std"),
        ("zeros:0", "add", "zeros:0"),
        ("zeros:2", "sum", "unknown update 'sum'"),
    ],
)
def test_transform_refuses_a_bad_spec_when_called(init: str, update: str, message: str) -> None:
    from psclient import transform

    started = time.monotonic()
    with pytest.raises(ValueError, match=message):
        transform([1, 2, 3], object, init, update)  # raises at the call: no iteration, no child process
    assert time.monotonic() - started < 5
