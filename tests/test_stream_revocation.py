"""Open streams end with their key, and websockets are capped per key: real `genroute api`
processes (two, sharing Redis and the database), a real worker, the `websockets` client and
httpx for SSE.

The key cache's lifetime is set to a minute here, so a stream that closes within seconds of
a revocation was closed by the announced change (api/streams.py), not by the backstop.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.stack import Stack, make_stack, running

ADMIN_KEY = "admin-secret-for-stream-revocation-tests"
MAX_WS = 3


@pytest.fixture(scope="module")
async def stacks(tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[tuple[Stack, str]]:
    st = await make_stack(tmp_path_factory.mktemp("streams"), redis_url=f"{redis_base}/0", admin_key=ADMIN_KEY,
                          key_cache_seconds="60", ws_max_per_key=str(MAX_WS), ws_ping_seconds="1")
    async with running(st):
        yield st, st.start_api_replica("api2")


def _admin(st: Stack) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=st.api_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)


async def _new_key(st: Stack, name: str) -> tuple[str, str]:
    async with _admin(st) as a:
        r = await a.post("/v1/admin/keys", json={"tenant": "alice", "name": name})
        assert r.status_code == 201, r.text
        return r.json()["id"], r.json()["key"]


async def _slow_job(base: str, key: str) -> str:
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        r = await c.post("/v1/jobs", json={"model": "local-image", "input": {
            "prompt": "a long one", "size": "256x256", "provider_params": {"latency_seconds": 60, "progress_steps": 2}}})
        assert r.status_code in (200, 201, 202), r.text
        return str(r.json()["id"])


def _ws_url(base: str, path: str) -> str:
    return base.replace("http://", "ws://", 1) + path


async def _first(ws: ClientConnection, kind: str, timeout: float = 20) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            msg = json.loads(await ws.recv())
            if msg.get("type") == kind:
                return msg


async def _closed(ws: ClientConnection, timeout: float) -> tuple[int | None, str]:
    """Read until the server closes; (code, reason)."""
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    return ws.close_code, ws.close_reason or ""


class SSE:
    """An SSE stream read in the background: every `event:` name with its data."""

    def __init__(self, base: str, path: str, key: str) -> None:
        self.client = httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=90)
        self.path = path
        self.events: list[tuple[str, str]] = []
        self.ended = asyncio.Event()
        self.status = 0
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async with self.client.stream("GET", self.path) as r:
                self.status = r.status_code
                name = "message"
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        name = line[len("event: "):]
                    elif line.startswith("data: "):
                        self.events.append((name, line[len("data: "):]))
                        name = "message"
        finally:
            self.ended.set()

    async def wait_for(self, pred: Any, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while not any(pred(n, d) for n, d in self.events):
                assert not self.ended.is_set(), self.events
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.aclose()


async def test_a_revoked_key_loses_its_open_websockets_and_sse_streams_on_every_replica(stacks: tuple[Stack, str]) -> None:
    st, replica = stacks
    key_id, key = await _new_key(st, "streamer")
    job = await _slow_job(st.api_url, key)
    auth = {"Authorization": f"Bearer {key}"}
    other = {"Authorization": f"Bearer {st.keys['alice']}"}  # the same tenant's other key: untouched
    sse_job = SSE(replica, f"/v1/jobs/{job}/events", key)
    sse_replicate = SSE(st.api_url, f"/replicate/v1/predictions/{job}/stream", key)
    try:
        async with connect(_ws_url(replica, f"/v1/jobs/{job}/events"), additional_headers=auth, open_timeout=20) as per_job, \
                connect(_ws_url(st.api_url, "/v1/ws"), additional_headers=auth, open_timeout=20) as mux, \
                connect(_ws_url(replica, "/v1/ws"), additional_headers=other, open_timeout=20) as control:
            await _first(per_job, "job.state")
            await mux.send(json.dumps({"op": "subscribe", "job_ids": [job]}))
            await _first(mux, "job.state")
            await control.send(json.dumps({"op": "subscribe", "job_ids": [job]}))
            await _first(control, "job.state")
            await sse_job.wait_for(lambda n, d: n == "job.state")
            async with asyncio.timeout(20):  # Replicate's stream sends nothing until the job logs: connected is enough
                while sse_replicate.status == 0:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # its body (which registers the stream) starts right after the headers
            assert sse_job.status == 200 and sse_replicate.status == 200

            async with _admin(st) as a:
                t0 = time.monotonic()
                assert (await a.post(f"/v1/admin/keys/{key_id}/revoke")).status_code == 200
            code, reason = await _closed(per_job, 10)
            assert code == 4401 and "revoked" in reason, (code, reason)
            code, reason = await _closed(mux, 10)
            assert code == 4401 and "revoked" in reason, (code, reason)
            for sse in (sse_job, sse_replicate):
                async with asyncio.timeout(10):
                    await sse.ended.wait()
                assert sse.events[-1][0] == "error" and "revoked" in sse.events[-1][1], sse.events[-3:]
            # every stream ended well within the key cache's minute: the announcement did it
            assert time.monotonic() - t0 < 8
            # the other key's websocket on the same job is still served
            await control.send(json.dumps({"op": "ping"}))
            await _first(control, "pong", timeout=10)
        # and the revoked key cannot open a new one
        async with connect(_ws_url(st.api_url, f"/v1/jobs/{job}/events"), additional_headers=auth, open_timeout=20) as ws:
            code, _ = await _closed(ws, 10)
            assert code == 4401
    finally:
        await sse_job.close()
        await sse_replicate.close()
        async with st.client("alice") as c:
            await c.post(f"/v1/jobs/{job}/cancel")


async def test_a_rotated_keys_stream_ends_when_its_grace_does(stacks: tuple[Stack, str]) -> None:
    st, replica = stacks
    key_id, key = await _new_key(st, "rotating")
    job = await _slow_job(st.api_url, key)
    try:
        async with connect(_ws_url(replica, f"/v1/jobs/{job}/events"), additional_headers={"Authorization": f"Bearer {key}"},
                           open_timeout=20) as ws:
            await _first(ws, "job.state")
            async with _admin(st) as a:
                r = await a.post(f"/v1/admin/keys/{key_id}/rotate", json={"grace_seconds": 2})
                assert r.status_code == 200, r.text
                new_key = r.json()["key"]
            t0 = time.monotonic()
            code, reason = await _closed(ws, 15)
            elapsed = time.monotonic() - t0
            assert code == 4401 and "expired" in reason, (code, reason)
            assert 1.0 <= elapsed <= 8, elapsed  # at the end of the grace, not at once, not much later
        async with connect(_ws_url(replica, f"/v1/jobs/{job}/events"), additional_headers={"Authorization": f"Bearer {new_key}"},
                           open_timeout=20) as ws:
            await _first(ws, "job.state")  # the new key follows the job
    finally:
        async with st.client("alice") as c:
            await c.post(f"/v1/jobs/{job}/cancel")


async def test_websockets_are_capped_per_key_across_replicas(stacks: tuple[Stack, str]) -> None:
    st, replica = stacks
    _, key = await _new_key(st, "many-sockets")
    auth = {"Authorization": f"Bearer {key}"}
    bases = [st.api_url, replica, st.api_url]
    opened: list[ClientConnection] = []
    try:
        for base in bases:  # MAX_WS places, spread over both processes
            ws = await connect(_ws_url(base, "/v1/ws"), additional_headers=auth, open_timeout=20)
            opened.append(ws)
            await ws.send(json.dumps({"op": "ping"}))
            await _first(ws, "pong")
        for base in (st.api_url, replica):  # the next, on either process, is refused with 4409
            async with connect(_ws_url(base, "/v1/ws"), additional_headers=auth, open_timeout=20) as ws:
                code, reason = await _closed(ws, 10)
                assert code == 4409 and "ws_max_per_key" in reason and str(MAX_WS) in reason, (code, reason)
        # another key of the same tenant has its own places
        async with connect(_ws_url(replica, "/v1/ws"), additional_headers={"Authorization": f"Bearer {st.keys['alice']}"},
                           open_timeout=20) as ws:
            await ws.send(json.dumps({"op": "ping"}))
            await _first(ws, "pong")
        # closing one frees its place (once the server has seen the close)
        await opened.pop(0).close()
        for _ in range(50):
            ws = await connect(_ws_url(replica, "/v1/ws"), additional_headers=auth, open_timeout=20)
            await ws.send(json.dumps({"op": "ping"}))
            try:
                await _first(ws, "pong", timeout=5)
                opened.append(ws)
                break
            except ConnectionClosed:
                assert ws.close_code == 4409
                await asyncio.sleep(0.1)
        else:
            pytest.fail("a freed place was never given again")
    finally:
        for ws in opened:
            await ws.close()


def test_logs_have_no_tracebacks(stacks: tuple[Stack, str]) -> None:
    st, _ = stacks
    for name in ("api", "api2", "worker"):
        assert "Traceback" not in st.log(name, tail=None), st.log(name)


async def test_a_revoked_keys_chat_completion_stream_ends_and_the_upstream_call_with_it(
        tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> None:
    """A streamed chat completion (a minute long at the provider) ends with an OpenAI-shaped
    error chunk within seconds of its key's revocation, and genroute stops reading the
    provider's stream: the fake's words stop flowing."""
    import yaml

    from core.routing.catalog import DEFAULT_CATALOG
    from tests.fakes import openai as openai_fake
    from tests.fakes.server import serve

    with serve(openai_fake.create_app(api_key="sk-rev")) as fake:
        root = tmp_path_factory.mktemp("chat_revocation")
        data = yaml.safe_load(DEFAULT_CATALOG.read_text())
        data["models"].append({"id": "gpt-4o-mini", "modality": "text", "deployments": [
            {"name": "openai-chat", "adapter": "openai", "model": "gpt-4o-mini", "base_url": fake + "/v1",
             "api_key_env": "REV_OPENAI_KEY"}]})
        (root / "catalog.yaml").write_text(yaml.safe_dump(data))
        st = await make_stack(root, redis_url=f"{redis_base}/0", admin_key=ADMIN_KEY, key_cache_seconds="60",
                              catalog=root / "catalog.yaml", env={"REV_OPENAI_KEY": "sk-rev"})
        async with running(st):
            key_id, key = await _new_key(st, "chatter")
            chunks: list[dict[str, Any]] = []
            body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "talk [slow-stream]"}]}
            async with httpx.AsyncClient(base_url=st.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=90) as c, \
                    c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.aiter_lines()
                async with asyncio.timeout(30):
                    while len(chunks) < 5:  # the answer is flowing
                        line = await anext(lines)
                        if line.startswith("data: {"):
                            chunks.append(json.loads(line[6:]))
                async with _admin(st) as a:
                    t0 = time.monotonic()
                    assert (await a.post(f"/v1/admin/keys/{key_id}/revoke")).status_code == 200
                async with asyncio.timeout(15):
                    async for line in lines:
                        if line.startswith("data: "):
                            chunks.append(json.loads(line[6:]) if line[6:].startswith("{") else {"done": line})
                ended_after = time.monotonic() - t0
            assert "error" in chunks[-1], chunks[-3:]
            assert chunks[-1]["error"]["code"] == "invalid_api_key" and "revoked" in chunks[-1]["error"]["message"]
            assert ended_after < 8, ended_after  # the announcement, not the minute-long key cache
            words = httpx.get(fake + "/_control/stats").json()["slow_words"]
            await asyncio.sleep(2)
            assert httpx.get(fake + "/_control/stats").json()["slow_words"] <= words + 2, "the upstream stream is still read"
            assert words < 150  # the provider was not read to the end
