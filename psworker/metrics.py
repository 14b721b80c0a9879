"""Prometheus metrics of a worker (served on --metrics-port), read from the runtime's counters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

# Totals since the worker started, and levels right now.
COUNTERS = {
    "records": "Records processed",
    "records_failed": "Records that failed (malformed or raised) and were skipped",
    "outputs": "Outputs emitted",
    "pulls": "Pulls issued",
    "pushes": "Pushes issued",
}
GAUGES = {
    "pulls_in_flight": "Pulls sent and not answered",
    "pulls_queued": "Pulls held back by the pull limit",
    "pushes_unacked": "Push batches not acknowledged",
    "input_queue_chunks": "Chunks of records waiting for the logic",
    "answer_queue_chunks": "Pull answers waiting for the logic",
}


class RuntimeCollector(Collector):
    """Reports the runtime's own counters at scrape time: nothing on the hot path."""

    def __init__(self, worker_index: int, read: Callable[[], dict[str, Any]]):
        self.worker = str(worker_index)
        self.read = read

    def collect(self) -> Any:
        values = self.read()
        kinds: list[tuple[type[CounterMetricFamily | GaugeMetricFamily], dict[str, str]]] = [
            (CounterMetricFamily, COUNTERS),
            (GaugeMetricFamily, GAUGES),
        ]
        for family_type, described in kinds:
            for name, text in described.items():
                family = family_type(f"streamps_worker_{name}", text, labels=["worker"])
                family.add_metric([self.worker], values[name])
                yield family


def register(worker_index: int, read: Callable[[], dict[str, Any]]) -> None:
    REGISTRY.register(RuntimeCollector(worker_index, read))
