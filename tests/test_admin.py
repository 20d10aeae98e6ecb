"""Tenants, admin keys and scoped keys with limits, managed through /v1/admin/..., from the
operator's and the client's side against real API processes (PostgreSQL, Redis).

The stack's key cache lives 60 s here, so anything that takes effect in under 2 s does so
because of the Redis announcement (api/deps.py KeyWatcher), not the cache's TTL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from core.billing.tenants import ensure_tenant
from core.db import create_engine, sessionmaker
from core.keys import changed_channel, create_key, lookup
from core.migrate import upgrade
from core.models import Tenant
from core.settings import Settings
from tests.services import fresh_postgres
from tests.stack import BIN, Stack, make_stack, running

ADMIN = "admin-secret-for-admin-tests"
CACHE_TTL = 60.0
PROPAGATION_BOUND = 2.0  # seconds; far under CACHE_TTL


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[Stack]:
    async with fresh_postgres() as db:
        st = await make_stack(tmp_path_factory.mktemp("admin"), redis_url=f"{redis_base}/0", database_url=db,
                              admin_key=ADMIN, key_cache_seconds=str(CACHE_TTL))
        async with running(st):
            yield st


@pytest.fixture(scope="module")
def url_b(stack: Stack) -> str:
    """A second `genroute api` process on the same DB and Redis (stopped with the stack)."""
    return stack.start_api_replica("api-b")


def admin_client(stack: Stack, url: str | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url or stack.api_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def new_tenant(a: httpx.AsyncClient, tenant_id: str, **body: Any) -> dict[str, Any]:
    r = await a.post("/v1/admin/tenants", json={"id": tenant_id, **body})
    assert r.status_code == 201, r.text
    return r.json()


async def new_key(a: httpx.AsyncClient, tenant: str, **body: Any) -> dict[str, Any]:
    r = await a.post("/v1/admin/keys", json={"tenant": tenant, "name": body.pop("name", "k"), **body})
    assert r.status_code == 201, r.text
    return r.json()


async def status_with(url: str, key: str) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        return (await c.get("/v1/models", headers=as_key(key))).status_code


async def refused_after(url: str, key: str, start: float, bound: float) -> float:
    """Seconds from `start` until `key` gets 401 at `url` (polling every 10 ms), or inf."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        while time.monotonic() - start < bound + 3:
            if (await c.get("/v1/models", headers=as_key(key))).status_code == 401:
                return time.monotonic() - start
            await asyncio.sleep(0.01)
    return float("inf")


