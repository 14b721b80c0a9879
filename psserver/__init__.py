"""One parameter-server shard: storage, init/update functions, server logic and the gRPC service."""

from psclient.specs import InitFn, UpdateFn, make_init, make_update
from psserver.logic import ServerHandle, ServerLogic
from psserver.store import ParameterStore

__all__ = ["InitFn", "ParameterStore", "ServerHandle", "ServerLogic", "UpdateFn", "make_init", "make_update"]
