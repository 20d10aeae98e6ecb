"""webhook signing secrets encrypted at rest (core/secretbox.py): wider columns, and the
existing secrets encrypted now when a key is configured at migrate time
(GENROUTE_WEBHOOK_ENCRYPTION_KEYS or GENROUTE_SECRET_KEY). Without one, rows stay as they
are and each is encrypted on its first read by a process that has the key (core/webhooks.py),
or all at once by `genroute webhooks reencrypt`.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import context, op

if TYPE_CHECKING:
    from core.secretbox import SecretBox

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_COLUMNS = (("secret", False), ("previous_secret", True))


def _box() -> "SecretBox | None":
    from core.secretbox import box_for

    settings = context.config.attributes.get("genroute_settings")
    if settings is None:  # alembic run by hand: the environment's settings
        from core.settings import Settings

        try:
            settings = Settings()
        except Exception:
            return None
    return box_for(settings)


def _rows() -> list[Any]:
    return list(op.get_bind().execute(sa.text("SELECT tenant, secret, previous_secret FROM webhook_secrets")).all())


def _write(tenant: str, secret: str, previous: str | None) -> None:
    op.get_bind().execute(
        sa.text("UPDATE webhook_secrets SET secret = :s, previous_secret = :p WHERE tenant = :t"),
        {"s": secret, "p": previous, "t": tenant},
    )


def upgrade() -> None:
    with op.batch_alter_table("webhook_secrets") as b:
        for name, nullable in _COLUMNS:
            b.alter_column(name, existing_type=sqlmodel.sql.sqltypes.AutoString(length=100),
                           type_=sqlmodel.sql.sqltypes.AutoString(length=255), existing_nullable=nullable)
    box = _box()
    if box is None:
        return  # encrypted lazily on read (module docstring)
    from core.secretbox import is_encrypted

    for tenant, secret, previous in _rows():
        ctx = f"webhook_secrets:{tenant}"
        if is_encrypted(secret) and (previous is None or is_encrypted(previous)):
            continue
        _write(tenant, secret if is_encrypted(secret) else box.encrypt(secret, ctx),
               previous if previous is None or is_encrypted(previous) else box.encrypt(previous, ctx))


def downgrade() -> None:
    from core.secretbox import is_encrypted

    rows = [r for r in _rows() if is_encrypted(r[1]) or is_encrypted(r[2])]
    if rows:
        box = _box()
        if box is None:
            raise RuntimeError("webhook secrets are encrypted and no key is set: set GENROUTE_SECRET_KEY "
                               "(or GENROUTE_WEBHOOK_ENCRYPTION_KEYS) to downgrade, so they can be stored in plaintext again")
        for tenant, secret, previous in rows:
            ctx = f"webhook_secrets:{tenant}"
            _write(tenant, box.decrypt(secret, ctx), box.decrypt(previous, ctx) if previous else None)
    with op.batch_alter_table("webhook_secrets") as b:
        for name, nullable in _COLUMNS:
            b.alter_column(name, existing_type=sqlmodel.sql.sqltypes.AutoString(length=255),
                           type_=sqlmodel.sql.sqltypes.AutoString(length=100), existing_nullable=nullable)
