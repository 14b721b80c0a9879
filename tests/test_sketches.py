"""Sketches over real text (the repo's README), on 2 workers x 2 shards: exact against the local reference."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `examples` is a directory of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

from examples.sketches import (  # noqa: E402
    BloomFilter,
    BloomLogic,
    CountMinLogic,
    CountMinSketch,
    hash_values,
)
from examples.wordcount import words  # noqa: E402
from psclient import Left, Right, transform  # noqa: E402

WORKERS = 2
SHARDS = 2
# Small on purpose: the README has about 900 distinct words, so cells collide a lot
# (count-min overestimates, Bloom false positives) and the exactness means something.
DEPTH, WIDTH = 4, 128
BITS, HASHES = 2048, 3
SEED = 7


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return (ROOT / "README.md").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def stream(lines: list[str]) -> list[str]:
    return [word for line in lines for word in words(line)]


def run(lines: list[str], logic: CountMinLogic | BloomLogic) -> tuple[list[dict[str, int]], list[tuple[object, int]]]:
    items = list(transform(lines, logic, logic.init, logic.update, WORKERS, SHARDS))
    kinds = [type(item) for item in items]
    first_right = kinds.index(Right) if Right in kinds else len(kinds)
    assert Left not in kinds[first_right:], "a Left arrived after the first Right"
    outputs = [item.value for item in items[:first_right]]
    model = [item.value for item in items[first_right:]]
    ids = [param_id for param_id, _ in model]
    assert len(ids) == len(set(ids)), "a cell appears twice in the Right stream"
    assert all(type(value) is int for _, value in model)
    return outputs, model


def check_summaries(outputs: list[dict[str, int]], lines: list[str], stream: list[str]) -> None:
    assert sorted(summary["worker"] for summary in outputs) == list(range(WORKERS))
    assert sum(summary["lines"] for summary in outputs) == len(lines)
    assert sum(summary["words"] for summary in outputs) == len(stream)


def test_hashes_are_stable_keyed_and_independent() -> None:
    # Fixed values: the cells of a word must not change between processes, runs or versions.
    assert hash_values("parameter", 3, 0) == [11521315427518053798, 11218555828271134580, 17756843444452078374]
    assert hash_values("parameter", 10, 0)[:3] == hash_values("parameter", 3, 0)
    assert len(set(hash_values("parameter", 20, 0))) == 20  # a second digest block for values 8..15
    assert hash_values("parameter", 3, 1) != hash_values("parameter", 3, 0)
    assert CountMinSketch(4, 128, 0).cells("parameter") == [38, 244, 294, 391]
    assert BloomFilter(2048, 3, 0).cells("parameter") == [1109, 633, 1232]
    assert all(row * 128 <= cell < (row + 1) * 128 for row, cell in enumerate(CountMinSketch(4, 128).cells("x")))


def test_sizing_helpers() -> None:
    cms = CountMinSketch.for_error(eps=0.01, delta=0.01)
    assert (cms.depth, cms.width) == (5, 272)
    bloom = BloomFilter.for_capacity(1000, 0.01)
    assert (bloom.bits, bloom.hashes) == (9586, 7)
    assert bloom.expected_fp_rate(1000) == pytest.approx(0.01, rel=0.05)
    with pytest.raises(ValueError, match="width"):
        CountMinSketch(3, 0)
    with pytest.raises(ValueError, match="not a cell"):
        CountMinSketch.from_model([(4 * 128, 1)], 4, 128)
    with pytest.raises(ValueError, match="not a bit"):
        BloomFilter.from_model([(0, 2)], 16, 2)


@pytest.mark.timeout(120)
def test_count_min_sketch_equals_the_local_reference(lines: list[str], stream: list[str]) -> None:
    outputs, model = run(lines, CountMinLogic(DEPTH, WIDTH, SEED))
    check_summaries(outputs, lines, stream)

    sketch = CountMinSketch.from_model(model, DEPTH, WIDTH, SEED)
    reference = CountMinSketch(DEPTH, WIDTH, SEED).update(stream)
    np.testing.assert_array_equal(sketch.table, reference.table)
    assert {param_id for param_id, _ in model} == set(np.flatnonzero(reference.table).tolist())
    assert (sketch.table.sum(axis=1) == len(stream)).all()  # every row counts every word once

    truth = Counter(stream)
    over = np.array([sketch.estimate(word) - count for word, count in truth.items()])
    assert (over >= 0).all(), "a count-min estimate fell below the true count"
    assert (over > 0).any(), "no collision at all: the test sketch is too wide to mean anything"
    # The guarantee: over <= e/width * N with probability >= 1 - exp(-depth) (98% here) per word.
    assert np.mean(over <= sketch.error_bound()) >= 0.95


@pytest.mark.timeout(120)
def test_bloom_filter_equals_the_local_reference(lines: list[str], stream: list[str]) -> None:
    outputs, model = run(lines, BloomLogic(BITS, HASHES, SEED))
    check_summaries(outputs, lines, stream)

    bloom = BloomFilter.from_model(model, BITS, HASHES, SEED)
    reference = BloomFilter(BITS, HASHES, SEED).update(stream)
    np.testing.assert_array_equal(bloom.array, reference.array)
    assert all(value == 1 for _, value in model)  # only set bits exist: pushes of 1 under `max`

    truth = set(stream)
    assert all(word in bloom for word in truth), "a Bloom filter false negative"
    probes = [f"{word}~{i}" for i, word in enumerate(sorted(truth))]  # never in the text
    fp_rate = float(np.mean([probe in bloom for probe in probes]))
    expected = bloom.expected_fp_rate(len(truth))
    assert 0.0 < fp_rate < 2 * expected + 0.02, (fp_rate, expected)
