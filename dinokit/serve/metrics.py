"""Prometheus metrics of one server: requests, latency, batch sizes, forward time, live items.

Each app has its own registry (no process-global state), rendered by ``GET /metrics``:

- ``dinokit_requests_total{method, route, status}``
- ``dinokit_request_seconds{route}`` (histogram)
- ``dinokit_batch_size`` (histogram of images per forward; > 1 means queries shared a forward)
- ``dinokit_forward_seconds`` (histogram)
- ``dinokit_items`` (gauge: live items in the index)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The metrics of one app; ``items`` is read when scraped."""

    def __init__(self, items: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("dinokit_requests", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("dinokit_request_seconds", "Request latency in seconds", ["route"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("dinokit_batch_size", "Images per model forward", buckets=_BATCH_BUCKETS,
                                    registry=self.registry)
        self.forward = Histogram("dinokit_forward_seconds", "Seconds per model forward",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        items_gauge = Gauge("dinokit_items", "Live items in the index", registry=self.registry)
        items_gauge.set_function(lambda: float(items()))

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.forward.observe(seconds)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        series = self._series.get(key)
        if series is None:  # labels() takes a lock and builds a key: once per label set, not per request
            series = self._series[key] = (self.requests.labels(method, route, str(status)),
                                          self.latency.labels(route))
        series[0].inc()
        series[1].observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """(Prometheus text exposition, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """ASGI middleware counting every HTTP request by route template (not raw path: bounded labels)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def watched(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = int(msg["status"])
            await send(msg)

        try:
            await self.app(scope, receive, watched)
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is None:
                route = "/static" if scope.get("path", "").startswith("/static/") else "other"
            self.metrics.observe_request(scope["method"], route, status["code"], time.perf_counter() - t0)
