"""Table models. Clients never see these directly: core/schemas.py holds the public shapes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Column, DateTime, Dialect, Index, Integer, Table, UniqueConstraint, false
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps are always aware UTC in Python. SQLite keeps no zone, so store UTC
    there as naive and put the zone back on read; PostgreSQL keeps timestamptz."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ts(**kw: Any) -> Any:
    return Field(sa_column=Column(UTCDateTime(), **kw))


def _money(nullable: bool = False) -> Any:
    """Micro-USD (1 USD = 1,000,000): integers, never floats, so sums are exact."""
    return Field(default=None if nullable else 0, sa_column=Column(BigInteger, nullable=nullable, default=None if nullable else 0))


class Tenant(SQLModel, table=True):
    """Owns keys, jobs, assets, webhooks and a budget. With a budget, `spent` and `held` are the
    sums of the tenant's billing entries, kept in step with them in the same transactions, so
    the budget check is one conditional UPDATE; without one they are not kept (0) and the
    entries are summed when asked (core/billing/ledger.py). `genroute billing audit` recomputes them."""

    __tablename__ = "tenants"

    id: str = Field(primary_key=True, max_length=100)
    name: str = Field(max_length=200)
    budget: int | None = _money(nullable=True)  # spend cap; None: no cap
    spent: int = _money()  # settled (kept only while the tenant has a budget)
    held: int = _money()  # held by work not finished yet (likewise)
    created_at: datetime = _ts(nullable=False, default=utcnow)
    updated_at: datetime = _ts(nullable=False, default=utcnow)


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=40)
    tenant: str = Field(index=True, max_length=100)
    name: str = Field(max_length=100)
    prefix: str = Field(max_length=16)  # the first characters, to tell keys apart in lists
    key_hash: str = Field(unique=True, max_length=64)  # sha256 hex; the key itself is never stored
    created_at: datetime = _ts(nullable=False, default=utcnow)
    revoked_at: datetime | None = _ts(nullable=True)
    # issue 6: admin keys, scopes and per-key limits (core/keys.py)
    is_admin: bool = False
    # {"models": [...], "modalities": [...]}: the key may use a model named in either; None: any
    scopes: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    rpm: int | None = None  # generation requests per sliding minute, across every API process
    max_concurrency: int | None = None  # its jobs and calls in flight at once
    queue_when_busy: bool = True  # over max_concurrency: False answers 429 instead of queueing
    expires_at: datetime | None = _ts(nullable=True)
    # issue 14: a job's priority when it names none, and the highest it may ask for
    default_priority: str | None = Field(default=None, max_length=8)
    max_priority: str | None = Field(default=None, max_length=8)
    cache_by_default: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, server_default=false()))


class Job(SQLModel, table=True):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_tenant_id", "tenant", "id"),
        Index("ix_jobs_status_updated", "status", "updated_at"),
        Index("ix_jobs_batch_id", "batch_id"),
        Index("ix_jobs_cancel_after_at", "cancel_after_at"),
        Index("ix_jobs_start_by_at", "start_by_at"),
        Index("ix_jobs_tenant_cache_key", "tenant", "cache_key"),
    )

    id: str = Field(primary_key=True, max_length=40)
    tenant: str = Field(max_length=100)
    model: str = Field(max_length=200)
    modality: str = Field(max_length=16)
    input: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column("metadata", JSON, nullable=False))

    status: str = Field(max_length=16)
    version: int = 0  # bumped by every write; the compare-and-set guard
    progress: float = 0.0
    progress_message: str | None = Field(default=None, max_length=500)
    queue_position: int | None = None

    deployment: str | None = Field(default=None, max_length=200)
    attempt: int = 0  # number of provider submits started
    # one entry per submit: {deployment, model, started_at, duration_ms, error: {code, message} | None}
    attempts: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False, default=list))
    provider_handle: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    poll_seq: int = 0  # which poll_job may run next; a stale duplicate sees a newer seq and stops
    poll_errors: int = 0
    next_poll_at: datetime | None = _ts(nullable=True)

    error_code: str | None = Field(default=None, max_length=40)
    error_message: str | None = Field(default=None, max_length=2000)
    error_detail: Any | None = Field(default=None, sa_column=Column(JSON, nullable=True))

    idempotency_key: str | None = Field(default=None, max_length=255)
    request_hash: str | None = Field(default=None, max_length=64)

    # billing (core/billing/ledger.py): the key that submitted it, the hold taken at submit and
    # what was settled at the end (None while held; 0 when released)
    key_id: str | None = Field(default=None, max_length=40)
    cost_held: int | None = _money(nullable=True)
    cost_settled: int | None = _money(nullable=True)

    # events and webhooks (core/events.py, core/webhooks.py)
    event_seq: int = 0  # seq of the job's last event; allocated by the ledger in the same UPDATE
    webhook_url: str | None = Field(default=None, max_length=2000)
    webhook_events: list[str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    webhook_format: str | None = Field(default=None, max_length=16)  # "replicate": Replicate's events and bodies

    # issue 14: deadlines (workers/deadlines.py), priority, batches, the result cache (core/cache.py)
    cancel_after_at: datetime | None = _ts(nullable=True)  # Cancel-After: canceled (reason deadline) if not done by then
    start_by_at: datetime | None = _ts(nullable=True)  # start_within_seconds: ended unbilled if still waiting then
    priority: str | None = Field(default=None, max_length=8)  # high | normal | low
    batch_id: str | None = Field(default=None, max_length=40)
    request_id: str | None = Field(default=None, max_length=128)  # the submit's X-Request-Id, for the worker's lines
    cached: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, server_default=false()))
    cache_key: str | None = Field(default=None, max_length=64)  # sha256 of (model, input) when cacheable
    cached_from: str | None = Field(default=None, max_length=40)  # the job whose outputs a cached job shares

    created_at: datetime = _ts(nullable=False, default=utcnow)
    updated_at: datetime = _ts(nullable=False, default=utcnow)
    started_at: datetime | None = _ts(nullable=True)
    finished_at: datetime | None = _ts(nullable=True)
    deadline_at: datetime | None = _ts(nullable=True)


class Asset(SQLModel, table=True):
    """One stored output of a job. Blobs are never deleted by genroute; a job served from the
    result cache gets its own Asset rows naming the same `key` (one blob, several jobs)."""

    __tablename__ = "assets"
    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_assets_job_index"), Index("ix_assets_sha256", "sha256"))

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", index=True, max_length=40)
    index: int
    key: str = Field(max_length=500)
    content_type: str = Field(max_length=100)
    bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    sha256: str = Field(max_length=64)
    width: int | None = None
    height: int | None = None
    duration_seconds: float | None = None
    thumbnail_key: str | None = Field(default=None, max_length=500)
    created_at: datetime = _ts(nullable=False, default=utcnow)


class Batch(SQLModel, table=True):
    """Up to 1,000 jobs submitted in one call (api/batches.py). Its jobs carry `batch_id`;
    `completed_at` is set, and the batch webhook planned, once every job has ended
    (workers/batches.py)."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_tenant_id", "tenant", "id"), Index("ix_batches_completed_at", "completed_at"))

    id: str = Field(primary_key=True, max_length=40)
    tenant: str = Field(max_length=100)
    key_id: str | None = Field(default=None, max_length=40)
    total: int  # jobs accepted
    rejected: int  # items refused at submit (never became jobs)
    webhook_url: str | None = Field(default=None, max_length=2000)
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column("metadata", JSON, nullable=False))
    created_at: datetime = _ts(nullable=False, default=utcnow)
    completed_at: datetime | None = _ts(nullable=True)


