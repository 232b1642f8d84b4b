"""Prometheus metrics: request counts, latency histogram, index size, export version.

With several uvicorn workers, prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR,
set by `fedrec serve --workers N`) sums counters and histograms over the workers; gauges are
reported per worker (pid label), since workers can briefly serve different versions mid-reload.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REQUESTS = Counter("fedrec_requests", "HTTP requests answered", ["method", "route", "status"])
LATENCY = Histogram(
    "fedrec_request_latency_seconds",
    "Time from request to response, by route",
    ["route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
INDEX_ITEMS = Gauge("fedrec_index_items", "Items in the served FAISS index", multiprocess_mode="liveall")
EXPORT_VERSION = Gauge(
    "fedrec_export_version", "Number of the served export version (vNNNN)", multiprocess_mode="liveall"
)
RELOADS = Counter("fedrec_reloads", "Export reload attempts", ["outcome"])


def set_export(version: str, items: int) -> None:
    EXPORT_VERSION.set(int(version.lstrip("v")) if version.lstrip("v").isdigit() else -1)
    INDEX_ITEMS.set(items)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware); labels by route template, not raw
    path, so customer ids never become label values."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            # the template as the API docs show it ({item_id}, not Starlette's {item_id:path})
            template = getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched"
            REQUESTS.labels(scope["method"], template, str(status["code"])).inc()
            LATENCY.labels(template).observe(time.perf_counter() - start)
