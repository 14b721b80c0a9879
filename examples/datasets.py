"""Real data sets for the examples: MovieLens 100K, and the classification sets.

MovieLens 100K (GroupLens: 100,000 ratings, 1..5 stars, by 943 users of 1,682
movies) comes from the recbole 1.2.1 wheel on PyPI, which carries it as
`recbole/dataset_example/ml-100k/ml-100k.inter`. pip downloads the wheel (no
dependencies, so no torch), the file is read out of the zip, and the wheel is
thrown away. Only PyPI needs to be reachable. It is cached in `data/`, which
git ignores.

The classification sets (breast_cancer and digits from scikit-learn, phishing
from river) come with those packages: `load_dataset` splits and standardizes
them.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

RECBOLE_WHEEL = "recbole==1.2.1"
ML100K_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"
ML100K_FILE = "ml-100k.inter"
ML100K_HEADER = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
ML100K_RATINGS = 100_000

Rating = tuple[int, int, float, int]  # (user, item, stars, timestamp in seconds since 1970)
Record = tuple[Any, Any]  # (features, label)

DATASETS = ("breast_cancer", "digits", "phishing")
SPLIT_SEED = 0
TEST_SIZE = 0.25


class DatasetError(RuntimeError):
    """A data set could not be fetched or read; the message says why and what to do."""


def _fetch_ml100k(target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="streamps-recbole-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", RECBOLE_WHEEL, "-d", tmp]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DatasetError(f"cannot fetch MovieLens 100K: `pip download {RECBOLE_WHEEL}` failed: {exc}") from exc
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise DatasetError(
                f"cannot fetch MovieLens 100K: `pip download --no-deps {RECBOLE_WHEEL}` failed "
                f"(exit code {done.returncode}): {detail[-1] if detail else 'no wheel downloaded'}. "
                f"PyPI must be reachable, or put {ML100K_FILE} into {target.parent} yourself."
            )
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                data = wheel.read(ML100K_MEMBER)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DatasetError(f"{wheels[0].name} holds no readable {ML100K_MEMBER}: {exc}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")  # one per process: fetches may race
    partial.write_bytes(data)
    partial.replace(target)  # a complete file or none, even if interrupted


def _parse_ml100k(path: Path) -> list[Rating]:
    ratings: list[Rating] = []
    with path.open(encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        if header != ML100K_HEADER:
            raise DatasetError(f"{path}: unexpected header {header}; delete the file to fetch it again")
        for number, line in enumerate(handle, start=2):
            fields = line.split("\t")
            try:
                ratings.append((int(fields[0]), int(fields[1]), float(fields[2]), int(float(fields[3]))))
            except (ValueError, IndexError):
                raise DatasetError(f"{path} line {number}: malformed rating {line.strip()!r}") from None
    if len(ratings) != ML100K_RATINGS:
        raise DatasetError(f"{path}: {len(ratings)} ratings, expected {ML100K_RATINGS}; delete it to fetch it again")
    return ratings


def movielens_100k(cache_dir: Path = Path("data")) -> list[Rating]:
    """The 100,000 MovieLens ratings as (user, item, stars, timestamp), in file order.

    The first call downloads the recbole wheel (2 MB) and keeps `ml-100k.inter`
    (2 MB) in `cache_dir`; later calls read that file.
    """
    path = Path(cache_dir) / ML100K_FILE
    if not path.is_file():
        _fetch_ml100k(path)
    return _parse_ml100k(path)


def split_80_20(ratings: list[Rating], seed: int) -> tuple[list[Rating], list[Rating]]:
    """A fixed random split: (train, test) with 80% and 20% of the ratings, the same for the same seed."""
    shuffled = list(ratings)
    random.Random(seed).shuffle(shuffled)
    cut = round(0.8 * len(shuffled))
    return shuffled[:cut], shuffled[cut:]


def split_by_time(ratings: list[Rating], fraction: float = 0.8) -> tuple[list[Rating], list[Rating]]:
    """The time-ordered split: the oldest `fraction` of the ratings to train on, the newest to test on,
    each in time order (ties in the given order). What a deployed model meets: no rating from the
    future, and many test ratings by users who had rated nothing yet."""
    by_time = sorted(ratings, key=lambda rating: rating[3])
    cut = round(fraction * len(by_time))
    return by_time[:cut], by_time[cut:]


# -- classification: scikit-learn's and river's bundled data sets ----------------------


@dataclass
class Dataset:
    """A train/test split for the sparse linear examples: records for the cluster, matrices for scikit-learn.

    `X_train`, `X_test` are each a dense 2-D array, a scipy sparse matrix (CSR,
    or anything with `tocsr()`), or a sequence of sparse rows `(indices, values)`;
    a sparse one is never made dense. `train`/`test` are the same rows as records
    (features, label): `(indices, values)` arrays, or with `feature_names` dicts
    keyed by feature name. `matrices()` gives what scikit-learn fits on.
    """

    name: str
    X_train: Any
    y_train: np.ndarray
    X_test: Any
    y_test: np.ndarray
    feature_names: list[str] | None = None
    classes: tuple[Any, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.y_train, self.y_test = np.asarray(self.y_train), np.asarray(self.y_test)
        self.classes = tuple(np.unique(self.y_train).tolist())

    def _records(self, X: Any, y: np.ndarray) -> list[Record]:
        labels = y.tolist()
        if len(labels) != _row_count(X):
            raise ValueError(f"{self.name}: {_row_count(X)} rows but {len(labels)} labels")
        records: list[Record] = []
        for (indices, values), label in zip(_sparse_rows(X), labels, strict=True):
            if self.feature_names is None:
                records.append(((indices, values), label))
            else:
                pairs = zip(indices.tolist(), values.tolist(), strict=True)
                records.append(({self.feature_names[j]: value for j, value in pairs}, label))
        return records

    @cached_property
    def train(self) -> list[Record]:
        return self._records(self.X_train, self.y_train)

    @cached_property
    def test(self) -> list[Record]:
        return self._records(self.X_test, self.y_test)

    @property
    def n_features(self) -> int:
        """Columns of the matrices: as given, or 1 + the largest index of the rows."""
        if self.feature_names is not None:
            return len(self.feature_names)
        if hasattr(self.X_train, "shape"):
            return int(self.X_train.shape[1])
        return 1 + max((int(ids.max()) for ids, _ in self._rows() if len(ids)), default=-1)

    def _rows(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for X in (self.X_train, self.X_test):
            for ids, values in _sparse_rows(X):
                if ids.dtype.kind not in "iu":
                    raise ValueError(f"{self.name}: rows with str feature ids make no matrix (int indices do)")
                yield ids, values

    def matrices(self) -> tuple[Any, Any]:
        """(X_train, X_test) as scikit-learn takes them: dense arrays and sparse matrices as they are,
        rows of (indices, values) as scipy CSR matrices (scipy comes with scikit-learn).

        On sparse input scikit-learn's SGD scales the intercept's steps by 0.01, on dense input it
        does not: its model is the twin of ours on dense input, or without an intercept."""
        if not isinstance(self.X_train, list | tuple) and not isinstance(self.X_test, list | tuple):
            return self.X_train, self.X_test
        from scipy.sparse import csr_matrix

        rows = list(self._rows())
        width, cut = self.n_features, _row_count(self.X_train)
        matrices = []
        for part in (rows[:cut], rows[cut:]):
            indptr = np.cumsum([0] + [len(ids) for ids, _ in part])
            flat_ids = np.concatenate([ids for ids, _ in part]) if part else np.empty(0, np.int64)
            flat_values = np.concatenate([values for _, values in part]) if part else np.empty(0)
            matrices.append(csr_matrix((flat_values, flat_ids, indptr), shape=(len(part), width)))
        return matrices[0], matrices[1]


def _row_count(X: Any) -> int:
    return X.shape[0] if hasattr(X, "shape") else len(X)


def _sparse_rows(X: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices, values) of each row's non-zero entries, from a dense array, a sparse matrix or rows."""
    if hasattr(X, "tocsr"):
        csr = X.tocsr()
        for start, end in itertools.pairwise(csr.indptr.tolist()):
            values = np.asarray(csr.data[start:end], dtype=np.float64)
            keep = values != 0.0
            yield csr.indices[start:end][keep].astype(np.int64), values[keep]
    elif isinstance(X, np.ndarray):
        if X.ndim != 2:
            raise ValueError(f"a dense X must be 2-D, got shape {X.shape}")
        for row in X:
            (nonzero,) = np.nonzero(row)
            yield nonzero.astype(np.int64), np.asarray(row[nonzero], dtype=np.float64)
    else:
        for number, row in enumerate(X):
            try:
                indices, values = row
            except (TypeError, ValueError):
                raise ValueError(f"row {number}: a sparse row is a pair (indices, values)") from None
            yield np.asarray(indices), np.asarray(values, dtype=np.float64)


def load_dataset(name: str, seed: int = SPLIT_SEED, test_size: float = TEST_SIZE) -> Dataset:
    """breast_cancer, digits (scikit-learn's bundled copies) or phishing (river's); no download."""
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    names: list[str] | None = None
    if name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        X, y = load_breast_cancer(return_X_y=True)
    elif name == "digits":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
    elif name == "phishing":
        from river.datasets import Phishing

        rows = list(Phishing())
        names = list(rows[0][0])
        X = np.array([[float(x[n]) for n in names] for x, _ in rows])
        y = np.array([int(label) for _, label in rows])
    else:
        raise ValueError(f"unknown data set {name!r}: use one of {', '.join(DATASETS)}")
    X_train, X_test, y_train, y_test = train_test_split(
        X.astype(np.float64), y, test_size=test_size, random_state=seed, stratify=y
    )
    scaler = StandardScaler().fit(X_train)
    return Dataset(name, scaler.transform(X_train), y_train, scaler.transform(X_test), y_test, names)
