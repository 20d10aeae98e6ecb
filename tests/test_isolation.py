"""Tenant isolation over the whole route table: for every route that takes an id (jobs,
outputs, events, videos, webhook endpoints and deliveries, usage), another tenant's key
gets 404, the same answer as for an id that never existed.

The cases are derived from the app's routes (HTTP and websocket), not listed by hand, so a
new route with a `{param}` is checked the day it is added. Each path parameter name needs
an entry in IDS (how to get alice's real id of that kind); a name that has none fails the
test, saying to add it. Routes that take an id but no API key are listed in EXEMPT with
why (and are checked for their own proof instead); operator routes are listed in
ADMIN_ROUTES (403 for any tenant key). Everything runs against real processes: uvicorn
API + ARQ worker + Redis + SQLite, checked with httpx and the `websockets` client.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import fastapi.routing
import httpx
import pytest
from fastapi import FastAPI
from starlette.routing import WebSocketRoute
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from api.app import create_app
from core.callbacks import callback_token
from core.ids import new_id
from core.settings import Settings
from tests.stack import Stack, make_stack, running

ADMIN_KEY = "admin-secret-for-isolation-tests"
DEAD_HOOK = "http://127.0.0.1:9/hook"  # nothing listens (discard port): deliveries exist, and fail
PARAM = re.compile(r"{(\w+)(?::\w+)?}")


# the world: alice's real ids of every kind --------------------------------------------------
@dataclass
class World:
    stack: Stack
    image_job: str  # succeeded, with outputs, and with a webhook (so it has deliveries)
    video_job: str  # succeeded local-video job
    delivery: str  # one of the image job's webhook deliveries
    output_url: str  # the image job's first output: a signed /v1/files/... URL

    async def new_endpoint(self) -> str:
        """A fresh endpoint per use: DELETE /v1/webhooks/endpoints/{id} consumes it."""
        async with self.stack.client("alice") as c:
            r = await c.post("/v1/webhooks/endpoints", json={"url": DEAD_HOOK, "events": ["job.succeeded"]})
            assert r.status_code == 201, r.text
            return str(r.json()["id"])

    async def new_batch(self) -> str:
        async with self.stack.client("alice") as c:
            r = await c.post("/v1/batches", json={"jobs": [{"model": "local-image", "input": {"prompt": "alice's batch", "size": "256x256"}}]})
            assert r.status_code == 201, r.text
            return str(r.json()["batch"]["id"])

    async def new_key(self) -> str:
        """A fresh key of alice's tenant per use: revoke and rotate consume it."""
        async with admin_client(self.stack) as a:
            r = await a.post("/v1/admin/keys", json={"tenant": "alice", "name": "throwaway"})
            assert r.status_code == 201, r.text
            return str(r.json()["id"])


async def _const(value: str) -> str:
    return value


# How to get alice's real id for each path (or query) parameter name. A route whose
# parameter is missing here fails test_another_tenants_id_is_not_found: add it.
IDS: dict[str, Callable[[World], Awaitable[str]]] = {
    "job_id": lambda w: _const(w.image_job),
    "index": lambda w: _const("0"),  # with job_id: the image job's first output
    "video_id": lambda w: _const(w.video_job),  # OpenAI's video id is the job id of a video job
    "delivery_id": lambda w: _const(w.delivery),
    "endpoint_id": lambda w: w.new_endpoint(),
    "tenant": lambda w: _const("alice"),  # GET /v1/usage?tenant=
    "tenant_id": lambda w: _const("alice"),  # admin routes
    "key_id": lambda w: w.new_key(),  # admin routes
    "batch_id": lambda w: w.new_batch(),
    "pid": lambda w: _const(w.image_job),  # a Replicate prediction id is the job id
}

# Routes whose parameters name catalog models (the same for every tenant), not anything a
# tenant owns: checked to answer bob as they answer alice, never 404.
CATALOG_ROUTES = {
    "/replicate/v1/models/{owner}/{name}",
    "/replicate/v1/models/{owner}/{name}/versions",
    "/replicate/v1/models/{owner}/{name}/versions/{version}",
    "/replicate/v1/models/{owner}/{name}/predictions",
    "/replicate/v1/deployments/{owner}/{name}/predictions",
}

# Routes that take an id but no API key: the URL carries its own proof (an HMAC made with
# the server's secret), so "another tenant's key" means nothing there. Each is checked
# instead to refuse a request without that proof, whatever key comes with it.
EXEMPT: dict[str, str] = {
    "/v1/files/{key:path}": "signed download URL of the local blob store (HMAC over key and expiry)",
    "/v1/callbacks/{provider}/{token}": "provider webhooks; the token is an HMAC naming the job (core/callbacks.py)",
}

