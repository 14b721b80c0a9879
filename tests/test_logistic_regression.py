"""Logistic regression with hashed features: the hashing and the SGD step by hand, the updates
against scikit-learn's to the last bits in one process, and test accuracy on real data on 2
workers x 2 shards within one point of SGDClassifier(loss="log_loss"), measured in the same run."""

from __future__ import annotations

import functools
import math
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `examples` is a directory of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

from examples.datasets import DATASETS, Dataset, load_dataset  # noqa: E402
from examples.linear_driver import train_distributed, train_in_process  # noqa: E402
from examples.linear_model import INTERCEPT_ID  # noqa: E402
from examples.logistic_regression import LogisticRegression, collisions, feature_hash, log_loss_step  # noqa: E402
from examples.references import sklearn_accuracy, sklearn_lr  # noqa: E402

BITS = 18
ETA = 0.01
ALPHA = 1e-4
EPOCHS = 5
MAX_LEAD = 1
TOLERANCE = 0.01  # the target: within one point of scikit-learn
MIN_ACCURACY = {"breast_cancer": 0.93, "digits": 0.92, "phishing": 0.85}


@functools.cache
def dataset(name: str) -> Dataset:
    return load_dataset(name)


def factory(data: Dataset, **options: Any) -> functools.partial[LogisticRegression]:
    return functools.partial(LogisticRegression, BITS, ETA, ALPHA, data.classes, epochs=EPOCHS, **options)


# -- by hand ------------------------------------------------------------------------------


def test_feature_hash_is_crc32_with_a_sign_bit() -> None:
    # crc32("https") = 1056335270: bit 31 clear; crc32("5") = 2226203566: bit 31 set
    assert zlib.crc32(b"https") == 1056335270
    assert feature_hash("https", 6) == (1056335270 % 64, 1.0)
    assert feature_hash("5", 6) == (2226203566 % 64, -1.0)
    assert feature_hash(5, 6) == feature_hash("5", 6)  # a name is hashed by its text
    assert feature_hash("5", 6, signed=False) == (2226203566 % 64, 1.0)
    assert feature_hash("https", 18)[0] == 1056335270 % 2**18


def test_features_sharing_a_bucket_add_up() -> None:
    logic = LogisticRegression(1, ETA, ALPHA, (0, 1))  # 2 buckets: every feature collides
    names = ["a", "b", "c", "d"]
    expected: dict[int, float] = {}
    for name, value in zip(names, [1.0, 2.0, 3.0, 4.0], strict=True):
        bucket, sign = feature_hash(name, 1)
        expected[bucket] = expected.get(bucket, 0.0) + sign * value
    ids, x = logic.featurize(dict(zip(names, [1.0, 2.0, 3.0, 4.0], strict=True)))
    assert ids[-1] == INTERCEPT_ID and x[-1] == 1.0
    assert dict(zip(ids[:-1], x[:-1].tolist(), strict=True)) == {b: v for b, v in expected.items() if v != 0.0}
    # Two features that cancel out in their bucket leave nothing to pull.
    bucket, sign = feature_hash("a", 1)
    other = next(n for n in map(str, range(100)) if feature_hash(n, 1) == (bucket, -sign))
    ids, x = logic.featurize({"a": 1.0, other: 1.0})
    assert ids == [INTERCEPT_ID]
    np.testing.assert_array_equal(x, [1.0])


def test_log_loss_step_by_hand() -> None:
    assert log_loss_step(1.0, 0.0) == pytest.approx(0.5)
    assert log_loss_step(-1.0, 0.0) == pytest.approx(-0.5)
    assert log_loss_step(1.0, math.log(3.0)) == pytest.approx(0.25)  # 1 / (1 + 3)
    assert log_loss_step(1.0, 30.0) == pytest.approx(math.exp(-30.0))  # far on the right side
    assert log_loss_step(-1.0, 30.0) == -1.0  # far on the wrong side: the whole step
    np.testing.assert_allclose(log_loss_step(np.array([1.0, -1.0]), np.array([0.0, math.log(3.0)])), [0.5, -0.75])


