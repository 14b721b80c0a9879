"""Sketches over a text stream, push-only: a count-min sketch and a Bloom filter.

Both sketches keep their cells on the shards, one int parameter per cell, and
the workers only ever push: a word's cells are computed locally from stable
hash functions, and the worker pushes 1 to each of them.

- Count-min sketch (Cormode and Muthukrishnan 2005): `depth` rows of `width`
  counters; row `r` hashes a word to one column `c`, and the cell is the
  parameter `r * width + c` (init `const:0`, update `add`). A word's count is
  estimated as the minimum over its `depth` cells: never below the true count,
  and above it by at most `e / width` times the stream length with probability
  at least `1 - exp(-depth)`.
- Bloom filter (Bloom 1970): `bits` cells, `hashes` hash functions; a word sets
  its bits to 1 (init `const:0`, update `max`). A word is "maybe present" when
  all its bits are set: no false negatives, and false positives at a rate near
  `(1 - exp(-hashes * n / bits)) ** hashes` after `n` distinct words.

The hash functions are keyed BLAKE2b digests (`hash_values`), the same in every
process and on every machine (never Python's salted `hash`). The in-memory
classes `CountMinSketch` and `BloomFilter` compute the same cells, so a sketch
built locally is the reference a distributed one must equal, cell for cell;
`CountMinSketch.from_model` and `BloomFilter.from_model` rebuild a sketch from
the final model of a job (its `Right` stream) for queries.

As a script, it sketches a text file (or a small built-in text) on 2 workers
and 2 shards, checks both sketches against the local reference and prints a
few estimates:

    python examples/sketches.py [FILE] [--query WORD ...]
    python examples/sketches.py README.md

As worker plugins, one line per record (sizes from STREAMPS_SKETCH_* variables:
DEPTH, WIDTH, BITS, HASHES, SEED; defaults below):

    psserver --init const:0 --update add ...
    psworker --logic examples.sketches:CountMinLogic --format lines --input FILE ...
    psserver --init const:0 --update max ...
    psworker --logic examples.sketches:BloomLogic --format lines --input FILE ...
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.settings import env
from examples.wordcount import SAMPLE_TEXT, words
from psclient import Right, transform
from psworker import ParameterServerClient, WorkerLogic

# eps = e / 272 ~ 1% of the stream length, delta = exp(-5) ~ 0.7%.
DEFAULT_DEPTH = 5
DEFAULT_WIDTH = 272
# About 2% false positives after 1,000 distinct words, 0.1% after 400.
DEFAULT_BITS = 8192
DEFAULT_HASHES = 4
DEFAULT_SEED = 0

_DIGEST_BYTES = 64  # BLAKE2b's largest digest: 8 values of 64 bits per call
_VALUES_PER_DIGEST = _DIGEST_BYTES // 8

Summary = dict[str, int]
Client = ParameterServerClient[int, Summary]


def hash_values(item: str, count: int, seed: int = DEFAULT_SEED) -> list[int]:
    """`count` independent 64-bit hashes of `item`, stable across processes and machines.

    Value `i` is the `i % 8`-th little-endian 64-bit word of BLAKE2b(item), keyed
    by `seed` and personalized by the block number `i // 8`.
    """
    data = item.encode("utf-8")
    key = int(seed).to_bytes(16, "little", signed=True)
    values: list[int] = []
    for block in range(-(-count // _VALUES_PER_DIGEST)):
        digest = hashlib.blake2b(data, digest_size=_DIGEST_BYTES, key=key, person=block.to_bytes(16, "little")).digest()
        values.extend(int.from_bytes(digest[i : i + 8], "little") for i in range(0, _DIGEST_BYTES, 8))
    return values[:count]


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


# -- the in-memory sketches: the hash functions, and the reference ---------------------------------


class CountMinSketch:
    """A count-min sketch in memory: `depth` x `width` int64 counters."""

    def __init__(self, depth: int = DEFAULT_DEPTH, width: int = DEFAULT_WIDTH, seed: int = DEFAULT_SEED):
        self.depth = _positive("depth", depth)
        self.width = _positive("width", width)
        self.seed = seed
        self.table = np.zeros((depth, width), dtype=np.int64)

    @classmethod
    def for_error(cls, eps: float, delta: float, seed: int = DEFAULT_SEED) -> CountMinSketch:
        """The smallest sketch whose estimates exceed the truth by at most eps * N with probability 1 - delta."""
        return cls(math.ceil(math.log(1.0 / delta)), math.ceil(math.e / eps), seed)

    def cells(self, word: str) -> list[int]:
        """The parameter ids of `word`'s cells: `row * width + column`, one per row."""
        width = self.width
        return [row * width + value % width for row, value in enumerate(hash_values(word, self.depth, self.seed))]

    def add(self, word: str, count: int = 1) -> None:
        flat = self.table.reshape(-1)
        for cell in self.cells(word):
            flat[cell] += count

    def update(self, stream: Iterable[str]) -> CountMinSketch:
        for word in stream:
            self.add(word)
        return self

    def estimate(self, word: str) -> int:
        """The count-min estimate: the smallest of `word`'s cells (>= its true count)."""
        flat = self.table.reshape(-1)
        return int(min(flat[cell] for cell in self.cells(word)))

    def error_bound(self) -> float:
        """eps * N: the overestimate that holds with probability 1 - exp(-depth)."""
        return math.e / self.width * self.total()

    def total(self) -> int:
        """The stream length N: every row's counters add up to it."""
        return int(self.table[0].sum())

    @classmethod
    def from_model(
        cls, model: Iterable[tuple[Any, Any]], depth: int, width: int, seed: int = DEFAULT_SEED
    ) -> CountMinSketch:
        """The sketch held by a job's final model (`(id, value)` pairs; absent cells are 0)."""
        sketch = cls(depth, width, seed)
        flat = sketch.table.reshape(-1)
        for param_id, value in model:
            if not isinstance(param_id, int) or not 0 <= param_id < depth * width:
                raise ValueError(f"parameter {param_id!r} is not a cell of a {depth} x {width} count-min sketch")
            flat[param_id] = int(value)
        return sketch


