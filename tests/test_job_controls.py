"""Cancel-After and start_within_seconds deadlines, batches, and the result cache, end to end:
API and worker processes, Redis, the local provider and the Replicate fake over HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from standardwebhooks import Webhook

from core.routing.catalog import DEFAULT_CATALOG
from tests.fakes import replicate as replicate_fake
from tests.fakes.server import serve
from tests.stack import Stack, make_stack, running
from tests.test_webhooks import Receiver

FAKE_KEY = "r8_controls"
ADMIN = "adm-controls-key"
POLL = 0.4  # the slow deployment's poll interval; the fake's [slow] script is 25 polls: ~10 s


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    with serve(replicate_fake.create_app(api_key=FAKE_KEY, slow_polls=25)) as url:
        yield url


def _catalog(path: Path, fake_url: str) -> Path:
    data = yaml.safe_load(DEFAULT_CATALOG.read_text())
    data["models"].append({
        "id": "slow-replicate", "modality": "image",
        "deployments": [{"name": "replicate-slow", "adapter": "replicate", "model": "black-forest-labs/flux-dev",
                         "base_url": fake_url, "api_key_env": "CONTROLS_REPLICATE_KEY",
                         "options": {"poll_interval": POLL}, "price": {"per_image": 25000}}],
    })
    data["models"].append({
        "id": "one-slot", "modality": "image",
        "deployments": [{"name": "local-one-slot", "adapter": "local", "model": "image",
                         "limits": {"max_concurrency": 1}, "price": {"per_image": 10000}}],
    })
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
async def stack(fake: str, tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("controls")
    st = await make_stack(root, redis_url=f"{redis_base}/0", catalog=_catalog(root / "catalog.yaml", fake),
                          env={"CONTROLS_REPLICATE_KEY": FAKE_KEY}, webhook_allowlist='["127.0.0.1/32"]',
                          webhook_backoff_seconds="[0.2, 0.5, 1]", admin_key=ADMIN)
    async with running(st):
        yield st


def image(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "local-image", "input": {"prompt": prompt, "size": "256x256", **extra}}


# deadlines -----------------------------------------------------------------------------------
async def test_cancel_after_ends_a_running_provider_task_at_its_deadline(stack: Stack, fake: str) -> None:
    cancels = httpx.get(f"{fake}/_control/stats").json()["cancels"]
    async with stack.client() as c:
        started = time.monotonic()
        r = await c.post("/v1/jobs", json={"model": "slow-replicate", "input": {"prompt": "[slow] a castle"}},
                         headers={"Cancel-After": "2s"})
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["cancel_after_at"] is not None
        job = await stack.wait_job(c, job["id"], timeout=30)
        took = time.monotonic() - started
    assert job["status"] == "canceled", job
    assert 1.8 <= took <= 6.0, took  # ~2 s: the scan runs every second; a 10 s task would end at ~10 s
    assert job["error"]["code"] == "canceled" and job["error"]["details"]["reason"] == "deadline"
    # the provider had the task: it is told to stop, and the hold is settled as a cancel after the start is
    deadline = time.monotonic() + 10
    while httpx.get(f"{fake}/_control/stats").json()["cancels"] <= cancels and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert httpx.get(f"{fake}/_control/stats").json()["cancels"] == cancels + 1
    assert job["cost"] == {"unit": "micro_usd", "status": "settled", "held": 25000, "settled": 25000}


async def test_cancel_after_on_the_replicate_route(stack: Stack) -> None:
    async with stack.client() as c:
        r = await c.post("/replicate/v1/models/genroute/local-image/predictions",
                         json={"input": {"prompt": "late", "width": 256, "height": 256, "latency_seconds": 20}},
                         headers={"Cancel-After": "1s"})
        assert r.status_code == 201, r.text
        job = await stack.wait_job(c, r.json()["id"], timeout=20)
        assert job["status"] == "canceled" and job["error"]["details"]["reason"] == "deadline"
        p = (await c.get(f"/replicate/v1/predictions/{job['id']}")).json()
        assert p["status"] == "canceled"


@pytest.mark.parametrize("value", ["soon", "0s", "10d", "-1s", "5x"])
async def test_bad_cancel_after_is_a_400(stack: Stack, value: str) -> None:
    async with stack.client() as c:
        r = await c.post("/v1/jobs", json=image("x"), headers={"Cancel-After": value})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", r.text


async def test_start_within_seconds_ends_a_waiting_job_unbilled(stack: Stack) -> None:
    async with stack.client() as c:
        busy = (await c.post("/v1/jobs", json={"model": "one-slot", "input": {
            "prompt": "hog", "size": "256x256", "provider_params": {"latency_seconds": 8}}})).json()
        deadline = time.monotonic() + 15
        while (await c.get(f"/v1/jobs/{busy['id']}")).json()["status"] != "running" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        r = await c.post("/v1/jobs", json={"model": "one-slot", "start_within_seconds": 2,
                                           "input": {"prompt": "waits", "size": "256x256"}})
        assert r.status_code == 201, r.text
        job = await stack.wait_job(c, r.json()["id"], timeout=20)
        assert job["status"] == "canceled" and job["error"]["details"]["reason"] == "start_deadline", job
        assert job["started_at"] is None
        assert job["cost"]["status"] == "released" and job["cost"]["settled"] == 0
        await c.post(f"/v1/jobs/{busy['id']}/cancel")


# cache ---------------------------------------------------------------------------------------
async def test_cache_serves_an_identical_seeded_request_of_the_same_tenant_only(stack: Stack) -> None:
    body = image("a cached lighthouse", seed=1234) | {"cache": True}
    async with stack.client() as alice, stack.client("bob") as bob:
        first = (await alice.post("/v1/jobs", json=body, headers={"Prefer": "wait=30"})).json()
        assert first["status"] == "succeeded" and not first["cached"] and first["cost"]["settled"] > 0
        await alice.get("/healthz")  # a warm connection, as a client in a loop has
        t0 = time.perf_counter()
        r = await alice.post("/v1/jobs", json=body)
        elapsed_ms = (time.perf_counter() - t0) * 1000
        second = r.json()
        print(f"cache hit end to end: {elapsed_ms:.1f} ms")
        assert r.status_code == 201 and second["status"] == "succeeded" and second["cached"] is True
        assert second["cached_from"] == first["id"] and second["id"] != first["id"]
        assert elapsed_ms < 500, elapsed_ms  # the issue asks for <= 50 ms; generous on a loaded machine
        assert [o["sha256"] for o in second["outputs"]] == [o["sha256"] for o in first["outputs"]]
        # one blob: both jobs' URLs name the same stored key
        assert [urlsplit(o["url"]).path for o in second["outputs"]] == [urlsplit(o["url"]).path for o in first["outputs"]]
        assert second["cost"] == {"unit": "micro_usd", "status": "settled", "held": 0, "settled": 0}
        data = (await alice.get(second["outputs"][0]["url"])).content
        assert len(data) == second["outputs"][0]["bytes"]
        third = (await alice.post("/v1/jobs", json=body)).json()  # a hit is never a source: it names the job that ran
        assert third["cached"] is True and third["cached_from"] == first["id"], third

        other = (await bob.post("/v1/jobs", json=body)).json()
        assert other["cached"] is False and other["status"] == "queued"  # never across tenants
        other = await stack.wait_job(bob, other["id"])
        assert other["status"] == "succeeded"
        assert [o["sha256"] for o in other["outputs"]] == [o["sha256"] for o in first["outputs"]]
        # the same bytes, but another tenant's: its own object
        assert urlsplit(other["outputs"][0]["url"]).path != urlsplit(first["outputs"][0]["url"]).path

        unseeded = image("a cached lighthouse") | {"cache": True}
        for _ in range(2):
            j = (await alice.post("/v1/jobs", json=unseeded, headers={"Prefer": "wait=30"})).json()
            assert j["cached"] is False  # no explicit seed: not cacheable
        off = (await alice.post("/v1/jobs", json=image("a cached lighthouse", seed=1234))).json()
        assert off["cached"] is False  # not asked for (the default is off)
        off = await stack.wait_job(alice, off["id"])
        # run again, it made the same bytes: stored once, content-addressed within the tenant
        assert urlsplit(off["outputs"][0]["url"]).path == urlsplit(first["outputs"][0]["url"]).path
        other_seed = (await alice.post("/v1/jobs", json=image("a cached lighthouse", seed=4321) | {"cache": True})).json()
        assert other_seed["cached"] is False


# batches -------------------------------------------------------------------------------------
async def test_batch_accepts_the_valid_items_reports_the_rest_and_calls_back_when_done(stack: Stack) -> None:
    receiver = Receiver()
    await receiver.start()
    try:
        items: list[dict[str, Any]] = [
            image("b0") | {"idempotency_key": "bk-0"},
            {"model": "local-image", "input": {"prompt": ""}},  # invalid input
            {"model": "nope", "input": {"prompt": "x"}},  # unknown model
            image("b3") | {"idempotency_key": "bk-3"},
            {"input": {"prompt": "no model"}},  # schema
            image("b5") | {"idempotency_key": "bk-0"},  # the same key twice in one batch
            {"model": "local-audio", "input": {"text": "hi", "duration_seconds": 0.2}},
        ]
        async with stack.client() as c:
            r = await c.post("/v1/batches", json={"jobs": items, "webhook_url": receiver.url("/batch"),
                                                  "metadata": {"run": "nightly"}})
            assert r.status_code == 201, r.text
            out = r.json()
            res = out["items"]
            assert [bool(x["job_id"]) for x in res] == [True, False, False, True, False, False, True]
            assert res[1]["error"]["code"] == "invalid_input" and res[2]["error"]["code"] == "model_not_found"
            assert res[4]["error"]["code"] == "invalid_input" and res[5]["error"]["code"] == "idempotency_conflict"
            assert out["batch"]["total"] == 3 and out["batch"]["rejected"] == 4
            bid = out["batch"]["id"]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                b = (await c.get(f"/v1/batches/{bid}")).json()
                if b["status"] == "completed":
                    break
                await asyncio.sleep(0.2)
            assert b["status"] == "completed" and b["counts"]["succeeded"] == 3, b
            assert {j["id"] for j in b["jobs"]} == {res[i]["job_id"] for i in (0, 3, 6)}
            assert all(j["batch_id"] == bid for j in b["jobs"])
            # the same items again: replays, not new jobs
            again = (await c.post("/v1/batches", json={"jobs": [items[0], items[3]]})).json()
            assert [x["replayed"] for x in again["items"]] == [True, True]
            assert [x["job_id"] for x in again["items"]] == [res[0]["job_id"], res[3]["job_id"]]
            assert (await c.get(f"/v1/batches/{bid}", headers={"Authorization": f"Bearer {stack.keys['bob']}"})).status_code == 404
            secret = (await c.get("/v1/webhooks/secret")).json()["secret"]
        deadline = time.monotonic() + 15
        while not receiver.received and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert len(receiver.received) == 1
        headers, raw = receiver.received[0]
        Webhook(secret).verify(raw, {k: headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")})
        body = json.loads(raw)
        assert body["type"] == "batch.completed" and body["batch_id"] == bid
        assert body["data"]["counts"]["succeeded"] == 3 and body["data"]["metadata"] == {"run": "nightly"}
    finally:
        await receiver.stop()


async def test_batch_budget_holds_are_per_item_in_request_order(stack: Stack) -> None:
    """docs/job-controls.md: holds are taken per item, in order; an item that does not fit
    the budget left gets budget_exceeded and the items before it keep theirs."""
    async with httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
        assert (await admin.post("/v1/admin/tenants", json={"id": "carol", "budget": 25000})).status_code == 201
        key = (await admin.post("/v1/admin/keys", json={"tenant": "carol", "name": "batches"})).json()["key"]
        item = {"model": "one-slot", "input": {"prompt": "held", "size": "256x256"}}  # 10,000 each
        async with httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}) as c:
            r = await c.post("/v1/batches", json={"jobs": [item, {"model": "nope", "input": {"prompt": "x"}}, item, item, item]})
            assert r.status_code == 201, r.text
            res = r.json()["items"]
            assert [bool(x["job_id"]) for x in res] == [True, False, True, False, False], res
            assert res[1]["error"]["code"] == "model_not_found"
            assert [res[i]["error"]["code"] for i in (3, 4)] == ["budget_exceeded"] * 2, res
            held = [(await c.get(f"/v1/jobs/{res[i]['job_id']}")).json()["cost"]["held"] for i in (0, 2)]
            assert held == [10000, 10000]
            for i in (0, 2):
                await stack.wait_job(c, res[i]["job_id"])
        tenant = (await admin.get("/v1/admin/tenants/carol")).json()
    assert tenant["spent"] <= 25000, tenant  # never overdrawn


async def test_a_batch_over_the_limit_is_refused(stack: Stack) -> None:
    async with stack.client() as c:
        r = await c.post("/v1/batches", json={"jobs": [image(f"x{i}") for i in range(1001)]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"


async def test_a_thousand_items_go_in_one_call(tmp_path: Path, redis_url: str) -> None:
    """API only (no worker), so the 1,000 jobs stay queued and only the submit is measured."""
    st = await make_stack(tmp_path, redis_url=redis_url)
    st.start_api()
    try:
        items = [{"model": "local-audio", "input": {"text": f"n{i}", "duration_seconds": 0.1},
                  "idempotency_key": f"k{i}"} for i in range(1000)]
        items[10] = {"model": "local-audio", "input": {}}
        async with st.client() as c:
            t0 = time.perf_counter()
            r = await c.post("/v1/batches", json={"jobs": items})
            took = time.perf_counter() - t0
            print(f"1000-item batch submit: {took * 1000:.0f} ms")
            assert r.status_code == 201, r.text
            out = r.json()
            assert out["batch"]["total"] == 999 and out["batch"]["rejected"] == 1
            assert out["items"][10]["error"]["code"] == "invalid_input"
            assert took < 60, took
            b = (await c.get(f"/v1/batches/{out['batch']['id']}", params={"limit": 1000})).json()
            assert b["counts"]["queued"] == 999 and len(b["jobs"]) == 999
            usage = (await c.get("/v1/jobs", params={"limit": 1})).json()
            assert usage["data"][0]["batch_id"] == out["batch"]["id"]
    finally:
        st.stop()


# priorities (API side: stored on the job; the worker's wait queue orders by it) --------------
async def test_priority_defaults_and_maximum_of_a_key(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
        r = await admin.post("/v1/admin/keys", json={"tenant": "alice", "name": "prio", "default_priority": "low",
                                                      "max_priority": "normal", "cache_by_default": True})
        assert r.status_code == 201, r.text
        key = r.json()
        assert (key["default_priority"], key["max_priority"], key["cache_by_default"]) == ("low", "normal", True)
        bad = await admin.post("/v1/admin/keys", json={"tenant": "alice", "name": "x", "max_priority": "urgent"})
        assert bad.status_code == 422
    async with httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {key['key']}"}) as c:
        assert (await c.post("/v1/jobs", json=image("p1"))).json()["priority"] == "low"  # the key's default
        assert (await c.post("/v1/jobs", json=image("p2") | {"priority": "high"})).json()["priority"] == "normal"  # capped
        assert (await c.post("/v1/jobs", json=image("p3") | {"priority": "low"})).json()["priority"] == "low"
        r = await c.post("/v1/jobs", json=image("p4") | {"priority": "urgent"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
        # the key's cache default: an identical seeded request is served from the cache without asking
        first = (await c.post("/v1/jobs", json=image("key default cache", seed=77), headers={"Prefer": "wait=30"})).json()
        assert first["status"] == "succeeded" and first["cached"] is False
        second = (await c.post("/v1/jobs", json=image("key default cache", seed=77))).json()
        assert second["cached"] is True and second["cached_from"] == first["id"]
        third = (await c.post("/v1/jobs", json=image("key default cache", seed=77) | {"cache": False})).json()
        assert third["cached"] is False
    async with stack.client() as c:  # a key without settings: normal
        assert (await c.post("/v1/jobs", json=image("p5"))).json()["priority"] == "normal"


async def test_high_priority_jobs_start_before_the_low_ones_waiting_for_the_same_slot(stack: Stack) -> None:
    """One slot, held; low jobs queue for it, then high ones: every high job starts before
    every low job that had not started when the high one was submitted, but for at most
    one (the slot already handed on), FIFO within each."""
    def one_slot(prompt: str, latency: float, priority: str) -> dict[str, Any]:
        return {"model": "one-slot", "priority": priority,
                "input": {"prompt": prompt, "size": "256x256", "provider_params": {"latency_seconds": latency}}}

    async with stack.client() as c:
        blocker = (await c.post("/v1/jobs", json=one_slot("blocker", 3.0, "normal"))).json()
        lows = [(await c.post("/v1/jobs", json=one_slot(f"low {i}", 0.3, "low"))).json() for i in range(6)]
        highs: list[tuple[float, dict[str, Any]]] = []
        for i in range(2):
            submitted = time.time()
            highs.append((submitted, (await c.post("/v1/jobs", json=one_slot(f"high {i}", 0.3, "high"))).json()))
        # while they wait: the high job's queue position is ahead of the low jobs submitted before it
        first_high = (await c.get(f"/v1/jobs/{highs[0][1]['id']}")).json()
        last_low = (await c.get(f"/v1/jobs/{lows[-1]['id']}")).json()
        assert first_high["status"] == last_low["status"] == "queued", (first_high, last_low)
        assert first_high["queue_position"] is not None and last_low["queue_position"] is not None
        assert first_high["queue_position"] <= 1 < last_low["queue_position"], (first_high, last_low)
        if first_high["eta_seconds"] is not None and last_low["eta_seconds"] is not None:
            assert first_high["eta_seconds"] <= last_low["eta_seconds"], (first_high, last_low)
        done = {j["id"]: await stack.wait_job(c, j["id"], timeout=60) for j in [blocker, *lows, *(h for _, h in highs)]}
    assert all(j["status"] == "succeeded" for j in done.values()), [(j["id"], j["status"], j["error"]) for j in done.values()]

    def started(job: dict[str, Any]) -> float:
        return datetime.fromisoformat(done[job["id"]]["started_at"].replace("Z", "+00:00")).timestamp()

    for submitted, high in highs:
        overtaken = [low for low in lows if started(low) > submitted]
        assert overtaken, "every low job had started before a high one was submitted: the slot was not held"
        # a slot handed to the next low job just before the high one arrived is that low
        # job's: a high job waits for at most that one free slot
        ahead = [low for low in overtaken if started(low) < started(high)]
        assert len(ahead) <= 1, ([started(h) for _, h in highs], [started(low) for low in lows], submitted)
    assert [started(low) for low in lows] == sorted(started(low) for low in lows)  # FIFO within a priority
    assert started(highs[0][1]) < started(highs[1][1])
