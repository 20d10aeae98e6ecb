"""Outages with real processes: a private PostgreSQL cluster stopped and started under a
running API (the shared one is never touched)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from tests.pg_cluster import private_postgres
from tests.stack import PrivateRedis, make_stack, running

IMAGE = {"model": "local-image", "input": {"prompt": "a cat", "size": "256x256"}}


async def test_postgres_stopped_then_started_answers_503_then_recovers(tmp_path: Path, redis_base: str) -> None:
    with private_postgres(tmp_path / "pg") as pg:
        st = await make_stack(tmp_path / "stack", redis_url=f"{redis_base}/0",
                              database_url=pg.url.replace("postgresql://", "postgresql+asyncpg://"), key_cache_seconds="0")
        async with running(st), st.client() as c:
            before = (await c.post("/v1/jobs", json=IMAGE)).json()
            await st.wait_job(c, before["id"])
            pg.stop()
            routes = [("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{before['id']}"), ("POST", "/v1/jobs"), ("GET", "/v1/models"),
                      ("GET", "/v1/usage"), ("POST", f"/v1/jobs/{before['id']}/cancel"), ("GET", "/v1/webhooks/endpoints")]
            for method, path in routes:
                r = await c.request(method, path, json=IMAGE if method == "POST" else None)
                assert r.status_code == 503, (method, path, r.status_code, r.text[:300])
                assert r.json()["error"]["code"] == "unavailable" and r.headers["retry-after"]
            pg.start()
            deadline = time.monotonic() + 60
            while True:
                r = await c.post("/v1/jobs", json=IMAGE)
                if r.status_code == 201 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            assert r.status_code == 201, r.text
            assert (await st.wait_job(c, r.json()["id"]))["status"] == "succeeded"
            assert (await c.get(f"/v1/jobs/{before['id']}")).json()["status"] == "succeeded"  # nothing lost


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs a redis-server binary to kill and restart")
async def test_redis_killed_and_back_empty_workers_ride_it_out_and_every_job_ends(tmp_path: Path) -> None:
    """kill -9 of Redis under load, back empty 3.5 s later: both workers keep running, every
    job (queued, waiting or at the provider when Redis went) succeeds, none `internal`."""
    redis = PrivateRedis(tmp_path / "redis")
    redis.start()
    st = await make_stack(tmp_path / "stack", redis_url=redis.url, worker_max_jobs="4")
    try:
        st.start_api()
        st.start_worker("worker1", ready=True)  # serving before Redis goes, not still starting
        st.start_worker("worker2", ready=True)
        body = {"model": "local-image", "input": {"prompt": "ride it out", "size": "256x256",
                                                  "provider_params": {"latency_seconds": 4, "progress_steps": 4}}}
        async with st.client() as c:
            ids = [(await c.post("/v1/jobs", json=body)).json()["id"] for _ in range(20)]
            await asyncio.sleep(1.5)  # some at the provider, some still queued
            redis.kill()
            await asyncio.sleep(3.5)
            redis.start()  # empty: the queues, poll schedules and leases are gone
            jobs = {}
            for job_id in ids:
                jobs[job_id] = await st.wait_job(c, job_id, timeout=90)
        assert {j["status"] for j in jobs.values()} == {"succeeded"}, {
            i: (j["status"], j["error"]) for i, j in jobs.items() if j["status"] != "succeeded"}
        for name in ("worker1", "worker2"):
            assert st.procs[name].poll() is None, f"{name} exited:\n{st.log(name)[-3000:]}"
        assert "Redis is back" in st.log("worker1", tail=None) + st.log("worker2", tail=None)
    finally:
        st.stop()
        redis.kill()


@pytest.mark.parametrize("where", ["limiter.snapshot", "limiter.acquire", "waits.leave"])
async def test_redis_blip_while_routing_puts_the_job_back_unharmed(tmp_path: Path, redis_base: str, where: str) -> None:
    """Redis drops the connection while a run routes a job (before the slot is taken, while
    taking it, or after the row says running, before any create was sent): the job goes back
    to queued with its attempt undone, and the next run finishes it. Never `internal`."""
    from contextlib import AsyncExitStack

    import redis.exceptions

    from adapters.registry import AdapterCache
    from core.runtime import open_runtime
    from storage import build_store
    from workers.run import run_job

    st = await make_stack(tmp_path, redis_url=f"{redis_base}/0")
    st.start_api()
    try:
        async with st.client() as c:
            job_id = (await c.post("/v1/jobs", json=IMAGE)).json()["id"]
            settings = st.settings()
            async with AsyncExitStack() as stack:
                rt = await open_runtime(settings, stack, build_store(settings))
                rt.adapters = AdapterCache(rt.http)
                owner_name, _, method = where.partition(".")
                owner = getattr(rt, owner_name)
                real = getattr(owner, method)
                calls = []

                async def blip(*args, **kwargs):
                    calls.append(1)
                    raise redis.exceptions.ConnectionError("Connection closed by server.")

                setattr(owner, method, blip)
                await run_job({"rt": rt}, job_id)
                setattr(owner, method, real)
                assert calls, f"{where} was never called: the test does not test anything"
                job = (await c.get(f"/v1/jobs/{job_id}")).json()
                assert job["status"] == "queued", job
                assert job["error"] is None and "unreachable" in (job["progress"]["message"] or ""), job
            st.start_worker()
            done = await st.wait_job(c, job_id, timeout=60)
            assert done["status"] == "succeeded", done
            assert len([a for a in done.get("attempts") or [] if not a.get("error")]) == 1, done["attempts"]
    finally:
        st.stop()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs a redis-server binary to kill and restart")
async def test_submits_while_redis_is_down_are_201_and_run_once_it_is_back(tmp_path: Path) -> None:
    """Redis killed: POST /v1/jobs answers 201 for a committed job (the reconciler enqueues
    it later) or 503 with nothing created, never 500; once Redis is back every accepted
    job succeeds, and the database holds exactly the jobs that got a 201."""
    redis = PrivateRedis(tmp_path / "redis")
    redis.start()
    st = await make_stack(tmp_path / "stack", redis_url=redis.url, key_cache_seconds="60")
    try:
        st.start_api()
        st.start_worker()
        async with st.client() as c:
            first = (await c.post("/v1/jobs", json=IMAGE)).json()  # the key is known and cached
            assert (await st.wait_job(c, first["id"]))["status"] == "succeeded"
            redis.kill()
            answers = [await c.post("/v1/jobs", json={**IMAGE, "input": {**IMAGE["input"], "prompt": f"cat {i}"}})
                       for i in range(6)]
            codes = [r.status_code for r in answers]
            assert set(codes) <= {201, 503}, [(r.status_code, r.text[:300]) for r in answers]
            accepted = [r.json()["id"] for r in answers if r.status_code == 201]
            assert accepted, "no submit was accepted: the key is cached, the database is up, so a 201 is due"
            for r in answers:
                if r.status_code == 503:
                    assert r.json()["error"]["code"] == "unavailable" and r.headers.get("retry-after"), r.text
                else:
                    assert r.json()["status"] == "queued", r.text
            redis.start()
            for job_id in accepted:
                job = await st.wait_job(c, job_id, timeout=90)
                assert job["status"] == "succeeded", job
            listed = (await c.get("/v1/jobs", params={"limit": 50})).json()["data"]
            assert sorted(j["id"] for j in listed) == sorted([first["id"], *accepted]), (codes, listed)
        assert st.procs["worker"].poll() is None, st.log("worker")[-3000:]
    finally:
        st.stop()
        redis.kill()
