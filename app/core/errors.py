"""Domain exceptions and the one error envelope every failure is turned into.

`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`, as OpenAI and vLLM do.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("alignd.api")


class AlignError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers
        if code is not None:
            self.code = code


class InvalidRequest(AlignError):
    pass


class UnprocessableRequest(AlignError):
    status_code = 422


class AuthenticationFailed(AlignError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(AlignError):
    status_code = 404
    type = "not_found_error"
    code = "not_found"


class Conflict(AlignError):
    status_code = 409
    type = "conflict_error"
    code = "conflict"


class PayloadTooLarge(AlignError):
    status_code = 413
    code = "payload_too_large"


class ServiceUnavailable(AlignError):
    status_code = 503
    type = "service_unavailable_error"
    code = "unavailable"


def envelope(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: AlignError) -> JSONResponse:
    return JSONResponse(status_code=exc.status_code, headers=exc.headers,
                        content=envelope(exc.message, exc.type, exc.code, exc.param))


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AlignError)
    async def _align_error(_: Request, exc: AlignError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _validation_param(tuple(first.get("loc", ())))
        message = str(first.get("msg", "invalid request"))
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {param!r}"
        elif param:
            message = f"{param}: {message}"
        code = "unknown_field" if first.get("type") == "extra_forbidden" else "invalid_value"
        return JSONResponse(status_code=422,
                            content=envelope(message, "invalid_request_error", code, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, f"http_{exc.status_code}")
        return JSONResponse(status_code=exc.status_code, headers=getattr(exc, "headers", None),
                            content=envelope(str(exc.detail), type_, code))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(status_code=500,
                            content=envelope("internal server error", "server_error", "internal_error"))
