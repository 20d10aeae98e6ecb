"""Which jobs GET /v1/jobs lists: the query parameters, checked, turned into one WHERE.

    status, model, deployment     exact matches (deployment: the one that ran it last)
    from, to                      created_at in [from, to); ISO 8601, a zone or UTC
    q                             text in the prompt: a case-insensitive substring of
                                  input.prompt or input.text (speech); `%` and `_` are literal
    tenant                        admin keys only: another tenant's jobs, or `*` for all

The prompt filter reads the JSON column with SQLAlchemy's JSON path operators, which render
`input ->> 'prompt'` on PostgreSQL and `JSON_EXTRACT(input, '$."prompt"')` on SQLite, so the
same query runs on both without a text copy of the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import or_
from sqlmodel import col, select

from core.errors import InvalidInput, NotFound
from core.jobs.ledger import JobStatus
from core.keys import Principal
from core.models import Job

ALL_TENANTS = "*"
TEXT_FIELDS = ("prompt", "text")


def _utc(v: datetime) -> datetime:
    return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)


def _like_pattern(text: str) -> str:
    """A LIKE pattern for a literal substring (backslash escapes the wildcards)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


@dataclass(frozen=True, slots=True)
class JobFilter:
    status: JobStatus | None = None
    model: str | None = None
    deployment: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    text: str | None = None
    tenant: str | None = None

    def tenant_for(self, principal: Principal) -> str | None:
        """Whose jobs: the key's tenant; an admin may name another, or `*` (None: every tenant)."""
        if self.tenant is None or self.tenant == principal.tenant:
            return principal.tenant
        if not principal.admin:
            # another tenant does not exist for this key (as on GET /v1/usage)
            raise NotFound(f"no tenant {self.tenant[:100]!r}")
        return None if self.tenant == ALL_TENANTS else self.tenant

    def check(self) -> JobFilter:
        start = _utc(self.start) if self.start else None
        end = _utc(self.end) if self.end else None
        if start is not None and end is not None and start >= end:
            raise InvalidInput("`from` must be before `to`",
                               details=[{"loc": ["query", "from"], "msg": "not before `to`", "type": "range"}])
        text = self.text.strip() if self.text is not None else None
        if self.text is not None and not text:
            raise InvalidInput("`q` must contain some text",
                               details=[{"loc": ["query", "q"], "msg": "blank", "type": "value_error"}])
        return JobFilter(self.status, self.model or None, self.deployment or None, start, end, text, self.tenant)

    def query(self, principal: Principal) -> Any:
        tenant = self.tenant_for(principal)
        q = select(Job)
        if tenant is not None:
            q = q.where(Job.tenant == tenant)
        if self.status is not None:
            q = q.where(Job.status == self.status.value)
        if self.model:
            q = q.where(Job.model == self.model)
        if self.deployment:
            q = q.where(Job.deployment == self.deployment)
        if self.start is not None:
            q = q.where(col(Job.created_at) >= self.start)
        if self.end is not None:
            q = q.where(col(Job.created_at) < self.end)
        if self.text:
            pattern = _like_pattern(self.text)
            q = q.where(or_(*(col(Job.input)[f].as_string().ilike(pattern, escape="\\") for f in TEXT_FIELDS)))
        return q
