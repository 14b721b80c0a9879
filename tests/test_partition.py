"""The partitioner: ids to shards and keys to workers, the same in every process."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import child_env

from psclient.wire.partition import check_id, key_bucket, shard_of, shards_of_ints, split_by_shard


@pytest.mark.parametrize(
    ("param_id", "shards", "expected"),
    [(0, 3, 0), (7, 3, 1), (-1, 3, 2), (-3, 3, 0), (-4, 3, 2), (2**63 - 1, 10, 7), (-(2**63), 10, 2), (-5, 1, 0)],
)
def test_int_ids_use_the_non_negative_modulo(param_id: int, shards: int, expected: int) -> None:
    assert shard_of(param_id, shards) == expected


def test_vectorized_int_rule_agrees_with_the_scalar_rule() -> None:
    ids = np.array([-(2**63), -7, -1, 0, 1, 5, 2**63 - 1], dtype=np.int64)

    shards = shards_of_ints(ids, 4)

    assert shards.tolist() == [shard_of(int(i), 4) for i in ids] == [0, 1, 3, 0, 1, 1, 3]


def test_str_ids_use_crc32_of_utf8_bytes() -> None:
    # crc32(b"hello") == 0x3610A686: a shard count above it shows the hash itself.
    assert shard_of("hello", 2**32) == 907_060_870
    assert shard_of("hello", 7) == 2
    assert shard_of("héllo wörld", 2**32) == 354_246_585
    assert shard_of("", 5) == 0


def test_str_rule_is_the_same_in_processes_with_other_hash_seeds() -> None:
    ids = ["alpha", "beta", "gamma", "ünïcode", "w1-7", "s42"]
    code = "import json, sys; from psclient.wire.partition import shard_of; print(json.dumps([shard_of(i, 13) for i in json.loads(sys.argv[1])]))"  # noqa: E501

    answers = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", code, json.dumps(ids)],
                env=child_env(PYTHONHASHSEED=str(seed)), capture_output=True, text=True, check=True, timeout=60,
            ).stdout
        )
        for seed in (1, 2)
    ]  # fmt: skip

    assert answers[0] == answers[1] == [shard_of(i, 13) for i in ids]


def test_split_by_shard_keeps_order_within_each_shard() -> None:
    ids = [4, "hello", -1, 7, 2, "hello", 0]

    positions = split_by_shard(ids, 3)

    assert positions == [[6], [0, 1, 3, 5], [2, 4]]
    for shard, shard_positions in enumerate(positions):
        assert all(shard_of(ids[p], 3) == shard for p in shard_positions)


@pytest.mark.parametrize("param_id", [0, -1, 2**63 - 1, -(2**63), np.int64(5), np.uint8(3), "x", ""])
def test_check_id_accepts_int64_and_str(param_id: object) -> None:
    checked = check_id(param_id)

    assert checked == param_id
    assert type(checked) in (int, str)


@pytest.mark.parametrize(
    ("param_id", "error"), [(True, TypeError), (1.0, TypeError), (None, TypeError), (b"x", TypeError),
                            (2**63, ValueError), (-(2**63) - 1, ValueError)],
)  # fmt: skip
def test_check_id_rejects_other_ids(param_id: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        check_id(param_id)


def test_key_bucket_follows_the_id_rule_and_is_stable_for_plain_data() -> None:
    assert key_bucket("hello", 7) == shard_of("hello", 7)
    assert key_bucket(-4, 3) == 2
    assert key_bucket(("a", 1), 4) == 0
    assert key_bucket(("a", 1), 1_000_003) == 650_815
    with pytest.raises(TypeError, match="partition key"):
        key_bucket(object(), 3)
