"""Setting up a service process: logs, metrics endpoint, stop signals, the `listening on` line.

psserver and psworker call these from their `main()`; servers themselves are
built in psclient.rpc.serving, which neither logs nor handles signals.
"""

from __future__ import annotations

import json
import logging
import signal
import sys

from psclient.rpc.serving import BoundAioServer, BoundServer


class StopSignal:
    """Set by SIGTERM or SIGINT; polled by the main thread.

    The handler only stores a flag: taking a lock inside a signal handler (as
    Event.set or logging do) can deadlock when the signal lands while the main
    thread holds that very lock.
    """

    POLL_S = 0.1

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0  # a second signal asks a graceful stop that is taking long to end at once
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signum = signum
        self.count += 1

    def is_set(self) -> bool:
        return self.signum is not None


def announce(bound: BoundServer | BoundAioServer) -> None:
    """Print the line that launchers (and people) wait for."""
    print(f"listening on {bound.address}", flush=True)


LOG_FORMATS = ("text", "json")


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, naming the service that speaks (for log shippers)."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(name: str, level: str = "INFO", fmt: str = "text") -> logging.Logger:
    """Log to stderr as text (`time LEVEL shard 0: message`) or JSON lines; `name` says who speaks."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter(name))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {name}: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    return logging.getLogger("streamps")


def start_metrics(port: int | None, host: str) -> int | None:
    """Serve Prometheus metrics over HTTP on `port` (0 picks one); return the bound port."""
    if port is None:
        return None
    from prometheus_client import start_http_server

    server, _ = start_http_server(port, addr=host)
    bound = int(server.server_port)
    logging.getLogger("streamps").info("metrics on http://%s:%d/metrics", host, bound)
    return bound
