"""Malformed input never gets a 500: hand-made bad requests, table-driven, against a real
`genroute api` + worker on PostgreSQL (NUL and NaN are PostgreSQL's to refuse), plus the
websockets, the Allow header and the OpenAPI document's error answers.

A bounded schemathesis run over the same stack lives in tests/test_schemathesis.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import websockets

from tests.services import fresh_postgres
from tests.stack import Stack, make_stack, running

IMAGE = {"model": "local-image", "input": {"prompt": "a cat", "size": "256x256"}}


def nested(depth: int, leaf: Any = "x") -> Any:
    out: Any = leaf
    for _ in range(depth):
        out = [out]
    return out


def raw_json(text: str) -> dict[str, Any]:
    return {"content": text.encode(), "headers": {"Content-Type": "application/json"}}


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[Stack]:
    async with fresh_postgres() as db:
        st = await make_stack(tmp_path_factory.mktemp("malformed"), redis_url=f"{redis_base}/0", database_url=db,
                              max_wait_seconds="10")
        async with running(st, ("worker", "--queue", "media")):
            yield st


@pytest.fixture(scope="module")
async def canceled_job(stack: Stack) -> str:
    async with stack.client() as c:
        job = (await c.post("/v1/jobs", json={"model": "local-video", "input": {"prompt": "never", "duration_seconds": 1}})).json()
        assert (await c.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
        return str(job["id"])


@dataclass
class Bad:
    """One hand-made bad request and the answer it must get."""

    name: str
    method: str
    path: str
    status: int
    code: str | None = None  # error.code (ours) or error.code (OpenAI's shape)
    kwargs: dict[str, Any] = field(default_factory=dict)
    message: str | None = None  # a piece the message must hold


CASES = [
    # a NUL byte anywhere that would reach PostgreSQL
    Bad("nul in a job id", "GET", "/v1/jobs/job_%00", 400, "invalid_request"),
    Bad("nul in a job id (cancel)", "POST", "/v1/jobs/job_%00x/cancel", 400, "invalid_request"),
    Bad("nul in a query", "GET", "/v1/jobs?model=a%00b", 400, "invalid_request"),
    Bad("nul in a cursor", "GET", "/v1/jobs?cursor=%00", 400, "invalid_request"),
    Bad("nul in a prompt", "POST", "/v1/jobs", 400, "invalid_json",
        {"json": {"model": "local-image", "input": {"prompt": "a\u0000b", "size": "256x256"}}}, "NUL"),
    Bad("nul in metadata keys", "POST", "/v1/jobs", 400, "invalid_json", {"json": {**IMAGE, "metadata": {"k\u0000": 1}}}),
    Bad("nul in an idempotency-key-like body field", "POST", "/v1/jobs", 400, "invalid_json",
        {"json": {**IMAGE, "webhook_url": "https://example.com/\u0000"}}),
    Bad("nul in a chat message", "POST", "/v1/chat/completions", 400, "invalid_json",
        {"json": {"model": "x", "messages": [{"role": "user", "content": "hi\u0000"}]}}),
    # numbers PostgreSQL's json cannot hold
    Bad("NaN in metadata", "POST", "/v1/jobs", 400, "invalid_json", raw_json(json.dumps(IMAGE)[:-1] + ', "metadata": {"a": NaN}}')),
    Bad("Infinity in metadata", "POST", "/v1/jobs", 400, "invalid_json",
        raw_json(json.dumps(IMAGE)[:-1] + ', "metadata": {"a": -Infinity}}')),
    Bad("1e999 in metadata", "POST", "/v1/jobs", 400, "invalid_json", raw_json(json.dumps(IMAGE)[:-1] + ', "metadata": {"a": 1e999}}')),
    Bad("a 5,000-digit integer", "POST", "/v1/jobs", 400, "invalid_json",
        raw_json(json.dumps(IMAGE)[:-1] + ', "metadata": {"a": ' + "9" * 5000 + "}}")),
    # nesting
    Bad("jobs nested 50,000 deep", "POST", "/v1/jobs", 400, "invalid_json",
        raw_json(json.dumps(IMAGE)[:-1] + ', "metadata": {"a": ' + "[" * 50_000 + "]" * 50_000 + "}}")),
    Bad("chat nested 50,000 deep", "POST", "/v1/chat/completions", 400, "invalid_json",
        raw_json('{"model": "x", "messages": [{"role": "user", "content": ' + "[" * 50_000 + "]" * 50_000 + "}]}")),
    Bad("jobs nested 100 deep", "POST", "/v1/jobs", 400, "invalid_json", {"json": {**IMAGE, "metadata": {"a": nested(100)}}}),
    # one Prefer: wait rule
    *(Bad(f"Prefer: wait={v[:12]}", "POST", "/v1/jobs", 400, "invalid_request", {"json": IMAGE, "headers": {"Prefer": f"wait={v}"}},
          "whole number") for v in ("0", "-1", "1.5", "abc", "99999", "9" * 5000)),
    Bad("Prefer: wait on GET", "GET", "/v1/jobs/job_nope", 400, "invalid_request", {"headers": {"Prefer": "wait=1.5"}}),
    # the OpenAI facades name the missing parameter
    Bad("speech without input", "POST", "/v1/audio/speech", 400, "missing_required_parameter",
        {"json": {"model": "local-audio", "voice": "alloy"}}, "'input'"),
    Bad("images without prompt", "POST", "/v1/images/generations", 400, "missing_required_parameter", {"json": {}}, "'prompt'"),
    Bad("binary garbage as JSON", "POST", "/v1/jobs", 400, "invalid_json",
        {"content": b"\xff\xfe\x00", "headers": {"Content-Type": "application/json"}}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_hand_made_bad_requests(stack: Stack, case: Bad) -> None:
    async with stack.client() as c:
        r = await c.request(case.method, case.path, **case.kwargs)
        assert r.status_code == case.status, (case.name, r.status_code, r.text[:500])
        err = r.json()["error"]
        assert err["code"] == case.code, err
        if case.message:
            assert case.message in err["message"], err
        # the keep-alive connection survives a refused request
        assert (await c.get("/v1/models")).status_code == 200


async def test_canceling_a_canceled_job_is_409(stack: Stack, canceled_job: str) -> None:
    async with stack.client() as c:
        r = await c.post(f"/v1/jobs/{canceled_job}/cancel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_cancelable"


async def test_nothing_malformed_was_stored(stack: Stack) -> None:
    async with stack.client() as c:
        jobs = (await c.get("/v1/jobs", params={"limit": 100})).json()["data"]
    assert all("\x00" not in json.dumps(j) for j in jobs)
    assert all(j["model"] != "local-image" or j["metadata"] == {} for j in jobs), "a refused body created a job"


# -- websockets ---------------------------------------------------------------------------------


def ws_url(stack: Stack, path: str) -> str:
    return stack.api_url.replace("http://", "ws://") + path


async def _close_code(stack: Stack, path: str, send: str | bytes | None) -> int | None:
    async with websockets.connect(ws_url(stack, path), additional_headers={"Authorization": f"Bearer {stack.keys['alice']}"},
                                  max_size=None) as ws:
        if send is not None:
            await ws.send(send)
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None


@pytest.mark.parametrize(
    "path,send,code",
    [
        ("/v1/ws", b"\x00\x01binary", 4400),
        ("/v1/ws", "[" * 100_000 + "]" * 100_000, 4400),
        ("/v1/ws", '{"op": "subscribe", "job_ids": [NaN]}', 4400),
        ("/v1/ws", '{"op": "subscribe", "job_ids": ["job_\\u0000"]}', 4400),
        ("/v1/jobs/job_%00/events", None, 4400),
        ("/v1/jobs/job_nope/events", None, 4404),
    ],
    ids=["binary", "nested-100k", "nan", "nul-in-json", "nul-in-path", "unknown-job"],
)
async def test_websockets_close_with_a_code(stack: Stack, path: str, send: str | bytes | None, code: int) -> None:
    assert await _close_code(stack, path, send) == code


# -- the HTTP surface -----------------------------------------------------------------------------


async def test_allow_lists_every_method_of_the_path(stack: Stack) -> None:
    async with stack.client() as c:
        r = await c.put("/v1/admin/keys/key_x")
    assert r.status_code == 405
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "PATCH"}
    assert r.json()["error"]["code"] == "method_not_allowed"


async def test_openapi_lists_the_error_answers(stack: Stack) -> None:
    async with stack.client(tenant="") as c:
        doc = (await c.get("/openapi.json")).json()
    ops = {(p, m): op for p, item in doc["paths"].items() for m, op in item.items()}
    create = ops[("/v1/jobs", "post")]["responses"]
    assert {"400", "401", "402", "403", "404", "409", "413", "422", "429", "503"} <= set(create)
    assert create["422"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/Error"
    assert {"400", "401", "404", "409", "503"} <= set(ops[("/v1/jobs/{job_id}/cancel", "post")]["responses"])
    chat = ops[("/v1/chat/completions", "post")]["responses"]
    assert chat["429"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/OpenAIError"
    assert all("503" in op["responses"] for op in ops.values())
    assert "HTTPValidationError" not in json.dumps(doc)
