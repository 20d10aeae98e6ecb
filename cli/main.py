"""`genroute`: run the service, manage keys, submit jobs.

    genroute dev                 API + worker in one process, SQLite, local blobs, embedded Redis if needed
    genroute api                 the HTTP API (production)
    genroute worker              ARQ workers for the media and video queues (production)
    genroute migrate             create / upgrade the database schema
    genroute keys create --name  print a new API key (shown once)
    genroute submit --model M --input k=v ... [--wait]
    genroute catalog check FILE  validate a catalog
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from core.settings import Settings


def _settings() -> Settings:
    return Settings()


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
    from core.migrate import upgrade

    upgrade(_settings())
    print("database schema is up to date")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from core.db import create_engine, sessionmaker
    from core.keys import create_key

    settings = _settings()

    async def go() -> str:
        engine = create_engine(settings)
        try:
            row, plain = await create_key(sessionmaker(engine), name=args.name, tenant=args.tenant)
        finally:
            await engine.dispose()
        return f"{plain}\n# key {row.id}, tenant {row.tenant!r}: store it now, it is not shown again"

    print(asyncio.run(go()))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run(
        "api.app:app_factory", factory=True, host=args.host, port=args.port, workers=args.workers,
        log_level=args.log_level, access_log=not args.no_access_log,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.main import serve_workers

    _run(serve_workers(_settings(), args.queue or None))
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from cli.embedded import redis_answers, start_embedded_redis
    from core.migrate import upgrade
    from workers.main import serve_workers

    settings = _ensure_secret(_settings())
    settings = settings.model_copy(update={"public_url": settings.public_url if "GENROUTE_PUBLIC_URL" in os.environ else f"http://{args.host}:{args.port}"})
    embedded = None
    if not redis_answers(settings.redis_url):
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
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]

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

    from adapters.registry import ADAPTERS
    from core.catalog import CatalogError, load_catalog

    try:
        catalog = load_catalog(Path(args.file))
    except CatalogError as exc:
        print(exc, file=sys.stderr)
        return 1
    problems = [
        f"{args.file}: models[{i}].deployments[{j}].adapter: unknown adapter {d.adapter!r}; known: {sorted(ADAPTERS)}"
        for i, m in enumerate(catalog.models)
        for j, d in enumerate(m.deployments)
        if d.adapter not in ADAPTERS
    ]
    if problems:
        print("invalid catalog:\n" + "\n".join(problems), file=sys.stderr)
        return 1
    missing = sorted({d.api_key_env for m in catalog.models for d in m.deployments if d.api_key_env and not d.api_key()})
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

    d = sub.add_parser("dev", help="API + worker in one process (SQLite, local blobs, embedded Redis if none answers)")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8000)
    d.add_argument("--log-level", default="info")
    d.set_defaults(fn=cmd_dev)

    a = sub.add_parser("api", help="serve the HTTP API")
    a.add_argument("--host", default="0.0.0.0")
    a.add_argument("--port", type=int, default=8000)
    a.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    a.add_argument("--log-level", default="info")
    a.add_argument("--no-access-log", action="store_true")
    a.set_defaults(fn=cmd_api)

    w = sub.add_parser("worker", help="run ARQ workers")
    w.add_argument("--queue", action="append", choices=["media", "video", "webhooks"], help="queue(s) to serve (default: all)")
    w.set_defaults(fn=cmd_worker)

    m = sub.add_parser("migrate", help="create or upgrade the database schema")
    m.set_defaults(fn=cmd_migrate)

    k = sub.add_parser("keys", help="manage API keys")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="create a key and print it once")
    kc.add_argument("--name", required=True)
    kc.add_argument("--tenant", help="tenant the key acts for (default: the name)")
    kc.set_defaults(fn=cmd_keys_create)

    c = sub.add_parser("catalog", help="work with catalog files")
    csub = c.add_subparsers(dest="catalog_command", required=True)
    cc = csub.add_parser("check", help="validate a catalog file (exit 1 with the path of each problem)")
    cc.add_argument("file")
    cc.set_defaults(fn=cmd_catalog_check)

    s = sub.add_parser("submit", help="submit a job and print it")
    s.add_argument("--model", required=True)
    s.add_argument("--input", action="append", default=[], metavar="K=V",
                   help="an input field; V is parsed as JSON when it can be; dotted keys nest (provider_params.latency_seconds=3)")
    s.add_argument("--wait", action="store_true", help="show progress until the job ends, then print output URLs")
    s.add_argument("--url", default=os.environ.get("GENROUTE_URL", "http://127.0.0.1:8000"))
    s.add_argument("--key", default=os.environ.get("GENROUTE_API_KEY"), help="API key (default: $GENROUTE_API_KEY, then dev mode's key)")
    s.add_argument("--idempotency-key")
    s.set_defaults(fn=cmd_submit)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("GENROUTE_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
