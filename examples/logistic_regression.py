"""Logistic regression with hashed sparse features (the hashing trick), SGD with L2.

A feature, whatever its name (an int or a str), lives in bucket
`crc32(str(name)) % 2**bits` (a stable hash: the same in every process and
every run), with the sign `+1` or `-1` given by bit 31 of the same hash (signed
hashing: features that share a bucket cancel out on average instead of adding
up). Features falling into one bucket add up. Each bucket is one parameter on
the shards: a float for a binary model, a vector with one entry per label for a
multiclass (one-vs-rest) model. The model never needs to know the feature names
in advance, and its size is fixed at `2**bits` whatever the data.

The data flow is SparseLinearLearner's (examples/sparse_linear.py):
for each record `(features, label)` the worker pulls the weights of its buckets
(one `ps.pull_many`), parks the record until they are all answered, outputs
`(epoch, label, predicted label)` before learning (prequential in the first
pass), then takes one SGD step on the log loss, as scikit-learn's SGDClassifier
does with a constant learning rate: with y in {-1, +1} and p = w.x + b,

    g = eta * y / (1 + exp(y p))                     (minus eta times dloss/dp)
    w_j += g x_j - eta * alpha * w_j                 (for the buckets of x)
    b   += g                                         (the intercept: no L2)

and pushes the changes as deltas (one `ps.push_many`). scikit-learn shrinks
every weight at every step (its L2 term is dense); here only the weights of the
record's buckets shrink, since the others are not even pulled (the usual sparse
L2). On data where every record has every feature the two are the same.

The script trains it on scikit-learn's breast_cancer and digits and river's
phishing data, on 2 workers x 2 shards, next to SGDClassifier(loss="log_loss",
penalty="l2") with the same learning rate, split and passes (results:
examples/RESULTS.md):

    python examples/logistic_regression.py [--dataset all] [--bits 18] [--plot curve.png]

As a worker plugin (jsonl records `[features, label]`):

    psclient run --logic examples.logistic_regression:LogisticRegression --init const:0.0 --update add ...

with hyperparameters from the environment: STREAMPS_LR_BITS, STREAMPS_LR_ETA,
STREAMPS_LR_ALPHA, STREAMPS_LR_CLASSES (comma-separated labels; default 0,1;
more than two needs `--init zeros:K`), STREAMPS_LR_EPOCHS, STREAMPS_LR_SIGNED,
STREAMPS_LR_AVERAGE, STREAMPS_LR_MAX_LEAD, STREAMPS_LR_WINDOW, STREAMPS_LR_SHUFFLE.
"""

from __future__ import annotations

import argparse
import functools
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.datasets import Dataset
from examples.linear_driver import add_run_arguments, compare_on_datasets
from examples.linear_model import INTERCEPT_ID, Id, sparse_features
from examples.references import sklearn_accuracy, sklearn_lr
from examples.settings import flag
from examples.sparse_linear import SparseLinearLearner

DEFAULT_BITS = 18
DEFAULT_ETA = 0.01
DEFAULT_ALPHA = 1e-4
MAX_BITS = 30  # bit 31 of the hash is the sign
# Past these margins the log loss gradient is computed as scikit-learn does (no overflow).
_FAR = 18.0


def feature_hash(name: Any, bits: int, signed: bool = True) -> tuple[int, float]:
    """(bucket, sign) of a feature name: crc32 of its text, low `bits` bits; sign from bit 31."""
    h = zlib.crc32(str(name).encode("utf-8"))
    sign = -1.0 if signed and h >> 31 else 1.0
    return h & ((1 << bits) - 1), sign


def log_loss_step(y: Any, p: Any) -> Any:
    """y / (1 + exp(y p)): minus the derivative of log(1 + exp(-y p)) in p, as scikit-learn computes it.

    Works on floats and on arrays (one-vs-rest: one entry per label).
    """
    z = np.asarray(y * p, dtype=np.float64)
    with np.errstate(over="ignore"):
        step = np.where(z > _FAR, np.exp(-z) * y, np.where(z < -_FAR, y, y / (np.exp(z) + 1.0)))
    return float(step) if step.ndim == 0 else step