def error(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


# tenants and keys ---------------------------------------------------------------------------------
async def test_operator_makes_a_tenant_and_a_key_that_works(stack: Stack) -> None:
    async with admin_client(stack) as a:
        t = await new_tenant(a, "acme", name="Acme Inc.", budget=5_000_000)
        assert t == {**t, "id": "acme", "object": "tenant", "name": "Acme Inc.", "budget": 5_000_000,
                     "spent": 0, "held": 0, "available": 5_000_000}
        assert error(await a.post("/v1/admin/tenants", json={"id": "acme"})) == (409, "tenant_exists")
        r = await a.get("/v1/admin/tenants/acme")
        assert r.status_code == 200 and r.json()["available"] == 5_000_000
        r = await a.patch("/v1/admin/tenants/acme", json={"budget": None})
        assert r.status_code == 200 and r.json()["budget"] is None and r.json()["available"] is None, r.text
        r = await a.patch("/v1/admin/tenants/acme", json={"name": "Acme"})
        assert r.json()["name"] == "Acme" and r.json()["budget"] is None  # left-out fields stay

        k = await new_key(a, "acme", name="ci", rpm=600, max_concurrency=4, scopes={"modalities": ["image"]})
        assert k["key"].startswith("gr_") and k["prefix"] == k["key"][:10]
        assert {x: k[x] for x in ("tenant", "name", "admin", "rpm", "max_concurrency", "queue_when_busy", "status")} == {
            "tenant": "acme", "name": "ci", "admin": False, "rpm": 600, "max_concurrency": 4,
            "queue_when_busy": True, "status": "active"}
        assert k["scopes"] == {"modalities": ["image"]} and k["expires_at"] is None and k["revoked_at"] is None

    async with httpx.AsyncClient(base_url=stack.api_url, headers=as_key(k["key"]), timeout=60) as c:
        assert (await c.get("/v1/models")).status_code == 200
        r = await c.post("/v1/jobs", json={"model": "local-image", "input": {"prompt": "a fox"}}, headers={"Prefer": "wait=30"})
        assert r.status_code in (200, 201) and r.json()["status"] == "succeeded", r.text
        assert (await c.get(f"/v1/jobs/{r.json()['id']}")).status_code == 200


async def test_lists_page_through_everything_and_never_show_a_secret(stack: Stack) -> None:
    async with admin_client(stack) as a:
        await new_tenant(a, "listed")
        made = [await new_key(a, "listed", name=f"k{i}") for i in range(3)]
        seen: list[str] = []
        cursor = None
        while True:
            r = await a.get("/v1/admin/keys", params={"tenant": "listed", "limit": 2, **({"cursor": cursor} if cursor else {})})
            assert r.status_code == 200, r.text
            body = r.json()
            for k in made:
                assert k["key"] not in r.text
            assert all("key" not in item and "key_hash" not in item for item in body["data"])
            seen += [item["id"] for item in body["data"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert seen == [k["id"] for k in reversed(made)]  # newest first, each once

        r = await a.get(f"/v1/admin/keys/{made[0]['id']}")
        assert r.status_code == 200 and r.json()["name"] == "k0" and "key" not in r.json()

        tenant_ids: list[str] = []
        cursor = None
        while True:
            r = await a.get("/v1/admin/tenants", params={"limit": 1, **({"cursor": cursor} if cursor else {})})
            tenant_ids += [t["id"] for t in r.json()["data"]]
            cursor = r.json()["next_cursor"]
            if cursor is None:
                break
        assert {"alice", "bob", "listed"} <= set(tenant_ids) and len(tenant_ids) == len(set(tenant_ids))


async def test_patch_changes_limits_and_scopes_and_null_clears_them(stack: Stack) -> None:
    async with admin_client(stack) as a:
        await new_tenant(a, "patchy")
        k = await new_key(a, "patchy")
        path = f"/v1/admin/keys/{k['id']}"
        r = await a.patch(path, json={"rpm": 5, "max_concurrency": 2, "queue_when_busy": False,
                                      "scopes": {"models": ["local-image", "local-image"], "modalities": ["audio"]},
                                      "name": "renamed", "expires_in_seconds": 3600})
        assert r.status_code == 200, r.text
        got = r.json()
        assert (got["rpm"], got["max_concurrency"], got["queue_when_busy"], got["name"]) == (5, 2, False, "renamed")
        assert got["scopes"] == {"models": ["local-image"], "modalities": ["audio"]}
        expires = datetime.fromisoformat(got["expires_at"])
        assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)
        assert (await a.get(path)).json() == got

        r = await a.patch(path, json={"rpm": None, "scopes": None, "expires_at": None})
        got = r.json()
        assert (got["rpm"], got["scopes"], got["expires_at"], got["max_concurrency"]) == (None, None, None, 2)
        assert (await status_with(stack.api_url, k["key"])) == 200  # the secret never changes on PATCH


async def test_validation_errors_say_what_to_fix(stack: Stack) -> None:
    async with admin_client(stack) as a:
        await new_tenant(a, "valid")
        k = await new_key(a, "valid")
        past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
        cases: list[tuple[str, str, Any, int, str, str]] = [
            # method, path, body, status, code, a word the message or details must carry
            ("POST", "/v1/admin/tenants", {"id": "bad id!"}, 422, "invalid_input", "id"),
            ("POST", "/v1/admin/tenants", {"id": "x" * 101}, 422, "invalid_input", "id"),
            ("POST", "/v1/admin/tenants", {"id": "admin"}, 422, "reserved_tenant_id", "reserved"),
            ("POST", "/v1/admin/tenants", {"id": "Admin"}, 422, "reserved_tenant_id", "reserved"),
            ("POST", "/v1/admin/tenants", {"id": "neg", "budget": -1}, 422, "invalid_input", "budget"),
            ("POST", "/v1/admin/tenants", {"id": "extra", "spent": 5}, 422, "invalid_input", "spent"),
            ("PATCH", "/v1/admin/tenants/valid", {"budget": 1.5}, 422, "invalid_input", "budget"),
            ("PATCH", "/v1/admin/tenants/valid", {"name": None}, 422, "invalid_input", "name"),
            ("PATCH", "/v1/admin/tenants/nobody", {"budget": 1}, 404, "tenant_not_found", "nobody"),
            ("GET", "/v1/admin/tenants/nobody", None, 404, "tenant_not_found", "POST /v1/admin/tenants"),
            ("GET", "/v1/admin/tenants/bad%20id", None, 404, "tenant_not_found", "bad id"),
            ("POST", "/v1/admin/keys", {"tenant": "nobody", "name": "k"}, 404, "tenant_not_found", "POST /v1/admin/tenants"),
            ("POST", "/v1/admin/keys", {"tenant": "admin", "name": "k"}, 422, "reserved_tenant_id", "reserved"),
            ("POST", "/v1/admin/keys", {"tenant": "ADMIN", "name": "k", "admin": True}, 422, "reserved_tenant_id", "reserved"),
            ("POST", "/v1/admin/keys", {"tenant": "valid"}, 422, "invalid_input", "name"),
            ("POST", "/v1/admin/keys", {"tenant": "valid", "name": "k", "scopes": {"modalities": ["smell"]}},
             422, "invalid_input", "modalities"),
            ("POST", "/v1/admin/keys", {"tenant": "valid", "name": "k", "scopes": {"models": ["no-such-model"]}},
             422, "unknown_model", "no-such-model"),
            ("POST", "/v1/admin/keys", {"tenant": "valid", "name": "k", "scopes": {}}, 422, "invalid_input", "at least one"),
            ("POST", "/v1/admin/keys", {"tenant": "valid", "name": "k", "rpm": 0}, 422, "invalid_input", "rpm"),
            ("POST", "/v1/admin/keys", {"tenant": "valid", "name": "k", "max_concurrency": -1}, 422, "invalid_input",
             "max_concurrency"),
            ("POST", "/v1/admin/keys", {"tenant": "valid", "name": "k", "expires_at": past}, 422, "invalid_expiry", "past"),
            ("POST", "/v1/admin/keys", {"tenant": "valid", "name": "k", "expires_at": "2031-01-01T00:00:00"},
             422, "invalid_input", "time zone"),
            ("POST", "/v1/admin/keys", {"tenant": "valid", "name": "k", "expires_at": "2031-01-01T00:00:00Z",
                                        "expires_in_seconds": 60}, 422, "invalid_input", "not both"),
            ("PATCH", f"/v1/admin/keys/{k['id']}", {"rpm": 0}, 422, "invalid_input", "rpm"),
            ("PATCH", f"/v1/admin/keys/{k['id']}", {"scopes": {"models": ["nope"]}}, 422, "unknown_model", "nope"),
            ("PATCH", f"/v1/admin/keys/{k['id']}", {"queue_when_busy": None}, 422, "invalid_input", "queue_when_busy"),
            ("GET", "/v1/admin/keys/key_nope", None, 404, "key_not_found", "key_nope"),
            ("GET", "/v1/admin/keys/" + "x" * 300, None, 404, "key_not_found", "GET /v1/admin/keys"),
            ("PATCH", "/v1/admin/keys/key_nope", {"rpm": 3}, 404, "key_not_found", "key_nope"),
            ("POST", "/v1/admin/keys/key_nope/revoke", None, 404, "key_not_found", "key_nope"),
            ("POST", "/v1/admin/keys/key_nope/rotate", None, 404, "key_not_found", "key_nope"),
            ("POST", f"/v1/admin/keys/{k['id']}/rotate", {"grace_seconds": -1}, 422, "invalid_input", "grace_seconds"),
        ]
        for method, path, body, status, code, word in cases:
            r = await a.request(method, path, json=body)
            assert r.status_code == status and r.json()["error"]["code"] == code, (method, path, body, r.text)
            assert word in r.text, (method, path, r.text)
        # a revoked key cannot be changed or rotated
        assert (await a.post(f"/v1/admin/keys/{k['id']}/revoke")).status_code == 200
        assert error(await a.patch(f"/v1/admin/keys/{k['id']}", json={"rpm": 3})) == (409, "key_revoked")
        assert error(await a.post(f"/v1/admin/keys/{k['id']}/rotate")) == (409, "key_revoked")
        r = await a.post(f"/v1/admin/keys/{k['id']}/revoke")  # revoking twice is harmless
        assert r.status_code == 200 and r.json()["status"] == "revoked"


async def test_admin_routes_need_an_admin_key(stack: Stack) -> None:
    async with stack.client() as c:  # a tenant key
        for method, path in [("GET", "/v1/admin/tenants"), ("POST", "/v1/admin/keys"), ("POST", "/v1/admin/catalog/reload"),
                             ("GET", "/v1/admin/keys/key_x")]:
            r = await c.request(method, path, json={"tenant": "alice", "name": "sneaky"} if method == "POST" else None)
            assert error(r) == (403, "forbidden"), (path, r.text)
            assert "admin key" in r.json()["error"]["message"]
        r = await c.get("/v1/admin/tenants", headers={"Authorization": "Bearer gr_not_a_real_key"})
        assert error(r) == (401, "unauthorized")
    async with httpx.AsyncClient(base_url=stack.api_url) as anon:
        assert error(await anon.get("/v1/admin/tenants")) == (401, "unauthorized")
        assert error(await anon.get("/v1/models", headers=as_key("gr_unknown"))) == (401, "unauthorized")

    async with admin_client(stack) as a:  # an admin key made over the API can do what the settings key does
        boss = await new_key(a, "alice", name="ops", admin=True)
        assert boss["admin"] is True
    async with httpx.AsyncClient(base_url=stack.api_url, headers=as_key(boss["key"])) as b:
        assert (await b.get("/v1/admin/tenants")).status_code == 200
        made = await new_key(b, "bob", name="made-by-ops")
        assert made["tenant"] == "bob"
        assert (await b.post("/v1/admin/catalog/reload")).status_code == 200
        assert (await b.post(f"/v1/admin/keys/{boss['id']}/revoke")).status_code == 200
        assert error(await b.get("/v1/admin/tenants")) == (401, "unauthorized")


async def test_rotate_without_grace_stops_the_old_key_at_once(stack: Stack) -> None:
    async with admin_client(stack) as a:
        await new_tenant(a, "rot")
        old = await new_key(a, "rot", name="svc", rpm=9, scopes={"models": ["local-image"]})
        assert await status_with(stack.api_url, old["key"]) == 200  # cached now
        r = await a.post(f"/v1/admin/keys/{old['id']}/rotate")
        assert r.status_code == 200, r.text
        new = r.json()
        assert new["id"] != old["id"] and new["key"] != old["key"] and new["status"] == "active"
        assert (new["tenant"], new["name"], new["rpm"], new["scopes"]) == ("rot", "svc", 9, {"models": ["local-image"]})
        assert new["previous"]["id"] == old["id"] and new["previous"]["status"] == "revoked"
    assert await status_with(stack.api_url, old["key"]) == 401
    assert await status_with(stack.api_url, new["key"]) == 200


async def test_rotate_with_grace_keeps_the_old_key_until_then(stack: Stack) -> None:
    grace = 2
    async with admin_client(stack) as a:
        await new_tenant(a, "graceful")
        old = await new_key(a, "graceful")
        assert await status_with(stack.api_url, old["key"]) == 200
        r = await a.post(f"/v1/admin/keys/{old['id']}/rotate", json={"grace_seconds": grace})
        start = time.monotonic()
        assert r.status_code == 200, r.text
        new = r.json()
        prev = new["previous"]
        assert prev["status"] == "active" and prev["revoked_at"] is None
        left = datetime.fromisoformat(prev["expires_at"]) - datetime.now(UTC)
        assert timedelta(seconds=grace - 1) < left <= timedelta(seconds=grace)
        assert await status_with(stack.api_url, old["key"]) == 200  # both work during the grace
        assert await status_with(stack.api_url, new["key"]) == 200
        gone = await refused_after(stack.api_url, old["key"], start, grace + 1)
        assert grace - 0.5 < gone < grace + 1, gone
        assert await status_with(stack.api_url, new["key"]) == 200
        assert (await a.get(f"/v1/admin/keys/{old['id']}")).json()["status"] == "expired"


async def test_a_key_stops_at_its_expiry_even_while_cached(stack: Stack) -> None:
    async with admin_client(stack) as a:
        await new_tenant(a, "brief")
        k = await new_key(a, "brief", expires_in_seconds=2)
        start = time.monotonic()
        assert k["expires_at"] is not None
        assert await status_with(stack.api_url, k["key"]) == 200  # cached for CACHE_TTL, but expiring in 2 s
        gone = await refused_after(stack.api_url, k["key"], start, 3)
        assert 1.0 < gone < 3.0, gone
        assert (await a.get(f"/v1/admin/keys/{k['id']}")).json()["status"] == "expired"
        assert error(await a.post(f"/v1/admin/keys/{k['id']}/rotate")) == (409, "key_expired")


# revocation on every API process -------------------------------------------------------------------
async def _revoke_and_measure(stack: Stack, url_a: str, url_b: str, tenant: str) -> tuple[float, float]:
    async with admin_client(stack, url_a) as a:
        k = await new_key(a, tenant)
        for url in (url_a, url_b, url_a, url_b):  # both processes have it cached
            assert await status_with(url, k["key"]) == 200
        start = time.monotonic()
        r = await a.post(f"/v1/admin/keys/{k['id']}/revoke")
        assert r.status_code == 200 and r.json()["status"] == "revoked", r.text
    return await asyncio.gather(refused_after(url_b, k["key"], start, PROPAGATION_BOUND),
                                refused_after(url_a, k["key"], start, PROPAGATION_BOUND))


async def test_a_revoked_key_is_refused_by_every_api_process_within_moments(stack: Stack, url_b: str) -> None:
    async with admin_client(stack) as a:
        await new_tenant(a, "revoked")
    delays = []
    for _ in range(3):
        b, a_ = await _revoke_and_measure(stack, stack.api_url, url_b, "revoked")
        delays.append((b, a_))
        print(f"revocation refused after: process B {b * 1000:.0f} ms, process A {a_ * 1000:.0f} ms "
              f"(key cache TTL {CACHE_TTL:g} s)")
        assert b < PROPAGATION_BOUND and a_ < PROPAGATION_BOUND, (b, a_)
    # and the other way round: revoked through B, refused by A
    b_first, a_second = await _revoke_and_measure(stack, url_b, stack.api_url, "revoked")
    print(f"revoked through B: refused by A after {b_first * 1000:.0f} ms, by B after {a_second * 1000:.0f} ms")
    assert b_first < PROPAGATION_BOUND and a_second < PROPAGATION_BOUND


async def test_invalidation_survives_a_lost_redis_connection(stack: Stack, url_b: str, redis_base: str) -> None:
    async with admin_client(stack) as a:
        await new_tenant(a, "reconnect")
    name = changed_channel(stack.env["GENROUTE_REDIS_PREFIX"])
    redis = Redis.from_url(f"{redis_base}/0")
    try:
        async def watchers() -> list[dict[str, Any]]:
            return [c for c in await redis.client_list(_type="pubsub") if c.get("name") == name]

        before = await watchers()
        assert len(before) == 2, before  # one per API process
        for c in before:
            await redis.client_kill_filter(_id=c["id"])
        deadline = time.monotonic() + 10
        while True:  # both watchers come back on new connections
            now = await watchers()
            if len(now) == 2 and not {c["id"] for c in now} & {c["id"] for c in before}:
                break
            assert time.monotonic() < deadline, now
            await asyncio.sleep(0.05)
    finally:
        await redis.aclose()
    b, a_ = await _revoke_and_measure(stack, stack.api_url, url_b, "reconnect")
    print(f"after a Redis reconnect, revocation refused after: B {b * 1000:.0f} ms, A {a_ * 1000:.0f} ms")
    assert b < PROPAGATION_BOUND and a_ < PROPAGATION_BOUND


async def test_a_key_knows_when_its_tenant_gets_a_budget(stack: Stack) -> None:
    """The principal carries `budgeted` (read in the same query as the key)."""
    async with admin_client(stack) as a:
        await new_tenant(a, "budgeted")
        k = await new_key(a, "budgeted")
        assert await status_with(stack.api_url, k["key"]) == 200
        r = await a.patch("/v1/admin/tenants/budgeted", json={"budget": 1_000_000})
        assert r.status_code == 200 and r.json()["available"] == 1_000_000
    settings = stack.settings()
    engine = create_engine(settings)
    try:
        principal = await lookup(sessionmaker(engine), k["key"])
        assert principal is not None and principal.budgeted and principal.tenant == "budgeted"
    finally:
        await engine.dispose()


# CLI ----------------------------------------------------------------------------------------------
def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), *args], env={**os.environ, **stack.env}, capture_output=True, text=True, timeout=60)


