"""Malformed input refused at the door, one place each, so nothing below ever sees it:

    a NUL in the URL (path or query)   RefuseNul middleware: 400 invalid_request, and a
                                       websocket is closed 4400 (PostgreSQL text cannot
                                       hold NUL: it used to surface as a 500)
    JSON that PostgreSQL's json type   loads(): NaN / Infinity / numbers that overflow to
    or our code cannot hold            them, a NUL in any string or key, nesting deeper
                                       than MAX_DEPTH, numbers past Python's digit limit
                                       -> json.JSONDecodeError (FastAPI's 400 invalid_json)

Every route reads its JSON through `loads`: FastAPI's body parsing via StrictRoute (each
APIRouter is built with `route_class=StrictRoute`), the routes that read `request.json()`
themselves through the same request object, and the websockets' messages directly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

MAX_DEPTH = 64  # OpenAI content parts and JSON-schema tool parameters stay far below


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (use null or a finite number)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def loads(data: bytes | str) -> Any:
    """json.loads that refuses what the database or our code cannot hold (module docstring).
    Raises json.JSONDecodeError with a message a client can act on."""
    try:
        value = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError(f"nested deeper than {MAX_DEPTH} levels", "", 0) from None
    except ValueError as exc:  # NaN, Infinity, a 5,000-digit integer, bytes that are not UTF-8
        raise json.JSONDecodeError(str(exc)[:200], "", 0) from None
    _check(value)
    return value


def _check(value: Any) -> None:
    """Depth and NUL, iteratively (a deep document must not exhaust the stack here either)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise json.JSONDecodeError("strings may not contain NUL (\\u0000)", "", 0)
        elif isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise json.JSONDecodeError(f"nested deeper than {MAX_DEPTH} levels", "", 0)
            if isinstance(item, dict):
                for k, v in item.items():
                    if "\x00" in k:
                        raise json.JSONDecodeError("keys may not contain NUL (\\u0000)", "", 0)
                    stack.append((v, depth + 1))
            else:
                stack.extend((v, depth + 1) for v in item)


class StrictRequest(Request):
    """A request whose `.json()` is `loads`."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class StrictRoute(APIRoute):
    """An APIRoute that parses JSON bodies with `loads` (its JSONDecodeError becomes
    FastAPI's 400 invalid_json, as broken JSON does)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(StrictRequest(request.scope, request.receive))

        return route


class RefuseNul:
    """ASGI middleware: a NUL byte in the path or query string is refused before routing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and _has_nul(scope):
            message = "the URL may not contain NUL (%00)"
            if scope["type"] == "websocket":
                await receive()  # websocket.connect
                await send({"type": "websocket.accept"})
                await send({"type": "websocket.close", "code": 4400, "reason": message})
                return
            body = json.dumps({"error": {"code": "invalid_request", "message": message, "details": None}}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _has_nul(scope: Scope) -> bool:
    query: bytes = scope.get("query_string", b"")
    return "\x00" in scope.get("path", "") or b"%00" in query or b"\x00" in query or b"%00" in scope.get("raw_path", b"")
