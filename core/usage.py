"""Usage of calls served inline by the API (chat completions): tokens, cost, deployment.

A call is recorded once, after its response is done (the last byte of a stream sent, or
the client gone), so recording never delays the first byte:

    chat route ──► response finished ──► record_usage(...) ──► one INSERT into usage_records
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from core.catalog import Price
from core.db import Sessions
from core.models import UsageRecord

CHARS_PER_TOKEN = 4  # as core.router estimates: used only when a provider reports no usage


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


def chat_cost(price: Price | None, prompt_tokens: int, completion_tokens: int) -> int | None:
    """Micro-USD for one chat call at `price` (None: the deployment has no price)."""
    if price is None:
        return None
    total = price.per_request + price.per_1k_input_tokens * prompt_tokens / 1000 + price.per_1k_output_tokens * completion_tokens / 1000
    return math.ceil(total)


async def record_usage(sessions: Sessions, record: UsageRecord) -> None:
    async with sessions() as s:
        s.add(record)
        await s.commit()
