"""Polls slow as a provider task ages (adapters/base.py Backoff, workers/poll.py): two jobs
of the same length on one worker, one on a deployment with a steady cadence and one with
`poll_backoff`, counted from the worker's own metrics; and the option's refusals."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml

from adapters.base import Backoff
from cli.embedded import free_port
from core.routing.catalog import DEFAULT_CATALOG, CatalogError, load_catalog
from tests.stack import make_stack, running
from tests.test_observe import samples, value

TASK_SECONDS, STEPS = 8.0, 40  # the local provider moves a step every 0.2 s
AGING = {"hold": 1, "start": 0.4, "double_every": 1, "cap": 2}


def _catalog(path: Path) -> Path:
    data = yaml.safe_load(DEFAULT_CATALOG.read_text())
    for name, options in (("steady", {}), ("aging", {"poll_backoff": AGING})):
        data["models"].append({"id": f"{name}-image", "modality": "image", "deployments": [
            {"name": f"{name}-local", "adapter": "local", "model": "image", "options": options}]})
    path.write_text(yaml.safe_dump(data))
    return path


async def test_an_aging_task_is_polled_less_and_still_seen_done_within_its_cap(tmp_path: Path, redis_url: str) -> None:
    stack = await make_stack(tmp_path, redis_url=redis_url, catalog=_catalog(tmp_path / "catalog.yaml"))
    port = free_port()
    async with running(stack, ("worker", "--metrics-port", str(port))), stack.client() as c:
        body = {"input": {"prompt": "a long render", "size": "256x256",
                          "provider_params": {"latency_seconds": TASK_SECONDS, "progress_steps": STEPS}}}
        ids = {}
        for name in ("steady", "aging"):
            r = await c.post("/v1/jobs", json={"model": f"{name}-image", **body})
            assert r.status_code == 201, r.text
            ids[name] = r.json()["id"]
        jobs = {name: await stack.wait_job(c, job_id, timeout=60) for name, job_id in ids.items()}
        assert {j["status"] for j in jobs.values()} == {"succeeded"}, jobs
        deadline = time.monotonic() + 20
        while True:  # the worker's counters may land a moment after the terminal event
            got = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
            polls = {n: value(got, "genroute_provider_calls_total", deployment=f"{n}-local", call="poll") for n in ids}
            if value(got, "genroute_jobs_finished_total") >= 2 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    # steady: about one poll per 0.2 s step; aging: 0.2 s for 1 s, then 0.4 s doubling to 2 s
    assert polls["steady"] >= STEPS * 0.6, polls
    assert 4 <= polls["aging"] <= polls["steady"] / 2, polls
    # still seen done within its cap (2 s) of the provider's end, with slack for a loaded machine
    started, ended = (datetime.fromisoformat(jobs["aging"][k]) for k in ("started_at", "finished_at"))
    assert (ended - started).total_seconds() <= TASK_SECONDS + AGING["cap"] + 6, jobs["aging"]


def test_backoff_keeps_the_adapters_interval_while_young_and_a_longer_ask_after() -> None:
    b = Backoff(hold=30, start=1, double_every=60, cap=5)
    assert b.at(0.5, 10) == 0.5  # young: the adapter's own cadence
    assert b.at(0.5, 31) == pytest.approx(1.0, rel=0.05)
    assert b.at(0.5, 90) == pytest.approx(2.0)
    assert b.at(0.5, 3600) == 5.0  # never above the cap
    assert b.at(30.0, 3600) == 30.0  # a provider asking for longer is heard


@pytest.mark.parametrize(("option", "says"), [
    ("every minute", "options.poll_backoff: false, or a mapping"),
    ({"hold": 1, "later": 3}, "options.poll_backoff: false, or a mapping"),
    ({"cap": 0}, "options.poll_backoff.cap: a number of seconds above 0"),
    ({"start": True}, "options.poll_backoff.start"),
    ({"start": 20, "cap": 5}, "options.poll_backoff.start: at most its cap"),
])
def test_a_bad_poll_backoff_refuses_the_catalog_with_its_path(tmp_path: Path, option: object, says: str) -> None:
    data = yaml.safe_load(DEFAULT_CATALOG.read_text())
    data["models"][0]["deployments"][0].setdefault("options", {})["poll_backoff"] = option
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(CatalogError) as err:
        load_catalog(path)
    assert says in str(err.value), err.value


def test_a_rebuilt_poll_schedule_keeps_the_tasks_age() -> None:
    """The reconciler re-polls a job from its row: the age its cadence slows by comes from
    its current attempt's start, not from the moment Redis lost the schedule."""
    from core.models import Job
    from workers.run import task_started_ms

    at = datetime(2026, 12, 4, 3, 0, tzinfo=UTC)
    job = Job(attempts=[{"deployment": "a", "started_at": "2026-12-04T02:00:00+00:00"},
                        {"deployment": "b", "started_at": at.isoformat()}])
    assert task_started_ms(job) == int(at.timestamp() * 1000)
    assert task_started_ms(Job(attempts=[])) == 0
    assert task_started_ms(Job(attempts=[{"started_at": "yesterday"}])) == 0
