"""The sparse linear examples as a user meets them, on real data: sparse rows or a scipy CSR matrix
(never made dense), the documented settings as the defaults, a seeded shuffle per pass, and a
trained model without the learner's own parameters."""

from __future__ import annotations

import functools
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `examples` is a directory of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

from examples.datasets import Dataset, load_dataset  # noqa: E402
from examples.linear_driver import train_in_process  # noqa: E402
from examples.linear_model import INTERCEPT_ID  # noqa: E402
from examples.logistic_regression import LogisticRegression  # noqa: E402
from examples.passive_aggressive import PassiveAggressive  # noqa: E402
from examples.references import sklearn_accuracy, sklearn_pa  # noqa: E402
from examples.sparse_linear import pass_order  # noqa: E402

sparse = pytest.importorskip("scipy.sparse")

HASHED_BITS = 18  # the hashing trick's usual width: 2**18 columns


@functools.cache
def dataset(name: str) -> Dataset:
    return load_dataset(name)


def _same_records(ours: list[Any], theirs: list[Any]) -> None:
    assert len(ours) == len(theirs)
    for ((ids, values), label), ((their_ids, their_values), their_label) in zip(ours, theirs, strict=True):
        assert label == their_label
        assert ids.dtype == np.int64 and ids.tolist() == their_ids.tolist()
        np.testing.assert_array_equal(values, their_values)


def _hashed(data: Dataset) -> Dataset:
    """The data set with its columns spread over 2**18 (crc32 of the column number): a CSR matrix."""
    width = 2**HASHED_BITS
    columns = np.array([zlib.crc32(str(j).encode()) % width for j in range(data.n_features)])
    assert len(set(columns.tolist())) == data.n_features  # no two columns share one

    def spread(X: np.ndarray) -> Any:
        coo = sparse.coo_matrix(X)
        return sparse.csr_matrix((coo.data, (coo.row, columns[coo.col])), shape=(X.shape[0], width))

    return Dataset(f"{data.name}, hashed", spread(data.X_train), data.y_train, spread(data.X_test), data.y_test)


def test_a_csr_matrix_or_sparse_rows_give_the_records_of_the_dense_array() -> None:
    data = dataset("digits")  # 64 pixels, half of them 0 in a typical image
    csr_train, csr_test = sparse.csr_matrix(data.X_train), sparse.csr_matrix(data.X_test)
    as_csr = Dataset("digits", csr_train, data.y_train, csr_test, data.y_test)
    rows = [(np.flatnonzero(row), row[np.flatnonzero(row)]) for row in data.X_train]
    test_rows = [(np.flatnonzero(row), row[np.flatnonzero(row)]) for row in data.X_test]
    as_rows = Dataset("digits", rows, data.y_train.tolist(), test_rows, data.y_test.tolist())

    _same_records(as_csr.train, data.train)
    _same_records(as_csr.test, data.test)
    _same_records(as_rows.train, data.train)
    assert as_csr.classes == as_rows.classes == data.classes == tuple(range(10))
    # scikit-learn gets a CSR matrix for rows, with as many columns as the largest index needs
    X_train, X_test = as_rows.matrices()
    assert sparse.issparse(X_train) and X_train.shape == (len(rows), 1 + max(int(i.max()) for i, _ in rows))
    np.testing.assert_array_equal(X_train.toarray(), data.X_train[:, : X_train.shape[1]])
    assert X_test.shape == (len(test_rows), X_train.shape[1])


def test_rows_with_str_ids_train_but_make_no_matrix() -> None:
    rows = [(["a", "b"], [1.0, -1.0]), (["b"], [2.0])]
    data = Dataset("named", rows, [0, 1], rows, [0, 1])
    assert data.train[1][0][0].tolist() == ["b"] and data.train[1][1] == 1
    with pytest.raises(ValueError, match="named: rows with str feature ids make no matrix"):
        data.matrices()


