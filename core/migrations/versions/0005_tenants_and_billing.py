"""tenants, admin and scoped keys with per-key limits, the billing ledger, job costs

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("budget", sa.BigInteger(), nullable=True),
        sa.Column("spent", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("held", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    # every tenant named so far gets a row (no budget: nothing changes for it)
    op.execute(
        "INSERT INTO tenants (id, name, budget, spent, held, created_at, updated_at) "
        "SELECT t, t, NULL, 0, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP FROM "
        "(SELECT tenant AS t FROM api_keys UNION SELECT tenant FROM jobs) AS named"
    )
    op.create_table(
        "billing_entries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("tenant", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("key_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
        sa.Column("subject_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("model", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
        sa.Column("deployment", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
        sa.Column("basis", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("subject_id", "kind", name="uq_billing_entries_subject_kind"),
    )
    op.create_index("ix_billing_entries_tenant_id", "billing_entries", ["tenant", "id"], unique=False)
    op.create_index("ix_billing_entries_kind_created", "billing_entries", ["kind", "created_at"], unique=False)
    with op.batch_alter_table("api_keys") as t:
        t.add_column(sa.Column("is_admin", sa.Boolean(), nullable=False, server_default=sa.false()))
        t.add_column(sa.Column("scopes", sa.JSON(), nullable=True))
        t.add_column(sa.Column("rpm", sa.Integer(), nullable=True))
        t.add_column(sa.Column("max_concurrency", sa.Integer(), nullable=True))
        t.add_column(sa.Column("queue_when_busy", sa.Boolean(), nullable=False, server_default=sa.true()))
        t.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("jobs") as t:
        t.add_column(sa.Column("key_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True))
        t.add_column(sa.Column("cost_held", sa.BigInteger(), nullable=True))
        t.add_column(sa.Column("cost_settled", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("usage_records") as t:
        t.alter_column("cost", type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=True)
    op.create_index("ix_usage_records_tenant_key", "usage_records", ["tenant", "key_id", "created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_usage_records_tenant_key", table_name="usage_records")
    with op.batch_alter_table("usage_records") as t:
        t.alter_column("cost", type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=True)
    with op.batch_alter_table("jobs") as t:
        for c in ("cost_settled", "cost_held", "key_id"):
            t.drop_column(c)
    with op.batch_alter_table("api_keys") as t:
        for c in ("expires_at", "queue_when_busy", "max_concurrency", "rpm", "scopes", "is_admin"):
            t.drop_column(c)
    op.drop_index("ix_billing_entries_kind_created", table_name="billing_entries")
    op.drop_index("ix_billing_entries_tenant_id", table_name="billing_entries")
    op.drop_table("billing_entries")
    op.drop_table("tenants")
