"""Webhook signing secrets at rest: stored encrypted, never in plaintext; migration 0008
encrypts the rows that exist; a row still in plaintext is encrypted on its first read; a key
rotation with `genroute webhooks reencrypt` (real API processes and the real CLI)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

from core.db import normalize_url
from core.migrate import alembic_config, upgrade
from core.secretbox import SecretBox, box_for, derive, kid_in, kid_of
from core.settings import Settings
from core.webhooks import new_secret
from tests.services import fresh_postgres
from tests.stack import BIN, Stack, make_stack, running

NEW_KEY = "a-new-webhook-encryption-key-0123456789"


async def _rows(url: str) -> dict[str, tuple[str, str | None]]:
    engine = create_async_engine(normalize_url(url))
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.text("SELECT tenant, secret, previous_secret FROM webhook_secrets"))).all()
    finally:
        await engine.dispose()
    return {r[0]: (r[1], r[2]) for r in rows}


async def _exec(url: str, sql: str, **params: Any) -> None:
    engine = create_async_engine(normalize_url(url))
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(sql), params)
    finally:
        await engine.dispose()


# the box ------------------------------------------------------------------------------------------
def test_the_box_binds_the_tenant_and_tells_keys_apart() -> None:
    box = box_for(Settings(secret_key="k" * 32))
    assert box is not None and box_for(Settings()) is None
    plain = new_secret()
    sealed = box.encrypt(plain, "webhook_secrets:alice")
    assert sealed.startswith("enc:v1:") and plain not in sealed and len(sealed) <= 255
    assert box.decrypt(sealed, "webhook_secrets:alice") == plain
    assert box.encrypt(plain, "webhook_secrets:alice") != sealed  # a fresh nonce each time
    with pytest.raises(RuntimeError):  # another tenant's row: does not open
        box.decrypt(sealed, "webhook_secrets:bob")
    assert box.decrypt(plain, "webhook_secrets:alice") == plain  # never encrypted: read as it is
    rotated = box_for(Settings(secret_key="k" * 32, webhook_encryption_keys=[NEW_KEY]))
    assert rotated is not None and rotated.current_kid == kid_of(derive(NEW_KEY)) != box.current_kid
    assert rotated.decrypt(sealed, "webhook_secrets:alice") == plain  # the secret key still decrypts
    assert not rotated.is_current(sealed) and rotated.is_current(rotated.encrypt(plain, "x"))
    with pytest.raises(RuntimeError, match="GENROUTE_WEBHOOK_ENCRYPTION_KEYS"):
        SecretBox((derive(NEW_KEY),)).decrypt(sealed, "webhook_secrets:alice")


# migration 0008 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("db", ["sqlite", "postgres"])
async def test_migration_0008_encrypts_existing_secrets_and_downgrades_to_plaintext(db: str, tmp_path: Path) -> None:
    async def check(url: str) -> None:
        settings = Settings(data_dir=tmp_path, database_url=url, secret_key="migration-secret-key-0123456789")
        box = box_for(settings)
        assert box is not None
        await asyncio.to_thread(upgrade, settings, "0007")
        plain, previous = new_secret(), new_secret()
        await _exec(url, "INSERT INTO webhook_secrets (tenant, secret, previous_secret, created_at) VALUES "
                         "('alice', :s, :p, CURRENT_TIMESTAMP), ('bob', :s2, NULL, CURRENT_TIMESTAMP)",
                    s=plain, p=previous, s2=plain[::-1])
        await asyncio.to_thread(upgrade, settings)
        rows = await _rows(url)
        assert kid_in(rows["alice"][0]) == box.current_kid and kid_in(rows["alice"][1] or "") == box.current_kid
        assert box.decrypt(rows["alice"][0], "webhook_secrets:alice") == plain
        assert box.decrypt(rows["alice"][1] or "", "webhook_secrets:alice") == previous
        assert box.decrypt(rows["bob"][0], "webhook_secrets:bob") == plain[::-1] and rows["bob"][1] is None
        assert plain not in json.dumps(rows)
        await asyncio.to_thread(command.downgrade, alembic_config(settings), "0007")
        assert await _rows(url) == {"alice": (plain, previous), "bob": (plain[::-1], None)}
        # migrated without a key: the rows stay as they are (encrypted on their first read)
        await asyncio.to_thread(upgrade, Settings(data_dir=tmp_path, database_url=url))
        assert await _rows(url) == {"alice": (plain, previous), "bob": (plain[::-1], None)}
        engine = create_async_engine(normalize_url(url))
        try:
            async with engine.connect() as conn:
                diff = await conn.run_sync(lambda sync: compare_metadata(MigrationContext.configure(sync), SQLModel.metadata))
        finally:
            await engine.dispose()
        assert diff == [], diff

    if db == "sqlite":
        await check(f"sqlite+aiosqlite:///{tmp_path}/m.db")
    else:
        async with fresh_postgres() as url:
            await check(url)


# real processes -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> Any:
    st = await make_stack(tmp_path_factory.mktemp("whsecrets"), redis_url=f"{redis_base}/0", tenants=("alice", "bob", "carol"))
    async with running(st):
        yield st


def _client(st: Stack, tenant: str, base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {st.keys[tenant]}"}, timeout=60)


def _cli(st: Stack, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **st.env, **{f"GENROUTE_{k.upper()}": v for k, v in env.items()}}
    return subprocess.run([str(BIN), *argv], env=full, cwd=st.root, capture_output=True, text=True, timeout=120)


async def test_secrets_are_stored_encrypted_and_a_key_rotation_reencrypts_them(stack: Stack) -> None:
    st = stack
    url = st.settings().resolved_database_url()
    old_kid = kid_of(derive(st.env["GENROUTE_SECRET_KEY"]))
    async with st.client("alice") as c:
        alice = (await c.get("/v1/webhooks/secret")).json()["secret"]
        rotated = (await c.post("/v1/webhooks/secret/rotate")).json()
        assert rotated["previous_secret"] == alice
    rows = await _rows(url)
    assert kid_in(rows["alice"][0]) == old_kid and kid_in(rows["alice"][1] or "") == old_kid
    assert alice not in json.dumps(rows) and rotated["secret"] not in json.dumps(rows)

    # a row from before encryption at rest (plaintext): read as it is, and encrypted on that read
    legacy = new_secret()
    await _exec(url, "INSERT INTO webhook_secrets (tenant, secret, created_at) VALUES ('bob', :s, CURRENT_TIMESTAMP)", s=legacy)
    async with st.client("bob") as c:
        assert (await c.get("/v1/webhooks/secret")).json()["secret"] == legacy
    assert kid_in((await _rows(url))["bob"][0]) == old_kid
    carol = new_secret()  # and one left in plaintext for reencrypt to find
    await _exec(url, "INSERT INTO webhook_secrets (tenant, secret, created_at) VALUES ('carol', :s, CURRENT_TIMESTAMP)", s=carol)

    # rotation: the new key first; GENROUTE_SECRET_KEY still decrypts the old rows
    out = _cli(st, "webhooks", "reencrypt", "--json", webhook_encryption_keys=json.dumps([NEW_KEY]))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"rows": 3, "rewritten": 3, "plaintext": 1}, out.stdout
    rows = await _rows(url)
    new_kid = kid_of(derive(NEW_KEY))
    assert {kid_in(s) for s, _ in rows.values()} == {new_kid} and kid_in(rows["alice"][1] or "") == new_kid
    again = _cli(st, "webhooks", "reencrypt", "--json", webhook_encryption_keys=json.dumps([NEW_KEY]))
    assert json.loads(again.stdout)["rewritten"] == 0, again.stdout

    # a process with the new key only (another GENROUTE_SECRET_KEY) reads every secret
    replica = st.start_api_replica("api-newkey", webhook_encryption_keys=json.dumps([NEW_KEY]),
                                   secret_key="an-unrelated-secret-key-0123456789")
    async with _client(st, "alice", replica) as c:
        got = (await c.get("/v1/webhooks/secret")).json()
        assert got["secret"] == rotated["secret"] and got["previous_secret"] == alice
    for tenant, plain in (("bob", legacy), ("carol", carol)):
        async with _client(st, tenant, replica) as c:
            assert (await c.get("/v1/webhooks/secret")).json()["secret"] == plain
    # the old process lacks the new key: a clear 503 naming the setting, not a wrong secret
    async with st.client("alice") as c:
        r = await c.get("/v1/webhooks/secret")
        assert r.status_code == 503 and r.json()["error"]["code"] == "webhook_secrets_unavailable", r.text
        assert "GENROUTE_WEBHOOK_ENCRYPTION_KEYS" in r.json()["error"]["message"]
    # and reencrypt without a key that opens them says so (exit 1, one error line)
    out = _cli(st, "webhooks", "reencrypt", secret_key="yet-another-secret-key-0123456789")
    assert out.returncode == 1 and "GENROUTE_WEBHOOK_ENCRYPTION_KEYS" in out.stderr and "Traceback" not in out.stderr