# Operator routes (api/admin.py): any tenant key gets 403 before the id is looked at; the
# admin key with alice's real id gets neither 403 nor 404.
ADMIN_ROUTES = {
    "/v1/admin/tenants/{tenant_id}",
    "/v1/admin/keys/{key_id}",
    "/v1/admin/keys/{key_id}/revoke",
    "/v1/admin/keys/{key_id}/rotate",
    "/v1/admin/jobs/{job_id}",
}


# the cases, from the route table ------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    method: str  # an HTTP method, "WS" (per-route websocket) or "WS-SUBSCRIBE" (/v1/ws message)
    path: str
    params: tuple[str, ...]
    query: tuple[str, ...] = ()  # parameters sent in the query string instead

    @property
    def id(self) -> str:
        return f"{self.method} {self.path}" + (f"?{'&'.join(self.query)}=" if self.query else "")


# Routes that take an id outside their path; each is checked like the derived ones.
EXTRA_CASES = [
    Case("GET", "/v1/usage", ("tenant",), query=("tenant",)),  # a tenant key may only read its own tenant
    Case("WS-SUBSCRIBE", "/v1/ws", ("job_id",)),  # {"op": "subscribe", "job_ids": [...]}
]


def route_table(app: FastAPI) -> list[tuple[str, str]]:
    """(method or "WS", path) of every route, through included routers."""
    walk = getattr(fastapi.routing, "iter_route_contexts", None)  # FastAPI >= 0.16x nests included routers
    routes = [ctx.original_route for ctx in walk(app.routes)] if walk else list(app.routes)
    out: list[tuple[str, str]] = []
    for r in routes:
        path = getattr(r, "path", None)
        if path is None:
            continue
        if isinstance(r, WebSocketRoute):
            out.append(("WS", path))
        else:
            out += [(m, path) for m in sorted(getattr(r, "methods", None) or ()) if m != "HEAD"]
    return out


def cases_of(app: FastAPI) -> list[Case]:
    """Every route with a `{param}` in its path, plus EXTRA_CASES."""
    found = [Case(m, p, tuple(PARAM.findall(p))) for m, p in route_table(app)]
    return [c for c in found if c.params] + EXTRA_CASES


def problem_with(case: Case) -> str | None:
    """Why the test cannot check `case` (the route table grew without this file), or None."""
    if case.path in EXEMPT or case.path in CATALOG_ROUTES:
        return None
    if case.path.startswith("/v1/admin/") and case.path not in ADMIN_ROUTES:
        return (f"{case.id} is an admin route not listed in ADMIN_ROUTES in tests/test_isolation.py: "
                "add it there (tenant keys must get 403)")
    missing = [p for p in case.params if p not in IDS]
    if missing:
        return (f"{case.id} takes {', '.join(missing)}, which IDS in tests/test_isolation.py does not know: add "
                "how to get alice's real id of that kind (or, for a route with no API key, list it in EXEMPT with why)")
    return None


CASES = cases_of(create_app(Settings()))  # only to read app.routes: no lifespan runs


# fixtures and helpers -------------------------------------------------------------------------
def admin_client(stack: Stack) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[World]:
    st = await make_stack(
        tmp_path_factory.mktemp("isolation"), redis_url=f"{redis_base}/0", admin_key=ADMIN_KEY,
        webhook_allowlist='["127.0.0.1/32"]', webhook_backoff_seconds="[0.2, 0.2]", webhook_timeout_seconds="2",
    )
    async with running(st):
        async with st.client("alice") as c:
            image = (await c.post("/v1/jobs", json={
                "model": "local-image", "input": {"prompt": "alice's fox", "size": "256x256"}, "webhook_url": DEAD_HOOK,
            })).json()
            video = (await c.post("/v1/jobs", json={
                "model": "local-video", "input": {"prompt": "alice's river", "duration_seconds": 1, "resolution": "360p", "fps": 2},
            })).json()
            image, video = await asyncio.gather(st.wait_job(c, image["id"]), st.wait_job(c, video["id"]))
            assert image["status"] == "succeeded" and image["outputs"], image
            assert video["status"] == "succeeded" and video["outputs"], video
            for _ in range(100):
                ds = (await c.get("/v1/webhooks/deliveries", params={"job_id": image["id"]})).json()["data"]
                if ds:
                    break
                await asyncio.sleep(0.1)
            assert ds, "the image job's webhook made no delivery"
        yield World(st, image["id"], video["id"], ds[0]["id"], image["outputs"][0]["url"])


