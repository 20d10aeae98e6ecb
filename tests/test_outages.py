"""Outages with real processes: a private PostgreSQL cluster stopped and started under a
running API (the shared one is never touched)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.pg_cluster import private_postgres
from tests.stack import make_stack, running

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
