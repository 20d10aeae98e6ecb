"""The one table from errors to HTTP responses, and the one error shape:
`{"error": {"code", "message", "details"}}`. Routes raise core.errors; nothing else."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import GenrouteError

log = logging.getLogger("genroute.api")

HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    402: "budget_exceeded",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    429: "rate_limited",
    503: "unavailable",
}


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def error_response(status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def _loc(loc: tuple[Any, ...] | list[Any]) -> list[Any]:
    return list(loc[1:]) if loc and loc[0] == "body" else list(loc)


async def _genroute(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GenrouteError)
    headers = dict(exc.headers or {})
    if exc.status_code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return error_response(exc.status_code, exc.code, exc.message, exc.details, headers or None)


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        ctx = bad_json.get("ctx") or {}
        return error_response(400, "invalid_json", f"request body is not valid JSON: {ctx.get('error', 'parse error')}")
    details = [{"loc": _loc(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]
    if any(d["loc"] == [] and d["type"] in ("missing", "model_attributes_type", "dict_type") for d in details):
        return error_response(400, "invalid_request", "request body must be a JSON object", details)
    return error_response(422, "invalid_input", "request does not match the schema; see details for the fields", details)


async def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code
    if exc.status_code == 404 and message == "Not Found":
        message = "no such endpoint; the API lives under /v1 (see /docs)"
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


# SQLSTATE classes that mean "the database cannot take this now", not "this request is wrong":
# 08 connection exception, 53 insufficient resources (too many connections), 57P0x shutdown
_DB_BUSY = ("08", "53", "57P0")


def database_busy(exc: BaseException) -> bool:
    """The database is overloaded or away (pool exhausted, too many connections, restarting)."""
    if isinstance(exc, SATimeoutError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    code = str(getattr(exc.orig, "sqlstate", "") or "")
    return code.startswith(_DB_BUSY) or bool(exc.connection_invalidated)


async def _database(request: Request, exc: Exception) -> JSONResponse:
    """503 with Retry-After when the database cannot take the request now, so clients retry
    instead of treating it as a bug; anything else from the database stays a logged 500."""
    if database_busy(exc):
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return error_response(503, "unavailable", "the database is overloaded or unavailable; retry shortly",
                              headers={"Retry-After": "1"})
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", "internal error; it has been logged")


def install(app: FastAPI) -> None:
    app.add_exception_handler(GenrouteError, _genroute)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(DBAPIError, _database)
    app.add_exception_handler(SATimeoutError, _database)
    app.add_exception_handler(Exception, _unexpected)