class BloomFilter:
    """A Bloom filter in memory: `bits` cells of 0 or 1, `hashes` hash functions."""

    def __init__(self, bits: int = DEFAULT_BITS, hashes: int = DEFAULT_HASHES, seed: int = DEFAULT_SEED):
        self.bits, self.hashes = _positive("bits", bits), _positive("hashes", hashes)
        self.seed = seed
        self.array = np.zeros(bits, dtype=np.uint8)

    @classmethod
    def for_capacity(cls, items: int, fp_rate: float, seed: int = DEFAULT_SEED) -> BloomFilter:
        """The optimal filter for `items` distinct words at a false-positive rate `fp_rate`."""
        bits = math.ceil(-items * math.log(fp_rate) / math.log(2) ** 2)
        return cls(max(1, bits), max(1, round(bits / max(items, 1) * math.log(2))), seed)

    def cells(self, word: str) -> list[int]:
        """The parameter ids of `word`'s bits (one per hash function; they may repeat)."""
        bits = self.bits
        # A different key than the count-min sketch's, so the two sketches' hashes are unrelated.
        return [value % bits for value in hash_values(word, self.hashes, self.seed + 1)]

    def add(self, word: str) -> None:
        self.array[self.cells(word)] = 1

    def update(self, stream: Iterable[str]) -> BloomFilter:
        for word in stream:
            self.add(word)
        return self

    def __contains__(self, word: str) -> bool:
        """True when `word` may have been added; False only when it surely was not."""
        return bool(self.array[self.cells(word)].all())

    def expected_fp_rate(self, items: int) -> float:
        return (1.0 - math.exp(-self.hashes * items / self.bits)) ** self.hashes

    def fill(self) -> float:
        """The fraction of bits set."""
        return float(self.array.mean())

    @classmethod
    def from_model(
        cls, model: Iterable[tuple[Any, Any]], bits: int, hashes: int, seed: int = DEFAULT_SEED
    ) -> BloomFilter:
        """The filter held by a job's final model (`(id, value)` pairs; absent bits are 0)."""
        bloom = cls(bits, hashes, seed)
        for param_id, value in model:
            if not isinstance(param_id, int) or not 0 <= param_id < bits or value not in (0, 1):
                raise ValueError(f"({param_id!r}, {value!r}) is not a bit of a {bits}-bit Bloom filter")
            bloom.array[param_id] = int(value)
        return bloom


# -- the worker logics ------------------------------------------------------------------------------


class _SketchLogic(WorkerLogic[str, int, Summary]):
    """Push 1 to every cell of every word of each line; one summary per worker at the end."""

    init = "const:0"  # every cell starts at 0

    def __init__(self, sketch: CountMinSketch | BloomFilter, update: str):
        self.sketch = sketch
        self.update = update  # how the shards fold the 1s pushed to a cell
        self.lines = 0
        self.words = 0

    def on_recv(self, data: str, ps: Client) -> None:
        self.lines += 1
        cells = self.sketch.cells
        for word in words(data):
            self.words += 1
            for cell in cells(word):
                ps.push(cell, 1)

    def on_pull_recv(self, param_id: Any, param_value: int, ps: Client) -> None:
        raise AssertionError("a sketch never pulls")

    def on_input_end(self, ps: Client) -> None:
        ps.output({"worker": ps.worker_index, "lines": self.lines, "words": self.words})


