"""The HTTP service of ``pipeline.serve``, a small package: the app (app), its settings (config),
the connections' bounds (connections), the checks before a route (limits), the worker pool (pool),
request reading (queries), what a URL may reach (urls), the metrics (metrics) and the errors every
refusal shares (errors)."""

from pipeline.service.app import Service
from pipeline.service.config import QueryLimits, ServeConfig
from pipeline.service.errors import ApiError
from pipeline.service.pool import Pool
from pipeline.service.queries import REQUEST_OPTIONS, request_config
from pipeline.service.urls import ServiceFetcher, UrlPolicy, UrlRefused

__all__ = ["ApiError", "Pool", "QueryLimits", "REQUEST_OPTIONS", "ServeConfig", "Service", "ServiceFetcher",
           "UrlPolicy", "UrlRefused", "request_config"]
