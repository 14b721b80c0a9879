"""streamps SDK: the wire layer, `transform` and `connect`.

from psclient import transform, connect, Left, Right
"""

from psclient.cluster import Cluster, connect
from psclient.either import Left, Right
from psclient.errors import JobFailed, ShardError, SpecError, StreampsError, WireError
from psclient.local import LocalCluster, transform
from psclient.partition import Id, shard_of

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
