"""What a search request asks for: its image (upload or URL) and its options, read and checked."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math

from starlette.datastructures import UploadFile
from starlette.requests import Request

from delf_retrieval.query.engine import Deadline, DeadlineExceeded
from delf_retrieval.query.retrieval import RetrievalConfig
from pipeline.service.config import QueryLimits
from pipeline.service.errors import ApiError

# Options a request may set, as RetrievalConfig names them (its defaults are the server's flags).
REQUEST_OPTIONS = ("top", "rank_by", "vote_weight", "shortlist", "neighbours", "nprobe", "max_distance",
                   "min_inliers", "residual_threshold", "expand", "expand_min_inliers", "seed")
URL_SCHEMES = ("http://", "https://", "gs://")
# The values a request may give each numeric option, (lowest, highest); None: QueryLimits' bound.
# Wider than any useful setting, narrow enough that no value makes the engine fail.
OPTION_RANGES = {"top": (1, None), "shortlist": (0, None), "neighbours": (1, None), "nprobe": (1, None),
                 "expand": (0, None), "max_distance": (1e-6, 4.0), "min_inliers": (0, 100_000),
                 "residual_threshold": (1e-3, 10_000.0), "vote_weight": (0.0, 1e6),
                 "expand_min_inliers": (1, 100_000), "seed": (0, 2**32 - 1)}


def _shown(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return repr(text[:40] + "..." if len(text) > 40 else text) if isinstance(value, str) else text[:40]


def _option_value(name: str, value, default, from_form: bool):
    """A request option as the type of its default; form fields arrive as text, JSON values typed."""
    kind = type(default)
    if from_form:
        try:
            value = kind(value)
        except ValueError:
            raise ApiError(400, "bad_option", f"{name} must be {kind.__name__}, not {_shown(value)}") from None
    elif isinstance(value, bool) or not (isinstance(value, kind) or (kind is float and isinstance(value, int))):
        raise ApiError(400, "bad_option", f"{name} must be {kind.__name__}, not {_shown(value)}")
    if kind is float:
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise ApiError(400, "bad_option", f"{name} must be finite")
    return value


def request_config(options: dict, defaults: RetrievalConfig, limits: QueryLimits, from_form: bool) -> RetrievalConfig:
    """The RetrievalConfig of a request: the server's defaults with the request's options."""
    changes = {}
    for name, value in options.items():
        if name not in REQUEST_OPTIONS:
            raise ApiError(400, "bad_option", f"unknown option {_shown(name)} (options: {', '.join(REQUEST_OPTIONS)})")
        value = _option_value(name, value, getattr(defaults, name), from_form)
        if name in OPTION_RANGES:
            low, high = OPTION_RANGES[name]
            high = getattr(limits, name) if high is None else high
            if value > high:
                raise ApiError(400, "bad_option", f"{name} may be at most {high}")
            if value < low:
                raise ApiError(400, "bad_option", f"{name} must be at least {low}")
        changes[name] = value
    try:
        return dataclasses.replace(defaults, **changes)
    except ValueError as e:
        raise ApiError(400, "bad_option", str(e)[:200]) from None


async def read_query(request: Request, deadline: Deadline) -> tuple[dict, bytes | None, str | None, str]:
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
                raise ApiError(400, "bad_json", f"the body is not JSON: {str(e)[:200]}") from None
            except RecursionError:
                raise ApiError(400, "bad_json", "the body is JSON nested too deep") from None
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