class WebhookEndpoint(SQLModel, table=True):
    """A tenant's default webhook target: every job of the tenant reports `events` to it."""

    __tablename__ = "webhook_endpoints"

    id: str = Field(primary_key=True, max_length=40)
    tenant: str = Field(index=True, max_length=100)
    url: str = Field(max_length=2000)
    events: list[str] = Field(sa_column=Column(JSON, nullable=False))
    description: str | None = Field(default=None, max_length=500)
    created_at: datetime = _ts(nullable=False, default=utcnow)


class WebhookSecret(SQLModel, table=True):
    """A tenant's signing secret (`whsec_...`). After a rotation the previous one keeps
    signing too (both signatures are sent) until `previous_expires_at`."""

    __tablename__ = "webhook_secrets"

    tenant: str = Field(primary_key=True, max_length=100)
    # encrypted at rest (core/secretbox.py): "enc:v1:{kid}:{base64url}", ~120 characters
    secret: str = Field(max_length=255)
    previous_secret: str | None = Field(default=None, max_length=255)
    previous_expires_at: datetime | None = _ts(nullable=True)
    created_at: datetime = _ts(nullable=False, default=utcnow)
    rotated_at: datetime | None = _ts(nullable=True)


class WebhookDelivery(SQLModel, table=True):
    """One event to one URL, with its attempts. Written in the transaction of the
    transition that caused it; `deliver_webhook` sends it (workers/webhooks.py)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_chain", "job_id", "url", "seq"),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_tenant_id", "tenant", "id"),
    )

    id: str = Field(primary_key=True, max_length=40)
    tenant: str = Field(max_length=100)
    job_id: str = Field(max_length=40)
    endpoint_id: str | None = Field(default=None, max_length=40)  # None: the job's own webhook_url
    url: str = Field(max_length=2000)
    event_id: str = Field(max_length=80)
    event_type: str = Field(max_length=40)
    seq: int
    payload: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    status: str = Field(default="pending", max_length=16)  # pending | delivered | exhausted
    attempt_count: int = 0
    next_attempt_at: datetime | None = _ts(nullable=True)  # also the lease of an attempt in flight
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, max_length=500)
    attempts: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = _ts(nullable=False, default=utcnow)
    updated_at: datetime = _ts(nullable=False, default=utcnow)
    delivered_at: datetime | None = _ts(nullable=True)


class UsageRecord(SQLModel, table=True):
    """One finished piece of work, against the key and tenant: an inline chat call (written
    after its response is done, core/billing/usage.py) or a job (written by its terminal transition,
    kind = its modality). GET /v1/usage sums these."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_records_tenant_created", "tenant", "created_at"),
        Index("ix_usage_records_tenant_key", "tenant", "key_id", "created_at"),
    )

    id: str = Field(primary_key=True, max_length=40)  # the request id (also the slot's lease id)
    tenant: str = Field(max_length=100)
    key_id: str = Field(max_length=40)
    kind: str = Field(default="chat", max_length=16)
    model: str = Field(max_length=200)  # the catalog model asked for
    deployment: str | None = Field(default=None, max_length=200)  # the one that answered (None: none did)
    status: str = Field(max_length=16)  # succeeded | failed | incomplete (a stream that broke or was dropped)
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))  # micro-USD charged; None: unpriced
    # one entry per deployment tried: {deployment, model, started_at, duration_ms, error: {code, message} | None}
    attempts: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    error_code: str | None = Field(default=None, max_length=40)
    duration_ms: int = 0
    created_at: datetime = _ts(nullable=False, default=utcnow)