async def test_cli_makes_tenants_budgets_and_scoped_keys(stack: Stack) -> None:
    r = await asyncio.to_thread(_cli, stack, "tenants", "create", "cli-co", "--budget", "2500000")
    assert r.returncode == 0 and "cli-co" in r.stdout, r.stderr
    r = await asyncio.to_thread(_cli, stack, "tenants", "create", "cli-co")
    assert r.returncode == 1 and "already exists" in r.stderr
    r = await asyncio.to_thread(_cli, stack, "tenants", "create", "bad id")
    assert r.returncode == 1 and "invalid tenant id" in r.stderr
    # the admin principal's own tenant id, however it would be made (a key's tenant defaults to its name)
    for args in (("tenants", "create", "admin"), ("keys", "create", "--name", "bot", "--tenant", "Admin"),
                 ("keys", "create", "--name", "admin")):
        r = await asyncio.to_thread(_cli, stack, *args)
        assert r.returncode == 1 and "reserved" in r.stderr, (args, r.stdout, r.stderr)
    r = await asyncio.to_thread(_cli, stack, "keys", "create", "--name", "bot", "--tenant", "cli-co", "--rpm", "30",
                                "--max-concurrency", "3", "--no-queue", "--model", "local-image", "--modality", "audio",
                                "--expires-in", "3600")
    assert r.returncode == 0, r.stderr
    plain = r.stdout.split()[0]
    r2 = await asyncio.to_thread(_cli, stack, "keys", "create", "--name", "x", "--model", "no-such-model")
    assert r2.returncode == 1 and "no-such-model" in r2.stderr
    async with admin_client(stack) as a:
        keys = (await a.get("/v1/admin/keys", params={"tenant": "cli-co"})).json()["data"]
        assert len(keys) == 1 and plain not in str(keys)
        k = keys[0]
        assert (k["name"], k["rpm"], k["max_concurrency"], k["queue_when_busy"], k["scopes"]) == (
            "bot", 30, 3, False, {"models": ["local-image"], "modalities": ["audio"]})
        assert k["expires_at"] is not None
        assert await status_with(stack.api_url, plain) == 200
        assert (await a.get("/v1/admin/tenants/cli-co")).json()["budget"] == 2_500_000
        r = await asyncio.to_thread(_cli, stack, "tenants", "budget", "cli-co", "none")
        assert r.returncode == 0, r.stderr
        assert (await a.get("/v1/admin/tenants/cli-co")).json()["budget"] is None
        r = await asyncio.to_thread(_cli, stack, "tenants", "budget", "nobody", "5")
        assert r.returncode == 1 and "no tenant" in r.stderr
    r = await asyncio.to_thread(_cli, stack, "keys", "create", "--name", "root", "--tenant", "ops", "--admin")
    assert r.returncode == 0 and "admin key" in r.stdout, r.stderr
    async with httpx.AsyncClient(base_url=stack.api_url, headers=as_key(r.stdout.split()[0])) as c:
        assert (await c.get("/v1/admin/tenants/ops")).status_code == 200  # its tenant was made too


# core: concurrent tenant creation -------------------------------------------------------------------
@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
async def test_ensure_tenant_and_create_key_are_safe_concurrently(db: str, tmp_path: Path) -> None:
    async def go(url: str) -> None:
        settings = Settings(data_dir=tmp_path / "data", database_url=url)
        await asyncio.to_thread(upgrade, settings)
        engine = create_engine(settings)
        try:
            sessions = sessionmaker(engine)
            await asyncio.gather(*(ensure_tenant(sessions, "racy") for _ in range(10)),
                                 *(create_key(sessions, name=f"k{i}", tenant="racy2") for i in range(10)))
            async with sessions() as s:
                for tid in ("racy", "racy2"):
                    row = await s.get(Tenant, tid)
                    assert row is not None and row.budget is None and row.name == tid
        finally:
            await engine.dispose()

    if db == "sqlite":
        await go("")
    else:
        async with fresh_postgres() as url:
            await go(url)
