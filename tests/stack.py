"""A genroute deployment as separate processes: `genroute api` under uvicorn and
`genroute worker` under ARQ, configured only through GENROUTE_* env, as a user runs them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from cli.embedded import free_port
from core.db import create_engine, sessionmaker
from core.keys import create_key
from core.migrate import upgrade
from core.routing.catalog import DEFAULT_CATALOG
from core.settings import Settings

BIN = Path(sys.executable).parent / "genroute"
TERMINAL = {"succeeded", "failed", "canceled"}


def write_catalog(path: Path, submit_log: Path) -> Path:
    """The default catalog, with every local deployment logging its submits."""
    data = yaml.safe_load(DEFAULT_CATALOG.read_text())
    for model in data["models"]:
        for dep in model["deployments"]:
            dep.setdefault("options", {})["submit_log"] = str(submit_log)
    path.write_text(yaml.safe_dump(data))
    return path


@dataclass
class Stack:
    root: Path
    env: dict[str, str]
    api_url: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def submit_log(self) -> Path:
        return self.root / "submits.log"

    def submits(self) -> list[str]:
        return self.submit_log.read_text().split() if self.submit_log.exists() else []

    def settings(self) -> Settings:
        return Settings(**{k[len("GENROUTE_"):].lower(): v for k, v in self.env.items() if k.startswith("GENROUTE_")})

    # processes -------------------------------------------------------------------------
    def _spawn(self, name: str, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        env = {**os.environ, **self.env, **(extra_env or {})}
        proc = subprocess.Popen([str(BIN), *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.root, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_api(self) -> None:
        port = int(self.api_url.rsplit(":", 1)[1])
        self._spawn("api", "api", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.api_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.procs["api"].poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"api did not start:\n{self.log('api')}")

    def start_api_replica(self, name: str, **env: str) -> str:
        """Another `genroute api` process on its own port, sharing the stack's DB and Redis
        (GENROUTE_* overrides in `env`, e.g. ws_queue_size="8"). Returns its base URL."""
        port = free_port()
        extra = {f"GENROUTE_{k.upper()}": v for k, v in env.items()}
        self._spawn(name, "api", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log",
                    extra_env=extra)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not start:\n{self.log(name)}")

    def start_worker(self, name: str = "worker", *args: str, ready: bool = False, **env: str) -> subprocess.Popen[bytes]:
        """`ready`: return once the worker serves its queues (its start-up checks passed),
        for tests that break Redis or the database right after."""
        if ready:
            env.setdefault("GENROUTE_LOG_LEVEL", "INFO")
        proc = self._spawn(name, "worker", *args, extra_env=env)
        time.sleep(0.2)
        deadline = time.monotonic() + 60
        while ready and "worker listening on" not in self.log(name) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is not None or (ready and "worker listening on" not in self.log(name)):
            raise RuntimeError(f"worker died at start (or never served):\n{self.log(name)}")
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            proc.wait(20)

    def stop(self) -> None:
        for name in list(self.procs):
            try:
                self.kill(name, signal.SIGTERM)
            except subprocess.TimeoutExpired:
                self.kill(name, signal.SIGKILL)

    def log(self, name: str, tail: int | None = 6000) -> str:
        """A process's log: its last `tail` characters (enough for an assertion message), or
        all of it with tail=None (for a test that looks for a line anywhere in it)."""
        p = self.root / f"{name}.log"
        text = p.read_text() if p.exists() else ""
        return text if tail is None else text[-tail:]

    # clients ---------------------------------------------------------------------------
    def client(self, tenant: str = "alice", **kw: Any) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"} if tenant else {}
        return httpx.AsyncClient(base_url=self.api_url, headers=headers, timeout=90, **kw)

    async def wait_job(self, client: httpx.AsyncClient, job_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            r = await client.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=5"})
            job = r.json()
            if job["status"] in TERMINAL or time.monotonic() > deadline:
                return job

    async def openai_video(self, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], httpx.Response]:
        """POST /v1/videos, wait for its job: (the job, GET /v1/videos/{id}, GET .../content)."""
        async with self.client() as c:
            r = await c.post("/v1/videos", json=body)
            assert r.status_code == 200, r.text
            video = r.json()
            job = await self.wait_job(c, video["id"])
            assert job["status"] == "succeeded", job["error"]
            got = (await c.get(f"/v1/videos/{video['id']}")).json()
            return job, got, await c.get(f"/v1/videos/{video['id']}/content")


async def make_stack(root: Path, *, redis_url: str, database_url: str = "", storage: str = "local",
                     s3: Any = None, tenants: tuple[str, ...] = ("alice", "bob"), catalog: Path | None = None,
                     env: dict[str, str] | None = None, **extra: str) -> Stack:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    extra_env = env or {}
    env = {
        "GENROUTE_DATA_DIR": str(root / "data"),
        "GENROUTE_REDIS_URL": redis_url,
        "GENROUTE_REDIS_PREFIX": f"t{uuid.uuid4().hex[:10]}",
        "GENROUTE_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "GENROUTE_SECRET_KEY": uuid.uuid4().hex,
        "GENROUTE_STORAGE": storage,
        "GENROUTE_CATALOG": str(catalog or write_catalog(root / "catalog.yaml", root / "submits.log")),
        "GENROUTE_WORKER_POLL_DELAY": "0.05",
        "GENROUTE_RECONCILE_EVERY_SECONDS": "1",
        "GENROUTE_RECONCILE_GRACE_SECONDS": "2",
        "GENROUTE_LOG_LEVEL": "WARNING",
        # the provider fakes and receivers listen on loopback (attack tests pass outbound_allowlist="[]")
        "GENROUTE_OUTBOUND_ALLOWLIST": '["127.0.0.1/32"]',
    }
    if database_url:
        env["GENROUTE_DATABASE_URL"] = database_url
    if storage == "s3":
        bucket = f"t-{uuid.uuid4().hex[:12]}"
        env.update(
            GENROUTE_S3_ENDPOINT_URL=s3.endpoint_url,
            GENROUTE_S3_BUCKET=bucket,
            GENROUTE_S3_ACCESS_KEY_ID=s3.access_key,
            GENROUTE_S3_SECRET_ACCESS_KEY=s3.secret_key,
            GENROUTE_S3_CREATE_BUCKET="true",
        )
    env.update({f"GENROUTE_{k.upper()}": v for k, v in extra.items()})
    env.update(extra_env)
    stack = Stack(root=root, env=env, api_url=f"http://127.0.0.1:{port}")
    settings = stack.settings()
    await asyncio.to_thread(upgrade, settings)
    engine = create_engine(settings)
    try:
        for tenant in tenants:
            _, plain = await create_key(sessionmaker(engine), name=tenant)
            stack.keys[tenant] = plain
    finally:
        await engine.dispose()
    return stack


@asynccontextmanager
async def running(stack: Stack, *workers: tuple[str, ...]) -> AsyncIterator[Stack]:
    """Start the API and workers (default: one `worker` on every queue), stop them all after.
    Each entry of `workers` is (name, *args), e.g. ("worker", "--queue", "media")."""
    stack.start_api()
    for name, *args in workers or (("worker",),):
        stack.start_worker(name, *args)
    try:
        yield stack
    finally:
        stack.stop()


class PrivateRedis:
    """A redis-server of our own on a free port, to kill -9 and start again empty."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.root)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).stdout.strip() != b"PONG":
            assert time.monotonic() < deadline, "the private redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
