"""One parameter-server shard: storage, init/update functions and the gRPC service."""

from psclient.specs import InitFn, UpdateFn, make_init, make_update
from psserver.store import ParameterStore

__all__ = ["InitFn", "ParameterStore", "UpdateFn", "make_init", "make_update"]
