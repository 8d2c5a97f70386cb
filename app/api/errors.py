"""The one mapping from failures to HTTP: every error body is {"error": {"code", "message", ...}}."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import Conflict, DomainError, Unauthorized, Unavailable

log = logging.getLogger(__name__)

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "overloaded",
    503: "unavailable",
}


def error_body(error: DomainError) -> dict[str, Any]:
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.param is not None:
        body["param"] = error.param
    if error.line is not None:
        body["line"] = error.line
    return {"error": body}


def error_headers(error: DomainError) -> dict[str, str]:
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))  # whole seconds, at least 1
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = error.challenge
    return headers


def error_response(error: DomainError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status, headers=error_headers(error) or None)


# Missing parts that have a code of their own: an upload without its file is a common client mistake.
MISSING_CODES = {"file": ("missing_file", "The multipart body has no 'file' part.")}


def _validation_error(exc: RequestValidationError) -> DomainError:
    first = exc.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = ".".join(location) or None
    message = first.get("msg", "Invalid request.")
    if param:
        message = f"{param}: {message}"
    code = "invalid_request"
    if first.get("type") == "missing" and param in MISSING_CODES:
        code, message = MISSING_CODES[param]
    error = DomainError(message, param=param, code=code)
    error.status = 422
    return error


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = DomainError(str(exc.detail), code=HTTP_CODES.get(exc.status_code, "http_error"))
        error.status = exc.status_code
        return error_response(error)

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    async def _database(_: Request, exc: Exception) -> JSONResponse:
        log.error("registry database error: %s", exc)
        return error_response(database_error(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(
            {"error": {"code": "internal_error", "message": "Internal server error."}}, status_code=500
        )


# PostgreSQL's SQLSTATEs for a transaction that lost to another: serialization failure, deadlock, lock not
# available. SQLite says "database is locked" when its busy timeout runs out behind another writer.
CONFLICT_SQLSTATES = {"40001", "40P01", "55P03"}


def database_error(exc: Exception) -> DomainError:
    """A database error by its kind: another request's write won (409, to retry), or the registry is
    unreachable (503). Not every database error means the database is down."""
    orig = getattr(exc, "orig", None)
    if (
        isinstance(exc, IntegrityError)
        or getattr(orig, "sqlstate", None) in CONFLICT_SQLSTATES
        or ("database is locked" in str(orig))
    ):
        return Conflict(
            "Another request changed the same data at the same moment; retry the request.",
            code="database_conflict",
            retry_after_s=1,
        )
    return Unavailable(
        "The registry database is unreachable; retry shortly.", code="database_unavailable", retry_after_s=5
    )
