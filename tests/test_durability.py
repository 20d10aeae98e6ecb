"""The pipeline under the faults the design promises to survive: long jobs that must not
hold worker slots, a worker killed mid-poll, mid-submit and mid-store, and a Redis that lost
its queues."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from tests.stack import Stack, make_stack


def _slow(i: int, latency: float, steps: int) -> dict:
    return {"model": "local-image", "input": {"prompt": f"slow {i}", "size": "256x256",
                                              "provider_params": {"latency_seconds": latency, "progress_steps": steps}}}


async def _submit_all(stack: Stack, bodies: list[dict]) -> list[str]:
    async with stack.client() as c:
        rs = await asyncio.gather(*(c.post("/v1/jobs", json=b) for b in bodies))
    assert all(r.status_code == 201 for r in rs), [r.text for r in rs if r.status_code != 201]
    return [r.json()["id"] for r in rs]


async def _statuses(stack: Stack, ids: list[str]) -> dict[str, dict]:
    async with stack.client() as c:
        rs = await asyncio.gather(*(c.get(f"/v1/jobs/{i}") for i in ids))
    return {r.json()["id"]: r.json() for r in rs}


async def _wait_all(stack: Stack, ids: list[str], timeout: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = await _statuses(stack, ids)
        if all(j["status"] in ("succeeded", "failed", "canceled") for j in jobs.values()) or time.monotonic() > deadline:
            return jobs
        await asyncio.sleep(0.25)


@pytest.fixture
async def stack(tmp_path, redis_base: str) -> AsyncIterator[Stack]:
    st = await make_stack(tmp_path, redis_url=f"{redis_base}/0", worker_max_jobs="2")
    st.start_api()
    try:
        yield st
    finally:
        st.stop()


async def test_slow_jobs_do_not_hold_worker_slots(stack: Stack) -> None:
    """max_jobs=2 and 50 jobs of 3 s: they run together (polls are not worker tasks), so
    they finish in seconds, not the 75 s that 2 slots held for the whole wait would take."""
    stack.start_worker()
    t0 = time.monotonic()
    ids = await _submit_all(stack, [_slow(i, 3.0, 3) for i in range(50)])
    peak = 0
    while time.monotonic() - t0 < 60:
        jobs = await _statuses(stack, ids)
        peak = max(peak, sum(j["status"] == "running" for j in jobs.values()))
        if all(j["status"] == "succeeded" for j in jobs.values()):
            break
        await asyncio.sleep(0.2)
    elapsed = time.monotonic() - t0
    assert all(j["status"] == "succeeded" for j in jobs.values()), {j["status"] for j in jobs.values()}
    # 2 worker slots held for whole tasks would allow 2 running at once and take ~75 s; a
    # loaded machine may not reach all 50 in one read, so bounds with slack, not a peak
    assert peak >= 10, peak
    assert elapsed < 40, elapsed
    assert sorted(stack.submits()) == sorted(ids)


async def test_worker_killed_mid_poll_loses_nothing_and_submits_once(stack: Stack) -> None:
    stack.start_worker()
    ids = await _submit_all(stack, [_slow(i, 5.0, 10) for i in range(20)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        jobs = await _statuses(stack, ids)
        if all(j["status"] == "running" and j["progress"]["fraction"] > 0 for j in jobs.values()):
            break
        await asyncio.sleep(0.1)
    assert all(j["status"] == "running" for j in jobs.values()), {j["status"] for j in jobs.values()}
    stack.kill("worker")  # SIGKILL, mid-poll
    stack.start_worker("worker2")
    jobs = await _wait_all(stack, ids, 60)
    assert {j["status"] for j in jobs.values()} == {"succeeded"}, {i: (j["status"], j["error"]) for i, j in jobs.items()}
    submits = stack.submits()
    assert sorted(submits) == sorted(ids), "a job was submitted to the provider twice (or never)"
    assert all(j["attempt"] == 1 for j in jobs.values())


async def test_reconciler_requeues_jobs_after_redis_loses_them(tmp_path, redis_base: str) -> None:
    # its own Redis DB: this test flushes it
    db_url = f"{redis_base}/13"
    st = await make_stack(tmp_path, redis_url=db_url)
    st.start_api()
    try:
        ids = await _submit_all(st, [_slow(i, 0.2, 1) for i in range(10)])
        r = aioredis.from_url(db_url)
        assert await r.zcard(st.settings().queue_for("image")) == 10
        await r.flushdb()
        await r.aclose()
        st.start_worker()
        jobs = await _wait_all(st, ids, 30)
        assert {j["status"] for j in jobs.values()} == {"succeeded"}
        assert sorted(st.submits()) == sorted(ids)
    finally:
        st.stop()


async def test_reconciler_requeues_3000_lost_runs_past_its_page_size(tmp_path, redis_base: str) -> None:
    """3,000 queued jobs whose runs Redis lost (more than one page of the reconciler's
    cursor): one pass puts every one back on the run queue, once."""
    from contextlib import AsyncExitStack
    from datetime import timedelta

    from sqlalchemy import insert, select
    from sqlalchemy import inspect as sa_inspect

    from core.ids import new_id
    from core.models import Job, utcnow
    from core.runtime import open_runtime
    from storage import build_store
    from workers import reconcile as reconciler

    db_url = f"{redis_base}/12"  # its own Redis DB: this test flushes it
    st = await make_stack(tmp_path, redis_url=db_url)
    st.start_api()
    try:
        [first] = await _submit_all(st, [_slow(0, 0.2, 1)])
        settings = st.settings()
        async with AsyncExitStack() as stack:
            rt = await open_runtime(settings, stack, build_store(settings))
            await rt.redis.flushdb()
            old = utcnow() - timedelta(minutes=10)
            async with rt.sessions() as session:
                row = (await session.execute(select(Job).where(Job.id == first))).scalar_one()
                template = {a.key: getattr(row, a.key) for a in sa_inspect(Job).column_attrs}
                rows = [template | {"id": new_id("job"), "idempotency_key": None, "updated_at": old, "created_at": old}
                        for _ in range(2999)]
                await session.execute(insert(Job), rows)
                await session.execute(Job.__table__.update().where(Job.id == first).values(updated_at=old))
                await session.commit()
            assert reconciler.PAGE < 3000
            counts = await reconciler.reconcile_once(rt)
            assert counts["requeued"] == 3000, counts
            assert await rt.redis.zcard(settings.queue_for("image")) == 3000
            again = await reconciler.reconcile_once(rt)  # their runs are queued now: nothing twice
            assert again["requeued"] == 0, again
    finally:
        st.stop()


@contextlib.asynccontextmanager
async def _replicate_stack(tmp_path, redis_base: str, options: dict, *, env: dict[str, str] | None = None,
                           **fake: Any) -> AsyncIterator[tuple[Stack, str]]:
    """A stack whose one model `held-replicate` is served by the Replicate fake (`env`: more
    GENROUTE_* settings, lower-case names)."""
    import yaml

    from core.routing.catalog import DEFAULT_CATALOG
    from tests.fakes import replicate as replicate_fake
    from tests.fakes.server import serve

    with serve(replicate_fake.create_app(api_key="r8_durable", **fake)) as url:
        data = yaml.safe_load(DEFAULT_CATALOG.read_text())
        data["models"].append({"id": "held-replicate", "modality": "image", "deployments": [{
            "name": "replicate-held", "adapter": "replicate", "model": "black-forest-labs/flux-dev", "base_url": url,
            "api_key_env": "DURABLE_REPLICATE_KEY", "options": options}]})
        catalog = tmp_path / "catalog.yaml"
        catalog.write_text(yaml.safe_dump(data))
        st = await make_stack(tmp_path / "stack", redis_url=f"{redis_base}/0", catalog=catalog,
                              env={"DURABLE_REPLICATE_KEY": "r8_durable"}, submit_marker_seconds="3", **(env or {}))
        st.start_api()
        try:
            yield st, url
        finally:
            st.stop()


def _fake_stats(url: str) -> dict:
    return httpx.get(f"{url}/_control/stats").json()


async def _submit_held(c: httpx.AsyncClient, prompt: str) -> str:
    r = await c.post("/v1/jobs", json={"model": "held-replicate", "input": {"prompt": prompt}})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def _until_stat(fake: str, stat: str, at_least: int, timeout: float) -> int:
    """Wait until the fake's counter `stat` reaches `at_least` (or `timeout`); its value."""
    deadline = time.monotonic() + timeout
    while (n := _fake_stats(fake)[stat]) < at_least and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return int(n)


