"""Passive-aggressive classification: the PA steps by hand, the updates against scikit-learn's
to the last bit in one process, and test accuracy on real data on 2 workers x 2 shards within
one point of scikit-learn's SGDClassifier with the PA learning rates, measured in the same run."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Processes

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `examples` is a directory of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

from examples.datasets import DATASETS, Dataset, load_dataset  # noqa: E402
from examples.linear_driver import InProcessPS, train_distributed, train_in_process  # noqa: E402
from examples.linear_model import (  # noqa: E402
    CLOCK_PREFIX,
    DONE,
    INTERCEPT_ID,
    average_id,
    averaged_model,
    sparse_features,
    split_model,
    split_record,
)
from examples.passive_aggressive import VARIANTS, PassiveAggressive, pa_tau  # noqa: E402
from examples.references import sklearn_accuracy, sklearn_pa  # noqa: E402
from examples.side_by_side import namespaced_id, split_namespaced_id  # noqa: E402

C = 0.01
EPOCHS = 5
MAX_LEAD = 1
TOLERANCE = 0.01  # the target: within one point of scikit-learn
# The final iterate of plain PA (no bound on the step) on phishing is chaotic: scikit-learn
# itself scores 0.832 +- 0.044 over 10 shuffled orders of the same data, and any asynchrony
# moves ours (0.847..0.866 over our runs, vs 0.869 for scikit-learn's one order). Its averaged
# model is within TOLERANCE. See examples/RESULTS.md.
FINAL_TOLERANCE = {("phishing", "PA"): 0.03}
MIN_ACCURACY = {"breast_cancer": 0.93, "digits": 0.92, "phishing": 0.84}


@functools.cache
def dataset(name: str) -> Dataset:
    return load_dataset(name)


# -- the PA step by hand ---------------------------------------------------------------


def test_tau_of_pa_pa1_pa2_by_hand() -> None:
    # loss 0.5, ||x||^2 = 2, C = 0.1
    assert pa_tau("PA", 0.5, 2.0, 0.1) == pytest.approx(0.25)  # l / s
    assert pa_tau("PA-I", 0.5, 2.0, 0.1) == pytest.approx(0.1)  # min(C, l / s)
    assert pa_tau("PA-II", 0.5, 2.0, 0.1) == pytest.approx(1 / 14)  # l / (s + 1 / (2C)) = 0.5 / 7
    assert pa_tau("PA-I", 0.5, 2.0, 1.0) == pytest.approx(0.25)  # C does not bind
    # x = 0: no step for PA and PA-I, PA-II still moves (the intercept)
    assert pa_tau("PA", 0.5, 0.0) == 0.0
    assert pa_tau("PA-I", 0.5, 0.0, 0.1) == 0.0
    assert pa_tau("PA-II", 0.5, 0.0, 0.1) == pytest.approx(0.1)
    # one loss per label (one-vs-rest)
    np.testing.assert_allclose(pa_tau("PA-I", np.array([0.5, 0.0, 1.0]), 2.0, 0.3), [0.25, 0.0, 0.3])


def _binary(variant: str, C: float) -> PassiveAggressive:
    return PassiveAggressive(variant, C, (0, 1))


def test_binary_update_by_hand() -> None:
    # x = (1, 2) and the intercept's 1; w = (0.1, 0.2), b = 0: w.x = 0.5; ||x||^2 = 5 (not the intercept)
    logic = _binary("PA", 1.0)
    ids, x = logic.featurize({"a": 1.0, "b": 2.0})
    assert ids == ["a", "b", INTERCEPT_ID]
    np.testing.assert_array_equal(x, [1.0, 2.0, 1.0])
    w = np.array([0.1, 0.2, 0.0])
    assert logic.scores(x, w) == pytest.approx(0.5)
    # label 1 (y = +1): loss 0.5
    np.testing.assert_allclose(logic.update(x, w, 0.5, 1), [0.1, 0.2, 0.1])  # tau = 0.5 / 5
    np.testing.assert_allclose(_binary("PA-I", 0.05).update(x, w, 0.5, 1), [0.05, 0.1, 0.05])  # tau = C
    np.testing.assert_allclose(_binary("PA-II", 0.5).update(x, w, 0.5, 1), [1 / 12, 2 / 12, 1 / 12])  # 0.5 / 6
    # label 0 (y = -1): loss 1.5, tau = 0.3, the step is -tau x
    np.testing.assert_allclose(logic.update(x, w, 0.5, 0), [-0.3, -0.6, -0.3])
    # margin >= 1: passive
    assert logic.update(x, w, 1.0, 1) is None
    assert logic.label_of(0.5) == 1 and logic.label_of(0.0) == 0 and logic.label_of(-0.1) == 0


def test_multiclass_update_by_hand() -> None:
    # 3 labels, x = (1, 1), no intercept; rows w_f1 = (0.5, 0.2, 0), w_f2 = (0, 0.4, 0.1): scores (0.5, 0.6, 0.1)
    x = np.array([1.0, 1.0])
    w = np.array([[0.5, 0.2, 0.0], [0.0, 0.4, 0.1]])
    scores = x @ w
    np.testing.assert_allclose(scores, [0.5, 0.6, 0.1])
    # One-vs-rest, label 0: y = (1, -1, -1), losses (0.5, 1.6, 1.1), PA taus loss / 2
    ovr = PassiveAggressive("PA", None, (0, 1, 2), fit_intercept=False)
    np.testing.assert_allclose(ovr.update(x, w, scores, 0), np.outer(x, [0.25, -0.8, -0.55]))
    assert ovr.label_of(scores) == 1
    # Crammer et al.: the best wrong label is 1; loss 1 - (0.5 - 0.6) = 1.1; tau = 1.1 / (2 * 2)
    crammer = PassiveAggressive("PA", None, (0, 1, 2), multiclass="crammer", fit_intercept=False)
    np.testing.assert_allclose(crammer.update(x, w, scores, 0), np.outer(x, [0.275, -0.275, 0.0]))
    crammer1 = PassiveAggressive("PA-I", 0.1, (0, 1, 2), multiclass="crammer", fit_intercept=False)
    np.testing.assert_allclose(crammer1.update(x, w, scores, 0), np.outer(x, [0.1, -0.1, 0.0]))
    assert crammer.update(x, w, np.array([2.0, 0.5, 0.0]), 0) is None  # margin 1.5: passive


def test_records_features_and_labels() -> None:
    ids, x = sparse_features({3: 1.5, "b": 0.0, 7: -2.0})  # zeros dropped
    assert ids == [3, 7]
    np.testing.assert_array_equal(x, [1.5, -2.0])
    ids, x = sparse_features((np.array([4, 1, 4]), np.array([1.0, 2.0, 0.5])))  # repeats summed
    assert ids == [4, 1] and all(type(i) is int for i in ids)
    np.testing.assert_array_equal(x, [1.5, 2.0])
    ids, x = sparse_features([["u", "v"], [1, 2]])  # JSON: lists
    assert ids == ["u", "v"]
    assert split_record({"features": {"a": 1}, "label": 2}) == ({"a": 1}, 2)
    assert split_record([{"a": 1}, 0]) == ({"a": 1}, 0)
    with pytest.raises(ValueError, match="neither an int nor a str"):
        sparse_features({1.5: 1.0})
    with pytest.raises(ValueError, match="dict"):
        sparse_features(np.ones(3))
    with pytest.raises(ValueError, match="not one of the classes"):
        _binary("PA", 1.0).sign(-1)


def test_namespaced_ids_round_trip() -> None:
    for param_id in (0, 5, -7, 2**40, "f", "0:x", INTERCEPT_ID, average_id(3)):
        for model in range(3):
            spaced = namespaced_id(param_id, model, 3)
            assert type(spaced) is type(param_id)
            assert split_namespaced_id(spaced, 3) == (model, param_id)


# -- one process: exactly scikit-learn ----------------------------------------------------


def _weights(model: dict[Any, Any], data: Dataset) -> tuple[np.ndarray, np.ndarray]:
    names = data.feature_names if data.feature_names is not None else range(data.X_train.shape[1])
    multiclass = len(data.classes) > 2
    zero = np.zeros(len(data.classes)) if multiclass else 0.0
    coef = np.array([model.get(name, zero) for name in names], dtype=np.float64)
    intercept = np.atleast_1d(np.asarray(model[INTERCEPT_ID], dtype=np.float64))
    return (coef.T if multiclass else coef[None, :]), intercept


@pytest.mark.parametrize("name", DATASETS)
def test_in_one_process_the_updates_are_scikit_learns(name: str) -> None:
    """With no asynchrony the logic makes SGDClassifier's updates: the same weights to ~1e-15."""
    data = dataset(name)
    for variant in VARIANTS:
        factory = functools.partial(PassiveAggressive, variant, C, data.classes, epochs=EPOCHS, average=True)
        run = train_in_process(variant, factory, data)
        final = sklearn_pa(variant, C, EPOCHS)
        averaged = sklearn_pa(variant, C, EPOCHS, average=True)
        assert run.test_accuracy == sklearn_accuracy(final, data), variant
        assert run.averaged_accuracy == sklearn_accuracy(averaged, data), variant
        for model, reference in ((run.model, final), (run.averaged, averaged)):
            coef, intercept = _weights(model, data)
            np.testing.assert_allclose(coef, reference.coef_, rtol=0, atol=1e-9, err_msg=variant)
            np.testing.assert_allclose(intercept, reference.intercept_, rtol=0, atol=1e-9, err_msg=variant)


