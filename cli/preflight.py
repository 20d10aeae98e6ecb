"""The first hour without tracebacks: settings are read and checked before a command does
anything, and each problem ends the process with one line that names the variable and
says what to do (exit code 2).

    load_settings()              every setting pydantic rejects -> ConfigProblem
    check_serving(settings)      what `api` / `worker` need: a signing secret with local
                                 storage, a key for webhook secrets at rest, URLs that parse, a catalog that loads, Redis
                                 answering, the schema in place
    ensure_schema(settings)      commands that read or write the database: SQLite is
                                 migrated on the spot, PostgreSQL is only checked
"""

from __future__ import annotations

import asyncio
import re
import secrets
import sys
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from core.settings import Settings

EXIT = 2


class ConfigProblem(Exception):
    """A setting the process cannot run with. `str()` is the one line to print."""


def _var(field: str) -> str:
    return f"GENROUTE_{field.upper()}"


def _default(field: str) -> str:
    info = Settings.model_fields.get(field)
    if info is None or info.default in (None, "", []):
        return ""
    return f" (default: {info.default})"


def _from_validation(exc: ValidationError) -> ConfigProblem:
    lines = []
    for err in exc.errors(include_url=False):
        field = str(err["loc"][0]) if err.get("loc") else "?"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        lines.append(f"{_var(field)}={err.get('input')!r} is not valid: {msg}; fix it or unset it{_default(field)}")
    more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
    return ConfigProblem(lines[0] + more)


_FIELD = re.compile(r'field "([a-z0-9_]+)"')


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise _from_validation(exc) from None
    except SettingsError as exc:
        m = _FIELD.search(str(exc))
        field = m[1] if m else "?"
        raise ConfigProblem(
            f"{_var(field)} cannot be parsed: give a JSON list (e.g. [\"a\", \"b\"]) or comma-separated values"
        ) from None


def check_urls(settings: Settings) -> None:
    from redis.asyncio.connection import parse_url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from core.db import normalize_url

    try:
        make_url(normalize_url(settings.resolved_database_url()))
    except (ArgumentError, ValueError) as exc:
        raise ConfigProblem(
            f"GENROUTE_DATABASE_URL={settings.database_url!r} is not a database URL ({exc}); "
            "use postgresql://USER:PASSWORD@HOST:5432/DB or sqlite+aiosqlite:///PATH, or unset it for SQLite in GENROUTE_DATA_DIR"
        ) from None
    try:
        parse_url(settings.redis_url)
    except ValueError as exc:
        raise ConfigProblem(f"GENROUTE_REDIS_URL={settings.redis_url!r} is not a Redis URL ({exc}); use redis://HOST:6379/0") from None


def check_storage(settings: Settings) -> None:
    if settings.storage == "local" and not settings.secret_key:
        raise ConfigProblem(
            "GENROUTE_SECRET_KEY is required with local storage (it signs download links): set it to a random string, "
            f"e.g. GENROUTE_SECRET_KEY={secrets.token_urlsafe(32)}"
        )
    if settings.storage == "s3" and not settings.s3_bucket:
        raise ConfigProblem("GENROUTE_S3_BUCKET is required with GENROUTE_STORAGE=s3: set it to the bucket's name")


def check_secrets(settings: Settings) -> None:
    """Webhook signing secrets are stored encrypted (core/secretbox.py): a key is needed."""
    short = [i for i, k in enumerate(settings.webhook_encryption_keys) if len(k) < 16]
    if short:
        raise ConfigProblem(f"GENROUTE_WEBHOOK_ENCRYPTION_KEYS: key {short[0] + 1} is shorter than 16 characters; "
                            f"use random strings, e.g. {secrets.token_urlsafe(32)}")
    if not settings.secret_key and not settings.webhook_encryption_keys:
        raise ConfigProblem(
            "GENROUTE_SECRET_KEY is required (it encrypts webhook signing secrets at rest; or set "
            f"GENROUTE_WEBHOOK_ENCRYPTION_KEYS): set it to a random string, e.g. GENROUTE_SECRET_KEY={secrets.token_urlsafe(32)}"
        )


def check_catalog(settings: Settings) -> None:
    from core.routing.catalog import CatalogError, load_catalog

    try:
        load_catalog(settings.catalog)
    except CatalogError as exc:
        lines = str(exc).strip().splitlines() or ["invalid"]
        problems = "; ".join(lines[1:4]) if len(lines) > 1 else lines[0]
        more = f" (and {len(lines) - 4} more)" if len(lines) > 4 else ""
        raise ConfigProblem(f"GENROUTE_CATALOG is refused: {problems}{more}; "
                            "`genroute catalog check FILE` lists every problem") from None
    except OSError as exc:
        raise ConfigProblem(f"GENROUTE_CATALOG={str(settings.catalog)!r} cannot be read ({exc.strerror}); "
                            "point it at a catalog file or unset it for the built-in one") from None


def check_redis(settings: Settings) -> None:
    from cli.embedded import redis_answers

    if not redis_answers(settings.redis_url, timeout=3):
        raise ConfigProblem(
            f"GENROUTE_REDIS_URL: no Redis answers at {_safe_url(settings.redis_url)}; start Redis there or point the variable at one"
        )


def _safe_url(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


def ensure_schema(settings: Settings, *, migrate_sqlite: bool = True) -> None:
    """The schema must be at head before a command touches the database: SQLite (dev) is
    brought there now; PostgreSQL is left to `genroute migrate`, run once per deploy."""
    from core.migrate import schema_status, upgrade

    sqlite = settings.resolved_database_url().startswith("sqlite")
    if sqlite:
        try:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigProblem(f"GENROUTE_DATA_DIR={str(settings.data_dir)!r} cannot be created ({exc.strerror}); "
                                "set it to a writable directory") from None
    try:
        status = asyncio.run(schema_status(settings))
    except Exception as exc:  # unreachable, bad credentials, no such database
        raise ConfigProblem(
            f"GENROUTE_DATABASE_URL: cannot open the database at {_safe_url(settings.resolved_database_url())} "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'no answer'}); "
            "check the URL and that the server runs"
        ) from None
    if status == "current":
        return
    if sqlite and migrate_sqlite:
        upgrade(settings)
        print(f"note: {'created' if status == 'missing' else 'upgraded'} the database schema in "
              f"{settings.resolved_database_url().split('///', 1)[-1]}", file=sys.stderr)
        return
    what = "has no genroute schema" if status == "missing" else "has an older genroute schema"
    raise ConfigProblem(f"the database at GENROUTE_DATABASE_URL {what}: run `genroute migrate` first")


def check_serving(settings: Settings, *, redis: bool = True) -> None:
    """Everything `genroute api` and `genroute worker` need before they start."""
    check_urls(settings)
    check_storage(settings)
    check_secrets(settings)
    check_catalog(settings)
    if redis:
        check_redis(settings)
    ensure_schema(settings, migrate_sqlite=False)
