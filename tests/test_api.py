"""The REST contract, from a client's side, against a running API + worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.stack import Stack, make_stack, running


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[Stack]:
    st = await make_stack(tmp_path_factory.mktemp("api"), redis_url=f"{redis_base}/0", max_body_bytes="65536")
    async with running(st, ("worker", "--queue", "media")):  # nobody serves the video queue: video jobs stay queued
        yield st


@pytest.fixture
async def alice(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with stack.client("alice") as c:
        yield c


def _err(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]


IMAGE = {"model": "local-image", "input": {"prompt": "a cat", "size": "256x256"}}


async def test_create_returns_201_then_job_succeeds(stack: Stack, alice: httpx.AsyncClient) -> None:
    r = await alice.post("/v1/jobs", json=IMAGE)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] in ("queued", "running", "succeeded") and job["id"].startswith("job_")
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    done = await stack.wait_job(alice, job["id"])
    assert done["status"] == "succeeded" and done["outputs"][0]["width"] == 256


async def test_idempotency_key_replays_the_same_job_and_enqueues_once(stack: Stack, alice: httpx.AsyncClient) -> None:
    key = f"idem-{time.time_ns()}"
    body = {"model": "local-image", "input": {"prompt": "idempotent fox", "size": "256x256", "seed": 1}}
    first, *rest = await asyncio.gather(*(alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}) for _ in range(5)))
    ids = {r.json()["id"] for r in [first, *rest]}
    assert len(ids) == 1, [r.text for r in [first, *rest]]
    assert sorted(r.status_code for r in [first, *rest]).count(201) == 1
    assert all(r.headers.get("idempotent-replayed") == "true" for r in [first, *rest] if r.status_code == 200)
    job_id = ids.pop()
    await stack.wait_job(alice, job_id)
    assert stack.submits().count(job_id) == 1
    # the same key with another body is a conflict that names the job
    other = {"model": "local-image", "input": {"prompt": "another fox", "size": "256x256"}}
    err = _err(await alice.post("/v1/jobs", json=other, headers={"Idempotency-Key": key}), 409, "idempotency_conflict")
    assert err["details"]["job_id"] == job_id
    # keys are per tenant: bob's same key is a new job
    async with stack.client("bob") as bob:
        r = await bob.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        assert r.status_code == 201 and r.json()["id"] != job_id


async def test_bad_idempotency_key_is_400(alice: httpx.AsyncClient) -> None:
    _err(await alice.post("/v1/jobs", json=IMAGE, headers={"Idempotency-Key": "has space"}), 400, "invalid_request")


async def test_prefer_wait_returns_200_when_done_and_202_when_not(alice: httpx.AsyncClient) -> None:
    r = await alice.post("/v1/jobs", json=IMAGE, headers={"Prefer": "wait=20"})
    assert r.status_code == 200 and r.json()["status"] == "succeeded"
    assert r.headers["preference-applied"] == "wait=20"
    slow = {"model": "local-image", "input": {"prompt": "slow", "size": "256x256", "provider_params": {"latency_seconds": 4}}}
    t0 = time.monotonic()
    r = await alice.post("/v1/jobs", json=slow, headers={"Prefer": "wait=1"})
    elapsed = time.monotonic() - t0
    assert r.status_code == 202 and r.json()["status"] in ("queued", "running"), r.text
    assert 0.9 <= elapsed < 3, elapsed
    # waiting on GET too; the job ends inside the wait and the answer comes at once
    t0 = time.monotonic()
    r = await alice.get(f"/v1/jobs/{r.json()['id']}", headers={"Prefer": "wait=20"})
    assert r.status_code == 200 and r.json()["status"] == "succeeded"
    assert time.monotonic() - t0 < 6
    _err(await alice.post("/v1/jobs", json=IMAGE, headers={"Prefer": "wait=61"}), 400, "invalid_request")


async def test_progress_is_reported_while_running(stack: Stack, alice: httpx.AsyncClient) -> None:
    body = {"model": "local-image", "input": {"prompt": "progress", "size": "256x256", "provider_params": {"latency_seconds": 2, "progress_steps": 4}}}
    job = (await alice.post("/v1/jobs", json=body)).json()
    seen = set()
    for _ in range(60):
        j = (await alice.get(f"/v1/jobs/{job['id']}")).json()
        seen.add(j["progress"]["fraction"])
        if j["status"] == "succeeded":
            break
        await asyncio.sleep(0.1)
    assert {0.25, 0.5, 0.75} & seen and 1.0 in seen, seen


async def test_cancel_queued_job_is_immediate(stack: Stack, alice: httpx.AsyncClient) -> None:
    r = await alice.post("/v1/jobs", json={"model": "local-video", "input": {"prompt": "never runs", "duration_seconds": 1}})
    job = r.json()
    assert job["status"] == "queued"
    got = (await alice.get(f"/v1/jobs/{job['id']}")).json()
    assert got["queue_position"] is not None  # the video queue has no worker here: it waits, visibly
    r = await alice.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert r.json()["error"]["code"] == "canceled"
    # a finished job cannot be canceled, a canceled one included (README: finished -> 409)
    again = await alice.post(f"/v1/jobs/{job['id']}/cancel")
    _err(again, 409, "job_not_cancelable")
    assert again.json()["error"]["details"] == {"status": "canceled"}
    done = (await alice.post("/v1/jobs", json=IMAGE, headers={"Prefer": "wait=20"})).json()
    _err(await alice.post(f"/v1/jobs/{done['id']}/cancel"), 409, "job_not_cancelable")


async def test_cancel_running_job_stops_it(stack: Stack, alice: httpx.AsyncClient) -> None:
    body = {"model": "local-image", "input": {"prompt": "long", "size": "256x256", "provider_params": {"latency_seconds": 3, "progress_steps": 6}}}
    job = (await alice.post("/v1/jobs", json=body)).json()
    for _ in range(50):
        if (await alice.get(f"/v1/jobs/{job['id']}")).json()["status"] == "running":
            break
        await asyncio.sleep(0.05)
    r = await alice.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    await asyncio.sleep(3.5)  # past the provider's latency: the poll chain must have stopped
    final = (await alice.get(f"/v1/jobs/{job['id']}")).json()
    assert final["status"] == "canceled" and final["outputs"] == []


async def test_tenants_cannot_see_each_others_jobs(stack: Stack, alice: httpx.AsyncClient) -> None:
    job = (await alice.post("/v1/jobs", json=IMAGE)).json()
    async with stack.client("bob") as bob:
        _err(await bob.get(f"/v1/jobs/{job['id']}"), 404, "not_found")
        _err(await bob.post(f"/v1/jobs/{job['id']}/cancel"), 404, "not_found")
        listed = (await bob.get("/v1/jobs", params={"limit": 100})).json()["data"]
        assert job["id"] not in {j["id"] for j in listed}


async def test_auth_is_required(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.api_url) as anon:
        err = _err(await anon.post("/v1/jobs", json=IMAGE), 401, "unauthorized")
        assert "Bearer" in err["message"]
        _err(await anon.get("/v1/jobs", headers={"Authorization": "Bearer gr_nope"}), 401, "unauthorized")
        _err(await anon.get("/v1/models", headers={"Authorization": "Basic abc"}), 401, "unauthorized")
        assert (await anon.get("/healthz")).status_code == 200


async def test_validation_errors_name_the_fields(alice: httpx.AsyncClient) -> None:
    r = await alice.post("/v1/jobs", json={"model": "local-image", "input": {"prompt": "", "size": "huge", "n": 0, "bogus": 1}})
    err = _err(r, 422, "invalid_input")
    locs = {tuple(d["loc"]) for d in err["details"]}
    assert {("input", "prompt"), ("input", "size"), ("input", "n"), ("input", "bogus")} <= locs, locs
    # a value the schema allows but this model cannot honour names the allowed values
    err = _err(await alice.post("/v1/jobs", json={"model": "local-image", "input": {"prompt": "x", "size": "4096x4096"}}), 422, "invalid_input")
    assert err["details"][0]["loc"] == ["input", "size"] and "1024x1024" in err["details"][0]["msg"]
    err = _err(await alice.post("/v1/jobs", json={"model": "local-audio", "input": {"voice": "alloy"}}), 422, "invalid_input")
    assert "text" in str(err["details"])
    err = _err(await alice.post("/v1/jobs", json={"model": "nope", "input": {}}), 404, "model_not_found")
    assert "/v1/models" in err["message"]
    _err(await alice.post("/v1/jobs", json={"input": {}}), 422, "invalid_input")
    _err(await alice.post("/v1/jobs", json={"model": "local-image", "input": {"prompt": "x" * 5000}}), 422, "invalid_input")
    _err(await alice.get("/v1/jobs", params={"status": "bogus"}), 422, "invalid_input")
    _err(await alice.get("/v1/jobs", params={"limit": 1000}), 422, "invalid_input")


@pytest.mark.parametrize(
    "content,ctype",
    [
        (b"{not json", "application/json"),
        (b"", "application/json"),
        (b"[1,2,3]", "application/json"),
        (b'"just a string"', "application/json"),
        (b'{"model": 5, "input": "x"}', "application/json"),
        (b'{"model": "local-image", "input": {"prompt": {"nested": [1]}}}', "application/json"),
        (b"[" * 50_000 + b"]" * 50_000, "application/json"),
        (b"\xff\xfe\x00garbage", "application/json"),
        (b"model=local-image", "application/x-www-form-urlencoded"),
        (b'{"model": "local-image", "input": {"prompt": "\\ud800"}}', "application/json"),
    ],
)
async def test_malformed_bodies_are_4xx_never_500(alice: httpx.AsyncClient, content: bytes, ctype: str) -> None:
    r = await alice.post("/v1/jobs", content=content, headers={"Content-Type": ctype})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.json()["error"]["code"] in ("invalid_json", "invalid_request", "invalid_input", "payload_too_large")


async def test_body_size_limit_is_413(alice: httpx.AsyncClient) -> None:
    big = {"model": "local-image", "input": {"prompt": "x", "provider_params": {"blob": "y" * 70_000}}}
    _err(await alice.post("/v1/jobs", json=big), 413, "payload_too_large")

    async def chunks():  # no Content-Length: the limit still holds while streaming
        for _ in range(20):
            yield b"x" * 8192

    r = await alice.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    _err(r, 413, "payload_too_large")


async def test_list_is_newest_first_with_cursor_and_filters(stack: Stack) -> None:
    async with stack.client("bob") as bob:
        ids = []
        for i in range(5):
            ids.append((await bob.post("/v1/jobs", json={"model": "local-video", "input": {"prompt": f"v{i}", "duration_seconds": 1}})).json()["id"])
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 2, "model": "local-video", "status": "queued"}
            if cursor:
                params["cursor"] = cursor
            page = (await bob.get("/v1/jobs", params=params)).json()
            seen += [j["id"] for j in page["data"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == sorted(ids, reverse=True)
        assert (await bob.get("/v1/jobs", params={"model": "local-image", "status": "queued"})).json()["data"] == []


async def test_models_lists_modality_parameters_and_providers(alice: httpx.AsyncClient) -> None:
    models = {m["id"]: m for m in (await alice.get("/v1/models")).json()["data"]}
    assert {"local-image", "local-video", "local-audio"} <= set(models)
    img = models["local-image"]
    assert img["modality"] == "image" and img["providers"] == ["local"]
    assert "prompt" in img["parameters"]["properties"] and "1024x1024" in img["capabilities"]["sizes"]


async def test_readyz_and_unknown_routes(stack: Stack, alice: httpx.AsyncClient) -> None:
    r = await alice.get(f"{stack.api_url}/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "redis": "ok", "storage": "ok"}
    _err(await alice.get("/v1/nope"), 404, "not_found")
    assert (await alice.get("/v1/nope")).headers["x-content-type-options"] == "nosniff"
    _err(await alice.delete("/v1/jobs"), 405, "method_not_allowed")
    _err(await alice.get("/v1/jobs/" + "x" * 500), 404, "not_found")


async def test_signed_file_urls_refuse_tampering(alice: httpx.AsyncClient) -> None:
    job = (await alice.post("/v1/jobs", json=IMAGE, headers={"Prefer": "wait=20"})).json()
    url = job["outputs"][0]["url"]
    async with httpx.AsyncClient() as anon:
        got = await anon.get(url)
        assert got.status_code == 200 and got.headers["content-type"].startswith("image/")
        assert got.headers["x-content-type-options"] == "nosniff"  # a browser never guesses another type
        _err(await anon.get(url.replace("sig=", "sig=0")), 404, "not_found")
        _err(await anon.get(url.replace("exp=", "exp=1")), 404, "not_found")
        base = url.split("/v1/files/")[0]
        _err(await anon.get(f"{base}/v1/files/../../etc/passwd?exp=9999999999&sig=00"), 404, "not_found")


async def test_the_job_list_filters_by_text_model_deployment_and_time(stack: Stack, alice: httpx.AsyncClient) -> None:
    """GET /v1/jobs?q=&model=&deployment=&from=&to= (the dashboard's filters): each narrows
    the list to what it says; `%` in q is a literal character, not a wildcard."""
    tag = f"zebra{int(time.time() * 1000)}"
    image = (await alice.post("/v1/jobs", json={"model": "local-image", "input": {"prompt": f"A {tag.upper()} crossing",
                                                                                  "size": "256x256"}},
                              headers={"Prefer": "wait=30"})).json()
    audio = (await alice.post("/v1/jobs", json={"model": "local-audio", "input": {"text": f"the {tag} speaks"}},
                              headers={"Prefer": "wait=30"})).json()
    assert image["status"] == audio["status"] == "succeeded", (image, audio)

    async def ids(**params: str) -> set[str]:
        r = await alice.get("/v1/jobs", params={"limit": "100", **params})
        assert r.status_code == 200, r.text
        return {j["id"] for j in r.json()["data"]}

    assert await ids(q=tag) == {image["id"], audio["id"]}  # the prompt and the speech text, any case
    assert await ids(q=f"{tag}%") == set() and await ids(q=f"{tag[:3]}_") == set()
    assert await ids(q=tag, model="local-audio") == {audio["id"]}
    assert await ids(q=tag, deployment="local-image") == {image["id"]}
    assert await ids(q=tag, **{"from": audio["created_at"]}) == {audio["id"]}  # from is inclusive
    assert await ids(q=tag, to=audio["created_at"]) == {image["id"]}  # to is not
    assert await ids(q=tag, status="failed") == set()
    bad = await alice.get("/v1/jobs", params={"from": "yesterday"})
    assert 400 <= bad.status_code < 500 and bad.json()["error"]["code"], bad.text