# -- 2 workers x 2 shards: within one point -----------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", DATASETS)
def test_on_two_workers_and_two_shards_within_one_point_of_scikit_learn(name: str) -> None:
    """PA, PA-I and PA-II side by side in one job, 5 passes, bounded lead; each final and
    averaged model is scored on the test split next to SGDClassifier's, fitted here."""
    data = dataset(name)
    factories = {
        variant: functools.partial(
            PassiveAggressive, variant, C, data.classes, epochs=EPOCHS, average=True, max_lead=MAX_LEAD
        )
        for variant in VARIANTS
    }
    runs = train_distributed(factories, data, workers=2, shards=2)

    n = len(data.train)
    report = []
    for variant, run in runs.items():
        reference = sklearn_accuracy(sklearn_pa(variant, C, EPOCHS), data)
        reference_averaged = sklearn_accuracy(sklearn_pa(variant, C, EPOCHS, average=True), data)
        report.append(
            f"{name} {variant}: final {run.test_accuracy:.3f} (sklearn {reference:.3f}), "
            f"averaged {run.averaged_accuracy:.3f} (sklearn {reference_averaged:.3f}), "
            f"prequential {run.prequential_accuracy():.3f}"
        )
        print(report[-1])

        # Every record predicted once per pass, before it was learned from.
        epochs = np.array([epoch for epoch, _, _ in run.outputs])
        assert len(run.outputs) == n * EPOCHS
        assert np.bincount(epochs, minlength=EPOCHS + 1)[1:].tolist() == [n] * EPOCHS
        assert sorted(label for epoch, label, _ in run.outputs if epoch == 1) == sorted(data.y_train.tolist())
        # The bounded lead keeps the workers together: a pass starts when the last one nearly ended.
        for epoch in range(1, EPOCHS):
            assert int(np.argmax(epochs == epoch + 1)) >= epoch * n - (10 + n // 50), (variant, epoch)
        # The model: a weight per feature and the intercept; apart, their averaging accumulators and
        # the clocks, from which averaged_model counts the steps: every record of every pass.
        present = np.flatnonzero(np.any(data.X_train != 0, axis=0))  # digits has pixels that are always 0
        names = {data.feature_names[j] for j in present} if data.feature_names else set(present.tolist())
        assert set(run.model) == names | {INTERCEPT_ID}
        assert set(run.internals) == {average_id(i) for i in run.model} | {f"{CLOCK_PREFIX}0", f"{CLOCK_PREFIX}1"}
        from_clocks = averaged_model({**run.model, **run.internals})
        assert run.averaged is not None and set(from_clocks) == set(run.averaged)
        for param_id, value in from_clocks.items():
            np.testing.assert_array_equal(value, run.averaged[param_id])

        assert run.test_accuracy >= MIN_ACCURACY[name], report[-1]
        assert abs(run.test_accuracy - reference) <= FINAL_TOLERANCE.get((name, variant), TOLERANCE), report[-1]
        assert abs(run.averaged_accuracy - reference_averaged) <= TOLERANCE, report[-1]


# -- as a plugin of `psclient run` -----------------------------------------------------------


@pytest.mark.timeout(120)
def test_runs_as_a_psclient_run_plugin(tmp_path: Path, procs: Processes, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(60):
        label = int(rng.integers(2))
        rows.append([{f"f{j}": round(float(rng.normal(2 * label - 1, 0.5)), 3) for j in range(3)}, label])
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    monkeypatch.setenv("STREAMPS_PA_VARIANT", "PA-II")
    monkeypatch.setenv("STREAMPS_PA_C", "0.1")
    monkeypatch.setenv("STREAMPS_PA_EPOCHS", "2")
    argv = [
        sys.executable, "-m", "psclient", "run", "--logic", "examples.passive_aggressive:PassiveAggressive",
        "--input", str(data), "--init", "const:0.0", "--update", "add", "--workers", "2", "--shards", "2",
        "--output", str(tmp_path / "out.jsonl"), "--model", str(tmp_path / "model.jsonl"),
    ]  # fmt: skip
    process, stderr = procs.popen(argv)
    process.communicate(timeout=100)
    assert process.returncode == 0, stderr.read_text()

    outputs = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(epoch for epoch, _, _ in outputs) == [1] * 60 + [2] * 60
    assert np.mean([label == predicted for epoch, label, predicted in outputs if epoch == 2]) > 0.9
    params = {row["id"]: row["value"] for row in map(json.loads, (tmp_path / "model.jsonl").read_text().splitlines())}
    # By default the learner averages and bounds the lead: the file holds its accumulators and clocks too.
    model, own = split_model(params)
    assert set(model) == {"f0", "f1", "f2", INTERCEPT_ID}
    assert set(own) == {average_id(i) for i in model} | {f"{CLOCK_PREFIX}0", f"{CLOCK_PREFIX}1"}
    assert all(model[f"f{j}"] > 0 for j in range(3))
    averaged = averaged_model(params)  # the steps from the clocks: 60 records, 2 passes
    assert averaged == averaged_model(params, 120) and set(averaged) == set(model)


# -- the bounded lead, in one process --------------------------------------------------------


def test_a_worker_waits_for_the_slowest_one_then_goes_on_in_order() -> None:
    ps = InProcessPS("const:0.0", num_workers=2)  # worker 0 of 2: the other clock is what the test stores
    logic = PassiveAggressive("PA", None, (0, 1), epochs=2, max_lead=2)
    records = [({"a": 1.0, "b": float(i)}, i % 2) for i in range(6)]
    for record in records:
        logic.on_recv(record, ps)
    logic.on_input_end(ps)
    for _ in range(20):  # the other worker learns nothing: worker 0 stops after max_lead + 1 records
        ps.answer_round(logic)
    assert [label for _, label, _ in ps.outputs] == [0, 1, 0]
    assert ps.pending == [f"{CLOCK_PREFIX}1"]  # it reads the other clock alone, again and again
    assert logic.lead_waits == 1
    assert ps.values[f"{CLOCK_PREFIX}0"] == 3.0

    ps.values[f"{CLOCK_PREFIX}1"] = 2.0  # the other worker learned 2 records: 2 more for worker 0
    for _ in range(20):
        ps.answer_round(logic)
    assert len(ps.outputs) == 5 and ps.pending == [f"{CLOCK_PREFIX}1"]

    ps.values[f"{CLOCK_PREFIX}1"] = DONE + 4.0  # it has finished: nobody waits for it any more
    while ps.answer_round(logic):
        pass
    assert [(epoch, label) for epoch, label, _ in ps.outputs] == [(e, i % 2) for e in (1, 2) for i in range(6)]
    assert ps.values[f"{CLOCK_PREFIX}0"] == DONE + 12.0  # its own records, then DONE
    assert not ps.pending
