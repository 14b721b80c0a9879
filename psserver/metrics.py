"""Prometheus metrics of a shard (served on --metrics-port)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

# Batches of one to tens of thousands of keys: latency from 0.1 ms up to seconds.
_LATENCY_BUCKETS = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)

REQUESTS = Counter("streamps_shard_requests_total", "Pull and push requests served", ["shard", "op"])
KEYS = Counter("streamps_shard_keys_total", "Parameter keys pulled or pushed", ["shard", "op"])
BYTES = Counter("streamps_shard_bytes_total", "Value bytes sent (pull) or received (push)", ["shard", "op"])
ERRORS = Counter("streamps_shard_errors_total", "Requests rejected (bad input) or failed", ["shard", "op"])
LATENCY = Histogram(
    "streamps_shard_request_seconds", "Time to serve one request", ["shard", "op"], buckets=_LATENCY_BUCKETS
)
PARAMETERS = Gauge("streamps_shard_parameters", "Parameters held", ["shard"])
DUPLICATES = Counter("streamps_shard_duplicate_pushes_total", "Push batches at or below the watermark", ["shard"])


class OpMetrics:
    """The metrics of one operation (pull or push) of one shard."""

    def __init__(self, shard: str, op: str):
        self.latency = LATENCY.labels(shard, op)
        self.requests = REQUESTS.labels(shard, op)
        self.keys = KEYS.labels(shard, op)
        self.bytes = BYTES.labels(shard, op)
        self.errors = ERRORS.labels(shard, op)

    def observe(self, started: float, keys: int, nbytes: int) -> None:
        self.latency.observe(time.perf_counter() - started)
        self.requests.inc()
        self.keys.inc(keys)
        self.bytes.inc(nbytes)
