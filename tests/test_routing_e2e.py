"""The router in the running system: fallback on a failing deployment with the attempt
history on the job, priority keeping traffic on a healthy primary, a concurrency limit
that holds across two worker processes (the provider's fake records its peak), and whose
fault an error is (a user's unreachable input image or flagged prompt: no fallback, no
health effect)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fakes import bfl
from tests.fakes import openai as openai_fake
from tests.fakes.server import free_port, serve
from tests.stack import Stack, make_stack, running

KEY = "bfl-routing"
OPENAI_KEY = "sk-routing"
SENT: list[tuple[str, str, str | None]] = []  # (method, path, X-Request-Id) of each request the fake got


def recording(app: Any) -> Any:
    async def recorded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            rid = dict(scope["headers"]).get(b"x-request-id")
            SENT.append((scope["method"], scope["path"], rid.decode() if rid else None))
        await app(scope, receive, send)
    return recorded


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    with ExitStack() as stack:
        poll_port = free_port()
        app = recording(bfl.create_app(api_key=KEY, polling_base=f"http://127.0.0.1:{poll_port}"))
        url = stack.enter_context(serve(app))
        stack.enter_context(serve(app, port=poll_port))
        yield url


@pytest.fixture(scope="module")
def openai_url() -> Iterator[str]:
    with serve(openai_fake.create_app(api_key=OPENAI_KEY)) as url:
        yield f"{url}/v1"


def _catalog(path: Path, bfl_url: str, submit_log: Path, openai_url: str) -> Path:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connect refused, provably not sent
    local = {"adapter": "local", "options": {"submit_log": str(submit_log)}}
    fast = {"poll_interval": 0.05}
    data = {"models": [
        {"id": "fallback-image", "modality": "image", "deployments": [
            {"name": "dead-bfl", "adapter": "bfl", "model": "flux-pro-1.1", "base_url": dead, "api_key_env": "E2E_BFL_KEY"},
            {"name": "local-backup", "model": "image", **local},
        ]},
        {"id": "dead-only", "modality": "image", "fallback_models": ["local-image"], "deployments": [
            {"name": "dead-bfl-2", "adapter": "bfl", "model": "flux-pro-1.1", "base_url": dead, "api_key_env": "E2E_BFL_KEY"},
        ]},
        {"id": "local-image", "modality": "image", "deployments": [{"name": "local-image", "model": "image", **local}]},
        {"id": "two-locals", "modality": "image", "strategy": "priority", "deployments": [
            {"name": "local-primary", "model": "image", "priority": 0, **local},
            {"name": "local-secondary", "model": "image", "priority": 1, **local},
        ]},
        # a user's mistake must not fall back to (or count against) anything
        {"id": "edit-image", "modality": "image", "deployments": [
            {"name": "openai-edit", "adapter": "openai", "model": "gpt-image-1", "base_url": openai_url,
             "api_key_env": "E2E_OPENAI_KEY"},
            {"name": "edit-backup", "model": "image", **local},
        ]},
        {"id": "routing-chat", "modality": "text", "deployments": [
            {"name": "openai-chat", "adapter": "openai", "model": "gpt-4o-mini", "base_url": openai_url,
             "api_key_env": "E2E_OPENAI_KEY"},
        ]},
        {"id": "limited-flux", "modality": "image", "deployments": [
            {"name": "bfl-limited", "adapter": "bfl", "model": "flux-pro-1.1", "base_url": bfl_url,
             "api_key_env": "E2E_BFL_KEY", "limits": {"max_concurrency": 3}, "options": fast},
        ]},
    ]}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
async def stack(fake: str, openai_url: str, tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("routing")
    catalog = _catalog(root / "catalog.yaml", fake, root / "submits.log", openai_url)
    st = await make_stack(root, redis_url=f"{redis_base}/0", catalog=catalog, env={"E2E_BFL_KEY": KEY, "E2E_OPENAI_KEY": OPENAI_KEY})
    async with running(st, ("worker1",), ("worker2",)):
        yield st


async def _run(c: httpx.AsyncClient, model: str, prompt: str = "a fox") -> dict[str, Any]:
    r = await c.post("/v1/jobs", json={"model": model, "input": {"prompt": prompt, "size": "1024x768"}}, headers={"Prefer": "wait=40"})
    return r.json()


async def test_failing_deployment_falls_back_and_the_attempts_show_both(stack: Stack) -> None:
    async with stack.client() as c:
        job = await _run(c, "fallback-image")
    assert job["status"] == "succeeded" and job["deployment"] == "local-backup", job
    first, second = job["attempts"]
    assert first["deployment"] == "dead-bfl" and first["error"]["code"] == "provider_unavailable"
    assert second["deployment"] == "local-backup" and second["error"] is None
    assert first["duration_ms"] is not None and second["started_at"]


async def test_fallback_model_serves_when_all_deployments_fail(stack: Stack) -> None:
    async with stack.client() as c:
        job = await _run(c, "dead-only")
    assert job["status"] == "succeeded" and job["deployment"] == "local-image", job
    assert [a["model"] for a in job["attempts"]] == ["dead-only", "local-image"]


async def test_priority_keeps_all_traffic_on_a_healthy_primary(stack: Stack) -> None:
    async with stack.client() as c:
        jobs = await asyncio.gather(*(_run(c, "two-locals", f"p{i}") for i in range(10)))
    assert {j["deployment"] for j in jobs} == {"local-primary"}, [j["deployment"] for j in jobs]


async def test_concurrency_limit_holds_across_two_worker_processes(stack: Stack, fake: str) -> None:
    async with httpx.AsyncClient() as h:
        await h.post(f"{fake}/_control/reset")
    async with stack.client() as c:
        rs = await asyncio.gather(*(c.post("/v1/jobs", json={"model": "limited-flux", "input": {"prompt": f"fox {i} [slow]"}})
                                    for i in range(10)))
        ids = [r.json()["id"] for r in rs]
        waiting_seen = False
        for _ in range(400):
            jobs = [(await c.get(f"/v1/jobs/{i}")).json() for i in ids]
            waiting_seen |= any(j["status"] == "queued" and "waiting for a free slot" in (j["progress"]["message"] or "") for j in jobs)
            if all(j["status"] in ("succeeded", "failed") for j in jobs):
                break
            await asyncio.sleep(0.1)
    assert {j["status"] for j in jobs} == {"succeeded"}, [(j["status"], j["error"]) for j in jobs]
    async with httpx.AsyncClient() as h:
        stats = (await h.get(f"{fake}/_control/stats")).json()
    assert stats["creates"] == 10 and stats["peak_inflight"] == 3, stats
    assert waiting_seen, "jobs waiting for a slot should say so while queued"


async def test_the_submit_to_the_provider_carries_the_request_id(stack: Stack) -> None:
    """The worker sends the id of the request that submitted the job (X-Request-Id) on to the
    provider with its submit, so the provider's logs can be matched with ours."""
    rid = "route-trace-41c2"
    async with stack.client() as c:
        r = await c.post("/v1/jobs", json={"model": "limited-flux", "input": {"prompt": "traced fox"}},
                         headers={"X-Request-Id": rid, "Prefer": "wait=40"})
        assert r.json()["status"] == "succeeded", r.json()
    creates = [sent for sent in SENT if sent[0] == "POST" and not sent[1].startswith("/_control")]
    assert creates and creates[-1][2] == rid, SENT[-5:]