def _unknown(value: str) -> str:
    """An id of the same kind that does not exist."""
    prefix, sep, _ = value.partition("_")
    if sep:
        return new_id(prefix)
    return value if value.isdigit() else f"nosuch-{value}"


def _url(case: Case, ids: dict[str, str]) -> tuple[str, dict[str, str]]:
    path = PARAM.sub(lambda m: ids[m[1]] if m[1] not in case.query else m[0], case.path)
    return path, {p: ids[p] for p in case.query}


def _masked(text: str, ids: dict[str, str], unknown: dict[str, str]) -> str:
    """`text` with the ids that differ between the two requests replaced by their names."""
    for name in sorted(ids, key=lambda n: -len(ids[n])):
        if ids[name] != unknown[name]:
            text = text.replace(ids[name], f"<{name}>")
    return text


async def _http(stack: Stack, key: str, case: Case, ids: dict[str, str]) -> tuple[int, str]:
    path, query = _url(case, ids)
    body = {} if case.method in ("POST", "PUT", "PATCH") else None
    async with httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        async with c.stream(case.method, path, params=query, json=body) as r:
            # a success may be a live stream (SSE) or a file: its status is all we need
            text = (await r.aread()).decode(errors="replace") if r.status_code >= 400 else ""
            return r.status_code, text


async def _ws(stack: Stack, key: str, case: Case, ids: dict[str, str]) -> tuple[int | None, str, list[dict[str, Any]]]:
    """Close code, close reason and the messages received before it closed (or before the
    first message naming the job, for a websocket that stays open)."""
    base = stack.api_url.replace("http://", "ws://", 1)
    msgs: list[dict[str, Any]] = []
    path = _url(case, ids)[0]
    async with connect(base + path, additional_headers={"Authorization": f"Bearer {key}"}, open_timeout=20) as ws:
        if case.method == "WS-SUBSCRIBE":
            await ws.send(json.dumps({"op": "subscribe", "job_ids": [ids["job_id"]]}))
        try:
            async with asyncio.timeout(20):
                async for raw in ws:
                    msgs.append(json.loads(raw))
                    if msgs[-1].get("type") == "job.state":
                        break  # the job was served: enough
        except ConnectionClosed:
            pass
    return ws.close_code, ws.close_reason or "", msgs


async def _answer(stack: Stack, key: str, case: Case, ids: dict[str, str]) -> tuple[int | None, str]:
    """(status or websocket close code, error body or close reason)."""
    if case.method.startswith("WS"):
        code, reason, msgs = await _ws(stack, key, case, ids)
        served = [m for m in msgs if m.get("type") == "job.state"]
        return (200 if served else code), reason
    return await _http(stack, key, case, ids)


# exempt routes: each checked for its own proof ----------------------------------------------------
async def _exempt_files(w: World) -> None:
    url = urlsplit(w.output_url)
    bob = {"Authorization": f"Bearer {w.stack.keys['bob']}"}
    async with httpx.AsyncClient(base_url=w.stack.api_url, timeout=30) as c:
        for query in ("", "exp=9999999999&sig=forged"):  # no proof, forged proof: with any key, 404
            r = await c.get(f"{url.path}?{query}", headers=bob)
            assert r.status_code == 404, (query, r.status_code, r.text)
        r = await c.get(f"{url.path}?{url.query}")  # the signed URL itself is the capability
        assert r.status_code == 200 and r.content


async def _exempt_callbacks(w: World) -> None:
    bob = {"Authorization": f"Bearer {w.stack.keys['bob']}"}
    forged = callback_token("not-the-server-secret", w.image_job)
    async with httpx.AsyncClient(base_url=w.stack.api_url, timeout=30) as c:
        r = await c.post(f"/v1/callbacks/local/{forged}", headers=bob, content=b"{}")
        assert r.status_code == 401, r.text
        genuine = callback_token(w.stack.env["GENROUTE_SECRET_KEY"], w.image_job)
        r = await c.post(f"/v1/callbacks/local/{genuine}", content=b"{}")  # accepted (and ignored: the job is over)
        assert r.status_code == 200 and r.json()["status"] == "ignored", r.text


EXEMPT_CHECKS: dict[str, Callable[[World], Awaitable[None]]] = {
    "/v1/files/{key:path}": _exempt_files,
    "/v1/callbacks/{provider}/{token}": _exempt_callbacks,
}


