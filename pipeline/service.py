"""The HTTP service of ``pipeline.serve``: a Starlette app, thin over the query engine (the search
API, image records, thumbnails and pictures, health, Prometheus metrics, the web page), with bounded
workers and queue, capped bodies, a deadline per request, bearer-token auth, and draining."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import io
import json
import logging
import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from delf_retrieval.corpus import images, inputs
from delf_retrieval.extraction.visualize import attention_overlay, query_picture
from delf_retrieval.query.engine import Deadline, DeadlineExceeded, EngineConfig
from delf_retrieval.query.live import LiveIndex
from delf_retrieval.query.retrieval import RetrievalConfig

log = logging.getLogger("pipeline.serve")

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")
# Options a request may set, as RetrievalConfig names them (its defaults are the server's flags).
REQUEST_OPTIONS = ("top", "rank_by", "vote_weight", "shortlist", "neighbours", "nprobe", "max_distance",
                   "min_inliers", "residual_threshold", "expand", "expand_min_inliers", "seed")
OPEN_PATHS = ("/", "/healthz")  # never behind the token: the page holds no data, liveness is for probes
DRAINING_PATHS = ("/healthz", "/readyz", "/metrics")  # still answered while draining (readyz: 503, not ready)
URL_SCHEMES = ("http://", "https://", "gs://")
PICTURE_SIDE = 1024  # the long side a recent query is kept at, for its pictures
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
# The HTTP status of each typed input error (images.ImageError.reason, inputs.FetchError.reason).
STATUS_OF_REASON = {"too_large": 413, "unsupported": 415, "fetch_failed": 422}


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
    max_connections: int = 64  # connections and requests at once (uvicorn answers 503 beyond)
    token: str | None = field(default=None, repr=False)  # bearer token of the API (None: no auth)
    recent_queries: int = 32  # queries whose pictures can be drawn afterwards
    pictured_matches: int = 50  # matches of a recent query kept with their inliers, for pictures
    visualize_top: int = 5  # matches drawn in a query's picture, as pipeline.search --visualize
    thumbnail_side: int = 256
    thumbnails_kept: int = 512
    engine: EngineConfig = EngineConfig()
    fetch: inputs.FetchConfig = inputs.FetchConfig()
    limits: QueryLimits = QueryLimits()

    def __post_init__(self):
        for name in ("workers", "max_upload_bytes", "max_connections", "recent_queries", "visualize_top",
                     "thumbnail_side", "thumbnails_kept"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_queue < 0 or self.pictured_matches < 0:
            raise ValueError("max_queue and pictured_matches must be >= 0")
        if not (self.request_timeout > 0 and self.reload_interval > 0 and self.drain_timeout >= 0):
            raise ValueError("request_timeout and reload_interval must be > 0, drain_timeout >= 0")


class ApiError(Exception):
    """An answer other than 200: its status, a short stable code and a sentence."""

    def __init__(self, status: int, error: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


class BodyTooLarge(Exception):
    pass


def error_response(status: int, error: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def busy(error: str, detail: str, retry_after: int = 1) -> ApiError:
    return ApiError(503, error, detail, {"Retry-After": str(retry_after)})


def _retrieve(future) -> None:
    if not future.cancelled():
        future.exception()


class Pool:
    """``workers`` threads and a queue of at most ``max_queue`` jobs in front of them: a job that
    finds the queue full is refused (QueueFull) rather than kept. A job whose request passed its
    deadline while queued never starts; a running one stops at its next deadline check, and
    holds its worker until then."""

    class QueueFull(Exception):
        pass

    def __init__(self, name: str, workers: int, max_queue: int):
        self.name, self.workers, self.max_queue = name, workers, max_queue
        self.waiting = 0
        self.running = 0
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=name)

    def _forget_if_cancelled(self, future) -> None:
        if future.cancelled():
            with self._lock:
                self.waiting -= 1

    async def run(self, job, deadline: Deadline):
        """``job(queued_seconds)`` on a worker; DeadlineExceeded when the deadline passes first."""
        with self._lock:
            if self.waiting + self.running >= self.workers + self.max_queue:
                raise Pool.QueueFull(f"{self.running} {self.name} jobs running and {self.waiting} waiting")
            self.waiting += 1
        queued = time.perf_counter()

        def work():
            with self._lock:
                self.waiting -= 1
                self.running += 1
            try:
                deadline.check("queued")
                return job(time.perf_counter() - queued)
            finally:
                with self._lock:
                    self.running -= 1

        future = self._executor.submit(work)
        future.add_done_callback(self._forget_if_cancelled)
        result = asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(asyncio.shield(result), max(deadline.remaining(), 0))
        except TimeoutError:
            result.add_done_callback(_retrieve)  # its late outcome is nobody's: not "never retrieved"
            stage = "queued" if future.cancel() else "running"
            raise DeadlineExceeded(stage, deadline.seconds) from None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


@dataclass
class RecentQuery:
    """What a recent query's pictures need: the query (at most PICTURE_SIDE px), its first matches
    with their inliers in that picture's pixels, and the network that extracted it."""

    image: np.ndarray
    matches: list
    extractor: object
    version: str
    score_map: np.ndarray | None = None