def _setting(value: int | None, name: str, default: int = DEFAULT_SEED) -> int:
    """An argument given, else STREAMPS_SKETCH_<NAME>, else the default."""
    return value if value is not None else env("SKETCH", name, int, default)


class CountMinLogic(_SketchLogic):
    """Count-min sketch cells as parameters: init `const:0`, update `add`."""

    def __init__(self, depth: int | None = None, width: int | None = None, seed: int | None = None):
        depth, width = _setting(depth, "DEPTH", DEFAULT_DEPTH), _setting(width, "WIDTH", DEFAULT_WIDTH)
        super().__init__(CountMinSketch(depth, width, _setting(seed, "SEED")), "add")


class BloomLogic(_SketchLogic):
    """Bloom filter bits as parameters: init `const:0`, update `max` (a bit, once set, stays set)."""

    def __init__(self, bits: int | None = None, hashes: int | None = None, seed: int | None = None):
        bits, hashes = _setting(bits, "BITS", DEFAULT_BITS), _setting(hashes, "HASHES", DEFAULT_HASHES)
        super().__init__(BloomFilter(bits, hashes, _setting(seed, "SEED")), "max")


# -- the driver -------------------------------------------------------------------------------------


def build(lines: Iterable[str], logic: _SketchLogic, workers: int = 2, shards: int = 2) -> Any:
    """`logic`'s sketch of the words of `lines`, built on an embedded cluster (a CountMinSketch or a BloomFilter)."""
    transformed = transform(lines, logic, logic.init, logic.update, worker_parallelism=workers, ps_parallelism=shards)
    model = [item.value for item in transformed if isinstance(item, Right)]
    sketch = logic.sketch
    if isinstance(sketch, CountMinSketch):
        return CountMinSketch.from_model(model, sketch.depth, sketch.width, sketch.seed)
    return BloomFilter.from_model(model, sketch.bits, sketch.hashes, sketch.seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Count-min sketch and Bloom filter of a text, on streamps.")
    parser.add_argument("file", nargs="?", help="a text file (default: a small built-in text)")
    parser.add_argument("--query", action="append", default=[], help="a word to look up (repeatable)")
    parser.add_argument("--depth", type=int, default=DEFAULT_DEPTH, help="count-min rows")
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH, help="count-min columns")
    parser.add_argument("--bits", type=int, default=DEFAULT_BITS, help="Bloom filter bits")
    parser.add_argument("--hashes", type=int, default=DEFAULT_HASHES, help="Bloom filter hash functions")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="keys the hash functions")
    parser.add_argument("--top", type=int, default=5, help="how many of the most common words to show")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args(argv)

    text = Path(args.file).read_text(encoding="utf-8") if args.file else SAMPLE_TEXT
    lines = text.splitlines()
    stream = [word for line in lines for word in words(line)]
    truth = Counter(stream)
    print(f"{len(stream):,} words, {len(truth):,} distinct; {args.workers} workers x {args.shards} shards", flush=True)

    cms = build(lines, CountMinLogic(args.depth, args.width, args.seed), args.workers, args.shards)
    reference = CountMinSketch(args.depth, args.width, args.seed).update(stream)
    same = np.array_equal(cms.table, reference.table)
    over = [cms.estimate(word) - count for word, count in truth.items()]
    print(
        f"count-min {args.depth} x {args.width}: {'equals' if same else 'DIFFERS FROM'} the local reference; "
        f"overestimates {sum(o > 0 for o in over)} of {len(truth)} words, at most by {max(over, default=0)} "
        f"(bound e/width * N = {cms.error_bound():.1f})"
    )

    bloom = build(lines, BloomLogic(args.bits, args.hashes, args.seed), args.workers, args.shards)
    reference_bloom = BloomFilter(args.bits, args.hashes, args.seed).update(stream)
    same = np.array_equal(bloom.array, reference_bloom.array)
    missed = sum(word not in bloom for word in truth)
    probes = [f"{word}#{i}" for i, word in enumerate(sorted(truth))]  # words that never occur
    false_positives = sum(probe in bloom for probe in probes)
    print(
        f"Bloom filter {args.bits} bits x {args.hashes} hashes: {'equals' if same else 'DIFFERS FROM'} the local "
        f"reference; {bloom.fill():.1%} of bits set; {missed} false negatives; "
        f"{false_positives} of {len(probes)} absent words look present "
        f"(expected rate {bloom.expected_fp_rate(len(truth)):.2%})"
    )

    queries = args.query or [word for word, _ in sorted(truth.items(), key=lambda wc: (-wc[1], wc[0]))[: args.top]]
    print(f"{'word':>16}  {'true':>6}  {'count-min':>9}  in Bloom filter")
    for word in queries:
        key = word.lower()
        print(f"{word:>16}  {truth[key]:6d}  {cms.estimate(key):9d}  {'maybe' if key in bloom else 'no'}")


if __name__ == "__main__":
    main()
