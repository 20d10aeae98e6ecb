"""Job priorities: `high`, `normal`, `low`. A key may set a default (used when a request
names none) and a maximum (a request above it is lowered to it, not refused, so code that
always asks for `high` keeps working on a key that may not have it).

What is stored on the job is the effective priority; the worker's wait queue starts
waiting jobs in priority order, FIFO within one (see docs/priorities.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.schemas import PRIORITY_RANK

if TYPE_CHECKING:
    from core.keys import Principal

DEFAULT = "normal"


def effective(requested: str | None, principal: Principal) -> str:
    """The priority a job gets: the request's, else the key's default, capped by the key's maximum."""
    chosen = requested or principal.default_priority or DEFAULT
    cap = principal.max_priority
    if cap is not None and PRIORITY_RANK[chosen] < PRIORITY_RANK[cap]:
        return str(cap)
    return chosen


def rank(priority: str | None) -> int:
    """0 starts first (high), 2 last (low); unknown or missing counts as normal."""
    return PRIORITY_RANK.get(priority or DEFAULT, PRIORITY_RANK[DEFAULT])
