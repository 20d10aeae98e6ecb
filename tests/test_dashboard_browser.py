"""The dashboard at /dashboard in a real headless Chromium (Debian's `chromium`, driven by
Playwright with `executable_path`), against real API + worker processes with the local models:
sign in, submit a slow job from the form and watch it live, cancel another, redeliver a
webhook, create and revoke a key, read the usage chart. Every page is saved as a screenshot at
1280x800 and 390x844 (GENROUTE_TEST_SCREENSHOTS, default artifacts/screenshots/).

Without a Chromium binary these tests skip with the reason; under CI=true they fail instead
(.ci/run installs the `chromium` package when it is missing)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.db import create_engine, sessionmaker
from core.keys import create_key
from tests.services import IN_CI
from tests.stack import Stack, make_stack, running
from tests.test_webhooks import Receiver

ROOT = Path(__file__).resolve().parent.parent
SHOTS = Path(os.environ.get("GENROUTE_TEST_SCREENSHOTS") or ROOT / "artifacts" / "screenshots")
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason}: under CI=true the browser tests must run (.ci/run installs chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium_path() -> str:
    """The Chromium binary: GENROUTE_TEST_CHROMIUM, else the first of CANDIDATES on PATH."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        _unavailable("playwright is not installed (scripts/bootstrap test installs it)")
    named = os.environ.get("GENROUTE_TEST_CHROMIUM")
    if named and not os.access(named, os.X_OK):
        _unavailable(f"GENROUTE_TEST_CHROMIUM={named} is not an executable file")
    path = named or next(filter(None, map(shutil.which, CANDIDATES)), None)
    if not path:
        _unavailable(f"no Chromium binary found (none of {', '.join(CANDIDATES)} on PATH): "
                     "apt-get install chromium, or set GENROUTE_TEST_CHROMIUM")
    assert path is not None
    return path


