"""Failed authentication: the negative cache and the per-address 401 limit, through real
HTTP on two `genroute api` processes sharing one Redis and one database.

The client address is set with X-Forwarded-For, which uvicorn believes from 127.0.0.1
(its default FORWARDED_ALLOW_IPS), as it would from a reverse proxy on the same host.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.stack import Stack, make_stack, running

ADMIN_KEY = "admin-secret-for-auth-failure-tests"
LIMIT = 6
WINDOW = 30


@pytest.fixture(scope="module")
async def stacks(tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[tuple[Stack, str]]:
    st = await make_stack(
        tmp_path_factory.mktemp("authfail"), redis_url=f"{redis_base}/0", admin_key=ADMIN_KEY,
        auth_failure_limit=str(LIMIT), auth_failure_window_seconds=str(WINDOW), auth_negative_cache_seconds="30",
        key_cache_seconds="60",  # changes still reach every process at once (announced); this is the backstop
    )
    async with running(st):
        replica = st.start_api_replica("api2")
        yield st, replica


def _bogus() -> str:
    return "gr_" + secrets.token_urlsafe(32)


def _from(address: str, key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "X-Forwarded-For": address}


async def _failures(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=30) as c:
        text = (await c.get(f"{url}/metrics")).text
    return {m[1]: float(m[2]) for m in re.finditer(r'^genroute_auth_failures_total\{outcome="(\w+)"\} (\S+)$', text, re.M)}


async def test_failed_authentications_are_limited_per_address_across_replicas(stacks: tuple[Stack, str]) -> None:
    st, replica = stacks
    address, other = "203.0.113.7", "203.0.113.8"
    alice = st.keys["alice"]
    async with httpx.AsyncClient(timeout=30) as c:
        assert (await c.get(f"{st.api_url}/v1/jobs", headers=_from(address, alice))).status_code == 200  # cached on api 1
        # LIMIT failures, spread over both processes: every one is a plain 401
        for i in range(LIMIT):
            url = (st.api_url, replica)[i % 2]
            r = await c.get(f"{url}/v1/jobs", headers=_from(address, _bogus()))
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
        # the next, on either process, is refused before any lookup
        for url in (st.api_url, replica):
            r = await c.get(f"{url}/v1/jobs", headers=_from(address, _bogus()))
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "too_many_auth_failures" and "retry in" in r.json()["error"]["message"]
            assert 1 <= int(r.headers["retry-after"]) <= WINDOW, r.headers
        # the OpenAI-compatible routes answer in their shape, with the same Retry-After
        r = await c.post(f"{replica}/v1/chat/completions", headers=_from(address, _bogus()),
                         json={"model": "local-text", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= WINDOW, r.text
        # a key api 1 already verified keeps working there; api 2 has not seen it: refused too
        assert (await c.get(f"{st.api_url}/v1/jobs", headers=_from(address, alice))).status_code == 200
        assert (await c.get(f"{replica}/v1/jobs", headers=_from(address, alice))).status_code == 429
        # another address is not affected
        r = await c.get(f"{replica}/v1/jobs", headers=_from(other, _bogus()))
        assert r.status_code == 401, r.text
        assert (await c.get(f"{replica}/v1/jobs", headers=_from(other, alice))).status_code == 200
    # a websocket from the limited address is closed with 4429 (the reason says when to retry)
    ws_url = replica.replace("http://", "ws://", 1) + "/v1/ws"
    async with connect(ws_url, additional_headers=_from(address, _bogus()), open_timeout=20) as ws:
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(20):
                await ws.recv()
    assert ws.close_code == 4429 and "retry in" in (ws.close_reason or ""), (ws.close_code, ws.close_reason)


async def test_a_repeated_unknown_key_is_answered_from_the_negative_cache(stacks: tuple[Stack, str]) -> None:
    st, replica = stacks
    bogus = _bogus()
    before = await _failures(replica)
    async with httpx.AsyncClient(timeout=30) as c:
        for _ in range(3):
            r = await c.get(f"{replica}/v1/jobs", headers=_from("198.51.100.1", bogus))
            assert r.status_code == 401, r.text
    after = await _failures(replica)
    assert after.get("looked_up", 0) - before.get("looked_up", 0) == 1, (before, after)  # one query, then none
    assert after.get("cached", 0) - before.get("cached", 0) == 2, (before, after)


async def test_a_key_made_valid_again_is_not_held_back_by_the_negative_cache(stacks: tuple[Stack, str]) -> None:
    """An expired key answered 401 (and remembered as unknown) works at once on every process
    when an admin extends it: the announced change drops the negative cache too."""
    st, replica = stacks
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.post(f"{st.api_url}/v1/admin/keys", headers=admin,
                         json={"tenant": "alice", "name": "short", "expires_in_seconds": 1})
        assert r.status_code == 201, r.text
        key, key_id = r.json()["key"], r.json()["id"]
        await asyncio.sleep(1.5)
        for url in (st.api_url, replica):
            for address in ("198.51.100.2", "198.51.100.3"):
                assert (await c.get(f"{url}/v1/jobs", headers=_from(address, key))).status_code == 401
        r = await c.patch(f"{st.api_url}/v1/admin/keys/{key_id}", headers=admin, json={"expires_in_seconds": 3600})
        assert r.status_code == 200 and r.json()["status"] == "active", r.text
        for url in (st.api_url, replica):
            for _ in range(50):  # the announcement reaches the other process within moments
                r = await c.get(f"{url}/v1/jobs", headers=_from("198.51.100.2", key))
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert r.status_code == 200, (url, r.text)


def test_logs_have_no_tracebacks(stacks: tuple[Stack, str]) -> None:
    st, _ = stacks
    for name in ("api", "api2"):
        assert "Traceback" not in st.log(name, tail=None), st.log(name)
