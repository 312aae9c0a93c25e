"""Prometheus metrics: request counts and latencies, jobs by status."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db.models import Job
from app.db.session import session_scope

REGISTRY = CollectorRegistry()
REQUESTS = Counter("alignd_http_requests_total", "HTTP requests", ["method", "route", "status"],
                   registry=REGISTRY)
LATENCY = Histogram("alignd_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
                    registry=REGISTRY)


class JobStatusCollector:
    def collect(self):  # noqa: ANN201 — prometheus_client protocol
        gauge = GaugeMetricFamily("alignd_jobs", "Jobs by status", labels=["status"])
        try:
            with session_scope() as session:
                rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        except Exception:  # noqa: BLE001 — a scrape must not fail because the DB is down
            rows = []
        for status, count in rows:
            gauge.add_metric([status], count)
        yield gauge


REGISTRY.register(JobStatusCollector())


class MetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            REQUESTS.labels(scope["method"], path, str(status)).inc()
            LATENCY.labels(scope["method"], path).observe(time.perf_counter() - start)
