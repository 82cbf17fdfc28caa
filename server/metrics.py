"""Prometheus metrics (prometheus-client), one registry per app so tests stay independent."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class _Callback(Collector):
    """A gauge family computed at scrape time (e.g. commands by status, from the database)."""

    def __init__(self, name: str, doc: str, label: str, read: Callable[[], dict[str, float]]):
        self._name, self._doc, self._label, self._read = name, doc, label, read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(self._name, self._doc, labels=[self._label])
        for key, value in sorted(self._read().items()):
            family.add_metric([key], value)
        yield family


class Metrics:
    """Everything Corral exports on /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.running = Gauge(
            "corral_commands_running", "Commands running on this runner now", registry=self.registry
        )
        self.queue_wait = Histogram(
            "corral_command_queue_wait_seconds",
            "From queued (or due for retry) to started, per attempt",
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.run_time = Histogram(
            "corral_command_run_seconds",
            "Run time of one attempt",
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.attempts = Counter(
            "corral_command_attempts",
            "Attempts finished, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.log_lines = Counter(
            "corral_log_lines_ingested", "Log lines stored", registry=self.registry
        )
        self.subscribers = Gauge(
            "corral_subscribers_connected",
            "Live log/status subscribers (GraphQL subscriptions and SSE)",
            registry=self.registry,
        )
        self.status_counts: dict[str, float] = {}

    def watch_status_counts(self, read: Callable[[], dict[str, float]]) -> None:
        """Export `corral_commands{status=...}` from `read` (a cached database count)."""
        self.registry.register(_Callback("corral_commands", "Commands by status", "status", read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
