# Kept for old imports (`from psclient.security import Security`, as README shows): the module is psclient.rpc.security.
from psclient.rpc.security import Security, configure, current

__all__ = ["Security", "configure", "current"]
