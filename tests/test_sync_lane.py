"""Long synchronous creates run on their own queue (Catalog.lane, workers/main.py): a model
whose creates may hold the call over a minute has its runs on `sync`, served by its own
ARQ worker with a run limit that fits them, so they take no slot of the short runs on
`media`, and the other queues keep short task limits (and short in-progress keys)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import redis.asyncio as aioredis
import yaml

from core.routing.catalog import DEFAULT_CATALOG, load_catalog
from core.settings import Settings
from tests.stack import make_stack, running
from workers.main import build_workers

SLOW_CREATE = 200  # seconds a create of the "slow host" may take


def _catalog(path: Path) -> Path:
    data = yaml.safe_load(DEFAULT_CATALOG.read_text())
    data["models"] += [
        {"id": "slow-host-image", "modality": "image", "deployments": [
            {"name": "slow-host", "adapter": "local", "model": "image", "timeouts": {"create": SLOW_CREATE}}]},
        # a quick model whose fallback is the slow host: its runs may make that long call too
        {"id": "quick-then-slow", "modality": "image", "fallback_models": ["slow-host-image"], "deployments": [
            {"name": "quick", "adapter": "local", "model": "image"}]},
        {"id": "slow-host-video", "modality": "video", "deployments": [
            {"name": "slow-video", "adapter": "local", "model": "video", "timeouts": {"create": SLOW_CREATE}}]},
    ]
    path.write_text(yaml.safe_dump(data))
    return path


def test_lanes_follow_the_longest_create_a_job_may_make(tmp_path: Path) -> None:
    catalog = load_catalog(_catalog(tmp_path / "catalog.yaml"))
    assert catalog.lane("local-image", "image") == "image"
    assert catalog.lane("slow-host-image", "image") == "sync"
    assert catalog.lane("quick-then-slow", "image") == "sync"  # through its fallback
    assert catalog.lane("slow-host-video", "video") == "video"  # video keeps its queue
    assert catalog.lane("gone-from-the-catalog", "audio") == "audio"


def test_each_queue_gets_the_task_limits_of_its_own_work(tmp_path: Path) -> None:
    settings = Settings(catalog=str(_catalog(tmp_path / "catalog.yaml")), redis_prefix="lanes")
    rt = SimpleNamespace(settings=settings, catalog=load_catalog(Path(settings.catalog)), redis=None)
    workers = {w.queue_name.rsplit(":", 1)[-1]: w for w in build_workers(rt)}  # type: ignore[arg-type]
    assert set(workers) == {"media", "video", "sync", "webhooks"}
    limit = {q: {name: f.timeout_s for name, f in w.functions.items() if name.startswith(("run_job", "store", "cancel", "deliver"))}
             for q, w in workers.items()}
    assert limit["sync"]["run_job"] >= 2 * SLOW_CREATE and set(limit["sync"]) == {"run_job"}
    assert limit["media"]["run_job"] < 2 * SLOW_CREATE  # the slow host's calls are not its to wait for
    assert limit["video"]["run_job"] >= 2 * SLOW_CREATE  # a video create of its own may take that long
    assert set(limit["webhooks"]) == {"deliver_webhook"}
    # ARQ's in-progress key: the longest task of the queue + 10 s
    assert workers["sync"].in_progress_timeout_s == limit["sync"]["run_job"] + 10
    assert workers["webhooks"].in_progress_timeout_s == limit["webhooks"]["deliver_webhook"] + 10


async def test_a_long_create_models_runs_wait_for_a_sync_worker_and_hold_no_media_slot(
    tmp_path: Path, redis_url: str
) -> None:
    stack = await make_stack(tmp_path, redis_url=redis_url, catalog=_catalog(tmp_path / "catalog.yaml"))
    prefix = stack.env["GENROUTE_REDIS_PREFIX"]
    r = aioredis.from_url(redis_url)
    try:
        async with running(stack, ("worker", "--queue", "media")), stack.client() as c:
            slow = (await c.post("/v1/jobs", json={"model": "slow-host-image", "input": {"prompt": "a slow host"}})).json()
            quick = (await c.post("/v1/jobs", json={"model": "local-image", "input": {"prompt": "quick"}})).json()
            assert (await stack.wait_job(c, quick["id"]))["status"] == "succeeded"
            await asyncio.sleep(1.5)  # the media worker had time to take the slow job's run, were it its
            job = (await c.get(f"/v1/jobs/{slow['id']}")).json()
            assert job["status"] == "queued", job
            assert await r.zscore(f"{prefix}:queue:sync", f"run:{slow['id']}") is not None
            assert job["queue_position"] == 0, job  # its place on the sync queue
            stack.start_worker("sync-worker", "--queue", "sync")
            done = await stack.wait_job(c, slow["id"])
            assert done["status"] == "succeeded", done
    finally:
        await r.aclose()
