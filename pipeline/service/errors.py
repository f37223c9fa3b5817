"""The service's answers other than 200: ApiError and the JSON body every refusal has."""

from __future__ import annotations

from starlette.responses import JSONResponse


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
