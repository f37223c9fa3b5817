"""The Starlette app of ``pipeline.serve`` and what it serves from (Service): its routes, thin over
the query engine (search, image records, thumbnails, pictures, health, metrics, the web page)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from delf_retrieval.api import Index
from delf_retrieval.corpus import images, inputs
from delf_retrieval.extraction.visualize import attention_overlay, query_picture
from delf_retrieval.index.segments import DamagedSegment
from delf_retrieval.query.engine import Deadline, DeadlineExceeded
from delf_retrieval.query.live import LiveIndex
from pipeline.service.config import ServeConfig
from pipeline.service.errors import ApiError, BodyTooLarge, busy, error_response
from pipeline.service.limits import Guard
from pipeline.service.metrics import Metrics, Observe
from pipeline.service.pool import Pool
from pipeline.service.queries import read_query, request_config
from pipeline.service.urls import ServiceFetcher, UrlPolicy

log = logging.getLogger("pipeline.serve")

PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static", "index.html")
IMAGE_ID = re.compile(r"[0-9]{1,19}")  # image ids are 63-bit
RANK = re.compile(r"[0-9]{1,6}")
PICTURE_SIDE = 1024  # the long side a recent query is kept at, for its pictures
# The HTTP status of each typed input error (images.ImageError.reason, inputs.FetchError.reason).
STATUS_OF_REASON = {"too_large": 413, "unsupported": 415, "fetch_failed": 422, "url_refused": 400}


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


def _scaled(match, factor: float):
    return dataclasses.replace(match, query_points=match.query_points * factor)


def png(picture: Image.Image) -> bytes:
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


class Service:
    """The app and what it serves from: the live index, the pools, the recent queries, the metrics."""

    def __init__(self, config: ServeConfig, live: LiveIndex | None = None):
        self.config = config
        self.queries = Pool("query", config.workers, config.max_queue)
        # Thumbnails: light work, on a pool of their own so a page's grid never waits behind queries.
        self.light = Pool("thumbnail", 2, 32)
        self.recent = Recent(config.recent_queries)
        self.thumbnails = Recent(config.thumbnails_kept)
        self.fetcher = inputs.Fetcher(config.fetch)  # the index's own images (thumbnails), as the build reads them
        self.url_fetcher = ServiceFetcher(UrlPolicy(config.allow_url), config.fetch)  # queries' URLs: public only
        self.in_flight = 0
        self.draining = False
        self.started = time.time()
        self.owns_live = live is None  # a live index handed in is started and stopped by its owner
        # The index answers through the Python API's Index, following the root's new versions.
        self.index = Index(config.index, config.engine, config.fetch, follow=True,
                           reload_interval=config.reload_interval, live=live)
        self.live = self.index.live
        self.metrics = Metrics(self)
        with open(PAGE, encoding="utf-8") as f:
            self.page = f.read()
        self.app = self._build_app()

    # -- the version ------------------------------------------------------------------------

    def engine(self):
        engine = self.index.engine
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

    def _answer(self, engine, config, data, url, name, query_id, deadline, queued):
        """A query on a worker: read (URL) or take the bytes, decode, extract, search."""
        timings = {"queue": queued}
        start = time.perf_counter()
        if url is not None:
            try:
                data = self.url_fetcher.read(url, until=deadline.end)
            except inputs.FetchError:
                deadline.check("fetching")  # cut off by the request's own deadline: 504, not the URL's fault
                raise
            timings["fetch"] = time.perf_counter() - start
            deadline.check("fetched")
            start = time.perf_counter()
        image = images.decode_image(data, name=name)
        timings["decode"] = time.perf_counter() - start
        deadline.check("decoded")
        answer = self.index.answer(image, config, deadline, engine=engine)
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
        options, data, url, name = await read_query(request, deadline)
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
            "picture": f"/v1/matches/{query_id}.png", "attention": f"/v1/attention/{query_id}.png",
            **({"landmark": answer.landmark.to_json()} if answer.landmark is not None else {})})

    def _image(self, request: Request):
        """(engine, image id, record) of the image the path names, in the serving version; 404 if absent."""
        engine = self.engine()
        text = request.path_params["image_id"]
        record = engine.image_record(int(text)) if IMAGE_ID.fullmatch(text) and int(text) < 2**63 else None
        if record is None:
            raise ApiError(404, "not_found", f"version {engine.version.name} has no image {text[:40]}")
        image_id = int(text)
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
                log.warning("thumbnail of image %s: %s", image_id, e)  # the remote's words stay in the log
                raise ApiError(502, "image_unreadable", "the indexed image cannot be read now") from None
            self.thumbnails.put(key, data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    async def landmarks(self, request: Request):
        """The landmarks of the index, largest first (at most 500), or one landmark's members (at most
        500) with /v1/landmarks/{id}; 404 when the index has none (pipeline.landmarks)."""
        engine = self.engine()
        recognizer = getattr(engine, "recognizer", None)
        if recognizer is None:
            raise ApiError(404, "not_found", "the index has no landmarks (run pipeline.landmarks)")
        text = request.path_params.get("landmark")
        if text is None:
            return JSONResponse({"landmarks": [{**{k: s.get(k) for k in ("landmark", "size", "latitude", "longitude",
                                                                       "radius_km")},
                                                "representative_id": str(inputs.image_id(s["representative"]))}
                                               for s in recognizer.summary[:500]]})
        chosen = next((s for s in recognizer.summary if IMAGE_ID.fullmatch(text) and str(s["landmark"]) == text), None)
        if chosen is None:
            raise ApiError(404, "not_found", f"no landmark {text[:40]}")
        return JSONResponse({"landmark": chosen["landmark"], "size": chosen["size"],
                             "representative_id": str(inputs.image_id(chosen["representative"])),
                             "members": [{"image_id": str(inputs.image_id(u)), "uri": u} for u in chosen["members"][:500]]})

    def _recent(self, request: Request) -> RecentQuery:
        query_id = request.path_params["query_id"]
        entry = self.recent.get(query_id)
        if entry is None:
            raise ApiError(404, "not_found", f"no recent query {query_id[:40]!r} (the last "
                                             f"{self.config.recent_queries} are kept)")
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
            if not RANK.fullmatch(rank) or not 1 <= int(rank) <= len(entry.matches):
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

    async def _damaged(self, request, e: DamagedSegment):
        log.error("%s: %s", self.config.index, e)  # one line: the segment, the file, the way out
        return error_response(503, "index_damaged", str(e), {"Retry-After": "60"})

    async def _internal(self, request, e: Exception):
        log.exception("internal error answering %s %s", request.method, request.url.path[:200], exc_info=e)
        return error_response(500, "internal_error", "the server failed to answer; its log says why")

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
            Route("/v1/images/{image_id}", self.image_record),  # ids checked by _image, not by a convertor
            Route("/v1/images/{image_id}/thumbnail", self.thumbnail),
            Route("/v1/landmarks", self.landmarks),
            Route("/v1/landmarks/{landmark}", self.landmarks),
            Route("/v1/matches/{query_id}.png", self.matches_picture),
            Route("/v1/attention/{query_id}.png", self.attention_picture),
        ]
        handlers = {ApiError: self._api_error, images.ImageError: self._input_error,
                    inputs.FetchError: self._input_error, DeadlineExceeded: self._deadline,
                    BodyTooLarge: self._too_large, HTTPException: self._http_error, DamagedSegment: self._damaged,
                    Exception: self._internal}
        return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan,
                         middleware=[Middleware(Observe, service=self), Middleware(Guard, service=self)])
