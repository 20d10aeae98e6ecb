"""Plain-data checks: the transition table, catalog validation, settings, compose file."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from api.jobs import parse_prefer_wait
from core.errors import InvalidRequest
from core.jobs.ledger import ALLOWED_FROM, TERMINAL, JobStatus, can_transition
from core.routing.catalog import CatalogError, load_catalog
from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_transition_table() -> None:
    for terminal in TERMINAL:
        for dst in JobStatus:
            assert not can_transition(terminal, dst), f"{terminal} -> {dst} must be impossible"
    assert can_transition(JobStatus.queued, JobStatus.running)
    assert can_transition(JobStatus.running, JobStatus.running)  # progress / handle updates
    assert can_transition(JobStatus.queued, JobStatus.canceled)
    assert not can_transition(JobStatus.queued, JobStatus.succeeded)  # success needs a run
    # back to queued only for a submit retry; queued -> queued says why a job waits
    assert ALLOWED_FROM[JobStatus.queued] == frozenset({JobStatus.running, JobStatus.queued})


def test_prefer_wait_parsing() -> None:
    assert parse_prefer_wait(None, 60) is None
    assert parse_prefer_wait("respond-async", 60) is None
    assert parse_prefer_wait("wait=5", 60) == 5
    assert parse_prefer_wait("respond-async, wait=10", 60) == 10
    assert parse_prefer_wait("wait", 60) == 60
    for bad in ("wait=0", "wait=61", "wait=-1", "wait=1.5", "wait=abc", "wait=", "wait=" + "9" * 5000, "wait=99999"):
        with pytest.raises(InvalidRequest):
            parse_prefer_wait(bad, 60)


def test_default_catalog_loads() -> None:
    cat = load_catalog()
    assert {"local-image", "local-video", "local-audio"} <= {m.id for m in cat.models}
    assert all(d.adapter == "local" for m in cat.models for d in m.deployments)  # no keys needed


@pytest.mark.parametrize(
    "text,needle",
    [
        ("models: [", "not valid YAML"),
        ("models:\n  - id: a\n    modality: smell\n    deployments: [{name: d, adapter: local, model: m}]\n", "models.0.modality"),
        ("models:\n  - id: a\n    modality: image\n    deployments: []\n", "models.0.deployments"),
        ("models:\n  - {id: a, modality: image, deployments: [{name: d, adapter: local, model: m}]}\n"
         "  - {id: a, modality: image, deployments: [{name: d, adapter: local, model: m}]}\n", "duplicate model id"),
    ],
)
def test_catalog_errors_name_file_and_path(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "cat.yaml"
    f.write_text(text)
    with pytest.raises(CatalogError) as exc:
        load_catalog(f)
    assert str(f) in str(exc.value) and needle in str(exc.value)
    with pytest.raises(CatalogError, match="not found"):
        load_catalog(tmp_path / "missing.yaml")


def test_settings_come_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENROUTE_WORKER_MAX_JOBS", "7")
    monkeypatch.setenv("GENROUTE_REDIS_PREFIX", "x")
    s = Settings()
    assert s.worker_max_jobs == 7
    assert s.queue_for("video") == "x:queue:video" and s.queue_for("image") == "x:queue:media"


def test_docker_compose_describes_the_production_stack() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    catalog_keys = {d["api_key_env"] for f in (ROOT / "catalogs").glob("*.yaml")
                    for m in (yaml.safe_load(f.read_text()).get("models") or [])
                    for d in m.get("deployments") or [] if d.get("api_key_env")}
    services = compose["services"]
    assert {"api", "worker", "redis", "postgres", "minio"} <= set(services)
    for name in ("api", "redis", "postgres", "minio", "worker"):
        assert "healthcheck" in services[name], name
    for name in ("api", "worker", "migrate"):
        env = services[name]["environment"]
        assert env["GENROUTE_REDIS_URL"].startswith("redis://redis:")
        assert "@postgres:" in env["GENROUTE_DATABASE_URL"] and env["GENROUTE_STORAGE"] == "s3"
        # every setting named is one genroute reads, and every other name a provider key
        # that a shipped catalog's api_key_env names
        for key in env:
            if key.startswith("GENROUTE_"):
                assert key.removeprefix("GENROUTE_").lower() in Settings.model_fields, key
        assert catalog_keys <= set(env), catalog_keys - set(env)
        assert "${GENROUTE_ADMIN_KEY:?" in text  # the first admin key is part of the set-up
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # replicas cannot share a host port: only the proxy publishes one, and its config exists
    assert "ports" not in services["api"]
    assert services["proxy"]["ports"] == ["8000:8000"]
    conf = services["proxy"]["volumes"][0].split(":")[0]
    assert "proxy_pass $api" in (ROOT / conf).read_text()
    # the worker's healthcheck asks the worker's own /healthz (a hung loop fails it)
    assert "--healthcheck" in services["worker"]["healthcheck"]["test"]
    port = services["worker"]["command"][services["worker"]["command"].index("--metrics-port") + 1]
    assert port in services["worker"]["healthcheck"]["test"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        env = dict(os.environ, GENROUTE_SECRET_KEY="x", GENROUTE_ADMIN_KEY="y")
        out = subprocess.run([docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                             capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr


def test_catalog_check_command(tmp_path: Path) -> None:
    import sys

    exe = Path(sys.executable).parent / "genroute"
    ok = subprocess.run([str(exe), "catalog", "check", str(ROOT / "examples" / "catalog.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0 and "ok" in ok.stdout, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - {id: a, modality: image, deployments: [{name: d, adapter: nope, model: m}]}\n")
    out = subprocess.run([str(exe), "catalog", "check", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1 and "models.0.deployments.0.adapter" in out.stderr and "nope" in out.stderr


def test_providers_section_fills_deployments(tmp_path: Path) -> None:
    f = tmp_path / "cat.yaml"
    f.write_text(
        "providers:\n"
        "  openai: {adapter: openai, base_url: 'https://api.openai.com/v1', api_key_env: OPENAI_API_KEY,\n"
        "           headers: {OpenAI-Organization: org-1}, options: {poll_interval: 10}}\n"
        "models:\n"
        "  - id: gpt-image-1\n    modality: image\n"
        "    deployments: [{name: d, provider: openai, model: gpt-image-1, options: {poll_interval: 2}}]\n"
    )
    dep = load_catalog(f).models[0].deployments[0]
    assert (dep.adapter, dep.base_url, dep.api_key_env) == ("openai", "https://api.openai.com/v1", "OPENAI_API_KEY")
    assert dep.options == {"poll_interval": 2, "headers": {"OpenAI-Organization": "org-1"}}  # the deployment wins
    f.write_text(f.read_text().replace("provider: openai", "provider: nope"))
    with pytest.raises(CatalogError, match="unknown provider 'nope'"):
        load_catalog(f)


async def test_an_overloaded_database_answers_503_not_500() -> None:
    """Too many connections, a lost connection or an exhausted pool: 503 + Retry-After (in both
    error shapes); any other database error stays a 500."""
    from fastapi import FastAPI
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from api import errors
    from api.openai_compat import openai_router

    class Orig(Exception):
        def __init__(self, sqlstate: str) -> None:
            super().__init__(sqlstate)
            self.sqlstate = sqlstate

    failures = {
        "too_many": DBAPIError("SELECT 1", {}, Orig("53300")),
        "lost": DBAPIError("SELECT 1", {}, Orig("08006")),
        "pool": PoolTimeout("QueuePool limit of size 30 overflow 0 reached"),
        "bug": DBAPIError("SELECT 1", {}, Orig("42P01")),  # undefined table: ours, a 500
    }
    app = FastAPI()
    errors.install(app)
    oai = openai_router()

    @app.get("/x/{kind}")
    async def ours(kind: str) -> None:
        raise failures[kind]

    @oai.get("/y/{kind}")
    async def openai_shaped(kind: str) -> None:
        raise failures[kind]

    app.include_router(oai)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t") as c:
        for kind in ("too_many", "lost", "pool"):
            r = await c.get(f"/x/{kind}")
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "unavailable"
            r = await c.get(f"/v1/y/{kind}")
            assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert (await c.get("/x/bug")).status_code == 500
        assert (await c.get("/v1/y/bug")).status_code == 500


def test_a_connection_broken_while_watching_counts_as_redis_lost() -> None:
    """redis-py turns a connection error during WATCH into a WatchError; ARQ's loop raised
    one when Redis was killed, and a worker that did not know it exited."""
    import redis.exceptions

    from core.outages import redis_lost, unavailable

    assert redis_lost(redis.exceptions.WatchError("A ConnectionError occurred on while watching one or more keys"))
    assert not redis_lost(redis.exceptions.WatchError("Watched variable changed."))
    assert unavailable(redis.exceptions.ConnectionError("Connection closed by server.")) == "Redis"


def test_an_empty_catalog_setting_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """docker-compose.yml passes `GENROUTE_CATALOG: ${GENROUTE_CATALOG:-}`: empty is unset."""
    monkeypatch.setenv("GENROUTE_CATALOG", "")
    assert Settings().catalog is None
