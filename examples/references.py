"""What the examples are checked against: scikit-learn's estimators and plain numpy loops.

scikit-learn is imported inside the functions: it is a dev dependency, not
needed to run the examples on the cluster.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from examples.datasets import Dataset
from examples.mf import MAX_STARS, MIN_STARS, PRIOR_MEAN, Hyper, biased_step, item_rows, predict, rmse, user_row
from examples.offline_mf import Curve, Record


def _sgd_classifier(epochs: int, average: bool, shuffle: int | None, **loss_and_rate: Any) -> Any:
    """SGDClassifier making `epochs` passes, in the data's order or shuffled by seed `shuffle`,
    with no stopping rule."""
    from sklearn.linear_model import SGDClassifier

    return SGDClassifier(
        max_iter=epochs, tol=None, shuffle=shuffle is not None, random_state=shuffle, average=average, **loss_and_rate
    )


def sklearn_pa(variant: str, C: float, epochs: int, average: bool = False, shuffle: int | None = None) -> Any:
    """scikit-learn's equivalent: SGDClassifier with the PA learning rates (1.8+), shuffled by seed `shuffle`.

    PassiveAggressiveClassifier is deprecated since scikit-learn 1.8 and points
    here. Plain PA is pa1 with an unbounded step (eta0 must be finite: 1e300).
    """
    rates = {"PA": ("pa1", 1e300), "PA-I": ("pa1", C), "PA-II": ("pa2", C)}
    if variant not in rates:
        raise ValueError(f"unknown PA variant {variant!r}: use one of {', '.join(rates)}")
    rate, eta0 = rates[variant]
    return _sgd_classifier(epochs, average, shuffle, loss="hinge", penalty=None, learning_rate=rate, eta0=eta0)


def sklearn_lr(eta: float, alpha: float, epochs: int, average: bool = False, shuffle: int | None = None) -> Any:
    """scikit-learn's equivalent: SGDClassifier on the log loss, L2, constant learning rate, shuffled by
    seed `shuffle`."""
    return _sgd_classifier(
        epochs, average, shuffle, loss="log_loss", penalty="l2", alpha=alpha, learning_rate="constant", eta0=eta
    )


def sklearn_accuracy(estimator: Any, data: Dataset) -> float:
    """Fit on the training split in order and score on the test split."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        X_train, X_test = data.matrices()
        estimator.fit(X_train, data.y_train)
    return float(estimator.score(X_test, data.y_test))


# -- matrix factorization: a numpy loop, and baselines ----------------------------------


def reference_offline(train: Sequence[Record], test: Sequence[Record], hyper: Hyper, seed: int = 0) -> Curve:
    """The same SGD in one process with numpy: epoch 1 in stream order, then item by item.

    Same step (`sgd_step`), hyperparameters, user init and evaluation as OfflineMF;
    item parameters drawn from N(0, init_std) by numpy rather than by the shards' init.
    """
    rank = hyper.rank
    mean = sum(r[2] for r in train) / len(train)
    rng = np.random.default_rng(seed)
    started = time.monotonic()
    items: dict[Any, np.ndarray] = {}
    users: dict[Any, np.ndarray] = {}

    def item(i: Any) -> np.ndarray:
        if i not in items:
            items[i] = item_rows(rng.normal(0.0, hyper.init_std, rank + 1))
        return items[i]

    def user(u: Any) -> np.ndarray:
        if u not in users:
            users[u] = user_row(rank, hyper.init_std, hyper.seed, u)
        return users[u]

    by_item: dict[Any, list[tuple[Any, float]]] = {}
    test_by_item: dict[Any, list[tuple[Any, float]]] = {}
    for u, i, r, *_ in train:
        by_item.setdefault(i, []).append((u, r))
    for u, i, r, *_ in test:
        test_by_item.setdefault(i, []).append((u, r))
    curve = Curve()
    for epoch in range(1, hyper.epochs + 1):
        squared = 0.0
        if epoch == 1:
            steps: Iterable[tuple[Any, Any, float]] = ((i, u, r) for u, i, r, *_ in train)
        else:
            order = list(by_item)
            rng.shuffle(order)
            for block in by_item.values():
                rng.shuffle(block)
            steps = ((i, u, r) for i in order for u, r in by_item[i])
        for i, u, r in steps:
            u_row, i_row = user(u), item(i)
            err = r - mean - float(u_row @ i_row)
            biased_step(u_row, i_row, err, hyper.lr, hyper.reg)
            squared += err * err
        curve.train_rmse.append(rmse(squared, len(train)))
        squared = 0.0
        for i, block in test_by_item.items():
            scores = predict(np.stack([user(u) for u, _ in block]), item(i), mean)
            stars = np.array([r for _, r in block])
            squared += float(np.sum((np.clip(scores, MIN_STARS, MAX_STARS) - stars) ** 2))
        curve.test.append(rmse(squared, len(test)))
    curve.seconds = time.monotonic() - started
    return curve


