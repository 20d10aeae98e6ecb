"""Per-key limits (core/limits/keys.py) against real processes: two `genroute api` processes and
an ARQ worker sharing PostgreSQL and Redis, driven over HTTP.

    rate         a key limited to N requests a minute gets exactly N, across API processes
    concurrency  queue_when_busy: the extra jobs wait queued (saying why); else 429 at submit
    scopes       403 model_not_allowed on models outside the key's scopes, in both error shapes
    chat         a streamed chat holds its key's slot while it streams

Every limit is written to the key's row in SQL before the API processes start, so no key
cache (api/deps.py) can hold an older value.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import text

from core.db import create_engine, sessionmaker
from core.keys import create_key
from tests.services import fresh_postgres
from tests.stack import TERMINAL, Stack, make_stack, running

RPM = 7
GRACE = 4  # seconds: the reconciler re-enqueues queued jobs whose row is older than this
WAITING = "waiting: its API key has 2 jobs in flight, its concurrency limit"  # workers/run.py _key_slot

# name (= tenant) -> the key's limits, made in SQL before the API starts
KEYS: dict[str, dict[str, Any]] = {
    "queued": {"max_concurrency": 2},  # queue_when_busy defaults to True
    "refusing": {"max_concurrency": 2, "queue_when_busy": False},
    "images": {"scopes": {"modalities": ["image"]}},
    "speech": {"scopes": {"models": ["local-audio"]}},
    "chatty": {"max_concurrency": 1},
    "single": {"max_concurrency": 1},
}


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[Stack]:
    async with fresh_postgres() as db:
        # a reconciler grace of 4 s: short enough for a wait to outlast it, with room for a loaded machine
        st = await make_stack(tmp_path_factory.mktemp("quotas"), redis_url=f"{redis_base}/0", database_url=db,
                              reconcile_grace_seconds=str(GRACE))
        engine = create_engine(st.settings())
        try:
            sessions = sessionmaker(engine)
            async with sessions() as s:
                await s.exec(text("UPDATE api_keys SET rpm = :n WHERE tenant = 'alice'").bindparams(n=RPM))  # type: ignore[call-overload]
                await s.commit()
            for name, limits in KEYS.items():
                st.keys[name] = (await create_key(sessions, name=name, **limits))[1]
        finally:
            await engine.dispose()
        async with running(st):
            yield st


@pytest.fixture(scope="module")
def url_b(stack: Stack) -> str:
    """A second API process on the same PostgreSQL and Redis (stopped with the stack)."""
    return stack.start_api_replica("api-b")


def client(stack: Stack, name: str, url: str | None = None) -> httpx.AsyncClient:
    """A client with key `name`, at the stack's first API process or at `url`."""
    return httpx.AsyncClient(base_url=url or stack.api_url, headers={"Authorization": f"Bearer {stack.keys[name]}"}, timeout=90)


def image(i: Any, latency: float = 0.0, steps: int = 1) -> dict[str, Any]:
    params = {"latency_seconds": latency, "progress_steps": steps} if latency else {}
    return {"model": "local-image", "input": {"prompt": f"quota {i}", "size": "256x256", "provider_params": params}}