async def test_worker_killed_mid_submit_ends_the_job_without_a_second_create(tmp_path, redis_base: str) -> None:
    """SIGKILL while a create call is in flight (a Replicate create held by Prefer: wait):
    Replicate cannot dedupe a resent create, so the next worker ends the job clearly within
    35 s instead of starting (and billing) a second prediction."""
    async with _replicate_stack(tmp_path, redis_base, {"sync_wait": 30, "poll_interval": 0.5},
                                slow_polls=400, wait_step=0.1) as (st, fake):
        st.start_worker()
        async with st.client() as c:
            job_id = await _submit_held(c, "[slow] a held create")
            assert await _until_stat(fake, "creates", 1, 20) == 1
            st.kill("worker")  # SIGKILL while the create is held open
            killed = time.monotonic()
            st.start_worker("worker2")
            job = await st.wait_job(c, job_id, timeout=40)
        took = time.monotonic() - killed
        assert job["status"] == "failed", job
        assert "interrupted" in job["error"]["message"], job["error"]
        assert took <= 35, took
        assert _fake_stats(fake)["creates"] == 1  # never a second prediction


async def test_worker_killed_mid_store_resumes_and_succeeds_once(tmp_path, redis_base: str) -> None:
    """SIGKILL while the result file is being downloaded into storage: the storing marker
    lapses, the reconciler puts the job back on the poll schedule, the next worker finds the
    prediction's result again and stores it: one prediction, one stored asset, within 35 s."""
    async with _replicate_stack(tmp_path, redis_base, {"poll_interval": 0.5}, slow_file_seconds=8.0) as (st, fake):
        st.start_worker()
        async with st.client() as c:
            job_id = await _submit_held(c, "[slow-file] stored slowly")
            assert await _until_stat(fake, "file_fetches", 1, 30) == 1, "the result download never started"
            await asyncio.sleep(1.0)  # well into the 8 s download
            assert (await c.get(f"/v1/jobs/{job_id}")).json()["status"] == "running"
            st.kill("worker")  # SIGKILL mid-store
            killed = time.monotonic()
            st.start_worker("worker2")
            job = await st.wait_job(c, job_id, timeout=45)
        took = time.monotonic() - killed
        assert job["status"] == "succeeded", job
        assert took <= 35, took
        assert len(job["outputs"]) == 1, job["outputs"]
        stats = _fake_stats(fake)
        assert stats["creates"] == 1  # resumed from the provider's result, never created again
        assert stats["file_fetches"] == 2  # the cut download, then the whole one


