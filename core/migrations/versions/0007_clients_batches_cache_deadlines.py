"""batches, Replicate-style webhooks, Cancel-After and time-to-start deadlines, priorities,
the result cache (cached jobs share their source's stored outputs)

Revision ID: 0007
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0007"
down_revision = "0005"
branch_labels = None
depends_on = None

_JOB_COLUMNS: list[tuple[str, Callable[[], sa.Column[Any]]]] = [
    ("webhook_format", lambda: sa.Column("webhook_format", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True)),
    ("cancel_after_at", lambda: sa.Column("cancel_after_at", sa.DateTime(timezone=True), nullable=True)),
    ("start_by_at", lambda: sa.Column("start_by_at", sa.DateTime(timezone=True), nullable=True)),
    ("priority", lambda: sa.Column("priority", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True)),
    ("batch_id", lambda: sa.Column("batch_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True)),
    ("cached", lambda: sa.Column("cached", sa.Boolean(), nullable=False, server_default=sa.false())),
    ("cache_key", lambda: sa.Column("cache_key", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)),
    ("cached_from", lambda: sa.Column("cached_from", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True)),
]


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("tenant", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("key_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("rejected", sa.Integer(), nullable=False),
        sa.Column("webhook_url", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_batches_tenant_id", "batches", ["tenant", "id"])
    op.create_index("ix_batches_completed_at", "batches", ["completed_at"])
    with op.batch_alter_table("jobs") as b:
        for _, make in _JOB_COLUMNS:
            b.add_column(make())
        b.create_index("ix_jobs_batch_id", ["batch_id"])
        b.create_index("ix_jobs_cancel_after_at", ["cancel_after_at"])
        b.create_index("ix_jobs_start_by_at", ["start_by_at"])
        b.create_index("ix_jobs_tenant_cache_key", ["tenant", "cache_key"])
    with op.batch_alter_table("api_keys") as b:
        b.add_column(sa.Column("default_priority", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True))
        b.add_column(sa.Column("max_priority", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True))
        b.add_column(sa.Column("cache_by_default", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_index("ix_assets_sha256", "assets", ["sha256"])


def downgrade() -> None:
    op.drop_index("ix_assets_sha256", table_name="assets")
    with op.batch_alter_table("api_keys") as b:
        b.drop_column("cache_by_default")
        b.drop_column("max_priority")
        b.drop_column("default_priority")
    with op.batch_alter_table("jobs") as b:
        b.drop_index("ix_jobs_tenant_cache_key")
        b.drop_index("ix_jobs_start_by_at")
        b.drop_index("ix_jobs_cancel_after_at")
        b.drop_index("ix_jobs_batch_id")
        for name, _ in reversed(_JOB_COLUMNS):
            b.drop_column(name)
    op.drop_index("ix_batches_completed_at", table_name="batches")
    op.drop_index("ix_batches_tenant_id", table_name="batches")
    op.drop_table("batches")
