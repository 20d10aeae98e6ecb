"""Usage of calls served inline by the API (chat completions): tokens, cost, deployment.

A call is recorded once, after its response is done (the last byte of a stream sent, or
the client gone), so recording never delays the first byte; its hold is settled (or
released) in the same batch, so usage and money never disagree:

    chat route ──► response finished ──► UsageWriter.add ──► batched INSERT into usage_records
                                                             + billing entries, tenant sums
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from typing import Any

from sqlalchemy import insert

from core.billing.ledger import Close
from core.billing.ledger import close as billing_close
from core.billing.pricing import CHARS_PER_TOKEN
from core.db import Sessions
from core.models import UsageRecord, table_of, utcnow

log = logging.getLogger("genroute.usage")
USAGE = table_of(UsageRecord)


def count_tokens(text: str) -> int:
    """A rough count for text a provider did not count for us."""
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


def prompt_text(messages: Any) -> str:
    out: list[str] = []
    for m in messages if isinstance(messages, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "\n".join(out)


def tokens_of(usage: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an OpenAI `usage` object, None when absent."""
    if not usage:
        return None
    try:
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (TypeError, ValueError):
        return None


async def record_usage(sessions: Sessions, record: UsageRecord, close: Close | None = None) -> None:
    async with sessions() as s:
        s.add(record)
        if close is not None:
            await billing_close(s, [close])
        await s.commit()


class UsageWriter:
    """Buffers usage rows and writes them in batches, one multi-row INSERT at a time, off
    the request path: a chat call costs a queue append, not an ORM session and a commit.

    Rows wait at most `interval` seconds. `close()` writes what is left (the API's
    shutdown calls it), so an orderly stop loses nothing; a crash loses at most one
    interval's rows, which the trade for ~1 ms of CPU per call accepts.
    """

    def __init__(self, sessions: Sessions, *, interval: float = 0.05, max_batch: int = 500) -> None:
        self.sessions = sessions
        self.interval = interval
        self.max_batch = max_batch
        self._rows: list[dict[str, Any]] = []
        self._closes: list[Close] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def add(self, record: UsageRecord, close: Close | None = None) -> None:
        if record.created_at is None:  # column defaults do not apply to explicit values
            record.created_at = utcnow()
        self._rows.append({c.name: getattr(record, c.key) for c in USAGE.columns})
        if close is not None:
            self._closes.append(close)
        self._wake.set()

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            await asyncio.sleep(self.interval)  # let a batch gather
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        while self._rows or self._closes:
            batch, self._rows = self._rows[: self.max_batch], self._rows[self.max_batch :]
            closes, self._closes = self._closes[: self.max_batch], self._closes[self.max_batch :]
            try:
                async with self.sessions() as s:
                    if batch:
                        await s.exec(insert(USAGE), params=batch)
                    await billing_close(s, closes)
                    await s.commit()
            except Exception:  # keep serving; the rows are logged, not retried forever (a lost
                # hold's release is redone by the reconciler's stale-hold sweep)
                log.exception("could not write %d usage rows and %d billing entries", len(batch), len(closes))

    async def close(self) -> None:
        """Write what is buffered. The loop is woken to finish its flush, not cancelled:
        a cancel mid-INSERT would lose the batch it had taken."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=10)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        await self.flush()

