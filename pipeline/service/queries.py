"""What a search request asks for: its image (upload or URL) and its options, read and checked."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math

from starlette.datastructures import UploadFile
from starlette.requests import Request

from delf_retrieval.engine import Deadline, DeadlineExceeded
from delf_retrieval.retrieval import RetrievalConfig
from pipeline.service.config import QueryLimits
from pipeline.service.errors import ApiError

# Options a request may set, as RetrievalConfig names them (its defaults are the server's flags).
REQUEST_OPTIONS = ("top", "rank_by", "vote_weight", "shortlist", "neighbours", "nprobe", "max_distance",
                   "min_inliers", "residual_threshold", "expand", "expand_min_inliers", "seed")
URL_SCHEMES = ("http://", "https://", "gs://")


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
