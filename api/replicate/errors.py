"""Errors in Replicate's shape: problem+json `{"title", "detail", "status"}`, which the
official client turns into `replicate.exceptions.ReplicateError` (status, title, detail).
Our stable error code rides along as `code`, so it is never lost."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from api.strict import StrictRoute
from core.errors import GenrouteError
from core.outages import database_busy

log = logging.getLogger("genroute.api.replicate")


def problem(status: int, detail: str, code: str, headers: dict[str, str] | None = None, errors: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"title": HTTPStatus(status).phrase, "detail": detail, "status": status, "code": code}
    if errors is not None:
        body["invalid_fields"] = errors
    return JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")


def translate(exc: Exception) -> JSONResponse:
    if isinstance(exc, GenrouteError):
        headers = dict(exc.headers or {})
        if exc.status_code == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return problem(exc.status_code, exc.message, exc.code, headers or None, exc.details)
    if isinstance(exc, RequestValidationError):
        errors = [{"loc": list(e.get("loc", ()))[1:], "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
        if any(e["type"] == "json_invalid" for e in errors):
            return problem(400, "request body is not valid JSON", "invalid_json")
        first = errors[0] if errors else {"loc": [], "msg": "invalid"}
        where = ".".join(str(x) for x in first["loc"]) or "body"
        return problem(422, f"{where}: {first['msg']}", "invalid_input", errors=errors)
    if database_busy(exc):
        return problem(503, "the database is overloaded or unavailable; retry shortly", "unavailable", {"Retry-After": "1"})
    log.error("unhandled error in a Replicate-compatible route", exc_info=exc)
    return problem(500, "internal error; it has been logged", "internal")


class ReplicateRoute(StrictRoute):
    """Every error of a /replicate route (auth and body parsing included) in Replicate's shape;
    bodies are parsed as strictly as on every other route (api/strict.py)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - translated, and logged when unexpected
                return translate(exc)

        return route
