"""streamps SDK: the wire layer, `transform` and `connect`.

from psclient import transform, connect, Left, Right
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from psclient.cluster import Cluster, connect
    from psclient.either import Left, Right
    from psclient.errors import JobFailed, ShardError, SpecError, StreampsError, WireError
    from psclient.jobs import transform
    from psclient.local import LocalCluster
    from psclient.wire.partition import Id, shard_of

# Exported names load their module on first use, so a command that needs none of
# them (`psclient health`, a container probe run every few seconds) does not pay
# for numpy, the generated protobuf modules and the cluster code.
_EXPORTS = {
    "Cluster": "psclient.cluster",
    "connect": "psclient.cluster",
    "Left": "psclient.either",
    "Right": "psclient.either",
    "JobFailed": "psclient.errors",
    "ShardError": "psclient.errors",
    "SpecError": "psclient.errors",
    "StreampsError": "psclient.errors",
    "WireError": "psclient.errors",
    "LocalCluster": "psclient.local",
    "transform": "psclient.jobs",
    "Id": "psclient.wire.partition",
    "shard_of": "psclient.wire.partition",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'psclient' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "Cluster",
    "Id",
    "JobFailed",
    "Left",
    "LocalCluster",
    "Right",
    "ShardError",
    "SpecError",
    "StreampsError",
    "WireError",
    "connect",
    "shard_of",
    "transform",
]