@pytest.fixture(scope="module")
async def browser(chromium_path: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=chromium_path, args=["--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, redis_base: str, chromium_path: str) -> AsyncIterator[Stack]:
    st = await make_stack(tmp_path_factory.mktemp("dashboard"), redis_url=f"{redis_base}/0", tenants=("alice",),
                          webhook_allowlist='["127.0.0.1/32"]', webhook_timeout_seconds="3")
    engine = create_engine(st.settings())
    try:
        _, st.keys["admin"] = await create_key(sessionmaker(engine), name="ops", tenant="ops", admin=True)
    finally:
        await engine.dispose()
    async with running(st):
        yield st


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture(scope="module")
def shots(request: pytest.FixtureRequest) -> Iterator[Path]:
    """The screenshot directory, emptied of an earlier run's; named in the test summary."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    yield SHOTS
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print(f"\ndashboard screenshots ({len(list(SHOTS.glob('*.png')))}): {SHOTS}")


class Session:
    """One browser context (one viewport) signed in with one key; screenshots named by it."""

    def __init__(self, page: Any, stack: Stack, tag: str, shots: Path) -> None:
        self.page, self.stack, self.tag, self.shots = page, stack, tag, shots
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        # a refused request (the bad key's 401, a tenant key's 403) is logged by the browser; a
        # script error is not expected anywhere
        page.on("console", lambda m: self.errors.append(f"console: {m.text}")
                if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
        page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))

    async def sign_in(self, key: str) -> None:
        await self.page.goto(f"{self.stack.api_url}/dashboard")
        await self.page.fill("#api-key", key)
        await self.page.click("#signin")
        await self.page.wait_for_selector("#signout")

    async def open(self, hash_: str, ready: str) -> None:
        await self.page.evaluate("h => { location.hash = h; }", hash_)
        await self.page.wait_for_selector(ready)
        await self.settle()

    async def settle(self) -> None:
        """Wait until no "Loading…" is left on the page (lists and charts drawn)."""
        await self.page.wait_for_function("() => !document.body.innerText.includes('Loading…')", timeout=10_000)

    async def shot(self, name: str) -> Path:
        path = self.shots / f"{name}-{self.tag}.png"
        await self.page.evaluate("() => window.scrollTo(0, 0)")  # the sticky top bar stays on top
        await self.page.screenshot(path=str(path), full_page=True)
        return path

    async def check_fits(self) -> None:
        """Nothing wider than the viewport: the page never scrolls sideways on a phone."""
        over = await self.page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert over <= 1, f"{self.page.url} is {over}px wider than the viewport"


async def new_session(browser: Any, stack: Stack, viewport: dict[str, int], tag: str, shots: Path) -> Session:
    context = await browser.new_context(viewport=viewport, device_scale_factor=1)
    return Session(await context.new_page(), stack, tag, shots)


async def eventually(fn: Callable[[], Awaitable[Any]], timeout: float = 20, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


def slow(prompt: str, seconds: float, steps: int) -> dict[str, Any]:
    return {"model": "local-image", "input": {"prompt": prompt, "size": "256x256",
                                              "provider_params": {"latency_seconds": seconds, "progress_steps": steps}}}


async def ensure_jobs(stack: Stack) -> tuple[str, str]:
    """A succeeded and a canceled job of alice's (the first test makes them; made here when
    a test runs alone)."""
    async with stack.client() as c:
        jobs = (await c.get("/v1/jobs", params={"limit": 50})).json()["data"]
        done = next((j["id"] for j in jobs if j["status"] == "succeeded"), None)
        canceled = next((j["id"] for j in jobs if j["status"] == "canceled"), None)
        if done is None:
            done = (await c.post("/v1/jobs", json=slow("made for the page", 0.2, 1), headers={"Prefer": "wait=30"})).json()["id"]
        if canceled is None:
            canceled = (await c.post("/v1/jobs", json=slow("canceled for the page", 30, 2))).json()["id"]
            assert (await c.post(f"/v1/jobs/{canceled}/cancel")).status_code == 200
    return done, canceled


async def test_a_tenant_submits_watches_cancels_and_redelivers(browser: Any, stack: Stack, receiver: Receiver, shots: Path) -> None:
    s = await new_session(browser, stack, DESKTOP, "desktop", shots)
    page = s.page
    # a bad key is refused with a message, not a blank page
    await page.goto(f"{stack.api_url}/dashboard")
    await page.wait_for_selector("#api-key")
    await s.shot("signin")
    await page.fill("#api-key", "gr_not_a_key")
    await page.click("#signin")
    await page.wait_for_selector(".signin-status .alert-error")
    assert "not accepted" in await page.inner_text(".signin-status")
    await s.shot("signin-error")

    await s.sign_in(stack.keys["alice"])
    await page.wait_for_selector("#job-list .empty")
    assert "No jobs yet" in await page.inner_text("#job-list")
    await s.shot("jobs-empty")
    await s.open("#/usage", "#usage-body .empty, #usage-chart")
    await s.shot("usage-empty")

    # submit a slow local job from the form, with a webhook to the receiver
    await s.open("#/new/local-image", "#job-form")
    await page.fill("#p-prompt", "a lighthouse at dusk")
    await page.select_option("#p-size", "512x512")
    await page.click(".advanced summary")
    await page.fill("#p-provider_params", json.dumps({"latency_seconds": 5, "progress_steps": 5}))
    await page.fill("#p-webhook_url", receiver.url())
    await s.shot("new-job")
    await page.evaluate("() => { window.__noReload = true; }")
    await page.click("#submit")
    await page.wait_for_selector("#job-state")
    job_id = page.url.rsplit("/", 1)[1]

    # its progress bar moves and its image appears, without a reload
    seen: list[int] = []
    shot_running = False
    deadline = time.monotonic() + 30
    while not await page.query_selector("#outputs img.media"):
        assert time.monotonic() < deadline, f"no image after 30 s; progress seen {seen}"
        # one read: the bar goes away when the job ends
        now = await page.evaluate("() => document.querySelector('#job-state [role=progressbar]')?.getAttribute('aria-valuenow') ?? null")
        if now is not None and (not seen or int(now) != seen[-1]):
            seen.append(int(now))
            if 0 < int(now) < 100 and not shot_running:
                await s.shot("job-running")
                shot_running = True
        await asyncio.sleep(0.15)
    assert len([v for v in seen if 0 < v < 100]) >= 2 and seen == sorted(seen), seen
    await page.wait_for_function("() => { const i = document.querySelector('#outputs img.media'); return i && i.complete && i.naturalWidth === 512; }")
    assert await page.evaluate("() => window.__noReload === true")
    await page.wait_for_selector(".page-head .pill[data-status=succeeded]")
    # the webhook was delivered once; redeliver it from the page: a second attempt lands
    await page.wait_for_selector(".delivery[data-status=delivered]", timeout=20_000)
    await s.shot("job-succeeded")
    assert [e["type"] for e in receiver.events(job_id)] == ["job.succeeded"]
    await page.click(".delivery .redeliver")
    await page.wait_for_function("() => document.querySelector('.delivery')?.innerText.includes('2 attempts')", timeout=20_000)
    assert [e["type"] for e in receiver.events(job_id)] == ["job.succeeded"] * 2

    # the list is live: a job submitted elsewhere appears, runs and ends there
    await s.open("#/jobs", "#job-list [data-job-id]")
    async with stack.client() as c:
        other = (await c.post("/v1/jobs", json=slow("a slow one to cancel", 30, 30))).json()["id"]
    row = f'#job-list [data-job-id="{other}"]'
    await page.wait_for_selector(f"{row}[data-status=running] [role=progressbar]", timeout=20_000)
    await s.shot("jobs-live")
    # cancel it from its page; the list shows the new state when we go back
    await page.click(row)
    await page.wait_for_selector("#cancel")
    await page.click("#cancel")
    await page.wait_for_selector(".page-head .pill[data-status=canceled]")
    await s.settle()
    await s.shot("job-canceled")
    await page.go_back()
    await page.wait_for_selector(f"{row}[data-status=canceled]")
    await page.wait_for_selector(f'#job-list [data-job-id="{job_id}"][data-status=succeeded]')
    await s.shot("jobs")

    # filters: no match is an empty state with a way out
    await s.open("#/jobs?status=failed", "#job-list .empty")
    assert "No jobs match" in await page.inner_text("#job-list")
    await s.shot("jobs-filtered-empty")
    await s.open("#/jobs/job_nope", ".empty")
    await s.shot("job-missing")

    # usage: the succeeded job is counted and drawn
    async def usage_counted() -> bool:
        async with stack.client() as c:
            return (await c.get("/v1/usage", params={"group_by": "model"})).json()["total"]["requests"] >= 2
    await eventually(usage_counted, what="usage to count the jobs")
    await s.open("#/usage?days=7&group=day&metric=requests", "#usage-chart svg")
    assert await page.locator("#usage-chart svg .bar rect").count() == 7
    await s.shot("usage")
    await s.open("#/usage?days=7&group=model&metric=cost", "#usage-chart svg")
    assert "local-image" in await page.inner_text("#usage-chart")
    await s.shot("usage-by-model")
    # a tenant key does not see the admin pages
    assert await page.locator("nav.nav a[href='#/admin']").count() == 0
    await s.open("#/admin", ".alert-error")
    await s.shot("admin-forbidden")
    assert not s.errors, s.errors
    await page.context.close()


async def test_an_admin_creates_and_revokes_a_key(browser: Any, stack: Stack, shots: Path) -> None:
    await ensure_jobs(stack)
    s = await new_session(browser, stack, DESKTOP, "desktop", shots)
    page = s.page
    await s.sign_in(stack.keys["admin"])
    assert await page.locator(".who .badge-admin").count() == 1
    await s.open("#/admin/tenants", "#tenants-table")
    await page.fill("#t-id", "bad id!")
    await page.click("#admin-tenants button[type=submit]")
    assert not await page.evaluate("() => document.querySelector('#t-id').validity.valid")  # the pattern applies
    await page.fill("#t-id", "acme")
    await page.fill("#t-budget", "25")
    await page.click("#admin-tenants button[type=submit]")
    await page.wait_for_selector('#tenants-table [data-tenant="acme"]')
    await s.shot("admin-tenants")

    await s.open("#/admin/keys", "#keys-table")
    await page.fill("#k-tenant", "acme")
    await page.fill("#k-name", "from-the-browser")
    await page.check("#k-mod-image")
    await page.check("#k-webhooks")
    await page.click("#create-key")
    await page.wait_for_selector("#new-key")
    plain = await page.input_value("#new-key")
    assert plain.startswith("gr_")
    row = '#keys-table [data-key-name="from-the-browser"]'
    await page.wait_for_selector(f"{row}[data-status=active]")
    assert "webhooks" in await page.inner_text(row)
    await s.shot("admin-keys-created")
    async with httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {plain}"}) as c:
        assert (await c.get("/v1/webhooks/deliveries")).status_code == 200
        await page.click(f"{row} .revoke")
        await page.wait_for_selector(f"{row}[data-status=revoked]")
        assert (await c.get("/v1/jobs")).status_code == 401
    await s.shot("admin-keys")

    await s.open("#/admin/deployments", "#deployments")
    await s.shot("admin-deployments")
    await s.open("#/admin/catalog", "#catalog-table")
    await page.click("#reload-catalog")
    await page.wait_for_selector("#reload-result .alert-ok")
    await s.shot("admin-catalog")
    await s.open("#/jobs?tenant=*", "#job-list [data-job-id]")
    await s.shot("jobs-all-tenants")
    await s.open("#/usage?tenant=alice&days=7", "#usage-chart svg")
    await s.shot("usage-admin")
    assert not s.errors, s.errors
    await page.context.close()


async def test_every_page_fits_a_phone(browser: Any, stack: Stack, shots: Path) -> None:
    done, canceled = await ensure_jobs(stack)
    s = await new_session(browser, stack, PHONE, "phone", shots)
    page = s.page
    await page.goto(f"{stack.api_url}/dashboard")
    await page.wait_for_selector("#api-key")
    await s.check_fits()
    await s.shot("signin")
    await s.sign_in(stack.keys["alice"])
    pages = [("jobs", "#/jobs", "#job-list [data-job-id]"), ("job-succeeded", f"#/jobs/{done}", "#outputs img.media"),
             ("job-canceled", f"#/jobs/{canceled}", "#job-state"), ("new-job", "#/new/local-image", "#job-form"),
             ("new-video", "#/new/local-video", "#job-form"), ("usage", "#/usage?days=7", "#usage-chart svg"),
             ("usage-by-model", "#/usage?days=7&group=model", "#usage-chart svg"), ("jobs-filtered-empty", "#/jobs?status=failed", "#job-list .empty")]
    for name, hash_, ready in pages:
        await s.open(hash_, ready)
        await s.check_fits()
        await s.shot(name)
        if name == "job-succeeded":  # the replayed events of its run never show it running again
            for _ in range(5):
                assert await page.get_attribute(".page-head .pill", "data-status") == "succeeded"
                assert await page.locator("#cancel").count() == 0
                await asyncio.sleep(0.1)
        if name == "new-video":  # local-video takes no input image: the form offers none
            assert await page.locator("#p-image, #p-input_images").count() == 0
    # a running job's page and list row on a phone
    async with stack.client() as c:
        running_id = (await c.post("/v1/jobs", json=slow("running on a phone", 8, 8))).json()["id"]
    await s.open(f"#/jobs/{running_id}", "#job-state [role=progressbar]")
    await s.check_fits()
    await s.shot("job-running")
    await page.click("#cancel")
    await page.wait_for_selector(".page-head .pill[data-status=canceled]")
    await page.context.close()

    s = await new_session(browser, stack, PHONE, "phone", shots)
    page = s.page
    await s.sign_in(stack.keys["admin"])
    for name, hash_, ready in [("admin-tenants", "#/admin/tenants", "#tenants-table"), ("admin-keys", "#/admin/keys", "#keys-table"),
                               ("admin-deployments", "#/admin/deployments", "#deployments"), ("admin-catalog", "#/admin/catalog", "#catalog-table"),
                               ("jobs-all-tenants", "#/jobs?tenant=*", "#job-list [data-job-id]")]:
        await s.open(hash_, ready)
        await s.check_fits()
        await s.shot(name)
    assert not s.errors, s.errors
    await page.context.close()


async def test_the_api_docs_load_offline_and_authorize_with_a_key(chromium_path: str, stack: Stack, shots: Path) -> None:
    """/docs as a user far from localhost meets it: the page is opened under a host name (the
    validator badge and other Swagger UI extras only reach out for non-local hosts), every
    request to any other host is refused and recorded, then Authorize takes the API key and
    "Try it out" on GET /v1/models answers 200."""
    from playwright.async_api import async_playwright

    port = stack.api_url.rsplit(":", 1)[1]
    host = "genroute.example"
    base = f"http://{host}:{port}"
    outside: list[str] = []
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=chromium_path, args=[
            "--disable-gpu", "--disable-dev-shm-usage", f"--host-resolver-rules=MAP {host} 127.0.0.1"])
        try:
            context = await b.new_context(viewport=DESKTOP, device_scale_factor=1)

            async def only_ours(route: Any) -> None:
                if route.request.url.startswith(base + "/"):
                    await route.continue_()
                else:
                    outside.append(route.request.url)
                    await route.abort()

            await context.route("**/*", only_ours)
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(f"{base}/docs")
            await page.wait_for_selector(".swagger-ui .information-container .title", timeout=20_000)
            await page.click(".swagger-ui .auth-wrapper .btn.authorize")
            await page.fill(".swagger-ui .modal-ux input", stack.keys["alice"])
            await page.click(".swagger-ui .modal-ux .auth-btn-wrapper .btn.authorize")
            await page.wait_for_selector(".swagger-ui .modal-ux .btn-done")
            await page.click(".swagger-ui .modal-ux .btn-done")
            op = page.locator(".opblock-get", has=page.locator(".opblock-summary-path[data-path='/v1/models']")).first
            await op.locator(".opblock-summary").click()
            await op.locator(".try-out__btn").click()
            await op.locator(".execute").click()
            status = op.locator(".live-responses-table tr.response .response-col_status").first
            await status.wait_for(timeout=20_000)
            assert (await status.inner_text()).strip() == "200", await op.inner_text()
            assert "local-image" in await op.locator(".live-responses-table").inner_text()
            await page.evaluate("() => window.scrollTo(0, 0)")
            await page.screenshot(path=str(shots / "api-docs-desktop.png"))
            assert not errors, errors
            await context.close()
        finally:
            await b.close()
    assert not outside, f"/docs reached outside genroute: {outside}"


async def test_a_job_page_tells_the_whole_story_and_plays_video_and_audio(browser: Any, stack: Stack, shots: Path) -> None:
    """A finished job's page: its input, a timeline of its events, the attempts with their
    deployment, the cost held and settled, output previews with download links (an image,
    the local video's animated WebP with its pause button, an audio player), and "Submit
    again", which makes a new job and opens it."""
    async with stack.client() as c:
        made = {}
        for model, inp in (("local-image", {"prompt": "story of a fox", "size": "256x256"}),
                           ("local-video", {"prompt": "story of a boat", "duration_seconds": 1, "fps": 4, "resolution": "360p"}),
                           ("local-audio", {"text": "story time"})):
            r = await c.post("/v1/jobs", json={"model": model, "input": inp}, headers={"Prefer": "wait=40"})
            assert r.json()["status"] == "succeeded", r.json()
            made[model] = r.json()
    s = await new_session(browser, stack, DESKTOP, "desktop", shots)
    page = s.page
    await s.sign_in(stack.keys["alice"])
    image = made["local-image"]
    await s.open(f"#/jobs/{image['id']}", "#outputs img.media")
    assert "story of a fox" in await page.inner_text("#job-input")
    timeline = await page.inner_text("#timeline")
    assert "Queued" in timeline and "Started" in timeline and "Succeeded" in timeline, timeline
    attempts = await page.inner_text("#attempts")
    assert "local-image" in attempts and "accepted" in attempts, attempts
    cost = await page.inner_text("#cost")
    assert "Held at submit" in cost and "Settled" in cost and "not yet" not in cost, cost
    href = await page.get_attribute("#outputs a[download]", "href") or ""
    assert href.split("?")[0] == image["outputs"][0]["url"].split("?")[0]  # signed afresh on each read
    await s.shot("job-story")

    await s.open(f"#/jobs/{made['local-video']['id']}", "#outputs .media-wrap img.media")
    await page.click("#outputs .play-toggle")  # pauses: the first frame stands in
    await page.wait_for_function("() => document.querySelector('#outputs .play-toggle').textContent === 'Play'")
    await s.open(f"#/jobs/{made['local-audio']['id']}", "#outputs audio.media-audio")
    await page.wait_for_function("() => document.querySelector('#outputs audio').readyState >= 1")  # the player read the file
    assert await page.evaluate("() => document.querySelector('#outputs audio').duration") > 0
    await s.shot("job-audio")

    await s.open(f"#/jobs/{image['id']}", "#resubmit")
    await page.click("#resubmit")
    await page.wait_for_function("id => location.hash.startsWith('#/jobs/job_') && !location.hash.endsWith(id)", arg=image["id"])
    again = page.url.rsplit("/", 1)[1]
    async with stack.client() as c:
        job = (await c.get(f"/v1/jobs/{again}")).json()
    assert job["input"]["prompt"] == "story of a fox" and job["id"] != image["id"], job
    assert not s.errors, s.errors
    await page.context.close()


async def test_waiting_jobs_show_their_place_and_eta_and_the_admin_sees_health_balance_and_rotates(
    browser: Any, tmp_path: Path, redis_base: str, shots: Path
) -> None:
    """A deployment with one slot and three jobs behind a running one: the list and the
    job's page say "#2 in queue · ETA …" and the deployments page "1 / 1" in flight; the
    usage page shows the tenant's budget, spent, held and available; Rotate shows the new
    key once, which works while the old one is refused."""
    import yaml

    from core.routing.catalog import DEFAULT_CATALOG

    data = yaml.safe_load(DEFAULT_CATALOG.read_text())
    data["models"].append({"id": "one-slot", "modality": "image", "deployments": [
        {"name": "one-slot-local", "adapter": "local", "model": "image", "limits": {"max_concurrency": 1}}]})
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(data))
    admin = "gr_admin_" + os.urandom(12).hex()
    st = await make_stack(tmp_path / "stack", redis_url=f"{redis_base}/0", tenants=("alice",),
                          catalog=tmp_path / "catalog.yaml", admin_key=admin)
    as_admin = {"Authorization": f"Bearer {admin}"}
    async with running(st), st.client() as c:
        assert (await c.patch("/v1/admin/tenants/alice", json={"budget": 5_000_000}, headers=as_admin)).status_code == 200

        def one(seconds: float) -> dict[str, Any]:
            return {"model": "one-slot", "input": {"prompt": f"one slot {seconds}", "size": "256x256",
                                                   "provider_params": {"latency_seconds": seconds, "progress_steps": 2}}}

        # a first job teaches the deployment how long its tasks take (the ETA's basis)
        r = await c.post("/v1/jobs", json=one(1), headers={"Prefer": "wait=30"})
        assert r.json()["status"] == "succeeded", r.json()
        ids = [(await c.post("/v1/jobs", json=one(60))).json()["id"] for _ in range(4)]

        async def last_waits() -> dict[str, Any] | None:
            job = (await c.get(f"/v1/jobs/{ids[-1]}")).json()
            return job if job.get("queue_position") == 2 and job.get("eta_seconds") else None
        last = await eventually(last_waits, what="the last job's place and ETA")

        s = await new_session(browser, st, DESKTOP, "desktop", shots)
        page = s.page
        await s.sign_in(st.keys["alice"])
        await s.open("#/jobs", f'#job-list [data-job-id="{ids[-1]}"]')
        # the queue may move on between reads (a slot handed over): any place, with its ETA
        row = await page.inner_text(f'#job-list [data-job-id="{ids[-1]}"]')
        assert re.search(r"#[1-3] in queue", row) and "ETA" in row, (row, last)
        await s.shot("jobs-waiting")
        await s.open(f"#/jobs/{ids[-1]}", ".alert-info")
        assert re.search(r"Waiting: #[1-3] in queue", await page.inner_text(".alert-info"))
        await s.shot("job-waiting")
        await s.open("#/usage?days=7", "#usage-chart svg")
        usage = await page.inner_text("#usage-body")
        assert "$5.00" in usage and "Held" in usage and "Available" in usage and "No budget" not in usage, usage
        await s.shot("usage-balance")
        await page.context.close()

        rotated = (await c.post("/v1/admin/keys", json={"tenant": "alice", "name": "to-rotate"}, headers=as_admin)).json()
        s = await new_session(browser, st, DESKTOP, "desktop", shots)
        page = s.page
        await s.sign_in(admin)
        await s.open("#/admin/deployments", '#deployments [data-deployment="one-slot-local"]')
        dep = await page.inner_text('#deployments [data-deployment="one-slot-local"]')
        assert "1 / 1" in dep and "Error rate" in dep and "Latency" in dep, dep
        await s.shot("admin-deployments-busy")
        await s.open("#/admin/keys", '#keys-table [data-key-name="to-rotate"][data-status=active]')
        await page.click('#keys-table [data-key-name="to-rotate"] .rotate')  # the grace prompt is accepted: 0 s
        await page.wait_for_selector("#new-key")
        fresh = await page.input_value("#new-key")
        assert fresh.startswith("gr_") and fresh != rotated["key"]
        await s.shot("admin-key-rotated")
        async with httpx.AsyncClient(base_url=st.api_url, timeout=30) as k:
            new_ok = await k.get("/v1/jobs", headers={"Authorization": f"Bearer {fresh}"})
            old = await k.get("/v1/jobs", headers={"Authorization": f"Bearer {rotated['key']}"})
        assert (new_ok.status_code, old.status_code) == (200, 401)
        assert not s.errors, s.errors
        await page.context.close()
        for job_id in ids:
            await c.post(f"/v1/jobs/{job_id}/cancel")