def test_2_to_the_18_hashed_columns_stay_sparse_and_learn_scikit_learns_weights() -> None:
    """A CSR matrix of 2**18 columns (dense: 0.9 GB for breast_cancer's 426 rows) trains as it is,
    and in one process to scikit-learn's weights fitted on the same matrix. No intercept: on sparse
    input scikit-learn's SGD scales the intercept's steps by 0.01, on dense input it does not."""
    data = _hashed(dataset("breast_cancer"))
    assert sparse.issparse(data.X_train) and data.X_train.shape == (426, 2**HASHED_BITS)
    factory = functools.partial(
        PassiveAggressive, "PA-II", 0.01, data.classes, epochs=3, average=True, fit_intercept=False
    )

    run = train_in_process("PA-II", factory, data)
    final, averaged = sklearn_pa("PA-II", 0.01, 3), sklearn_pa("PA-II", 0.01, 3, average=True)
    final.set_params(fit_intercept=False)
    averaged.set_params(fit_intercept=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final.fit(data.X_train, data.y_train)
        averaged.fit(data.X_train, data.y_train)

    assert sparse.issparse(data.X_train)  # nothing made it dense
    used = sorted(int(i) for i in np.unique(data.X_train.indices))
    assert sorted(i for i in run.model if isinstance(i, int)) == used
    assert INTERCEPT_ID not in run.model
    np.testing.assert_allclose([run.model[i] for i in used], final.coef_[0, used], rtol=0, atol=1e-9)
    assert run.test_accuracy == final.score(data.X_test, data.y_test)
    assert run.averaged_accuracy == averaged.score(data.X_test, data.y_test)


def test_the_settings_of_the_documented_results_are_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    pa, lr = PassiveAggressive(), LogisticRegression()
    assert (pa.variant, pa.C, pa.classes, pa.epochs, pa.average, pa.max_lead) == ("PA-I", 0.01, (0, 1), 5, True, 1)
    assert (lr.bits, lr.eta, lr.alpha, lr.epochs, lr.average, lr.max_lead) == (18, 0.01, 1e-4, 5, True, 1)
    # In one process the defaults are scikit-learn's PA-I, C=0.01, 5 passes, final and averaged.
    data = dataset("breast_cancer")
    run = train_in_process("PA-I", functools.partial(PassiveAggressive, classes=data.classes), data)
    assert run.test_accuracy == sklearn_accuracy(sklearn_pa("PA-I", 0.01, 5), data)
    assert run.averaged_accuracy == sklearn_accuracy(sklearn_pa("PA-I", 0.01, 5, average=True), data)
    # The environment still overrides them; a negative lead is unbounded.
    monkeypatch.setenv("STREAMPS_PA_MAX_LEAD", "-1")
    monkeypatch.setenv("STREAMPS_PA_EPOCHS", "2")
    monkeypatch.setenv("STREAMPS_PA_AVERAGE", "no")
    assert (PassiveAggressive().max_lead, PassiveAggressive().epochs, PassiveAggressive().average) == (None, 2, False)
    assert PassiveAggressive(max_lead=-1).max_lead is None and PassiveAggressive(max_lead=0).max_lead == 0


def test_a_seeded_shuffle_gives_each_pass_a_fresh_order_and_scikit_learns_updates_in_it() -> None:
    """In one process, with shuffle=SEED, pass 1 is the stream's order and pass e >= 2 is
    pass_order(SEED, 0, e, n); the model equals scikit-learn's fitted on the passes in those orders."""
    data = dataset("breast_cancer")
    n, epochs = len(data.train), 3
    factory = functools.partial(PassiveAggressive, "PA-II", 0.01, data.classes, epochs=epochs, shuffle=7)

    run = train_in_process("PA-II", factory, data)

    orders = [np.arange(n), *(pass_order(7, 0, epoch, n) for epoch in range(2, epochs + 1))]
    assert sorted(orders[1].tolist()) == list(range(n)) and orders[1].tolist() != orders[2].tolist()
    assert [label for _, label, _ in run.outputs] == data.y_train[np.concatenate(orders)].tolist()
    assert [epoch for epoch, _, _ in run.outputs] == [e for e in range(1, epochs + 1) for _ in range(n)]
    stream = np.concatenate(orders)  # one pass over the passes back to back makes scikit-learn's epochs
    for model, average in ((run.model, False), (run.averaged, True)):
        reference = sklearn_pa("PA-II", 0.01, 1, average=average)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference.fit(data.X_train[stream], data.y_train[stream])
        np.testing.assert_allclose([model.get(j, 0.0) for j in range(data.n_features)], reference.coef_[0], atol=1e-9)
        assert model[INTERCEPT_ID] == pytest.approx(reference.intercept_[0], abs=1e-9)
    # Another seed, another order; no seed, the stream's order every pass.
    assert pass_order(8, 0, 2, n).tolist() != orders[1].tolist()
    plain = train_in_process("PA-II", functools.partial(factory, shuffle=None), data)
    assert [label for _, label, _ in plain.outputs] == data.y_train.tolist() * epochs
