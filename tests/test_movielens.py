"""Biased matrix factorization on MovieLens 100K, through `transform` on real processes.

The data comes from the recbole 1.2.1 wheel on PyPI (cached in data/); without
network access and without the cached file these tests are skipped, saying why.
Each accuracy test prints its figure next to the reference measured in the same run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from examples.datasets import DatasetError, movielens_100k, split_by_time
from examples.mf import Hyper
from examples.movielens_mf import DATA_DIR, load_split, main
from examples.offline_mf import IMPLICIT_LR, IMPLICIT_REG, run_offline
from examples.online_biased_mf import run_online
from examples.references import item_bias_rmse, mean_rmse, popularity_auc, reference_offline, unseen_users

# The target of issue 4: Surprise's SVD scores 0.934 on ml-100k.
TARGET_RMSE = 0.935
# The numpy loop of the same SGD must land near the published figures too (0.91-0.94).
REFERENCE_BAND = (0.88, 0.95)
WORKERS = SHARDS = 2

Split = tuple[list[Any], list[Any]]


@pytest.fixture(scope="module")
def split() -> Iterator[Split]:
    try:
        yield load_split()
    except DatasetError as exc:
        pytest.skip(f"MovieLens 100K unavailable: {exc}")


@pytest.fixture(scope="module")
def time_split() -> Iterator[Split]:
    try:
        yield load_split(split="time")
    except DatasetError as exc:
        pytest.skip(f"MovieLens 100K unavailable: {exc}")


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Show a measured figure in the test run's output, even under -q."""
    with capsys.disabled():
        print(f"\n[movielens] {line}")


@pytest.mark.timeout(240)
def test_offline_biased_mf_reaches_the_target_rmse(split: Split, capsys: pytest.CaptureFixture[str]) -> None:
    train, test = split
    hyper = Hyper()

    ours = run_offline(train, test, hyper, workers=WORKERS, shards=SHARDS)
    reference = reference_offline(train, test, hyper)

    report(
        capsys,
        f"offline biased MF, {hyper.epochs} epochs, {WORKERS} workers x {SHARDS} shards: test RMSE "
        f"{ours.test[-1]:.4f} ({ours.seconds:.1f} s); single-process numpy, same SGD: "
        f"{reference.test[-1]:.4f} ({reference.seconds:.1f} s); target {TARGET_RMSE}",
    )
    assert len(ours.test) == len(ours.train_rmse) == hyper.epochs
    assert ours.test[-1] <= TARGET_RMSE
    assert REFERENCE_BAND[0] <= reference.test[-1] <= REFERENCE_BAND[1]
    assert abs(ours.test[-1] - reference.test[-1]) < 0.02
    assert ours.test[-1] < ours.test[0], "training more epochs did not help"
    assert sorted(ours.items) == sorted({item for _, item, *_ in train + test})


@pytest.mark.timeout(120)
def test_online_biased_mf_beats_the_global_mean(split: Split, capsys: pytest.CaptureFixture[str]) -> None:
    train, test = split
    stream = train + test

    result = run_online(stream, Hyper(), workers=WORKERS, shards=SHARDS)

    report(
        capsys,
        f"online biased MF, one pass over {len(stream):,} ratings: prequential RMSE {result.rmse:.4f}; "
        f"running mean of the ratings before each one: {result.running_mean_rmse:.4f}; "
        f"global mean of the whole stream: {result.baseline_rmse:.4f}",
    )
    assert len(result.actual) == len(stream)
    assert sorted(result.actual.tolist()) == sorted(r for _, _, r in stream)
    assert result.rmse < result.baseline_rmse - 0.05
    # The prequential baseline: each rating predicted by the mean of those output before it.
    total, squared = 0.0, 0.0
    for seen, stars in enumerate(result.actual.tolist()):
        squared += ((total / seen if seen else 3.0) - stars) ** 2
        total += stars
    assert result.running_mean_rmse == pytest.approx((squared / len(stream)) ** 0.5, rel=1e-12)
    assert result.rmse < result.running_mean_rmse - 0.05


@pytest.mark.timeout(180)
def test_implicit_feedback_with_negative_sampling_beats_popularity(
    split: Split, capsys: pytest.CaptureFixture[str]
) -> None:
    train, test = split
    hyper = Hyper(lr=IMPLICIT_LR, reg=IMPLICIT_REG, epochs=3)

    ours = run_offline(train, test, hyper, workers=WORKERS, shards=SHARDS, negatives=2, eval_every_epoch=False)
    baseline = popularity_auc(train, test)

    report(
        capsys,
        f"implicit MF, 2 negatives per rating, {hyper.epochs} epochs: sampled test AUC {ours.test[-1]:.4f} "
        f"({ours.seconds:.1f} s); items ranked by popularity: {baseline:.4f}",
    )
    assert len(ours.test) == 1  # evaluated after the last epoch only
    assert ours.test[-1] > baseline


def test_the_loader_keeps_timestamps_and_splits_by_time(split: Split) -> None:
    ratings = movielens_100k(DATA_DIR)
    assert ratings[0] == (196, 242, 3.0, 881250949)  # the file's first line
    train, test = split_by_time(ratings)
    assert (len(train), len(test)) == (80_000, 20_000)
    stamps = [stamp for *_, stamp in train + test]
    assert stamps == sorted(stamps) and max(r[3] for r in train) <= min(r[3] for r in test)
    assert sorted(train + test) == sorted(ratings)
    # load_split gives (user, item, stars) records, the timestamps dropped, in the split's order
    assert load_split(split="time") == ([r[:3] for r in train], [r[:3] for r in test])
    assert split[0][0] == (251, 1, 4.0)  # the random split is the one it always was


def test_on_the_time_split_most_test_users_are_new_and_item_biases_beat_the_mean(time_split: Split) -> None:
    train, test = time_split
    users, items, stars = (np.array(column) for column in zip(*train, strict=True))
    mean = stars.mean()
    counts = np.bincount(items, minlength=1700)
    biases = np.bincount(items, weights=stars - mean, minlength=1700) / (counts + 25.0)
    test_items, test_stars = np.array([i for _, i, _ in test]), np.array([r for _, _, r in test])
    expected = np.sqrt(np.mean((np.clip(mean + biases[test_items], 1, 5) - test_stars) ** 2))
    new = sum(1 for u, _, _ in test if u not in set(users.tolist()))

    assert item_bias_rmse(train, test) == pytest.approx(expected, abs=1e-12)
    assert mean_rmse(train, test) == pytest.approx(np.sqrt(np.mean((mean - test_stars) ** 2)), abs=1e-12)
    assert item_bias_rmse(train, test) < mean_rmse(train, test) - 0.05
    assert unseen_users(train, test) == new > len(test) // 2


@pytest.mark.timeout(240)
def test_the_script_reports_the_baselines_of_the_time_split(
    time_split: Split, capsys: pytest.CaptureFixture[str]
) -> None:
    train, test = time_split
    main(["--split", "time", "--epochs", "2", "--no-reference"])
    out = capsys.readouterr().out

    assert "MovieLens 100K, time 80/20 split (oldest first): 80,000 train, 20,000 test ratings" in out
    assert (
        f"baselines: test RMSE {mean_rmse(train, test):.4f} predicting the training mean, "
        f"{item_bias_rmse(train, test):.4f} with item biases too; "
        f"{unseen_users(train, test):,} of 20,000 test ratings are by users with no training rating"
    ) in out
    assert "epoch  2: test RMSE" in out
