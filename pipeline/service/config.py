"""What the service runs with: ServeConfig and the QueryLimits on what one request may ask for."""

from __future__ import annotations

from dataclasses import dataclass, field

from delf_retrieval.corpus import inputs
from delf_retrieval.query.engine import EngineConfig
from pipeline.service.urls import UrlPolicy


@dataclass(frozen=True)
class QueryLimits:
    """The most a request may ask for: bounds on the work one query can cause."""

    top: int = 1000
    shortlist: int = 1000
    neighbours: int = 100
    nprobe: int = 256
    expand: int = 100


@dataclass(frozen=True)
class ServeConfig:
    """Everything the server runs with; ``engine.retrieval`` holds each request's defaults."""

    index: str
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 2  # queries extracted and searched at once
    max_queue: int = 8  # queries waiting for a worker; beyond, 503 with Retry-After
    max_upload_bytes: int = 20 << 20  # request bodies; larger is 413
    request_timeout: float = 30.0  # a request's whole time (body, fetch, queue, extraction, search); then 504
    reload_interval: float = 60.0  # seconds between looks at the root's pointer
    drain_timeout: float = 30.0  # on SIGTERM, the longest wait for requests in flight
    max_requests: int = 64  # requests being answered at once; beyond, 503 (idle connections do not count)
    max_connections: int = 1024  # open connections; beyond, the one idle longest is closed
    header_timeout: float = 10.0  # a connection answering no request is closed after this, unless one arrives
    keep_alive_timeout: float = 5.0  # an idle keep-alive connection is closed after this (uvicorn's)
    token: str | None = field(default=None, repr=False)  # bearer token of the API (None: no auth)
    recent_queries: int = 32  # queries whose pictures can be drawn afterwards
    pictured_matches: int = 50  # matches of a recent query kept with their inliers, for pictures
    visualize_top: int = 5  # matches drawn in a query's picture, as pipeline.search --visualize
    thumbnail_side: int = 256
    thumbnails_kept: int = 512
    engine: EngineConfig = EngineConfig()
    fetch: inputs.FetchConfig = inputs.FetchConfig()
    limits: QueryLimits = QueryLimits()
    allow_url: tuple[str, ...] = ()  # what query URLs may reach beyond public http(s) (urls.UrlPolicy)

    def __post_init__(self):
        for name in ("workers", "max_upload_bytes", "max_requests", "max_connections", "recent_queries",
                     "visualize_top", "thumbnail_side", "thumbnails_kept"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_queue < 0 or self.pictured_matches < 0:
            raise ValueError("max_queue and pictured_matches must be >= 0")
        if not (self.request_timeout > 0 and self.reload_interval > 0 and self.drain_timeout >= 0):
            raise ValueError("request_timeout and reload_interval must be > 0, drain_timeout >= 0")
        UrlPolicy(self.allow_url)  # its entries are checked now (AllowUrlError is a ValueError)
        if not (self.header_timeout > 0 and self.keep_alive_timeout > 0):
            raise ValueError("header_timeout and keep_alive_timeout must be > 0")
