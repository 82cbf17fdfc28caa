"""Prometheus metrics (prometheus-client), one registry per app so tests stay independent.

Served as OpenMetrics to a scraper that asks for it (`Accept: application/openmetrics-text`),
else in the Prometheus text format; without the `*_created` series prometheus-client adds
to counters and histograms (a timestamp as a value: noise in every dashboard)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector

OPENMETRICS = "application/openmetrics-text"

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


# The PostgreSQL broker's counters (server/pgbroker.py), as corral_broker_<name>_total.
BROKER_COUNTERS = {
    "notifications_sent": "NOTIFY payloads this process sent to the other Corral processes",
    "notifications_received": "NOTIFY payloads this process heard from the other processes",
    "reconnects": "Times the broker's LISTEN connection was opened again after a loss",
}


class _Counters(Collector):
    """Counters kept elsewhere (plain numbers), read at scrape time."""

    def __init__(self, prefix: str, docs: dict[str, str], read: Callable[[], dict[str, float]]):
        self._prefix, self._docs, self._read = prefix, docs, read

    def collect(self) -> Iterable[CounterMetricFamily]:
        values = self._read()
        for name, doc in self._docs.items():
            yield CounterMetricFamily(f"{self._prefix}{name}", doc, value=values.get(name, 0.0))


class _WithoutCreated:
    """A registry's metrics without their `*_created` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class Metrics:
    """Everything Corral exports on /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # CPU, memory, open files of this process
        PlatformCollector(registry=self.registry)  # python_info
        self.http_requests = Counter(
            "corral_http_requests",
            "HTTP requests answered, by method, route and status code",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "corral_http_request_seconds",
            "Time to the start of the response, by method and route",
            ["method", "route"],
            registry=self.registry,
        )
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

    def watch_broker(self, read: Callable[[], dict[str, float]]) -> None:
        """Export the PostgreSQL broker's counters (BROKER_COUNTERS) from `read`."""
        self.registry.register(_Counters("corral_broker_", BROKER_COUNTERS, read))

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition and its content type: OpenMetrics when `accept` names it."""
        source: Any = _WithoutCreated(self.registry)
        if OPENMETRICS in accept:
            # prometheus-client's OpenMetrics writer is untyped.
            body: bytes = openmetrics.generate_latest(source)  # type: ignore[no-untyped-call]
            return body, openmetrics.CONTENT_TYPE_LATEST
        return generate_latest(source), CONTENT_TYPE_LATEST


class RequestMetrics:
    """ASGI middleware: count each HTTP request by method, route (its path template, never
    the raw path: bounded labels) and status, and time it to the response's start."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), "500"
        elapsed: float | None = None

        async def send_timed(message: Any) -> None:
            nonlocal status, elapsed
            if message["type"] == "http.response.start":
                status, elapsed = str(message["status"]), time.perf_counter() - started
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            services = getattr(scope["app"].state, "services", None)
            if services is not None:
                route = getattr(scope.get("route"), "path", "unmatched")
                method = scope["method"]
                services.metrics.http_requests.labels(method, route, status).inc()
                seconds = time.perf_counter() - started if elapsed is None else elapsed
                services.metrics.http_seconds.labels(method, route).observe(seconds)
