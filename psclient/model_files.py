"""A model as the files `psserver --load` reads: for `transform(..., model=...)`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from psclient.wire.partition import Id, check_id, shard_of
from psclient.wire.records import to_json_compatible


def write_model_files(model: Iterable[tuple[Id, Any]], num_shards: int, directory: Path) -> list[Path]:
    """Each shard's share of `model` as the JSON lines `psserver --load` reads, one file per shard."""
    paths = [directory / f"model-{shard}.jsonl" for shard in range(num_shards)]
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(path.open("w", encoding="utf-8")) for path in paths]
        for entry in model:
            try:
                param_id, value = entry
                param_id = check_id(param_id)
                line = json.dumps({"id": param_id, "value": to_json_compatible(value)})
            except (TypeError, ValueError) as exc:
                raise ValueError(f"model entry {entry!r} is not an (id, numeric value) pair: {exc}") from None
            files[shard_of(param_id, num_shards)].write(line + "\n")
    return paths