async def test_unreachable_input_images_are_the_users_fault_through_the_api(stack: Stack) -> None:
    """Four jobs whose input image URL nothing listens on (three once opened the breaker for
    every tenant): each fails invalid_input at the OpenAI deployment, none falls back to the
    backup, and the next good job is still served by the OpenAI deployment."""
    dead = f"http://127.0.0.1:{free_port()}/in.png"
    async with stack.client() as c:
        for i in range(4):
            r = await c.post("/v1/jobs", json={"model": "edit-image", "input": {"prompt": f"edit {i}", "input_images": [dead]}},
                             headers={"Prefer": "wait=40"})
            job = r.json()
            assert job["status"] == "failed" and job["error"]["code"] == "invalid_input", job
            assert [a["deployment"] for a in job["attempts"]] == ["openai-edit"], job["attempts"]
        r = await c.post("/v1/jobs", json={"model": "edit-image", "input": {"prompt": "a good one", "size": "1024x1024"}},
                         headers={"Prefer": "wait=40"})
        job = r.json()
    assert job["status"] == "succeeded" and job["deployment"] == "openai-edit", (job["error"], job["attempts"])
    assert "edit-backup" not in stack.submits()


async def test_a_flagged_chat_prompt_is_moderated_through_the_api(stack: Stack) -> None:
    """OpenAI's 400 invalid_prompt (a flagged prompt) is `moderated`, not invalid_input: a
    text job fails `moderated`; /v1/chat/completions answers it in OpenAI's own words,
    `content_policy_violation`, streamed or not."""
    messages = [{"role": "user", "content": "something bad [flagged]"}]
    async with stack.client() as c:
        r = await c.post("/v1/jobs", json={"model": "routing-chat", "input": {"messages": messages}}, headers={"Prefer": "wait=40"})
        job = r.json()
        assert job["status"] == "failed" and job["error"]["code"] == "moderated", job
        r = await c.post("/v1/chat/completions", json={"model": "routing-chat", "messages": messages})
        assert r.status_code == 400 and r.json()["error"]["code"] == "content_policy_violation", r.text
        r = await c.post("/v1/chat/completions", json={"model": "routing-chat", "messages": messages, "stream": True})
        assert r.status_code < 500 and "content_policy_violation" in r.text, r.text