# the tests -------------------------------------------------------------------------------------
def test_the_route_table_is_read_and_the_lists_are_current() -> None:
    """The walk finds the routes (a walk that found none would make the test below pass
    vacuously), and every EXEMPT/ADMIN_ROUTES entry still names a route."""
    ids = {c.id for c in CASES}
    for expected in ("GET /v1/jobs/{job_id}", "GET /v1/jobs/{job_id}/outputs/{index}", "WS /v1/jobs/{job_id}/events",
                     "GET /v1/jobs/{job_id}/events", "POST /v1/jobs/{job_id}/cancel", "GET /v1/videos/{video_id}",
                     "GET /v1/webhooks/deliveries/{delivery_id}", "DELETE /v1/webhooks/endpoints/{endpoint_id}"):
        assert expected in ids, (expected, sorted(ids))
    paths = {c.path for c in CASES}
    assert not (set(EXEMPT) | ADMIN_ROUTES | CATALOG_ROUTES) - paths, "stale entries: remove them"
    assert set(EXEMPT_CHECKS) == set(EXEMPT)


def test_a_new_route_with_an_unknown_id_fails_until_it_is_added() -> None:
    """What a new route gets: a parameter IDS does not know is a failure, not a skip."""
    app = FastAPI()

    @app.get("/v1/things/{thing_id}")
    async def thing(thing_id: str) -> None: ...

    @app.post("/v1/admin/things/{job_id}")
    async def admin_thing(job_id: str) -> None: ...

    problems = {c.id: problem_with(c) for c in cases_of(app)}
    assert "thing_id" in (problems["GET /v1/things/{thing_id}"] or "") and "add" in (problems["GET /v1/things/{thing_id}"] or "")
    assert "ADMIN_ROUTES" in (problems["POST /v1/admin/things/{job_id}"] or "")
    assert [c.id for c in CASES if problem_with(c) is not None] == []  # today's routes are all known


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
async def test_another_tenants_id_is_not_found(world: World, case: Case) -> None:
    problem = problem_with(case)
    if problem is not None:
        pytest.fail(problem)
    if case.path in EXEMPT:
        await EXEMPT_CHECKS[case.path](world)
        return
    st = world.stack
    if case.path in CATALOG_ROUTES:
        path = case.path.replace("{owner}", "genroute").replace("{name}", "local-image").replace("{version}", "0" * 64)
        async with st.client("bob") as c:
            body = {"input": {"prompt": "bob's own", "width": 256, "height": 256}} if case.method == "POST" else None
            r = await c.request(case.method, path, json=body)
        assert r.status_code in (200, 201), (case.id, r.status_code, r.text)
        return
    ids = {p: await IDS[p](world) for p in case.params}
    unknown = {p: _unknown(v) for p, v in ids.items()}

    if case.path in ADMIN_ROUTES:
        for tenant in ("bob", "alice"):
            status, body = await _answer(st, st.keys[tenant], case, ids)
            assert status == 403 and json.loads(body)["error"]["code"] == "forbidden", (tenant, status, body)
        status, body = await _answer(st, ADMIN_KEY, case, ids)
        assert status not in (403, 404), ("the admin key should reach it", status, body)
        return

    # bob first: a mutating route (DELETE, cancel, redeliver) must have done nothing to alice's id
    status, body = await _answer(st, st.keys["bob"], case, ids)
    expected = 4404 if case.method.startswith("WS") else 404  # api/events.py CLOSE_NOT_FOUND
    assert status == expected, (case.id, status, body)
    # ...and be told exactly what an id that never existed is told: nothing leaks
    status_unknown, body_unknown = await _answer(st, st.keys["bob"], case, unknown)
    assert (status_unknown, _masked(body_unknown, unknown, ids)) == (status, _masked(body, ids, unknown))
    # the id was real: alice reaches it on the same route
    status, body = await _answer(st, st.keys["alice"], case, ids)
    assert status not in (404, 4404), (case.id, "alice's own id", status, body)


# the webhooks scope: webhook management needs it --------------------------------------------------
# Every route under these prefixes manages a tenant's webhooks (endpoints, the signing secret,
# deliveries). Derived from the route table like CASES, so a new webhook route is covered.
WEBHOOK_PREFIXES = ("/v1/webhooks/", "/replicate/v1/webhooks/")
WEBHOOK_ROUTES = [(m, p) for m, p in route_table(create_app(Settings())) if p.startswith(WEBHOOK_PREFIXES)]


def _code(body: str) -> str | None:
    """The stable error code, in our shape ({"error": {"code"}}) or Replicate's ({"code"})."""
    data = json.loads(body)
    return data["error"]["code"] if isinstance(data.get("error"), dict) else data.get("code")