async def _stored_bytes(c: httpx.AsyncClient, job: dict) -> bytes:
    r = await c.get(job["outputs"][0]["url"])
    assert r.status_code == 200, r.text
    return r.content


async def test_our_blob_directory_failing_is_waited_on_then_stored_once(tmp_path, redis_base: str) -> None:
    """The local blob store's own directory fails (we run as root, where chmod does not
    stop a write, so the directory is replaced by a plain file: every put raises
    NotADirectoryError, as a full or read-only disk raises its OSError): the job waits,
    running, and is stored once the directory is back; one prediction, the right bytes."""
    import shutil

    async with _replicate_stack(tmp_path, redis_base, {"poll_interval": 0.5}) as (st, fake):
        st.start_worker(ready=True)
        blobs = st.settings().resolved_storage_dir()
        assert blobs.is_dir()
        shutil.rmtree(blobs)
        blobs.write_text("not a directory")  # our own storage fails
        async with st.client() as c:
            job_id = await _submit_held(c, "a store that fails")
            deadline = time.monotonic() + 30
            while "blob store away" not in st.log("worker", tail=None) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert "blob store away" in st.log("worker", tail=None), st.log("worker")
            await asyncio.sleep(4)  # several failed puts (and reconciler passes) later
            job = (await c.get(f"/v1/jobs/{job_id}")).json()
            assert job["status"] == "running", job  # waited on, never ended for it
            blobs.unlink()
            blobs.mkdir()  # the disk is fixed
            job = await st.wait_job(c, job_id, timeout=30)
            assert job["status"] == "succeeded", job
            assert len(job["outputs"]) == 1, job["outputs"]
            stored = await _stored_bytes(c, job)
        stats = _fake_stats(fake)
        assert stats["creates"] == 1
        assert hashlib.sha256(stored).hexdigest() in stats["file_digests"].values()
        assert "Traceback" not in st.log("worker", tail=None)


