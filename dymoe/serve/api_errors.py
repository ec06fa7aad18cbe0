"""Errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Every way a request can fail ends here, so the server answers instead of dying: a malformed body 400,
an unknown model 404, a bad parameter 400 naming it, an oversize body 413, a full or slow queue 503 with
``Retry-After``. A bug becomes a 500 in :class:`dymoe.serve.app.RequestGuard` (logged with its traceback;
the client sees no internals).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dymoe.errors import DymoeError
from dymoe.serve.scheduler import QueueRejected
from dymoe.serve.schemas import UnsupportedField

ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
               413: "invalid_request_error", 503: "server_busy", 500: "server_error"}


class APIError(Exception):
    """An error answer: HTTP ``status``, a message that says what to change, the ``param`` at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        error_type = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _param(loc: tuple) -> str | None:
    """``("messages", 0, "role")`` -> ``"messages[0].role"`` (the "body" prefix FastAPI adds is dropped)."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def from_validation(exc: ValidationError | RequestValidationError) -> APIError:
    """The first validation error as a 400 that names the parameter and the value it got."""
    first = exc.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, UnsupportedField):
        return APIError(400, f"{cause.field}: {cause}", param=cause.field, code="unsupported_parameter")
    param = _param(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing":
        return APIError(400, f"{param}: this parameter is required", param=param, code="missing_parameter")
    got = first.get("input")
    shown = repr(got) if len(repr(got)) <= 80 else repr(got)[:77] + "..."
    return APIError(400, f"invalid value for {param}: {message} (got {shown})", param=param,
                    code="invalid_parameter")


def from_queue(exc: QueueRejected) -> APIError:
    return APIError(503, str(exc), code=f"queue_{exc.reason}", headers={"Retry-After": str(exc.retry_after_s)})


def install(app) -> None:
    """Route every exception a request can raise to an OpenAI-shaped answer."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return from_validation(exc).response()

    @app.exception_handler(QueueRejected)
    async def _queue(request: Request, exc: QueueRejected):
        return from_queue(exc).response()

    @app.exception_handler(DymoeError)
    async def _dymoe(request: Request, exc: DymoeError):
        return APIError(400, str(exc)).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see GET /v1/models, POST /v1/completions, " \
                      "POST /v1/chat/completions"
        return APIError(exc.status_code, message).response()