class Recent:
    """The last ``size`` entries by key, oldest dropped first."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get(self, key):
        with self._lock:
            return self._items.get(key)


class Metrics:
    """The service's Prometheus metrics, in a registry of its own."""

    def __init__(self, service: "Service"):
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


def _option_value(name: str, value, default, from_form: bool):
    """A request option as the type of its default; form fields arrive as text, JSON values typed."""
    kind = type(default)
    if from_form:
        try:
            value = kind(value)
        except ValueError:
            raise ApiError(400, "bad_option", f"{name} must be {kind.__name__}, not {value!r}") from None
    elif isinstance(value, bool) or not (isinstance(value, kind) or (kind is float and isinstance(value, int))):
        raise ApiError(400, "bad_option", f"{name} must be {kind.__name__}, not {json.dumps(value)}")
    if kind is float and not math.isfinite(value):
        raise ApiError(400, "bad_option", f"{name} must be finite")
    return float(value) if kind is float else value


def request_config(options: dict, defaults: RetrievalConfig, limits: QueryLimits, from_form: bool) -> RetrievalConfig:
    """The RetrievalConfig of a request: the server's defaults with the request's options."""
    changes = {}
    for name, value in options.items():
        if name not in REQUEST_OPTIONS:
            raise ApiError(400, "bad_option", f"unknown option {name!r} (options: {', '.join(REQUEST_OPTIONS)})")
        value = _option_value(name, value, getattr(defaults, name), from_form)
        limit = getattr(limits, name, None)
        if limit is not None and value > limit:
            raise ApiError(400, "bad_option", f"{name} may be at most {limit}")
        changes[name] = value
    try:
        return dataclasses.replace(defaults, **changes)
    except ValueError as e:
        raise ApiError(400, "bad_option", str(e)) from None


def _scaled(match, factor: float):
    return dataclasses.replace(match, query_points=match.query_points * factor)


def png(picture: Image.Image) -> bytes:
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


class Observe:
    """Pure ASGI middleware, outermost of ours: counts the requests in flight, and each answer by
    route template (never the raw path: labels stay few) and status."""

    def __init__(self, app, service: "Service"):
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
            metrics.requests.labels(route, scope["method"], str(status["code"])).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)


class Guard:
    """Pure ASGI middleware: draining (503), the bearer token (401) and the body cap (413: by
    Content-Length at once, else as soon as the bytes received pass it)."""

    def __init__(self, app, service: "Service"):
        self.app, self.service = app, service
        self.max_bytes = service.config.max_upload_bytes
        self.token = service.config.token.encode() if service.config.token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], dict(scope["headers"])
        response = None
        if self.service.draining and path not in DRAINING_PATHS:
            response = error_response(503, "shutting_down", "the server is shutting down",
                                      {"Retry-After": "5", "Connection": "close"})
        elif self.token is not None and path not in OPEN_PATHS and not self._authorised(headers):
            response = error_response(401, "unauthorized", "a valid bearer token is required",
                                      {"WWW-Authenticate": "Bearer"})
        else:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                response = error_response(413, "too_large", f"the request body exceeds {self.max_bytes} bytes")
        if response is not None:
            return await response(scope, receive, send)
        received = 0

        async def capped():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return message

        await self.app(scope, capped, send)

    def _authorised(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"")
        return given.startswith(b"Bearer ") and hmac.compare_digest(given[7:].strip(), self.token)


