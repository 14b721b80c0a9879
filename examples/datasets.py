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

import os
import random
import subprocess
import sys
import tempfile
import zipfile
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

Rating = tuple[int, int, float]  # (user, item, stars)
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
                ratings.append((int(fields[0]), int(fields[1]), float(fields[2])))
            except (ValueError, IndexError):
                raise DatasetError(f"{path} line {number}: malformed rating {line.strip()!r}") from None
    if len(ratings) != ML100K_RATINGS:
        raise DatasetError(f"{path}: {len(ratings)} ratings, expected {ML100K_RATINGS}; delete it to fetch it again")
    return ratings


def movielens_100k(cache_dir: Path = Path("data")) -> list[Rating]:
    """The 100,000 MovieLens ratings as (user, item, stars), in file order.

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


# -- classification: scikit-learn's and river's bundled data sets ----------------------


@dataclass
class Dataset:
    """A fixed, seeded, stratified train/test split, standardized with the train statistics.

    `X_*` are dense matrices (for scikit-learn), `train`/`test` the same rows as
    sparse records (features, label): (indices, values) arrays, or for phishing
    dicts keyed by feature name.
    """

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    feature_names: list[str] | None = None
    classes: tuple[Any, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.classes = tuple(np.unique(self.y_train).tolist())

    def _records(self, X: np.ndarray, y: np.ndarray) -> list[Record]:
        records: list[Record] = []
        for row, label in zip(X, y.tolist(), strict=True):
            (nonzero,) = np.nonzero(row)
            if self.feature_names is None:
                records.append(((nonzero.astype(np.int64), row[nonzero]), label))
            else:
                records.append(({self.feature_names[j]: float(row[j]) for j in nonzero}, label))
        return records

    @cached_property
    def train(self) -> list[Record]:
        return self._records(self.X_train, self.y_train)

    @cached_property
    def test(self) -> list[Record]:
        return self._records(self.X_test, self.y_test)


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
