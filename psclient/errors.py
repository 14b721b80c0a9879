"""Errors the SDK raises. Each carries a one-line message meant for a person."""

from __future__ import annotations


class StreampsError(Exception):
    """Base class of every error streamps raises on purpose."""


class WireError(StreampsError, ValueError):
    """A message on the wire is malformed: bad dtype, shape, size or ids."""


class SpecError(StreampsError, ValueError):
    """An init/update spec or a `module:attr` plugin name cannot be used."""


class ShardError(StreampsError):
    """A shard is unreachable or refused a request."""


class JobFailed(StreampsError):
    """A job stopped: user code raised, a record was malformed, or a shard failed."""


class WorkerStopped(JobFailed):
    """A worker stopped on a signal (a graceful stop) takes no more records. Feeding it ends
    there; what it took still runs to the end, so a stream's job ends as stopped, not failed."""
