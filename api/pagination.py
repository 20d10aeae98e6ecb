"""Cursor pagination over ULID ids: newest first, `next_cursor` = the last id of a full page."""

from __future__ import annotations

from typing import Any

from sqlmodel import col

from core.db import Sessions


async def page(sessions: Sessions, query: Any, id_column: Any, cursor: str | None, limit: int) -> tuple[list[Any], str | None]:
    if cursor:
        query = query.where(id_column < cursor)
    query = query.order_by(col(id_column).desc()).limit(limit + 1)
    async with sessions() as s:
        rows = list((await s.exec(query)).all())
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, rows[-1].id if more and rows else None