def popularity_auc(train: Sequence[Record], test: Sequence[Record], seed: int = 0) -> float:
    """The baseline of implicit feedback: score an item by its training ratings; sampled AUC on `test`."""
    counts: dict[Any, int] = {}
    rated: dict[Any, set[Any]] = {}
    for u, i, *_ in [*train, *test]:
        rated.setdefault(u, set()).add(i)
    for _, i, *_ in train:
        counts[i] = counts.get(i, 0) + 1
    catalog = sorted({i for _, i, *_ in [*train, *test]})
    rng = np.random.default_rng(seed)
    right = pairs = 0.0
    for u, i, *_ in test:
        while (j := catalog[rng.integers(len(catalog))]) in rated[u]:
            pass
        score_i, score_j = counts.get(i, 0), counts.get(j, 0)
        right += 1.0 if score_i > score_j else 0.5 if score_i == score_j else 0.0
        pairs += 1
    return right / pairs


# Koren's damping of the item biases ("Factor in the neighbors", 2010): an item rated n times
# gets sum(stars - mean) / (n + 25), so a rarely rated item stays near the mean.
ITEM_BIAS_DAMPING = 25.0


def _rmse_of(predicted: np.ndarray, test: Sequence[Record]) -> float:
    stars = np.array([r for _, _, r, *_ in test], dtype=np.float64)
    return rmse(float(np.sum((np.clip(predicted, MIN_STARS, MAX_STARS) - stars) ** 2)), len(test))


def mean_rmse(train: Sequence[Record], test: Sequence[Record]) -> float:
    """Test RMSE of predicting every rating by the mean of the training ratings."""
    mean = sum(r for _, _, r, *_ in train) / len(train)
    return _rmse_of(np.full(len(test), mean), test)


def item_bias_rmse(train: Sequence[Record], test: Sequence[Record], damping: float = ITEM_BIAS_DAMPING) -> float:
    """Test RMSE of `mean + item bias`, the biases damped (ITEM_BIAS_DAMPING): the baseline that needs
    nothing of the user, so it is the one to beat where test users are new (a time split)."""
    mean = sum(r for _, _, r, *_ in train) / len(train)
    sums: dict[Any, float] = {}
    counts: dict[Any, int] = {}
    for _, i, r, *_ in train:
        sums[i] = sums.get(i, 0.0) + (r - mean)
        counts[i] = counts.get(i, 0) + 1
    biases = {i: sums[i] / (counts[i] + damping) for i in sums}
    return _rmse_of(np.array([mean + biases.get(i, 0.0) for _, i, *_ in test]), test)


def unseen_users(train: Sequence[Record], test: Sequence[Record]) -> int:
    """Test ratings by users with no training rating (whose user vector the model never trained)."""
    known = {u for u, *_ in train}
    return sum(1 for u, *_ in test if u not in known)


def running_means(stars: np.ndarray, prior: float = PRIOR_MEAN) -> np.ndarray:
    """Each rating of a stream predicted by the mean of the ratings before it (`prior` for the first):
    the prequential baseline, which unlike the mean of the whole stream has not seen the future."""
    stars = np.asarray(stars, dtype=np.float64)
    if not len(stars):
        return stars.copy()
    return np.concatenate([[prior], np.cumsum(stars)[:-1] / np.arange(1, len(stars))])
