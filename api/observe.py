"""The HTTP boundary's observation, as plain ASGI middleware (outermost, so it sees every
answer, errors and refusals included):

- a request id: the client's `X-Request-Id` when it is sane, else a new one; bound to the
  request's log context (core/logs.py), returned in the response, sent on to providers
  (adapters/http.py) and webhook receivers (workers/webhooks.py);
- `genroute_http_requests_total` and the latency histogram, by route template (never the
  raw path, so job ids do not become label values);
- `GET /metrics`, the Prometheus exposition (core/metrics.py).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import logs, metrics

HEADER = b"x-request-id"
NOSNIFF = (b"x-content-type-options", b"nosniff")
_SANE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def request_id_from(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == HEADER:
            try:
                text: str = value.decode("ascii")
            except UnicodeDecodeError:
                break
            if _SANE.match(text):
                return text
            break
    return f"req_{uuid.uuid4().hex}"


def route_of(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


class Observe:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        rid = request_id_from(scope)
        with logs.bind(request_id=rid):
            if scope["type"] == "websocket":
                await self.app(scope, receive, send)
                return
            if scope["path"] == "/metrics" and scope["method"] == "GET":
                await self._metrics(scope, send, rid)
                return
            await self._http(scope, receive, send, rid)

    async def _http(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        t0 = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [*message.get("headers", []), (HEADER, rid.encode())]
                if not any(k.lower() == NOSNIFF[0] for k, _ in headers):
                    headers.append(NOSNIFF)  # every answer, downloads above all: no type guessing
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            metrics.observe_http(scope["method"], route_of(scope), status, time.perf_counter() - t0)

    async def _metrics(self, scope: Scope, send: Send, rid: str) -> None:
        # the lifespan leaves the process's Exposition (with its Redis probe) on app.state
        exposition = getattr(getattr(scope.get("app"), "state", None), "metrics", None) or metrics.Exposition(None)
        body = await exposition.render()
        headers: list[Any] = [(b"content-type", metrics.CONTENT_TYPE_LATEST.encode()), (HEADER, rid.encode()),
                              (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