class BillingEntry(SQLModel, table=True):
    """The append-only money ledger. Per subject (a job, or an inline chat call): one `hold`
    at submit, then one `settle` (the actual cost) or one `release` (nothing charged). The
    unique (subject_id, kind) makes a second settle or release impossible, whatever retries."""

    __tablename__ = "billing_entries"
    __table_args__ = (
        UniqueConstraint("subject_id", "kind", name="uq_billing_entries_subject_kind"),
        Index("ix_billing_entries_tenant_id", "tenant", "id"),
        Index("ix_billing_entries_kind_created", "kind", "created_at"),  # the stale-hold sweep
    )

    id: int | None = Field(default=None, sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True))
    tenant: str = Field(max_length=100)
    key_id: str | None = Field(default=None, max_length=40)
    subject_id: str = Field(max_length=40)
    kind: str = Field(max_length=16)  # hold | settle | release
    amount: int = _money()  # micro-USD, >= 0 (a release carries the amount it frees)
    model: str | None = Field(default=None, max_length=200)
    deployment: str | None = Field(default=None, max_length=200)
    basis: str | None = Field(default=None, max_length=40)  # how a settle was priced (core/billing/pricing.py)
    created_at: datetime = _ts(nullable=False, default=utcnow)


def table_of(model: type[SQLModel]) -> Table:
    """The Core table behind a table model, for the bulk statements that skip the ORM (a third
    of its CPU). SQLModel sets `__table__` when the class is made; its type hints omit it."""
    table: Table = model.__table__  # type: ignore[attr-defined]
    return table