class LogisticRegression(SparseLinearLearner):
    """Binary or one-vs-rest logistic regression on hashed features, SGD with L2.

    Arguments left as None come from STREAMPS_LR_<NAME> environment variables,
    or else from the defaults, the settings of examples/RESULTS.md: 2**18
    buckets, eta 0.01, alpha 1e-4, classes 0 and 1, 5 passes, averaged, max_lead 1.
    """

    ENV_PREFIX = "LR"

    def __init__(
        self,
        bits: int | None = None,
        eta: float | None = None,
        alpha: float | None = None,
        classes: Sequence[Any] | None = None,
        *,
        signed: bool | None = None,
        **options: Any,
    ):
        """`options`: SparseLinearLearner's (epochs, window, average, max_lead, fit_intercept, predictions)."""
        super().__init__(classes, **options)
        self.bits = bits if bits is not None else self.setting("BITS", int, DEFAULT_BITS)
        if not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in 1..{MAX_BITS}, got {self.bits}")
        self.eta = eta if eta is not None else self.setting("ETA", float, DEFAULT_ETA)
        self.alpha = alpha if alpha is not None else self.setting("ALPHA", float, DEFAULT_ALPHA)
        if not self.eta > 0 or self.alpha < 0:
            raise ValueError(f"eta must be > 0 and alpha >= 0, got eta={self.eta}, alpha={self.alpha}")
        self.signed = signed if signed is not None else self.setting("SIGNED", flag, True)
        self._hashes: dict[Any, tuple[int, float]] = {}

    def bucket(self, name: Any) -> tuple[int, float]:
        """(bucket, sign) of a feature name, memoized: the same names come back record after record."""
        found = self._hashes.get(name)
        if found is None:
            found = self._hashes[name] = feature_hash(name, self.bits, self.signed)
        return found

    def featurize(self, features: Any) -> tuple[list[Id], np.ndarray]:
        names, values = sparse_features(features)
        buckets: dict[Id, float] = {}
        for name, value in zip(names, values.tolist(), strict=True):
            bucket, sign = self.bucket(name)
            buckets[bucket] = buckets.get(bucket, 0.0) + sign * value
        ids: list[Id] = [bucket for bucket, value in buckets.items() if value != 0.0]
        x = [buckets[bucket] for bucket in ids]
        if self.fit_intercept:
            ids.append(INTERCEPT_ID)
            x.append(1.0)
        return ids, np.asarray(x, dtype=np.float64)

    def update(self, x: np.ndarray, weights: np.ndarray, scores: Any, label: Any) -> np.ndarray | None:
        if self.multiclass:
            y = np.full(len(self.classes), -1.0)
            y[self.index(label)] = 1.0
            deltas = np.outer(x, self.eta * log_loss_step(y, scores))
        else:
            deltas = x * (self.eta * log_loss_step(self.sign(label), scores))
        decayed = len(x) - 1 if self.fit_intercept else len(x)  # the intercept is not regularized
        if self.alpha:
            deltas[:decayed] -= min(1.0, self.eta * self.alpha) * weights[:decayed]
        return deltas


def collisions(data: Dataset, bits: int) -> tuple[int, int]:
    """(features, features sharing a bucket with another one) of a data set under `bits`."""
    names = data.feature_names if data.feature_names is not None else list(range(data.n_features))
    buckets = [feature_hash(name, bits)[0] for name in names]
    counts: dict[int, int] = {}
    for bucket in buckets:
        counts[bucket] = counts.get(bucket, 0) + 1
    return len(names), sum(1 for bucket in buckets if counts[bucket] > 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Logistic regression with hashed features on streamps, next to scikit-learn's SGDClassifier."
    )
    parser.add_argument("--bits", type=int, default=DEFAULT_BITS, help="2**bits hash buckets")
    parser.add_argument("--eta", type=float, default=DEFAULT_ETA, help="constant learning rate")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="L2 strength")
    parser.add_argument("--unsigned", action="store_true", help="plain (unsigned) feature hashing")
    args = add_run_arguments(parser).parse_args(argv)

    def factories(data: Dataset) -> dict[str, Callable[[], SparseLinearLearner]]:
        factory = functools.partial(
            LogisticRegression,
            args.bits,
            args.eta,
            args.alpha,
            data.classes,
            signed=not args.unsigned,
            epochs=args.epochs,
            window=args.window,
            max_lead=args.max_lead,
            shuffle=args.shuffle,
            average=True,
        )
        return {"LR": factory}

    def reference(_label: str, data: Dataset, average: bool) -> float:
        return sklearn_accuracy(sklearn_lr(args.eta, args.alpha, args.epochs, average, args.shuffle), data)

    def note(data: Dataset) -> str:
        features, shared = collisions(data, args.bits)
        return f"; {features} features in 2**{args.bits} buckets, {shared} share one"

    compare_on_datasets(
        args,
        f"logistic regression, 2**{args.bits} hash buckets ({'un' if args.unsigned else ''}signed), "
        f"eta={args.eta}, alpha={args.alpha}, {args.epochs} passes, {args.workers} workers x {args.shards} shards.\n"
        f"Test accuracy next to SGDClassifier(loss='log_loss', penalty='l2', alpha, learning_rate='constant', "
        f"eta0=eta, shuffle={args.shuffle is not None}, random_state={args.shuffle}, tol=None, "
        f"max_iter=passes[, average=True]) on the same split (its features "
        f"unhashed); 1st pass: prequential accuracy.",
        factories,
        reference,
        plot_title=f"logistic regression, eta={args.eta}, alpha={args.alpha}",
        note=note,
    )


if __name__ == "__main__":
    main()