async def test_output_dropped_mid_body_is_resumed_with_range(tmp_path, redis_base: str) -> None:
    """The provider's output URL drops the connection a third of the way into the body: the
    store resumes with `Range: bytes=N-`, the job succeeds with the whole, correct file, and
    the prediction was created once."""
    async with _replicate_stack(tmp_path, redis_base, {"poll_interval": 0.5}) as (st, fake):
        st.start_worker()
        async with st.client() as c:
            job = await st.wait_job(c, await _submit_held(c, "[drop-file] a cut download"), timeout=45)
            assert job["status"] == "succeeded", job
            stored = await _stored_bytes(c, job)
        stats = _fake_stats(fake)
        assert stats["creates"] == 1
        assert stats["file_fetches"] == 2, stats  # the cut fetch, then the resumed rest
        assert len(stats["file_ranges"]) == 1 and stats["file_ranges"][0] != "bytes=0-", stats["file_ranges"]
        assert list(stats["file_digests"].values()) == [hashlib.sha256(stored).hexdigest()]
        assert job["outputs"][0]["bytes"] == len(stored)


async def test_worker_killed_mid_cancel_the_provider_cancel_is_sent_again_promptly(tmp_path, redis_base: str) -> None:
    """SIGKILL while the provider cancel of a canceled job is in flight: ARQ would retry
    the task only when its in-progress key lapses (the longest task timeout, about an hour),
    the prediction running on meanwhile. The cancel's marker lapses instead, and the
    reconciler queues it again: the prediction is canceled within seconds, once more only."""
    async with _replicate_stack(tmp_path, redis_base, {"poll_interval": 0.5}, slow_polls=400, cancel_delay=60) as (st, fake):
        st.start_worker(ready=True)
        async with st.client() as c:
            job_id = await _submit_held(c, "[slow] to be canceled")
            await _until_stat(fake, "polls", 1, 30)  # polled: the handle is saved
            r = await c.post(f"/v1/jobs/{job_id}/cancel")
            assert r.status_code == 200 and r.json()["status"] == "canceled", r.text
            assert await _until_stat(fake, "cancels", 1, 20) == 1 and _fake_stats(fake)["inflight"] == 1
            st.kill("worker")  # SIGKILL while the provider holds the cancel call
            killed = time.monotonic()
            httpx.post(f"{fake}/_control/config", json={"cancel_delay": 0})
            st.start_worker("worker2")
            while _fake_stats(fake)["inflight"] and time.monotonic() - killed < 40:
                await asyncio.sleep(0.1)
            took = time.monotonic() - killed
            assert _fake_stats(fake)["inflight"] == 0, "the prediction runs on: the cancel was never sent again"
            assert took < 30, took
            await asyncio.sleep(4)  # several reconciler passes: the cancel is done, not sent again
            stats = _fake_stats(fake)
            assert stats["cancels"] == 2 and stats["creates"] == 1, stats
            assert (await c.get(f"/v1/jobs/{job_id}")).json()["status"] == "canceled"
        assert "Traceback" not in st.log("worker2", tail=None)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs a redis-server binary to kill and restart")
async def test_a_cancel_while_redis_is_down_is_answered_and_sent_once_redis_is_back(tmp_path, redis_base: str) -> None:
    """Redis killed, then a running job canceled: the row says canceled, so the answer is
    200 (not a 5xx a client would retry into a 409), and the provider cancel, which could
    not be queued, is queued by the reconciler once Redis is back: the prediction stops."""
    from tests.stack import PrivateRedis

    redis = PrivateRedis(tmp_path / "redis")
    redis.start()
    try:
        async with _replicate_stack(tmp_path, redis.url.removesuffix("/0"), {"poll_interval": 0.5}, slow_polls=400,
                                    env={"key_cache_seconds": "60"}) as (st, fake):
            st.start_worker(ready=True)
            async with st.client() as c:
                job_id = await _submit_held(c, "[slow] canceled while Redis is away")
                await _until_stat(fake, "polls", 1, 30)  # polled: the handle is saved
                redis.kill()
                r = await c.post(f"/v1/jobs/{job_id}/cancel")
                assert r.status_code == 200 and r.json()["status"] == "canceled", r.text
                assert _fake_stats(fake)["cancels"] == 0 and _fake_stats(fake)["inflight"] == 1
                redis.start()  # back empty: no cancel task, no marker
                back = time.monotonic()
                while _fake_stats(fake)["inflight"] and time.monotonic() - back < 40:
                    await asyncio.sleep(0.1)
                assert _fake_stats(fake)["inflight"] == 0, "the prediction runs on: its cancel was never sent"
                await asyncio.sleep(3)
                stats = _fake_stats(fake)
                assert stats["cancels"] == 1 and stats["creates"] == 1, stats
                assert (await c.get(f"/v1/jobs/{job_id}")).json()["status"] == "canceled"
            assert st.procs["worker"].poll() is None, st.log("worker")
    finally:
        redis.kill()