@pytest.fixture(scope="module")
async def scoped_keys(world: World) -> dict[str, str]:
    """Two more keys of alice's tenant, both scoped to local-image: one without the webhooks
    scope, one granted it."""
    out = {}
    async with admin_client(world.stack) as a:
        for name, scopes in (("models-only", {"models": ["local-image"]}),
                             ("with-webhooks", {"models": ["local-image"], "webhooks": True})):
            r = await a.post("/v1/admin/keys", json={"tenant": "alice", "name": name, "scopes": scopes})
            assert r.status_code == 201, r.text
            assert r.json()["scopes"] == {"models": ["local-image"], **({"webhooks": True} if scopes.get("webhooks") else {})}
            out[name] = r.json()["key"]
    return out


def test_the_webhook_routes_are_found() -> None:
    found = {f"{m} {p}" for m, p in WEBHOOK_ROUTES}
    for expected in ("POST /v1/webhooks/endpoints", "GET /v1/webhooks/endpoints", "DELETE /v1/webhooks/endpoints/{endpoint_id}",
                     "GET /v1/webhooks/secret", "POST /v1/webhooks/secret/rotate", "GET /v1/webhooks/deliveries",
                     "GET /v1/webhooks/deliveries/{delivery_id}", "POST /v1/webhooks/deliveries/{delivery_id}/redeliver",
                     "GET /replicate/v1/webhooks/default/secret"):
        assert expected in found, (expected, sorted(found))


@pytest.mark.parametrize(("method", "path"), WEBHOOK_ROUTES, ids=lambda x: x)
async def test_a_key_without_the_webhooks_scope_gets_403_on_webhook_management(
    world: World, scoped_keys: dict[str, str], method: str, path: str
) -> None:
    st = world.stack
    case = Case(method, path, tuple(PARAM.findall(path)))
    missing = [p for p in case.params if p not in IDS]
    assert not missing, f"{path} takes {missing}: add them to IDS"
    ids = {p: await IDS[p](world) for p in case.params}  # alice's real ids: only the scope is missing
    status, body = await _http(st, scoped_keys["models-only"], case, ids)
    assert status == 403 and _code(body) == "webhooks_not_allowed", (status, body)
    assert "webhooks" in json.dumps(json.loads(body)), body  # the message says what to grant
    # the same tenant's key granted the scope reaches the route, as does a key with no scopes
    for key in (scoped_keys["with-webhooks"], st.keys["alice"]):
        ids = {p: await IDS[p](world) for p in case.params}  # DELETE consumed the endpoint: a fresh one
        status, body = await _http(st, key, case, ids)
        assert status not in (401, 403, 404), (status, body)


async def test_the_webhooks_scope_is_validated_and_a_webhooks_only_key_uses_no_model(world: World) -> None:
    st = world.stack
    async with admin_client(st) as a:
        r = await a.post("/v1/admin/keys", json={"tenant": "alice", "name": "bad", "scopes": {"webhooks": "yes"}})
        assert r.status_code == 422, r.text
        r = await a.post("/v1/admin/keys", json={"tenant": "alice", "name": "none", "scopes": {"webhooks": False}})
        assert r.status_code == 422 and "webhooks" in r.text, r.text
        r = await a.post("/v1/admin/keys", json={"tenant": "alice", "name": "hooks", "scopes": {"webhooks": True}})
        assert r.status_code == 201 and r.json()["scopes"] == {"webhooks": True}, r.text
        hooks_only, key_id = r.json()["key"], r.json()["id"]
    async with httpx.AsyncClient(base_url=st.api_url, headers={"Authorization": f"Bearer {hooks_only}"}, timeout=60) as c:
        assert (await c.get("/v1/webhooks/endpoints")).status_code == 200
        r = await c.post("/v1/jobs", json={"model": "local-image", "input": {"prompt": "x", "size": "256x256"}})
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed", r.text
        assert (await c.get("/v1/models")).json()["data"] == []
    # granting and withdrawing the scope takes effect at once (the key cache is dropped)
    async with admin_client(st) as a:
        r = await a.patch(f"/v1/admin/keys/{key_id}", json={"scopes": {"modalities": ["image"]}})
        assert r.status_code == 200 and r.json()["scopes"] == {"modalities": ["image"]}, r.text
    async with httpx.AsyncClient(base_url=st.api_url, headers={"Authorization": f"Bearer {hooks_only}"}, timeout=60) as c:
        r = await c.get("/v1/webhooks/endpoints")
        assert r.status_code == 403 and r.json()["error"]["code"] == "webhooks_not_allowed", r.text
