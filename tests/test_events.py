"""Live events through real processes: uvicorn API(s) + ARQ worker + Redis, checked from the
outside with the `websockets` client, httpx for SSE, and the `genroute submit` CLI."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from core.events import Event, EventBus, EventType
from tests.stack import BIN, Stack, make_stack, running

TERMINAL = {"job.succeeded", "job.failed", "job.canceled"}


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[Stack]:
    # one key holds hundreds of websockets here: no per-key cap (tests/test_stream_revocation.py checks it)
    st = await make_stack(tmp_path_factory.mktemp("events"), redis_url=f"{redis_base}/0", ws_recheck_seconds="1",
                          ws_max_per_key="0")
    async with running(st):
        yield st


def _job(i: int | str, latency: float = 1.0, steps: int = 4) -> dict[str, Any]:
    return {"model": "local-image", "input": {"prompt": f"events {i}", "size": "256x256",
                                              "provider_params": {"latency_seconds": latency, "progress_steps": steps}}}


def ws_url(base: str, path: str) -> str:
    return base.replace("http://", "ws://", 1) + path


def auth(stack: Stack, tenant: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.keys[tenant]}"}


async def read_job_ws(url: str, headers: dict[str, str], *, stop_after: int | None = None) -> tuple[list[dict], int | None]:
    """Messages of a per-job socket until it closes (or `stop_after` events), and the close code."""
    msgs: list[dict] = []
    async with connect(url, additional_headers=headers, max_size=None, open_timeout=20) as ws:
        try:
            async for raw in ws:
                msgs.append(json.loads(raw))
                if stop_after is not None and len(events_of(msgs)) >= stop_after:
                    break
        except ConnectionClosed:
            pass
    return msgs, ws.close_code


def events_of(msgs: list[dict]) -> list[dict]:
    return [m for m in msgs if "seq" in m and "id" in m]


def assert_complete(events: list[dict]) -> None:
    """Every event of one job, once, in order: queued .. terminal. Durable events have dense
    seqs; progress sub-events (published without a row write) stand between them."""
    positions = [(e["seq"], e.get("sub", 0)) for e in events]
    assert positions == sorted(set(positions)), positions
    seqs = [e["seq"] for e in events if not e.get("sub")]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert all(e["type"] == "job.progress" for e in events if e.get("sub"))
    types = [e["type"] for e in events]
    assert types[0] == "job.queued" and types[1] == "job.started" and types[-1] in TERMINAL, types
    assert sum(t in TERMINAL for t in types) == 1
    assert len({e["id"] for e in events}) == len(events)


async def submit(stack: Stack, body: dict, base: str | None = None, tenant: str = "alice") -> str:
    async with stack.client(tenant) as c:
        r = await c.post(f"{base or stack.api_url}/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        return r.json()["id"]


# ------------------------------------------------------------------------------------------
async def test_bus_publishes_once_in_seq_order_and_replays(stack: Stack, redis_url: str) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    try:
        bus = EventBus(redis, stack.env["GENROUTE_REDIS_PREFIX"] + ":unit", maxlen=100, retention_seconds=60)
        now = datetime.now(UTC)
        evs = [Event.make("job_unit1", i, EventType.progress, now, {"i": i}) for i in (1, 2, 3)]
        assert await bus.publish("alice", evs[:2]) == [1, 2]
        assert await bus.publish("alice", evs) == [3]  # seqs at or below the top are duplicates
        assert await bus.publish("alice", evs[:1]) == []
        assert [e.seq for e in await bus.replay("job_unit1", 0)] == [1, 2, 3]
        assert [e.data for e in await bus.replay("job_unit1", 1)] == [{"i": 2}, {"i": 3}]
        assert [e.seq for e in await bus.replay("job_unit1", 1, upto=2)] == [2]
        assert 0 < await redis.ttl(bus.stream_key("job_unit1")) <= 60
    finally:
        await redis.aclose()


async def test_job_socket_sends_state_then_every_event_then_closes(stack: Stack) -> None:
    job_id = await submit(stack, _job("one"))
    msgs, code = await read_job_ws(ws_url(stack.api_url, f"/v1/jobs/{job_id}/events?last_event_id=0"), auth(stack))
    assert msgs[0]["type"] == "job.state" and msgs[0]["job"]["id"] == job_id
    events = events_of(msgs)
    assert_complete(events)
    assert code == 1000
    types = [e["type"] for e in events]
    assert types[-2:] == ["job.output", "job.succeeded"] and "job.progress" in types
    assert all(e["job_id"] == job_id and e["id"].startswith("evt_") for e in events)
    progress = [e["data"]["progress"] for e in events if e["type"] == "job.progress"]
    assert progress == sorted(progress) and 0.5 in progress
    out = next(e for e in events if e["type"] == "job.output")["data"]
    assert out["content_type"] == "image/png" and out["width"] == 256
    cost = events[-1]["data"]["cost"]  # the terminal event says what the job was charged
    assert cost["unit"] == "micro_usd" and cost["settled"] == cost["held"] > 0, cost
    # a finished job: the state says so and the socket closes at once (nothing is missed)
    msgs, code = await read_job_ws(ws_url(stack.api_url, f"/v1/jobs/{job_id}/events"), auth(stack))
    assert [m["type"] for m in msgs] == ["job.state"] and msgs[0]["job"]["status"] == "succeeded" and code == 1000
    assert msgs[0]["seq"] == events[-1]["seq"]


async def test_200_subscribers_of_50_jobs_get_every_event(stack: Stack) -> None:
    n_jobs, per_job = 50, 4
    tenant_msgs: list[dict] = []
    async with connect(ws_url(stack.api_url, "/v1/ws"), additional_headers=auth(stack), max_size=None) as mux:
        await mux.send(json.dumps({"op": "subscribe", "all": True}))
        assert json.loads(await mux.recv())["type"] == "subscribed"
        t0 = time.monotonic()
        async with stack.client() as c:
            rs = await asyncio.gather(*(c.post("/v1/jobs", json=_job(f"fan {i}", latency=1.5, steps=3)) for i in range(n_jobs)))
        ids = [r.json()["id"] for r in rs]
        # connect while the jobs run: each subscriber replays what it missed, then goes live
        results = await asyncio.gather(*(
            read_job_ws(ws_url(stack.api_url, f"/v1/jobs/{job_id}/events?last_event_id=0"), auth(stack))
            for job_id in ids for _ in range(per_job)
        ))
        elapsed = time.monotonic() - t0

        async def drain() -> None:
            done: set[str] = set()
            while len(done) < n_jobs:
                m = json.loads(await mux.recv())
                tenant_msgs.append(m)
                if m.get("type") in TERMINAL and m["job_id"] in ids:
                    done.add(m["job_id"])

        await asyncio.wait_for(drain(), 30)
    by_job: dict[str, list[list[dict]]] = {}
    for (msgs, code), job_id in zip(results, [j for j in ids for _ in range(per_job)], strict=True):
        assert code == 1000
        events = events_of(msgs)
        assert_complete(events)
        by_job.setdefault(job_id, []).append(events)
    for job_id, copies in by_job.items():
        assert all(c == copies[0] for c in copies), job_id  # every subscriber saw the same events
        # the tenant-wide subscriber saw the same events of every job, live
        assert [m for m in tenant_msgs if m.get("job_id") == job_id] == copies[0]
    total = sum(len(c[0]) for c in by_job.values())
    print(f"\n[measure] {n_jobs * per_job} websocket subscribers x {n_jobs} jobs: {total * per_job} events "
          f"delivered, jobs submitted to all subscribers done in {elapsed:.2f} s")


async def test_reconnect_with_last_event_id_gets_exactly_the_missed_events(stack: Stack) -> None:
    job_id = await submit(stack, _job("resume", latency=2.0, steps=5))
    url = ws_url(stack.api_url, f"/v1/jobs/{job_id}/events")
    first, _ = await read_job_ws(url + "?last_event_id=0", auth(stack), stop_after=3)
    seen = events_of(first)
    await asyncio.sleep(0.8)  # events happen while we are away
    rest_msgs, code = await read_job_ws(f"{url}?last_event_id={seen[-1]['id']}", auth(stack))
    rest = events_of(rest_msgs)
    assert code == 1000 and rest and (rest[0]["seq"], rest[0].get("sub", 0)) > (seen[-1]["seq"], seen[-1].get("sub", 0))
    assert_complete(seen + rest)
    full, _ = await read_job_ws(url + "?last_event_id=0", auth(stack))
    assert events_of(full) == seen + rest  # the replay is the same events, byte for byte
    # a bare seq works too; an id of another job does not
    last_seq = (seen + rest)[-1]["seq"]
    tail, _ = await read_job_ws(f"{url}?last_event_id={last_seq - 1}", auth(stack))
    assert events_of(tail) == [e for e in seen + rest if (e["seq"], e.get("sub", 0)) > (last_seq - 1, 0)]
    _, code = await read_job_ws(f"{url}?last_event_id=evt_01nope_3", auth(stack))
    assert code == 4400


def parse_sse(lines: list[str]) -> list[dict[str, str]]:
    out, cur = [], {}
    for line in lines:
        if not line:
            if cur:
                out.append(cur)
            cur = {}
        elif not line.startswith(":"):
            k, _, v = line.partition(":")
            cur[k] = v[1:] if v.startswith(" ") else v
    return out


async def read_sse(client: httpx.AsyncClient, path: str, headers: dict[str, str] | None = None, stop_after: int | None = None) -> list[dict[str, str]]:
    lines: list[str] = []
    async with client.stream("GET", path, headers={"Accept": "text/event-stream", **(headers or {})}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            lines.append(line)
            if stop_after is not None and line == "" and sum(1 for b in parse_sse(lines) if "id" in b) >= stop_after:
                break
    return [b for b in parse_sse(lines) if "event" in b]


async def test_sse_streams_and_resumes_with_last_event_id(stack: Stack) -> None:
    job_id = await submit(stack, _job("sse", latency=2.0, steps=5))
    async with stack.client() as c:
        first = await read_sse(c, f"/v1/jobs/{job_id}/events?last_event_id=0", stop_after=3)
        assert first[0]["event"] == "job.state"
        seen = [b for b in first if "id" in b]
        await asyncio.sleep(0.8)
        rest = [b for b in await read_sse(c, f"/v1/jobs/{job_id}/events", {"Last-Event-ID": seen[-1]["id"]}) if "id" in b]
        events = [json.loads(b["data"]) for b in seen + rest]
        assert_complete(events)
        assert [b["id"] for b in seen + rest] == [e["id"] for e in events]
        assert [b["event"] for b in seen + rest] == [e["type"] for e in events]
        # the websocket's full replay is the same events
        full, _ = await read_job_ws(ws_url(stack.api_url, f"/v1/jobs/{job_id}/events?last_event_id=0"), auth(stack))
        assert events_of(full) == events
        r = await c.get(f"/v1/jobs/{job_id}/events", params={"last_event_id": "nonsense"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


async def test_other_tenants_and_strangers_are_refused(stack: Stack) -> None:
    job_id = await submit(stack, _job("private", latency=0.5, steps=1))
    url = ws_url(stack.api_url, f"/v1/jobs/{job_id}/events")
    msgs, code = await read_job_ws(url, auth(stack, "bob"))
    assert code == 4404 and msgs == []  # like REST: another tenant's job does not exist
    _, code = await read_job_ws(ws_url(stack.api_url, "/v1/jobs/job_01doesnotexist/events"), auth(stack))
    assert code == 4404
    _, code = await read_job_ws(url, {"Authorization": "Bearer gr_wrong"})
    assert code == 4401
    _, code = await read_job_ws(url + "?token=gr_wrong", {})
    assert code == 4401
    # browsers: the key as a query parameter, or as the first message
    msgs, code = await read_job_ws(f"{url}?token={stack.keys['alice']}", {})
    assert code == 1000 and msgs[0]["job"]["id"] == job_id
    async with connect(url) as ws:
        await ws.send(json.dumps({"op": "auth", "token": stack.keys["alice"]}))
        assert json.loads(await ws.recv())["type"] == "job.state"
    # SSE: the REST answer
    async with stack.client("bob") as bob:
        r = await bob.get(f"/v1/jobs/{job_id}/events")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    # multiplexed: subscribing to alice's job closes bob's socket with 4404
    async with connect(ws_url(stack.api_url, "/v1/ws"), additional_headers=auth(stack, "bob")) as ws:
        await ws.send(json.dumps({"op": "subscribe", "job_ids": [job_id]}))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 4404
    async with connect(ws_url(stack.api_url, "/v1/ws"), additional_headers=auth(stack, "bob")) as ws:
        await ws.send("not json")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 4400
    # bob's tenant-wide subscription never carries alice's events
    async with connect(ws_url(stack.api_url, "/v1/ws"), additional_headers=auth(stack, "bob")) as ws:
        await ws.send(json.dumps({"op": "subscribe", "all": True}))
        assert json.loads(await ws.recv())["type"] == "subscribed"
        await submit(stack, _job("alice only", latency=0.2, steps=1))
        bob_job = await submit(stack, _job("bob", latency=0.2, steps=1), tenant="bob")
        got: list[dict] = []
        while not any(m.get("type") == "job.succeeded" for m in got):
            got.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
        assert {m["job_id"] for m in got if "job_id" in m} == {bob_job}


async def test_multiplexed_socket_subscribes_by_job_and_closes_nothing_early(stack: Stack) -> None:
    a = await submit(stack, _job("mux a", latency=1.0, steps=2))
    b = await submit(stack, _job("mux b", latency=1.5, steps=3))
    async with connect(ws_url(stack.api_url, "/v1/ws"), additional_headers=auth(stack)) as ws:
        await ws.send(json.dumps({"op": "subscribe", "job_ids": [a, b], "last_event_ids": {a: "0", b: "0"}}))
        msgs: list[dict] = []
        while sum(m.get("type") in TERMINAL for m in msgs) < 2:
            msgs.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
        await ws.send(json.dumps({"op": "ping"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "pong"
    states = [m for m in msgs if m["type"] == "job.state"]
    assert {s["job"]["id"] for s in states} == {a, b}
    for job_id in (a, b):
        assert_complete([m for m in msgs if m.get("job_id") == job_id and "seq" in m and "id" in m])


async def test_two_api_processes_share_events(stack: Stack) -> None:
    other = stack.start_api_replica("api2")
    try:
        async with connect(ws_url(other, "/v1/ws"), additional_headers=auth(stack)) as ws:
            await ws.send(json.dumps({"op": "subscribe", "all": True}))
            assert json.loads(await ws.recv())["type"] == "subscribed"
            job_id = await submit(stack, _job("elsewhere", latency=1.0, steps=2))  # through the first API
            per_job = asyncio.create_task(read_job_ws(ws_url(other, f"/v1/jobs/{job_id}/events?last_event_id=0"), auth(stack)))
            live: list[dict] = []
            while not any(m.get("type") in TERMINAL for m in live):
                live.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
            msgs, code = await per_job
        assert_complete([m for m in live if m.get("job_id") == job_id])
        assert code == 1000 and events_of(msgs) == [m for m in live if m.get("job_id") == job_id]
    finally:
        stack.kill("api2")


def _stalled_client(base: str, key: str) -> socket.socket:
    """A websocket client that subscribes to its tenant's events and then never reads:
    a plain socket with a tiny receive buffer, so the server's sends back up at once."""
    host, port = base.removeprefix("http://").split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    s.sendall((f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
               f"Authorization: Bearer {key}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert b" 101 " in head.split(b"\r\n")[0], head
    payload, mask = json.dumps({"op": "subscribe", "all": True}).encode(), os.urandom(4)
    s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    return s


async def test_a_stalled_client_is_dropped_without_slowing_a_fast_one(stack: Stack, redis_url: str) -> None:
    other = stack.start_api_replica("api-slow", ws_queue_size="32", ws_send_timeout_seconds="2")
    redis = aioredis.Redis.from_url(redis_url)
    n, size = 300, 64 * 1024  # 19 MB of events
    stalled = await asyncio.to_thread(_stalled_client, other, stack.keys["alice"])
    try:
        bus = EventBus(redis, stack.env["GENROUTE_REDIS_PREFIX"])
        async with connect(ws_url(other, "/v1/ws"), additional_headers=auth(stack), max_size=None) as fast:
            await fast.send(json.dumps({"op": "subscribe", "all": True}))
            assert json.loads(await fast.recv())["type"] == "subscribed"
            await asyncio.sleep(0.3)  # the stalled client's subscribe is processed
            now = datetime.now(UTC)
            fake = f"job_slow{int(time.time() * 1000)}"

            async def produce() -> None:
                for i in range(1, n + 1, 2):
                    await bus.publish("alice", [Event.make(fake, s, EventType.progress, now, {"blob": "x" * size}) for s in range(i, i + 2)])
                    await asyncio.sleep(0.01)

            async def consume_fast() -> list[int]:
                seqs: list[int] = []
                while len(seqs) < n:
                    m = json.loads(await fast.recv())
                    if m.get("job_id") == fake:
                        seqs.append(m["seq"])
                return seqs

            t0 = time.monotonic()
            _, seqs = await asyncio.gather(produce(), asyncio.wait_for(consume_fast(), 60))
            fast_elapsed = time.monotonic() - t0
            assert seqs == list(range(1, n + 1))

        def drain() -> int:
            stalled.settimeout(20)
            got = 0
            while chunk := stalled.recv(1 << 20):  # b"": the server hung up
                got += len(chunk)
            return got

        await asyncio.sleep(2 * 2 + 5 + 1)  # send timeout, then the close attempt gives up
        got = await asyncio.to_thread(drain)
        # the server let go of it: what it had buffered for it was a small part of the events
        assert got < n * size / 4, got
        print(f"\n[measure] fast client got {n} x 64 KiB events in {fast_elapsed:.2f} s; the stalled one was "
              f"dropped after {got / 1e6:.1f} MB of {n * size / 1e6:.0f} MB")
    finally:
        stalled.close()
        await redis.aclose()
        stack.kill("api-slow")


async def test_cli_submit_wait_follows_the_event_stream(stack: Stack) -> None:
    env = {**os.environ, "GENROUTE_URL": stack.api_url, "GENROUTE_API_KEY": stack.keys["alice"], "GENROUTE_LOG_LEVEL": "WARNING"}
    cmd = [str(BIN), "submit", "--model", "local-image", "--input", "prompt=a lighthouse", "--input", "size=256x256",
           "--input", "provider_params.latency_seconds=1", "--wait"]
    proc = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("http") and "polling" not in proc.stderr, (proc.stdout, proc.stderr)


# the CLI follows jobs through genroute.client; its polling fallback is tested in tests/test_client.py


def test_api_logs_have_no_tracebacks(stack: Stack) -> None:
    for name in ("api", "worker"):
        assert "Traceback" not in stack.log(name, tail=None), stack.log(name)
