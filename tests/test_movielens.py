"""Biased matrix factorization on MovieLens 100K, through `transform` on real processes.

The data comes from the recbole 1.2.1 wheel on PyPI (cached in data/); without
network access and without the cached file these tests are skipped, saying why.
Each accuracy test prints its figure next to the reference measured in the same run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from examples.datasets import DatasetError
from examples.mf import Hyper
from examples.movielens_mf import load_split
from examples.offline_mf import IMPLICIT_LR, IMPLICIT_REG, run_offline
from examples.online_biased_mf import run_online
from examples.references import popularity_auc, reference_offline

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
        f"global mean of the whole stream: {result.baseline_rmse:.4f}",
    )
    assert len(result.actual) == len(stream)
    assert sorted(result.actual.tolist()) == sorted(r for _, _, r in stream)
    assert result.rmse < result.baseline_rmse - 0.05


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
