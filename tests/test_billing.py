"""Billing by outcome, from the user's side: real API and worker processes on PostgreSQL.

A job holds its price at submit and, when it ends, is charged what it delivered
(succeeded), nothing (failed: provider error, moderation, timeout; canceled before the
provider took it) or its hold (canceled after the provider took it). Concurrent submits
never overdraw a budget, 500 jobs of mixed outcomes add up to the micro-USD, and chat
calls settle exactly their reported tokens. Every test ends with `billing.audit`: the
tenant's `spent` and `held` equal what its `billing_entries` add up to.

Each test has its own tenant, whose budget is set in SQL before its key is first used.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai import AsyncOpenAI
from redis.asyncio import Redis
from sqlalchemy import func
from sqlmodel import select

from core.billing import ledger as billing
from core.db import Sessions, create_engine, sessionmaker
from core.keys import announce_change, create_key
from core.limits.deployments import Limiter
from core.models import BillingEntry, Job, Tenant
from core.routing.catalog import DEFAULT_CATALOG, load_catalog
from tests.services import fresh_postgres
from tests.stack import TERMINAL, Stack, make_stack, running

TENANTS = ("outcomes", "poor", "bystander", "race", "scale", "chatty", "broke", "reporter")
DEFAULT_PRICES = {m["id"]: m["deployments"][0].get("price") for m in yaml.safe_load(DEFAULT_CATALOG.read_text())["models"]}
PER_IMAGE = DEFAULT_PRICES["local-image"]["per_image"]  # by quality: low, medium, ...
PER_SECOND = DEFAULT_PRICES["local-video"]["per_second"]  # by resolution
TEXT_PRICE = {"per_1k_input_tokens": 2500, "per_1k_output_tokens": 10000}  # given to local-text below
VIDEO_DEADLINE = 2  # seconds; a video job slower than this times out


def _catalog(root: Path) -> Path:
    """The default catalog, with a token price on local-text."""
    data = yaml.safe_load(DEFAULT_CATALOG.read_text())
    for model in data["models"]:
        for dep in model["deployments"]:
            if dep["name"] == "local-text":
                dep["price"] = TEXT_PRICE
    path = root / "catalog.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("billing")
    async with fresh_postgres() as database_url:
        st = await make_stack(root, redis_url=f"{redis_base}/0", database_url=database_url, catalog=_catalog(root),
                              tenants=TENANTS, deadline_video_seconds=str(VIDEO_DEADLINE), worker_max_jobs="200",
                              db_pool_size="5")  # ≤ 10 connections a process: PostgreSQL's 100 are shared
        async with running(st):
            yield st


@pytest.fixture(scope="module")
async def db(stack: Stack) -> AsyncIterator[Sessions]:
    engine = create_engine(stack.settings())
    try:
        yield sessionmaker(engine)
    finally:
        await engine.dispose()


# -- requests ---------------------------------------------------------------------------------


def image(*, n: int = 1, size: str = "256x256", quality: str = "low", **params: Any) -> dict[str, Any]:
    """A local-image job body; `params` go to the local provider (latency_seconds, fail, ...).
    Held and charged PER_IMAGE[quality] × n (no size in the price table below 1024x1536)."""
    return {"model": "local-image",
            "input": {"prompt": "a lighthouse", "size": size, "n": n, "provider_params": {"quality": quality, **params}}}


def slow_video(seconds: int = 2, resolution: str = "360p") -> dict[str, Any]:
    """A video the provider takes 30 s for: past VIDEO_DEADLINE, so it times out."""
    return {"model": "local-video", "input": {"prompt": "waves", "duration_seconds": seconds, "resolution": resolution,
                                              "provider_params": {"latency_seconds": 30, "progress_steps": 30}}}


def client(url: str, key: str) -> httpx.AsyncClient:
    """A client with `key` at `url` (stack.client covers a tenant's first key at the first API)."""
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


async def submit(c: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    r = await c.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    return r.json()


async def until(check: Callable[[], Awaitable[Any]], *, timeout: float = 30, what: str = "condition") -> Any:
    """Re-check `check` until it returns something truthy (and return that)."""
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return result


# -- the ledger, read directly ----------------------------------------------------------------


async def set_budget(stack: Stack, db: Sessions, tenant_id: str, budget: int | None) -> None:
    """What the admin API does: set the budget (recomputing the sums) and tell every API
    process's key cache."""
    async with db() as s:
        assert await billing.set_budget(s, tenant_id, budget)
        await s.commit()
    redis = Redis.from_url(stack.settings().redis_url)
    try:
        await announce_change(redis, stack.settings().redis_prefix)
    finally:
        await redis.aclose()


async def tenant(db: Sessions, tenant_id: str) -> Tenant:
    async with db() as s:
        row = await s.get(Tenant, tenant_id)
        assert row is not None
        return row


async def entries(db: Sessions, tenant_id: str) -> dict[str, dict[str, int]]:
    """subject id -> {kind: amount}; asserts no subject has two entries of one kind."""
    async with db() as s:
        rows = (await s.exec(select(BillingEntry).where(BillingEntry.tenant == tenant_id))).all()
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for e in rows:
        assert e.kind not in out[e.subject_id], f"two {e.kind} entries for {e.subject_id}"
        out[e.subject_id][e.kind] = e.amount
    return dict(out)


async def assert_books_balance(db: Sessions, tenant_id: str) -> Tenant:
    """audit: spent and held on the tenant row equal what its entries add up to."""
    async with db() as s:
        result = await billing.audit(s, tenant_id)
    assert result.ok, result
    return await tenant(db, tenant_id)


async def job_count(db: Sessions, tenant_id: str, *, terminal: bool = False) -> int:
    q = select(func.count()).select_from(Job).where(Job.tenant == tenant_id)
    if terminal:
        q = q.where(Job.status.in_(TERMINAL))  # type: ignore[attr-defined]
    async with db() as s:
        return int((await s.exec(q)).one())


# -- 1. outcomes ------------------------------------------------------------------------------


async def test_each_outcome_settles_or_releases_its_hold(stack: Stack, db: Sessions) -> None:
    """Success is charged the catalog price of what was delivered; provider failure, moderation,
    timeout and a cancel while queued cost nothing; a cancel after the provider took the task
    is charged its hold."""
    await set_budget(stack, db, "outcomes", 10_000_000)
    low = PER_IMAGE["low"]
    # a second key of the tenant that runs one job at a time: its second job stays queued
    _, serial_key = await create_key(db, name="outcomes-serial", tenant="outcomes", max_concurrency=1)
    async with stack.client("outcomes") as c, client(stack.api_url, serial_key) as serial:
        ok = await submit(c, image(n=2, size="1024x1024", quality="low"))
        provider_error = await submit(c, image(fail="provider_error"))
        moderated = await submit(c, image(fail="moderated"))
        timeout = await submit(c, slow_video(seconds=4))
        # the serial key's first job is taken by the provider (and runs 10 minutes); its second waits queued
        started = await submit(serial, image(latency_seconds=600, progress_steps=1))
        await until(lambda: _provider_has(c, started["id"]), what="the provider to take the first job")
        assert (await c.get(f"/v1/jobs/{started['id']}")).json()["cost"]["status"] == "held"
        queued = await submit(serial, image())
        await until(lambda: _says_waiting(c, queued["id"]), what="the second job to wait for its key's slot")
        canceled_queued = (await c.post(f"/v1/jobs/{queued['id']}/cancel")).json()
        canceled_started = (await c.post(f"/v1/jobs/{started['id']}/cancel")).json()
        # the cancel's answer is the row its transition wrote; a later read says the same
        assert (await c.get(f"/v1/jobs/{queued['id']}")).json()["cost"] == canceled_queued["cost"]
        done = {name: await stack.wait_job(c, job["id"]) for name, job in
                [("ok", ok), ("provider_error", provider_error), ("moderated", moderated), ("timeout", timeout)]}

    assert ok["cost"] == {"unit": "micro_usd", "status": "held", "held": 2 * low, "settled": None}
    assert done["ok"]["status"] == "succeeded" and len(done["ok"]["outputs"]) == 2, done["ok"]
    assert done["ok"]["cost"] == {"unit": "micro_usd", "status": "settled", "held": 2 * low, "settled": 2 * low}
    for code in ("provider_error", "moderated", "timeout"):
        job = done[code]
        assert (job["status"], job["error"]["code"]) == ("failed", code), job
        held = 4 * PER_SECOND["360p"] if code == "timeout" else low
        assert job["cost"] == {"unit": "micro_usd", "status": "released", "held": held, "settled": 0}, job
    assert canceled_queued["status"] == "canceled"
    assert canceled_queued["cost"] == {"unit": "micro_usd", "status": "released", "held": low, "settled": 0}
    assert canceled_started["status"] == "canceled"
    assert canceled_started["cost"] == {"unit": "micro_usd", "status": "settled", "held": low, "settled": low}

    books = await entries(db, "outcomes")
    jobs = {"ok": ok, "started": started, "queued": queued, **{k: done[k] for k in ("provider_error", "moderated", "timeout")}}
    assert {name: books[job["id"]] for name, job in jobs.items()} == {
        "ok": {"hold": 2 * low, "settle": 2 * low},
        "started": {"hold": low, "settle": low},
        "queued": {"hold": low, "release": low},
        "provider_error": {"hold": low, "release": low},
        "moderated": {"hold": low, "release": low},
        "timeout": {"hold": 4 * PER_SECOND["360p"], "release": 4 * PER_SECOND["360p"]},
    }
    row = await assert_books_balance(db, "outcomes")
    assert (row.spent, row.held) == (2 * low + low, 0)


async def _provider_has(c: httpx.AsyncClient, job_id: str) -> bool:
    job = (await c.get(f"/v1/jobs/{job_id}")).json()
    return job["status"] == "running" and (job["progress"]["message"] or "").startswith("step ")  # the handle is saved


async def _says_waiting(c: httpx.AsyncClient, job_id: str) -> bool:
    job = (await c.get(f"/v1/jobs/{job_id}")).json()
    return job["status"] == "queued" and "concurrency limit" in (job["progress"]["message"] or "")


# -- 2. 402 -----------------------------------------------------------------------------------


async def _health(stack: Stack) -> dict[str, Any]:
    """The local-image deployment as the router sees it in Redis (core.limits.deployments)."""
    catalog = load_catalog(Path(stack.env["GENROUTE_CATALOG"]))
    dep = catalog.deployment("local-image")
    assert dep is not None
    redis = Redis.from_url(stack.settings().redis_url)
    try:
        snap = await Limiter.from_settings(redis, stack.settings()).snapshot([dep], catalog_version=catalog.version)
    finally:
        await redis.aclose()
    state = snap.states["local-image"]
    return {"failures": state.failures, "cooling": state.cooldown_until is not None, "unhealthy": state.unhealthy}


async def test_a_hold_the_budget_cannot_cover_is_refused_with_402(stack: Stack, db: Sessions) -> None:
    """402 budget_exceeded says what is left and what to do; no job, no entry, and the
    refusals (more of them than open a breaker) do not touch the deployment's health."""
    hold = PER_IMAGE["low"]
    await set_budget(stack, db, "poor", hold - 1)
    before = await _health(stack)
    async with stack.client("poor") as c:
        refusals = [await c.post("/v1/jobs", json=image()) for _ in range(stack.settings().router_cooldown_failures + 2)]
        listed = (await c.get("/v1/jobs")).json()["data"]
    for r in refusals:
        assert r.status_code == 402, r.text
        error = r.json()["error"]
        assert error["code"] == "budget_exceeded"
        assert "Raise the budget" in error["message"] and "/v1/admin/tenants/poor" in error["message"], error["message"]
        assert error["details"] == {"budget": hold - 1, "spent": 0, "held": 0, "available": hold - 1, "required": hold}
    assert listed == [] and await job_count(db, "poor") == 0
    assert await entries(db, "poor") == {}
    row = await assert_books_balance(db, "poor")
    assert (row.spent, row.held) == (0, 0)

    assert await _health(stack) == before == {"failures": 0, "cooling": False, "unhealthy": False}
    async with stack.client("bystander") as c:  # another tenant's job runs on it as usual
        r = await c.post("/v1/jobs", json=image(), headers={"Prefer": "wait=30"})
    assert r.json()["status"] == "succeeded" and r.json()["deployment"] == "local-image", r.text


# -- 3. concurrent submits --------------------------------------------------------------------


async def test_concurrent_submits_never_overdraw_the_budget(stack: Stack, db: Sessions) -> None:
    """A budget of exactly K holds, 80 submits at once through two API processes: exactly K
    are accepted. The jobs run for 10 minutes, so nothing settles during the race."""
    k, hold = 10, PER_IMAGE["low"]
    await set_budget(stack, db, "race", k * hold)
    second_api = stack.start_api_replica("api-race")
    body = image(latency_seconds=600, progress_steps=1)
    async with stack.client("race") as a, client(second_api, stack.keys["race"]) as b:
        responses = await asyncio.gather(*(c.post("/v1/jobs", json=body) for _ in range(40) for c in (a, b)))

    assert Counter(r.status_code for r in responses) == {201: k, 402: 80 - k}
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 402} == {"budget_exceeded"}
    accepted = {r.json()["id"] for r in responses if r.status_code == 201}
    books = await entries(db, "race")
    assert books == {job_id: {"hold": hold} for job_id in accepted}
    assert await job_count(db, "race") == k
    row = await assert_books_balance(db, "race")
    assert (row.budget, row.spent, row.held) == (k * hold, 0, k * hold)


# -- 4. the ledger at scale -------------------------------------------------------------------

OUTCOMES = {"succeeded": 40, "provider_error": 15, "moderated": 15, "timeout": 15, "canceled": 15}  # weights


def planned_jobs(count: int, seed: int) -> list[tuple[str, dict[str, Any], int]]:
    """(outcome, body, hold) for `count` jobs of seeded random outcomes."""
    rng = random.Random(seed)
    jobs = []
    for outcome in rng.choices(list(OUTCOMES), weights=list(OUTCOMES.values()), k=count):
        if outcome == "succeeded":
            n, quality = rng.randint(1, 3), rng.choice(["low", "medium"])
            jobs.append((outcome, image(n=n, quality=quality), n * PER_IMAGE[quality]))
        elif outcome == "timeout":
            seconds = rng.randint(1, 4)
            jobs.append((outcome, slow_video(seconds), seconds * PER_SECOND["360p"]))
        elif outcome == "canceled":  # canceled right after its submit: still queued, or taken by the provider
            jobs.append((outcome, image(latency_seconds=60), PER_IMAGE["low"]))
        else:
            jobs.append((outcome, image(fail=outcome), PER_IMAGE["low"]))
    return jobs


async def _all_jobs(c: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    cursor: str | None = None
    while True:
        page = (await c.get("/v1/jobs", params={"limit": 100, **({"cursor": cursor} if cursor else {})})).json()
        out.update((j["id"], j) for j in page["data"])
        if not (cursor := page["next_cursor"]):
            return out


async def test_500_jobs_of_random_outcomes_add_up_to_the_micro_usd(stack: Stack, db: Sessions) -> None:
    """Each job has one hold and one settle or release; spent is exactly what the succeeded
    jobs delivered plus the holds of jobs canceled after the provider took them; nothing
    stays held."""
    await set_budget(stack, db, "scale", 10**12)
    plan = planned_jobs(500, seed=20240611)

    async def run(c: httpx.AsyncClient, outcome: str, body: dict[str, Any]) -> str:
        job = await submit(c, body)
        if outcome == "canceled":
            r = await c.post(f"/v1/jobs/{job['id']}/cancel")
            assert r.status_code == 200 and r.json()["status"] == "canceled", r.text
        return job["id"]

    async with stack.client("scale") as c:
        ids = await asyncio.gather(*(run(c, outcome, body) for outcome, body, _ in plan))
        await until(lambda: _all_terminal(db, "scale", len(plan)), timeout=45, what="every job to end")
        jobs = await _all_jobs(c)

    assert set(jobs) == set(ids)
    books = await entries(db, "scale")
    assert set(books) == set(ids)
    charged: Counter[str] = Counter()  # micro-USD settled, by outcome (cancels split by whether the provider had the task)
    counts: Counter[str] = Counter()
    for job_id, (outcome, body, hold) in zip(ids, plan, strict=True):
        job, cost = jobs[job_id], jobs[job_id]["cost"]
        if outcome == "succeeded":  # the catalog price of the images delivered
            assert job["status"] == "succeeded" and len(job["outputs"]) == body["input"]["n"], job
            assert cost == {"unit": "micro_usd", "status": "settled", "held": hold, "settled": hold}, job
        elif outcome == "canceled":
            taken = cost["status"] == "settled"  # the provider had the task: the hold is charged
            assert job["status"] == "canceled", job
            assert cost == {"unit": "micro_usd", "status": "settled" if taken else "released", "held": hold,
                            "settled": hold if taken else 0}, job
            outcome = "canceled after the provider took it" if taken else "canceled before"
        else:
            assert (job["status"], job["error"]["code"]) == ("failed", outcome), job
            assert cost == {"unit": "micro_usd", "status": "released", "held": hold, "settled": 0}, job
        closing = {"settle": hold} if cost["status"] == "settled" else {"release": hold}
        assert books[job_id] == {"hold": hold, **closing}, (job, books[job_id])
        charged[outcome] += cost["settled"]
        counts[outcome] += 1

    row = await assert_books_balance(db, "scale")
    settles = sum(b.get("settle", 0) for b in books.values())
    assert row.spent == settles == charged["succeeded"] + charged["canceled after the provider took it"], (charged, counts)
    assert row.held == 0


async def _all_terminal(db: Sessions, tenant_id: str, count: int) -> bool:
    return await job_count(db, tenant_id, terminal=True) == count


# -- 5. chat ----------------------------------------------------------------------------------


def chat_price(prompt_tokens: int, completion_tokens: int) -> int:
    """TEXT_PRICE for the tokens, rounded up to the micro-USD once."""
    p = TEXT_PRICE
    return math.ceil((p["per_1k_input_tokens"] * prompt_tokens + p["per_1k_output_tokens"] * completion_tokens) / 1000)


def openai_client(stack: Stack, tenant_id: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{stack.api_url}/v1", api_key=stack.keys[tenant_id], max_retries=0)


async def _closed(db: Sessions, tenant_id: str, subject_id: str) -> dict[str, int] | None:
    """The call's entries once its hold is settled or released (the usage writer batches them)."""
    got = (await entries(db, tenant_id)).get(subject_id, {})
    return got if {"settle", "release"} & got.keys() else None


async def test_chat_calls_settle_exactly_the_reported_tokens(stack: Stack, db: Sessions) -> None:
    """Plain and streamed calls of a budgeted tenant hold before they run and settle their
    usage × price (rounded up once: 3 × 2500 + 5 × 10000 = 57.5 micro-USD is charged 58)."""
    await set_budget(stack, db, "chatty", 1_000_000)
    async with openai_client(stack, "chatty") as oai:
        raw = await oai.chat.completions.with_raw_response.create(
            model="local-text", messages=[{"role": "user", "content": "one two three"}])
        plain_id, plain = raw.headers["x-genroute-request-id"], raw.parse().usage
        raw = await oai.chat.completions.with_raw_response.create(
            model="local-text", messages=[{"role": "user", "content": "a b c d e"}], max_tokens=2, stream=True,
            stream_options={"include_usage": True})
        stream_id = raw.headers["x-genroute-request-id"]
        streamed = [chunk.usage async for chunk in raw.parse() if chunk.usage is not None][-1]

    assert (plain.prompt_tokens, plain.completion_tokens) == (3, 5)  # "local-text heard: three two one"
    assert (streamed.prompt_tokens, streamed.completion_tokens) == (5, 2)  # cut at max_tokens
    assert chat_price(3, 5) == 58
    for call_id, usage in ((plain_id, plain), (stream_id, streamed)):
        books = await until(lambda call_id=call_id: _closed(db, "chatty", call_id), what=f"the call {call_id} to settle")
        # exactly the reported usage, also where it exceeds the hold's estimate (the prompt's
        # tokens are estimated from its characters; "a b c d e" is 5 tokens, estimated 3)
        assert books.keys() == {"hold", "settle"}, books  # held before it ran, settled after
        assert books["settle"] == chat_price(usage.prompt_tokens, usage.completion_tokens), books
    row = await assert_books_balance(db, "chatty")
    assert (row.spent, row.held) == (chat_price(3, 5) + chat_price(5, 2), 0)


async def test_a_chat_the_budget_cannot_cover_gets_402_in_openais_shape(stack: Stack, db: Sessions) -> None:
    """Refused before anything runs, plain or streamed: nothing held, nothing charged."""
    await set_budget(stack, db, "broke", 1000)  # a call holds its prompt and 512 output tokens: 5120+ micro-USD
    async with openai_client(stack, "broke") as oai:
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as refused:
                await oai.chat.completions.create(
                    model="local-text", messages=[{"role": "user", "content": "hello"}], stream=stream)
            assert refused.value.status_code == 402
            body = refused.value.response.json()
            assert body == {"error": {"message": body["error"]["message"], "type": "insufficient_quota", "param": None,
                                      "code": "budget_exceeded"}}
            assert "Raise the budget" in body["error"]["message"], body
        with pytest.raises(openai.APIStatusError) as refused:  # the OpenAI media doors hold the same way
            await oai.images.generate(model="local-image", prompt="a lighthouse", size="1024x1024")
        assert refused.value.status_code == 402 and refused.value.response.json()["error"]["code"] == "budget_exceeded"
    assert await entries(db, "broke") == {}
    row = await assert_books_balance(db, "broke")
    assert (row.spent, row.held) == (0, 0)


# -- 6. the usage report ------------------------------------------------------------------------


async def test_usage_report_adds_up_what_was_charged(stack: Stack, db: Sessions) -> None:
    """GET /v1/usage: per model, key and day, counts by outcome, durations, tokens and cost,
    the same numbers billing settled; and the balance (no budget: added up from the entries)."""
    low = PER_IMAGE["low"]
    async with stack.client("reporter") as c:
        jobs = [await submit(c, image(n=2)), await submit(c, image()), await submit(c, image(fail="provider_error"))]
        for j in jobs:
            assert (await stack.wait_job(c, j["id"]))["status"] in TERMINAL
    async with openai_client(stack, "reporter") as oai:
        raw = await oai.chat.completions.with_raw_response.create(
            model="local-text", messages=[{"role": "user", "content": "one two three"}])
        call_id = raw.headers["x-genroute-request-id"]
    await until(lambda: _closed(db, "reporter", call_id), what="the chat call to settle")
    async with db() as s:
        key_id = (await s.exec(select(Job.key_id).where(Job.tenant == "reporter"))).first()

    async with stack.client("reporter") as c:
        by_model = (await c.get("/v1/usage", params={"group_by": "model"})).json()
        groups = {g["group"]: g for g in by_model["data"]}
        assert groups["local-image"] | {"duration_ms_total": 0, "duration_ms_avg": 0} == {
            "group": "local-image", "requests": 3, "succeeded": 2, "failed": 1, "canceled": 0, "incomplete": 0,
            "duration_ms_total": 0, "duration_ms_avg": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": 3 * low}
        assert groups["local-image"]["duration_ms_total"] > 0
        assert groups["local-text"]["requests"] == 1 and groups["local-text"]["cost"] == chat_price(3, 5)
        assert (groups["local-text"]["prompt_tokens"], groups["local-text"]["completion_tokens"]) == (3, 5)
        total = 3 * low + chat_price(3, 5)
        assert by_model["total"]["cost"] == total and by_model["total"]["requests"] == 4
        assert by_model["balance"] == {"budget": None, "spent": total, "held": 0, "available": None}

        by_key = (await c.get("/v1/usage", params={"group_by": "key"})).json()
        assert [(g["group"], g["requests"], g["cost"]) for g in by_key["data"]] == [(key_id, 4, total)]
        by_day = (await c.get("/v1/usage", params={"group_by": "day"})).json()
        assert [(g["group"], g["cost"]) for g in by_day["data"]] == [(time.strftime("%Y-%m-%d", time.gmtime()), total)]

        later = (await c.get("/v1/usage", params={"from": "2099-01-01T00:00:00Z", "to": "2099-01-02T00:00:00Z"})).json()
        assert later["data"] == [] and later["total"]["requests"] == 0
        for bad in ({"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, {"group_by": "hour"}, {"from": "yesterday"},
                    {"from": "2020-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}):
            r = await c.get("/v1/usage", params=bad)
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input", (bad, r.text)
        # another tenant's usage does not exist for this key; an admin key may read it
        assert (await c.get("/v1/usage", params={"tenant": "outcomes"})).status_code == 404
    _, admin_key = await create_key(db, name="auditor", tenant="ops", admin=True)
    async with client(stack.api_url, admin_key) as admin:
        report = (await admin.get("/v1/usage", params={"tenant": "reporter"})).json()
        assert report["tenant"] == "reporter" and report["total"]["cost"] == total
        assert (await admin.get("/v1/usage", params={"tenant": "nobody-here"})).status_code == 404
