"""What a request must pass before a route sees it: draining, the request limit, the bearer token and
the body cap (Guard)."""

from __future__ import annotations

import hmac

from pipeline.service.errors import BodyTooLarge, error_response

OPEN_PATHS = ("/", "/healthz")  # never behind the token: the page holds no data, liveness is for probes
DRAINING_PATHS = ("/healthz", "/readyz", "/metrics")  # still answered while draining (readyz: 503, not ready)


class Guard:
    """Pure ASGI middleware: draining (503), more than ``max_requests`` being answered (503), the
    bearer token (401) and the body cap (413: by Content-Length at once, else as soon as the bytes
    received pass it). ``service`` gives its ``config``, ``draining`` and ``in_flight`` (which
    counts this request: Observe is outside)."""

    def __init__(self, app, service):
        self.app, self.service = app, service
        self.max_bytes = service.config.max_upload_bytes
        self.max_requests = service.config.max_requests
        self.token = service.config.token.encode() if service.config.token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], dict(scope["headers"])
        response = None
        if self.service.draining and path not in DRAINING_PATHS:
            response = error_response(503, "shutting_down", "the server is shutting down",
                                      {"Retry-After": "5", "Connection": "close"})
        elif self.service.in_flight > self.max_requests and path not in DRAINING_PATHS:
            response = error_response(503, "busy", f"more than {self.max_requests} requests at once; try again "
                                      "shortly", {"Retry-After": "1"})
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
