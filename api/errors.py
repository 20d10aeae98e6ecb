"""The one table from errors to HTTP responses, and the one error shape:
`{"error": {"code", "message", "details"}}`. Routes raise core.errors; nothing else.

A dependency that does not answer is a 503 `unavailable` with Retry-After on every route,
never a 500: PostgreSQL away (asyncpg raises ConnectionRefusedError, an OSError, before
SQLAlchemy can wrap it; `the database system is starting up` while it restarts), or Redis
away (redis-py's ConnectionError / TimeoutError). On a websocket the same decision closes
the socket with a code instead (1013 try again later, 1011 internal), since a handler
there cannot answer with a response."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import asyncpg
import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket, WebSocketState

from core.errors import GenrouteError
from core.outages import unavailable

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


async def _send(conn: HTTPConnection, status: int, code: str, message: str, details: Any = None,
                headers: dict[str, str] | None = None) -> JSONResponse | None:
    """The error as a response, or, on a websocket, as a close code (no response exists there)."""
    if isinstance(conn, WebSocket):
        ws_code = 1013 if status == 503 else 1011 if status >= 500 else 4000 + status
        with contextlib.suppress(Exception):
            if conn.client_state == WebSocketState.CONNECTING:
                await conn.accept()
            await conn.close(ws_code, f"{code}: {message}"[:120])
        return None
    return error_response(status, code, message, details, headers)


def _where(conn: HTTPConnection) -> str:
    return f"{'WS' if isinstance(conn, WebSocket) else getattr(conn, 'method', '?')} {conn.url.path[:200]!r}"


async def _genroute(conn: HTTPConnection, exc: Exception) -> JSONResponse | None:
    assert isinstance(exc, GenrouteError)
    headers = dict(exc.headers or {})
    if exc.status_code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return await _send(conn, exc.status_code, exc.code, exc.message, exc.details, headers or None)


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


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        return await _method_not_allowed(request, exc)
    code = HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code
    if exc.status_code == 404 and message == "Not Found":
        message = "no such endpoint; the API lives under /v1 (see /docs)"
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


async def _unavailable(conn: HTTPConnection, exc: Exception) -> JSONResponse | None:
    """503 with Retry-After when a dependency cannot take the request now, so clients retry
    instead of treating it as a bug; anything else stays a logged 500."""
    which = unavailable(exc)
    if which is not None:
        log.warning("%s unavailable on %s: %s: %s", which, _where(conn), type(exc).__name__, str(exc)[:300])
        return await _send(conn, 503, "unavailable", f"{which} is overloaded or unavailable; retry shortly",
                           headers={"Retry-After": "1"})
    return await _unexpected(conn, exc)


async def _unexpected(conn: HTTPConnection, exc: Exception) -> JSONResponse | None:
    log.error("unhandled error on %s", _where(conn), exc_info=exc)
    return await _send(conn, 500, "internal", "internal error; it has been logged")


def install(app: FastAPI) -> None:
    app.add_exception_handler(GenrouteError, _genroute)  # type: ignore[arg-type]  # serves HTTP and websockets: Starlette types one or the other
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    for cls in (DBAPIError, SATimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        app.add_exception_handler(cls, _unavailable)  # type: ignore[arg-type]  # serves HTTP and websockets: Starlette types one or the other
    app.add_exception_handler(Exception, _unexpected)  # type: ignore[arg-type]  # serves HTTP and websockets: Starlette types one or the other


# --- the OpenAPI document: every error answer a route can give --------------------------------

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}, "details": {}}}},
}
OPENAI_ERROR_SCHEMA: dict[str, Any] = {
    "title": "OpenAIError",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}}},
}
_WHY = {
    400: "malformed request (bad JSON, a NUL byte, a bad header value)",
    401: "missing or unknown API key",
    402: "the tenant's budget cannot cover the request",
    403: "the key may not do this",
    404: "not found for this tenant",
    405: "method not allowed (the Allow header lists the path's methods)",
    409: "conflict (idempotency key reused, job not cancelable)",
    413: "request body too large",
    422: "the input does not match the schema",
    429: "rate or concurrency limit (Retry-After)",
    502: "the provider failed",
    503: "a dependency (database, Redis, provider) is unavailable (Retry-After)",
    504: "the job did not finish in time",
}


def error_statuses(path: str, method: str, op: dict[str, Any]) -> list[int]:
    """The error statuses an operation can answer, from what it is: every route may get a
    malformed request (400) and a dependency away (503); keyed routes (everything under
    /v1 but the signed file links) 401/403/429; a path parameter 404; a body 413/422;
    POST/PATCH/DELETE with a key 402/409; OpenAI-compatible routes the provider's 502/504."""
    codes = {400, 503}
    keyed = path.startswith("/v1/") and not path.startswith("/v1/files/")
    if keyed:
        codes |= {401, 403, 429}
    if any(p.get("in") == "path" for p in op.get("parameters") or ()) or "{" in path:
        codes.add(404)
    if method in ("post", "put", "patch"):
        codes |= {413, 422}
    if method in ("post", "patch", "delete") and keyed:
        codes |= {402, 404, 409}
    if op.get("parameters") and any(p.get("in") == "query" for p in op["parameters"]):
        codes.add(422)
    if "openai" in (op.get("tags") or []):
        codes |= {404, 422, 502, 504}
    return sorted(codes)


def document(app: FastAPI) -> None:
    """List each operation's error answers, with the error schema, in /openapi.json
    (FastAPI alone documents only a 422, in a shape we never send)."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        comps.pop("HTTPValidationError", None)
        comps.pop("ValidationError", None)
        comps["Error"], comps["OpenAIError"] = ERROR_SCHEMA, OPENAI_ERROR_SCHEMA
        for path, ops in schema.get("paths", {}).items():
            for method, op in ops.items():
                if not isinstance(op, dict) or "responses" not in op:
                    continue
                ref = "#/components/schemas/" + ("OpenAIError" if "openai" in (op.get("tags") or []) else "Error")
                fastapi_422 = {422} if "422" in op["responses"] else set()  # path/query validation
                for status in sorted(set(error_statuses(path, method, op)) | fastapi_422):
                    op["responses"][str(status)] = {"description": _WHY[status],
                                                    "content": {"application/json": {"schema": {"$ref": ref}}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customize it


async def _method_not_allowed(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """405 with an Allow header naming every method of the path, not only those of the first
    route Starlette tried (GET and PATCH /v1/admin/keys/{id} are separate routes). The
    OpenAPI document is the one list of paths and methods."""
    import re

    allowed: set[str] = set()
    for template, ops in request.app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template)), request.url.path):
            allowed |= {m.upper() for m in ops if m in ("get", "put", "post", "patch", "delete")}
    if "GET" in allowed:
        allowed.add("HEAD")
    headers = {"Allow": ", ".join(sorted(allowed))} if allowed else dict(getattr(exc, "headers", None) or {})
    return error_response(405, "method_not_allowed", "method not allowed on this path; see the Allow header",
                          headers=headers)