class Service:
    """The app and what it serves from: the live index, the pools, the recent queries, the metrics."""

    def __init__(self, config: ServeConfig, live: LiveIndex | None = None):
        self.config = config
        self.queries = Pool("query", config.workers, config.max_queue)
        # Thumbnails: light work, on a pool of their own so a page's grid never waits behind queries.
        self.light = Pool("thumbnail", 2, 32)
        self.recent = Recent(config.recent_queries)
        self.thumbnails = Recent(config.thumbnails_kept)
        self.fetcher = inputs.Fetcher(config.fetch)
        self.in_flight = 0
        self.draining = False
        self.started = time.time()
        self.owns_live = live is None  # a live index handed in is started and stopped by its owner
        self.live = live or LiveIndex(config.index, config.engine, config.reload_interval)
        self.metrics = Metrics(self)
        with open(PAGE, encoding="utf-8") as f:
            self.page = f.read()
        self.app = self._build_app()

    # -- the version ------------------------------------------------------------------------

    def engine(self):
        engine = self.live.engine
        if engine is None:
            raise busy("not_ready", "the index is not loaded yet" + (f" ({self.live.last_error})"
                                                                      if self.live.last_error else ""), 5)
        return engine

    # -- draining ---------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """From now on every request but DRAINING_PATHS is answered 503 (and /readyz: not ready);
        those in flight finish."""
        self.draining = True
        log.info("draining: %d requests in flight, new ones get 503", self.in_flight)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (True), or ``timeout`` s (False)."""
        end = time.monotonic() + timeout
        while self.in_flight > 0 and time.monotonic() < end:
            time.sleep(0.05)
        return self.in_flight == 0

    # -- routes -----------------------------------------------------------------------------

    async def page_route(self, request: Request):
        return HTMLResponse(self.page, headers={"Cache-Control": "no-cache"})

    async def healthz(self, request: Request):
        return JSONResponse({"alive": True, "uptime": time.time() - self.started})

    async def readyz(self, request: Request):
        engine = self.live.engine
        if self.draining:
            return JSONResponse({"ready": False, "reason": "shutting down"}, status_code=503)
        if engine is None:
            return JSONResponse({"ready": False, "reason": self.live.last_error or "loading the model and the index"},
                                status_code=503)
        return JSONResponse({"ready": True, **engine.info(), "last_error": self.live.last_error,
                             "workers": self.config.workers, "max_queue": self.config.max_queue})

    async def metrics_route(self, request: Request):
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _read_query(self, request: Request, deadline: Deadline) -> tuple[dict, bytes | None, str | None, str]:
        """(options, uploaded bytes or None, url or None, the query's name) of a search request."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if content_type == "multipart/form-data":
                form = await asyncio.wait_for(request.form(max_files=1, max_fields=len(REQUEST_OPTIONS) + 1),
                                              deadline.remaining())
                upload = form.get("image")
                if not isinstance(upload, UploadFile):
                    raise ApiError(400, "no_image", "a multipart search needs an 'image' file field")
                options = {k: v for k, v in form.multi_items() if k != "image"}
                if any(not isinstance(v, str) for v in options.values()):
                    raise ApiError(400, "bad_option", "only the 'image' field may be a file")
                return options, await upload.read(), None, (upload.filename or "upload")[:200]
            if content_type == "application/json":
                try:
                    body = json.loads(await asyncio.wait_for(request.body(), deadline.remaining()))
                except ValueError as e:
                    raise ApiError(400, "bad_json", f"the body is not JSON: {e}") from None
                if not isinstance(body, dict) or not isinstance(body.get("url"), str):
                    raise ApiError(400, "no_image", "a JSON search needs {\"url\": \"http(s):// or gs:// ...\"}")
                url = body.pop("url")
                if not url.startswith(URL_SCHEMES):
                    raise ApiError(400, "bad_url", "the url must be http://, https:// or gs://")
                return body, None, url, url
        except TimeoutError:
            raise DeadlineExceeded("reading the request", deadline.seconds) from None
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data with an 'image' file, or "
                                                      "application/json with a 'url'")

    def _answer(self, engine, config, data, url, name, query_id, deadline, queued):
        """A query on a worker: read (URL) or take the bytes, decode, extract, search."""
        timings = {"queue": queued}
        start = time.perf_counter()
        if url is not None:
            try:
                data = inputs.read_image_bytes(url, self.fetcher, until=deadline.end)
            except inputs.FetchError:
                deadline.check("fetching")  # cut off by the request's own deadline: 504, not the URL's fault
                raise
            timings["fetch"] = time.perf_counter() - start
            deadline.check("fetched")
            start = time.perf_counter()
        image = images.decode_image(data, name=name)
        timings["decode"] = time.perf_counter() - start
        deadline.check("decoded")
        answer = engine.answer(image, config, deadline)
        timings.update(answer.timings)
        factor = min(1.0, PICTURE_SIDE / max(image.shape[:2]))
        small = np.asarray(Image.fromarray(image).resize((max(1, round(image.shape[1] * factor)),
                                                          max(1, round(image.shape[0] * factor))), Image.BILINEAR)) \
            if factor < 1 else image
        self.recent.put(query_id, RecentQuery(small, [_scaled(m, factor) for m in
                                                      answer.matches[: self.config.pictured_matches]],
                                              engine.extractor, engine.version.name))
        return answer, timings

    async def search(self, request: Request):
        deadline = Deadline(self.config.request_timeout)
        arrived = time.perf_counter()
        engine = self.engine()  # the version this query starts, and finishes, with
        options, data, url, name = await self._read_query(request, deadline)
        config = request_config(options, engine.config, self.config.limits, from_form=data is not None)
        query_id = secrets.token_hex(8)
        try:
            answer, timings = await self.queries.run(
                lambda queued: self._answer(engine, config, data, url, name, query_id, deadline, queued), deadline)
        except Pool.QueueFull as e:
            raise busy("queue_full", f"the query queue is full ({e}); try again shortly") from None
        search_stages = [s for s in ("shortlist", "ann", "voting", "ransac", "expansion") if s in timings]
        timings["search"] = sum(timings[s] for s in search_stages)
        timings["total"] = time.perf_counter() - arrived
        for stage, seconds in timings.items():
            self.metrics.stages.labels(stage).observe(seconds)
        matches = []
        for rank, match in enumerate(answer.matches, 1):
            record = {**match.to_json(), "image_id": str(match.image_id),
                      "thumbnail": f"/v1/images/{match.image_id}/thumbnail"}
            if rank <= self.config.pictured_matches:
                record["picture"] = f"/v1/matches/{query_id}.png?rank={rank}"
            matches.append(record)
        return JSONResponse({
            "query": name, "query_id": query_id, "version": engine.version.name, "index_id": engine.version.index_id,
            "matches": matches, "num_descriptors": answer.num_descriptors, "timings": timings,
            "picture": f"/v1/matches/{query_id}.png", "attention": f"/v1/attention/{query_id}.png"})

    def _image(self, request: Request):
        """(engine, image id, record) of the image the path names, in the serving version; 404 if absent."""
        engine = self.engine()
        image_id = request.path_params["image_id"]
        record = engine.image_record(image_id)
        if record is None:
            raise ApiError(404, "not_found", f"version {engine.version.name} has no image {image_id}")
        return engine, image_id, record

    async def image_record(self, request: Request):
        engine, _, record = self._image(request)
        return JSONResponse({**record, "image_id": str(record["image_id"]), "version": engine.version.name})

    def _thumbnail(self, uri: str) -> bytes:
        picture = Image.fromarray(inputs.read_image(uri, self.fetcher))
        picture.thumbnail((self.config.thumbnail_side, self.config.thumbnail_side), Image.BILINEAR)
        out = io.BytesIO()
        picture.save(out, format="JPEG", quality=85)
        return out.getvalue()

    async def thumbnail(self, request: Request):
        _, image_id, record = self._image(request)
        key = (image_id, record["content_hash"])
        data = self.thumbnails.get(key)
        if data is None:
            try:
                data = await self.light.run(lambda queued: self._thumbnail(record["uri"]),
                                            Deadline(self.config.request_timeout))
            except Pool.QueueFull as e:
                raise busy("queue_full", f"too many thumbnails at once ({e})") from None
            except (images.ImageError, inputs.FetchError, OSError) as e:
                raise ApiError(502, "image_unreadable", f"the indexed image cannot be read now: {e}") from None
            self.thumbnails.put(key, data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    def _recent(self, request: Request) -> RecentQuery:
        query_id = request.path_params["query_id"]
        entry = self.recent.get(query_id)
        if entry is None:
            raise ApiError(404, "not_found", f"no recent query {query_id!r} (the last {self.config.recent_queries} "
                                             "are kept)")
        return entry

    async def _picture(self, entry: RecentQuery, draw) -> Response:
        def job(queued):
            if entry.score_map is None:
                entry.score_map = entry.extractor.score_map(entry.image)
            return png(draw(entry))

        try:
            data = await self.queries.run(job, Deadline(self.config.request_timeout))
        except Pool.QueueFull as e:
            raise busy("queue_full", f"the query queue is full ({e}); try again shortly") from None
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    async def matches_picture(self, request: Request):
        entry = self._recent(request)
        rank = request.query_params.get("rank")
        if rank is None:
            chosen, first = entry.matches[: self.config.visualize_top], 1
        else:
            if not rank.isdigit() or not 1 <= int(rank) <= len(entry.matches):
                raise ApiError(404, "not_found", f"rank must be 1 to {len(entry.matches)} (the matches kept with "
                                                 "their inliers)")
            chosen, first = [entry.matches[int(rank) - 1]], int(rank)
        return await self._picture(entry, lambda e: query_picture(e.image, e.score_map, chosen, first_rank=first))

    async def attention_picture(self, request: Request):
        entry = self._recent(request)
        return await self._picture(entry, lambda e: attention_overlay(Image.fromarray(e.image), e.score_map))

    # -- errors -----------------------------------------------------------------------------

    async def _api_error(self, request, e: ApiError):
        return error_response(e.status, e.error, e.detail, e.headers)

    async def _input_error(self, request, e):
        reason = getattr(e, "reason", "invalid")
        return error_response(STATUS_OF_REASON.get(reason, 400), reason, str(e))

    async def _deadline(self, request, e: DeadlineExceeded):
        return error_response(504, "deadline", str(e))

    async def _too_large(self, request, e):
        return error_response(413, "too_large", f"the request body exceeds {self.config.max_upload_bytes} bytes")

    async def _http_error(self, request, e: HTTPException):
        return error_response(e.status_code, "bad_request" if e.status_code == 400 else "http_error", str(e.detail),
                              e.headers)

    async def _internal(self, request, e: Exception):
        log.exception("internal error answering %s %s", request.method, request.url.path, exc_info=e)
        return error_response(500, "internal_error", f"{type(e).__name__}: {e}")

    def _build_app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(app):
            if self.owns_live:
                self.live.start()
            try:
                yield
            finally:
                if self.owns_live:
                    self.live.stop()
                await asyncio.to_thread(self.queries.shutdown)
                await asyncio.to_thread(self.light.shutdown)

        routes = [
            Route("/", self.page_route),
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
            Route("/metrics", self.metrics_route),
            Route("/v1/search", self.search, methods=["POST"]),
            Route("/v1/images/{image_id:int}", self.image_record),
            Route("/v1/images/{image_id:int}/thumbnail", self.thumbnail),
            Route("/v1/matches/{query_id}.png", self.matches_picture),
            Route("/v1/attention/{query_id}.png", self.attention_picture),
        ]
        handlers = {ApiError: self._api_error, images.ImageError: self._input_error,
                    inputs.FetchError: self._input_error, DeadlineExceeded: self._deadline,
                    BodyTooLarge: self._too_large, HTTPException: self._http_error, Exception: self._internal}
        return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan,
                         middleware=[Middleware(Observe, service=self), Middleware(Guard, service=self)])
