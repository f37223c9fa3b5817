"""The service's Prometheus metrics: the registry, the index collector and the Observe middleware."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from delf_retrieval.query.live import LiveIndex

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})  # labels; any other is "other"
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


class Metrics:
    """The service's Prometheus metrics, in a registry of its own. ``service`` is read at each
    scrape: its pools (``queries``), ``in_flight`` and ``live``."""

    def __init__(self, service):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds
        self.requests = Counter("delf_http_requests_total", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("delf_http_request_seconds", "Seconds from a request's arrival to its answer",
                                 ["route"], buckets=STAGE_BUCKETS, registry=r)
        self.stages = Histogram("delf_query_stage_seconds", "Seconds of each stage of the queries answered",
                                ["stage"], buckets=STAGE_BUCKETS, registry=r)
        Gauge("delf_queue_depth", "Queries admitted and waiting for a worker",
              registry=r).set_function(lambda: service.queries.waiting)
        Gauge("delf_workers_busy", "Workers extracting or searching a query",
              registry=r).set_function(lambda: service.queries.running)
        Gauge("delf_http_in_flight", "HTTP requests being answered", registry=r).set_function(lambda: service.in_flight)
        r.register(_IndexCollector(service.live))


class _IndexCollector:
    """The serving version and the follower's outcomes, read from the live index at each scrape."""

    def __init__(self, live: LiveIndex):
        self.live = live

    def collect(self):
        engine = self.live.engine
        info = GaugeMetricFamily("delf_index_version_info", "The serving index version (value 1)",
                                 labels=["version", "index_id"])
        sizes = GaugeMetricFamily("delf_index_size", "Images and descriptors of the serving version", labels=["of"])
        if engine is not None:
            info.add_metric([engine.version.name, engine.version.index_id], 1)
            for of in ("images", "descriptors"):
                sizes.add_metric([of], engine.manifest["counts"][of])
        reloads = CounterMetricFamily("delf_index_reloads", "Versions opened since start: switched to, refused "
                                      "(damaged: never served), put off (storage unreachable)", labels=["outcome"])
        for outcome in ("switched", "failed", "retry"):
            reloads.add_metric([outcome], self.live.outcomes[outcome])
        yield from (info, sizes, reloads)


class Observe:
    """Pure ASGI middleware, outermost of ours: counts the requests in flight, and each answer by
    route template (never the raw path), method (one of METHODS, else "other") and status, so the
    labels stay few whatever clients send."""

    def __init__(self, app, service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        metrics = self.service.metrics
        self.service.in_flight += 1
        try:
            await self.app(scope, receive, sending)
        finally:
            self.service.in_flight -= 1
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in METHODS else "other"
            metrics.requests.labels(route, method, str(status["code"])).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)