def error(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


async def jobs_of(c: httpx.AsyncClient) -> list[dict[str, Any]]:
    r = await c.get("/v1/jobs", params={"limit": 100})
    assert r.status_code == 200, r.text
    return r.json()["data"]


def max_overlap(jobs: list[dict[str, Any]]) -> int:
    """The most jobs between started_at and finished_at at any one instant."""
    edges = sorted((datetime.fromisoformat(j[k]), +1 if k == "started_at" else -1)
                   for j in jobs for k in ("started_at", "finished_at"))  # at a tie, the end (-1) sorts first
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


# rate ------------------------------------------------------------------------------------------
async def test_a_key_gets_exactly_its_rpm_across_two_api_processes(stack: Stack, url_b: str) -> None:
    n = 3 * RPM
    clients = [client(stack, "alice"), client(stack, "alice", url_b)]
    bobs = [client(stack, "bob"), client(stack, "bob", url_b)]
    try:
        answers = await asyncio.gather(*(clients[i % 2].post("/v1/jobs", json=image(i)) for i in range(n)))
        by_bob = await asyncio.gather(*(bobs[i % 2].post("/v1/jobs", json=image(f"b{i}")) for i in range(n)))

        statuses = sorted(r.status_code for r in answers)
        assert statuses == [201] * RPM + [429] * (n - RPM), statuses
        for r in answers:
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "rate_limited" and f"limited to {RPM}" in r.json()["error"]["message"]
                assert 1 <= int(r.headers["Retry-After"]) <= 60, r.headers
        # a refused request made no job; the accepted ones are all there
        accepted = {r.json()["id"] for r in answers if r.status_code == 201}
        assert {j["id"] for j in await jobs_of(clients[0])} == accepted
        # the OpenAI facade takes its turn from the same allowance
        r = await clients[1].post("/v1/images/generations", json={"model": "local-image", "prompt": "one more"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited" and "retry-after" in r.headers, r.text
        assert r.json()["error"]["type"] == "rate_limit_error"
        # another tenant's unlimited key is not touched by alice's limit
        assert [r.status_code for r in by_bob] == [201] * n, [r.text for r in by_bob if r.status_code != 201][:2]
    finally:
        for c in clients + bobs:
            await c.aclose()


# concurrency -----------------------------------------------------------------------------------
async def test_a_queueing_key_runs_at_most_its_concurrency_and_the_rest_wait(stack: Stack) -> None:
    async with client(stack, "queued") as c:
        answers = await asyncio.gather(*(c.post("/v1/jobs", json=image(f"q{i}", latency=1.5, steps=3)) for i in range(5)))
        assert [r.status_code for r in answers] == [201] * 5, [r.text for r in answers]
        ids = {r.json()["id"] for r in answers}
        most_running, waiting_seen = 0, set()
        deadline = time.monotonic() + 60
        while True:
            jobs = [j for j in await jobs_of(c) if j["id"] in ids]
            running = [j for j in jobs if j["status"] == "running"]
            most_running = max(most_running, len(running))
            assert len(running) <= 2, [(j["id"], j["status"]) for j in jobs]
            waiting_seen |= {j["id"] for j in jobs if j["status"] == "queued" and j["progress"]["message"] == WAITING}
            if all(j["status"] in TERMINAL for j in jobs):
                break
            assert time.monotonic() < deadline, jobs
            await asyncio.sleep(0.05)
        assert most_running == 2, most_running  # the limit was used, not just respected
        assert len(waiting_seen) == 3, waiting_seen  # 5 jobs, 2 slots: 3 waited, and said why
        assert [j["status"] for j in jobs] == ["succeeded"] * 5, [(j["status"], j["error"]) for j in jobs]
        assert max_overlap(jobs) == 2, [(j["started_at"], j["finished_at"]) for j in jobs]
        assert all(stack.submits().count(i) == 1 for i in ids), stack.submits()  # waiting did not submit twice


async def test_a_refusing_key_gets_429_at_submit_and_is_let_in_once_a_job_ends(stack: Stack, url_b: str) -> None:
    async with client(stack, "refusing") as c, client(stack, "refusing", url_b) as c_b:
        first = [await c.post("/v1/jobs", json=image(f"r{i}", latency=1.5, steps=3)) for i in range(2)]
        assert [r.status_code for r in first] == [201, 201], [r.text for r in first]
        r = await c_b.post("/v1/jobs", json=image("r-third"))  # the other process: the slots are in Redis
        assert error(r) == (429, "concurrency_limited"), r.text
        assert 1 <= int(r.headers["Retry-After"]) <= 5 and "refuse rather than queue" in r.json()["error"]["message"]
        assert len(await jobs_of(c)) == 2  # the refused submit made no job
        for j in first:
            assert (await stack.wait_job(c, j.json()["id"]))["status"] == "succeeded"
        # the slot is freed just after the terminal row commits: allow that moment, no more
        t0 = time.monotonic()
        while (r := await c_b.post("/v1/jobs", json=image("r-after"))).status_code == 429 and time.monotonic() - t0 < 2:
            await asyncio.sleep(0.05)
        assert r.status_code == 201, r.text
        assert (await stack.wait_job(c, r.json()["id"]))["status"] == "succeeded"


async def test_a_job_that_waits_long_sits_in_the_keys_wait_queue_without_spinning(stack: Stack, redis_base: str) -> None:
    """A job waiting for its key's slot joins the key's wait queue (core/limits/waits.py):
    no run of it is deferred on a timer, the reconciler (which ticks many times while it
    waits twice its grace) starts none beside it, it reports its place, and the release of
    the slot by the long job's end hands the slot to it at once."""
    queue = stack.settings().queue_for("image")
    redis = Redis.from_url(f"{redis_base}/0")
    async with client(stack, "single") as c:
        try:
            r = await c.post("/v1/jobs", json=image("long", latency=2 * GRACE, steps=4))
            assert r.status_code == 201, r.text
            long_id = r.json()["id"]
            while (await c.get(f"/v1/jobs/{long_id}")).json()["status"] == "queued":
                await asyncio.sleep(0.05)  # it holds the key's one slot
            r = await c.post("/v1/jobs", json=image("waits"))
            assert r.status_code == 201, r.text
            waiter = r.json()["id"]
            t0 = time.monotonic()
            while not ((await c.get(f"/v1/jobs/{waiter}")).json()["progress"]["message"] or "").startswith("waiting: its API key"):
                assert time.monotonic() - t0 < 30, "the waiter never said it waits for its key"
                await asyncio.sleep(0.05)  # its first run found the slot taken
            runs: list[int] = []
            positions: list[int | None] = []
            while (await c.get(f"/v1/jobs/{long_id}")).json()["status"] not in TERMINAL:
                queued_runs = await redis.zrange(queue, 0, -1)
                runs.append(sum(waiter in m.decode() for m in queued_runs))
                w = (await c.get(f"/v1/jobs/{waiter}")).json()
                if w["status"] == "queued":
                    positions.append(w["queue_position"])
                await asyncio.sleep(0.25)
            assert len(runs) > 20 and max(runs) == 0, runs  # woken by the release, never by a timer
            assert positions and set(positions) == {0}, positions  # first in the key's queue
            done = await stack.wait_job(c, waiter)
            assert done["status"] == "succeeded" and stack.submits().count(waiter) == 1, done
        finally:
            await redis.aclose()


# scopes ----------------------------------------------------------------------------------------
async def _refused(r: httpx.Response, *, openai: bool) -> None:
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["code"] == "model_not_allowed", err
    if openai:  # OpenAI's shape: message, type, param, code
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", err
    else:
        assert set(err) == {"code", "message", "details"}, err


CHAT = {"model": "local-text", "messages": [{"role": "user", "content": "hello there"}]}
VIDEO = {"model": "local-video", "input": {"prompt": "a river", "duration_seconds": 1, "resolution": "360p", "fps": 2}}
AUDIO = {"model": "local-audio", "input": {"text": "hello"}}


async def test_a_modality_scoped_key_may_use_only_that_modality(stack: Stack) -> None:
    async with client(stack, "images") as c:
        await _refused(await c.post("/v1/jobs", json=VIDEO), openai=False)
        await _refused(await c.post("/v1/jobs", json=AUDIO), openai=False)
        await _refused(await c.post("/v1/chat/completions", json=CHAT), openai=True)
        await _refused(await c.post("/v1/videos", json={"model": "local-video", "prompt": "a river"}), openai=True)
        await _refused(await c.post("/v1/audio/speech", json={"model": "local-audio", "input": "hi", "voice": "alloy"}), openai=True)
        r = await c.post("/v1/jobs", json=image("scoped"))
        assert r.status_code == 201, r.text
        assert "any image model" in (await c.post("/v1/jobs", json=VIDEO)).json()["error"]["message"]  # says what it may use
        assert [j["model"] for j in await jobs_of(c)] == ["local-image"]  # nothing refused left a job
        assert (await stack.wait_job(c, r.json()["id"]))["status"] == "succeeded"


async def test_a_model_scoped_key_may_use_only_that_model(stack: Stack) -> None:
    async with client(stack, "speech") as c:
        await _refused(await c.post("/v1/jobs", json=image("nope")), openai=False)
        await _refused(await c.post("/v1/jobs", json=VIDEO), openai=False)
        await _refused(await c.post("/v1/chat/completions", json=CHAT), openai=True)
        await _refused(await c.post("/v1/images/generations", json={"model": "local-image", "prompt": "nope"}), openai=True)
        r = await c.post("/v1/jobs", json=AUDIO)
        assert r.status_code == 201, r.text
        r = await c.post("/v1/audio/speech", json={"model": "local-audio", "input": "hi", "voice": "alloy"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("audio/"), r.text
        assert {j["model"] for j in await jobs_of(c)} == {"local-audio"}


# chat ------------------------------------------------------------------------------------------
async def test_a_streamed_chat_holds_its_keys_only_slot_until_it_ends(stack: Stack) -> None:
    # the local model echoes the prompt's words one chunk each: 100k words are ~19 MB of
    # SSE, more than the sockets buffer, so a client that stops reading keeps the call open
    long = {"model": "local-text", "stream": True, "messages": [{"role": "user", "content": "w " * 100_000}]}
    async with client(stack, "chatty") as c, client(stack, "chatty") as other:
        async with c.stream("POST", "/v1/chat/completions", json=long) as first:
            assert first.status_code == 200
            chunks = first.aiter_raw()  # kept referenced: a dropped iterator would close the connection
            assert (await anext(chunks)).startswith(b"data: ")  # it streams; now stop reading
            r = await other.post("/v1/chat/completions", json={**CHAT, "stream": True})
            assert r.status_code == 429, r.text
            err = r.json()["error"]
            assert (err["code"], err["type"]) == ("concurrency_limited", "rate_limit_error") and "retry-after" in r.headers, err
            r = await other.post("/v1/chat/completions", json=CHAT)  # not streamed: the same slot
            assert r.status_code == 429, r.text
            r = await other.post("/v1/jobs", json=image("chatty"))  # a job queues behind it instead
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            await asyncio.sleep(0.5)
            assert (await other.get(f"/v1/jobs/{job_id}")).json()["status"] == "queued"
        # the client hung up: the call ends and frees the slot within moments
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10:
            job = (await other.get(f"/v1/jobs/{job_id}")).json()
            if job["status"] in TERMINAL:
                break
            await asyncio.sleep(0.1)
        assert job["status"] == "succeeded", job
        t0 = time.monotonic()  # the job's slot is freed just after its terminal row commits
        while (r := await other.post("/v1/chat/completions", json={**CHAT, "stream": True})).status_code == 429:
            assert time.monotonic() - t0 < 2, r.text
            await asyncio.sleep(0.05)
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
