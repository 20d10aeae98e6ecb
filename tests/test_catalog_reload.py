"""Catalog reload: by an admin call or SIGHUP, in the API and the worker, without dropping
requests; a broken file is refused with its line and the old catalog keeps serving."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import yaml

from core.routing.catalog import DEFAULT_CATALOG
from tests.stack import Stack, make_stack, running

ADMIN = "admin-secret-for-tests"


def _write(path: Path, extra_model: str | None = None) -> None:
    data = yaml.safe_load(DEFAULT_CATALOG.read_text())
    if extra_model:
        data["models"].append({"id": extra_model, "modality": "image",
                               "deployments": [{"name": f"{extra_model}-local", "adapter": "local", "model": "image"}]})
    path.write_text(yaml.safe_dump(data))


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("reload")
    _write(root / "catalog.yaml")
    st = await make_stack(root, redis_url=f"{redis_base}/0", catalog=root / "catalog.yaml", admin_key=ADMIN)
    async with running(st):
        yield st


async def _models(c: httpx.AsyncClient) -> set[str]:
    return {m["id"] for m in (await c.get("/v1/models")).json()["data"]}


async def test_admin_reload_adds_a_model_without_dropping_requests(stack: Stack) -> None:
    catalog = Path(stack.env["GENROUTE_CATALOG"])
    async with stack.client() as c:
        assert "fresh-image" not in await _models(c)
        # the worker is up (and so handles SIGHUP) once it has finished a job
        r = await c.post("/v1/jobs", json={"model": "local-image", "input": {"prompt": "warm"}}, headers={"Prefer": "wait=20"})
        assert r.json()["status"] == "succeeded"
        _write(catalog, "fresh-image")

        async def traffic() -> list[int]:
            return [(await c.get("/v1/models")).status_code for _ in range(40)]

        load = asyncio.create_task(traffic())
        admin = {"Authorization": f"Bearer {ADMIN}"}
        for _ in range(5):
            r = await c.post("/v1/admin/catalog/reload", headers=admin)
            assert r.status_code == 200 and "fresh-image" in r.json()["models"], r.text
        assert set(await load) == {200}
        assert "fresh-image" in await _models(c)
        os.kill(stack.procs["worker"].pid, signal.SIGHUP)  # workers reload on SIGHUP
        await asyncio.sleep(0.5)
        assert stack.procs["worker"].poll() is None, stack.log("worker")
        r = await c.post("/v1/jobs", json={"model": "fresh-image", "input": {"prompt": "new"}}, headers={"Prefer": "wait=20"})
        assert r.json()["status"] == "succeeded", r.json()


async def test_broken_catalog_is_refused_and_the_old_one_keeps_serving(stack: Stack) -> None:
    catalog = Path(stack.env["GENROUTE_CATALOG"])
    good = catalog.read_text()
    broken = yaml.safe_load(good)
    broken["models"].append({"id": "broken", "modality": "smell", "deployments": [{"name": "b", "adapter": "local", "model": "image"}]})
    catalog.write_text(yaml.safe_dump(broken, sort_keys=False))
    async with stack.client() as c:
        r = await c.post("/v1/admin/catalog/reload", headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_catalog", r.text
        details = "\n".join(r.json()["error"]["details"])
        assert f"{catalog}:" in details and "modality" in details
        line = int(details.split(f"{catalog}:")[1].split(":")[0])
        assert catalog.read_text().splitlines()[line - 1].strip().endswith("modality: smell"), line
        assert "local-image" in await _models(c)
        os.kill(stack.procs["api"].pid, signal.SIGHUP)  # refused on SIGHUP too, logged
        await asyncio.sleep(0.5)
        r = await c.post("/v1/jobs", json={"model": "local-image", "input": {"prompt": "still here"}}, headers={"Prefer": "wait=20"})
        assert r.json()["status"] == "succeeded"
    catalog.write_text(good)
    assert "catalog reload refused" in stack.log("api", tail=None)


async def test_sighup_reloads_the_api(stack: Stack) -> None:
    catalog = Path(stack.env["GENROUTE_CATALOG"])
    _write(catalog, "hup-image")
    os.kill(stack.procs["api"].pid, signal.SIGHUP)
    async with stack.client() as c:
        for _ in range(50):
            if "hup-image" in await _models(c):
                break
            await asyncio.sleep(0.1)
        assert "hup-image" in await _models(c)


async def test_admin_endpoint_needs_the_admin_key(stack: Stack) -> None:
    async with stack.client() as c:  # a tenant key is not the admin key
        r = await c.post("/v1/admin/catalog/reload")
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


async def test_a_catalog_naming_an_unknown_adapter_is_refused_on_reload(stack: Stack) -> None:
    """What `genroute catalog check` refuses, a reload refuses: the old catalog keeps
    serving, so jobs never sit queued for a deployment no process can build."""
    catalog = Path(stack.env["GENROUTE_CATALOG"])
    good = catalog.read_text()
    bad = yaml.safe_load(good)
    bad["models"].append({"id": "ghost", "modality": "image",
                          "deployments": [{"name": "ghost-1", "adapter": "no_such_adapter", "model": "m"}]})
    catalog.write_text(yaml.safe_dump(bad, sort_keys=False))
    try:
        async with stack.client() as c:
            r = await c.post("/v1/admin/catalog/reload", headers={"Authorization": f"Bearer {ADMIN}"})
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_catalog", r.text
            details = "\n".join(r.json()["error"]["details"])
            assert "unknown adapter 'no_such_adapter'" in details and f"{catalog}:" in details, details
            assert "ghost" not in await _models(c)
            r = await c.post("/v1/jobs", json={"model": "ghost", "input": {"prompt": "x"}})
            assert r.status_code in (400, 404, 422) and r.json()["error"]["code"] == "model_not_found", r.text
            # the worker, told to reload the same file, refuses it too and goes on with the old one
            os.kill(stack.procs["worker"].pid, signal.SIGHUP)
            for _ in range(100):
                if "unknown adapter 'no_such_adapter'" in stack.log("worker", tail=None):
                    break
                await asyncio.sleep(0.1)
            log = stack.log("worker", tail=None)
            assert "catalog reload refused" in log and "unknown adapter 'no_such_adapter'" in log, log[-3000:]
            assert stack.procs["worker"].poll() is None, log[-3000:]
            r = await c.post("/v1/jobs", json={"model": "local-image", "input": {"prompt": "old catalog"}},
                             headers={"Prefer": "wait=20"})
            assert r.json()["status"] == "succeeded", r.text
    finally:
        catalog.write_text(good)