def test_sgd_update_by_hand() -> None:
    # eta 0.1, alpha 0.5; x = (1, 2) and the intercept; w = (0.2, -0.1), b = 0: p = 0, g = 0.1 * 0.5
    logic = LogisticRegression(4, 0.1, 0.5, (0, 1))
    x = np.array([1.0, 2.0, 1.0])
    w = np.array([0.2, -0.1, 0.0])
    # w_j += g x_j - eta alpha w_j; b += g (no L2 on the intercept)
    np.testing.assert_allclose(logic.update(x, w, 0.0, 1), [0.05 - 0.01, 0.1 + 0.005, 0.05])
    np.testing.assert_allclose(logic.update(x, w, 0.0, 0), [-0.05 - 0.01, -0.1 + 0.005, -0.05])
    # one-vs-rest: label 2 of 3, p = 0 everywhere: steps (-0.05, -0.05, +0.05) per label
    multi = LogisticRegression(4, 0.1, 0.0, (0, 1, 2))
    np.testing.assert_allclose(multi.update(x, np.zeros((3, 3)), np.zeros(3), 2), np.outer(x, [-0.05, -0.05, 0.05]))


# -- one process: exactly scikit-learn ----------------------------------------------------


def _weights(logic: LogisticRegression, model: dict[Any, Any], data: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The model per original feature (unhashed: bucket weight times the feature's sign)."""
    names = data.feature_names if data.feature_names is not None else range(data.X_train.shape[1])
    multiclass = len(data.classes) > 2
    zero = np.zeros(len(data.classes)) if multiclass else 0.0
    rows = []
    for name in names:
        bucket, sign = logic.bucket(name)
        rows.append(sign * np.asarray(model.get(bucket, zero), dtype=np.float64))
    coef = np.array(rows)
    intercept = np.atleast_1d(np.asarray(model[INTERCEPT_ID], dtype=np.float64))
    return (coef.T if multiclass else coef[None, :]), intercept


@pytest.mark.parametrize("name", DATASETS)
def test_in_one_process_the_updates_are_scikit_learns(name: str) -> None:
    """No bucket is shared at 2**18 on these data sets, and every record has (nearly) every
    feature, so the sparse L2 is scikit-learn's dense one: the same weights to ~1e-13."""
    data = dataset(name)
    assert collisions(data, BITS)[1] == 0
    make = factory(data, average=True)
    run = train_in_process("LR", make, data)
    final, averaged = sklearn_lr(ETA, ALPHA, EPOCHS), sklearn_lr(ETA, ALPHA, EPOCHS, average=True)
    assert run.test_accuracy == sklearn_accuracy(final, data)
    assert run.averaged_accuracy == sklearn_accuracy(averaged, data)
    logic = make()
    for model, reference in ((run.model, final), (run.averaged, averaged)):
        coef, intercept = _weights(logic, model, data)
        np.testing.assert_allclose(coef, reference.coef_, rtol=0, atol=1e-9)
        np.testing.assert_allclose(intercept, reference.intercept_, rtol=0, atol=1e-9)


# -- 2 workers x 2 shards: within one point -----------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", DATASETS)
def test_on_two_workers_and_two_shards_within_one_point_of_scikit_learn(name: str) -> None:
    data = dataset(name)
    run = train_distributed({"LR": factory(data, average=True, max_lead=MAX_LEAD)}, data, workers=2, shards=2)["LR"]
    reference = sklearn_accuracy(sklearn_lr(ETA, ALPHA, EPOCHS), data)
    reference_averaged = sklearn_accuracy(sklearn_lr(ETA, ALPHA, EPOCHS, average=True), data)
    report = (
        f"{name} LR: final {run.test_accuracy:.3f} (sklearn {reference:.3f}), averaged {run.averaged_accuracy:.3f} "
        f"(sklearn {reference_averaged:.3f}), prequential {run.prequential_accuracy():.3f}"
    )
    print(report)

    n = len(data.train)
    assert len(run.outputs) == n * EPOCHS
    assert sorted(label for epoch, label, _ in run.outputs if epoch == 1) == sorted(data.y_train.tolist())
    # One parameter per bucket of a feature, none else but the intercept, averages and clocks.
    logic = factory(data)()
    present = np.flatnonzero(np.any(data.X_train != 0, axis=0))  # digits has pixels that are always 0
    names = [data.feature_names[j] for j in present] if data.feature_names else present.tolist()
    buckets = {logic.bucket(feature)[0] for feature in names}
    assert {param_id for param_id in run.model if isinstance(param_id, int)} == buckets
    assert all(0 <= bucket < 2**BITS for bucket in buckets)

    assert run.test_accuracy >= MIN_ACCURACY[name], report
    assert abs(run.test_accuracy - reference) <= TOLERANCE, report
    assert abs(run.averaged_accuracy - reference_averaged) <= TOLERANCE, report
