"""What a tenant is told of a failure a provider caused (DESIGN.md §12).

A provider's error body is written for its account holder, the operator: OpenAI echoes
the tail of the operator's key, a 402 tells the account's billing state, a gateway's 502
names the upstream hosts it tried. So a tenant gets the stable error code and a cleaned
message; the provider's own words and body stay with the operator (the job's
`error.details.provider`, shown on the admin routes only, and the worker's log line).

    operator's fault (bad key, no credits, wrong model)  a fixed sentence: nothing of the answer
    provider trouble with an HTTP status (5xx, 429)      "<provider> answered HTTP 503" and our own note
    everything else (the input, moderation, a failed     the message, scrubbed: no keys (masked or
    task, a refused URL)                                 not), no URLs or internal host names,
                                                         at most 500 characters
    details                                              only the keys meant for the tenant (where,
                                                         what is allowed, moderation stage/reasons)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core import logs
from core.errors import Fault, ProviderError, ProviderErrorKind

PRIVATE = "provider"  # the key under error_detail that only operators see
MAX_MESSAGE = 500
# detail keys a tenant may see: where the problem is and what would be accepted
_PUBLIC_KEYS = frozenset({"loc", "allowed", "stage", "reasons", "fetch", "reason", "provider_status", "status"})

_OPERATOR_TEXT = {
    ProviderErrorKind.auth: "the provider refused this deployment's credentials; this is not your request's fault, "
                            "the operator has to fix the deployment",
    ProviderErrorKind.quota: "the provider's account behind this deployment cannot take work right now; this is not "
                             "your request's fault, the operator has to fix the deployment",
}
_MISCONFIGURED = ("the deployment is misconfigured at the provider (model or base URL); this is not your request's "
                  "fault, the operator has to fix the deployment")
_ANSWERED = re.compile(r"^(?P<who>[\w./-]{1,60}) answered (?P<status>\d{3})\b")
_URL = re.compile(r"\b(?:https?|wss?|gs|s3)://[^\s\"'<>)\]]+", re.IGNORECASE)
# keys the provider masked before echoing them (OpenAI: "sk-abc12***********wxyz"), and
# long opaque tokens: neither is the tenant's to see
_MASKED = re.compile(r"[A-Za-z0-9_.-]*\*{3,}[A-Za-z0-9_.-]*")
_ASSIGNED = re.compile(r"(?i)\b(token|access_token|api[_-]?key|key|secret|password|signature|sig|credential)(\s*[=:]\s*)[^\s,;&\"']+")
_INTERNAL_HOST = re.compile(r"\b(?:[A-Za-z0-9-]+\.)+(?:internal|local|lan|corp|intranet|svc)\b", re.IGNORECASE)
_KEYISH = re.compile(r"\b(?:sk|pk|rk|key|gr|r8|whsec|fal|AIza)[-_][A-Za-z0-9_-]{6,}|\bAIza[A-Za-z0-9_-]{20,}")


@dataclass(frozen=True, slots=True)
class Disclosed:
    message: str  # for the tenant
    detail: Any  # for the row: the tenant's part, and the provider's under PRIVATE


def scrub(text: str) -> str:
    """A provider's words made fit for a tenant: no secrets, masked keys or URLs, short."""
    text = logs.redact(text)
    text = _URL.sub("[url]", text)
    text = _INTERNAL_HOST.sub("[host]", text)
    text = _ASSIGNED.sub(r"\1\2[redacted]", text)
    text = _MASKED.sub("[redacted]", text)
    text = _KEYISH.sub("[redacted]", text)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def public_detail(detail: Any) -> Any:
    """The keys of a detail a tenant may see (None when nothing is left)."""
    if not isinstance(detail, Mapping):
        return None
    out = {k: detail[k] for k in detail if k in _PUBLIC_KEYS}
    if isinstance(out.get("reasons"), list):
        out["reasons"] = [scrub(str(r)) for r in out["reasons"]]
    return out or None


def _stored(message: str, detail: Any, public: Any) -> Any:
    """What the row keeps: the tenant's detail, and the provider's full words for operators."""
    private = {"message": message, "detail": detail}
    if isinstance(public, dict):
        return {**public, PRIVATE: private}
    return {PRIVATE: private}


def for_tenant(message: str, *, kind: ProviderErrorKind | None = None, fault: Fault | None = None,
               status: int | None = None) -> str:
    """The tenant's message for a provider failure (see the module's table)."""
    if kind in _OPERATOR_TEXT:
        return _OPERATOR_TEXT[kind]
    if fault is Fault.operator:
        return _MISCONFIGURED
    m = _ANSWERED.match(message)
    if m and (status is None or status >= 429):
        return f"{m['who']} answered HTTP {m['status']}; the provider's own message is kept for the operator"
    return scrub(message)


def of_provider_error(exc: ProviderError) -> Disclosed:
    status = exc.detail.get("status") if isinstance(exc.detail, Mapping) else None
    message = for_tenant(exc.message, kind=exc.kind, fault=exc.fault, status=status if isinstance(status, int) else None)
    return Disclosed(message, _stored(exc.message, exc.detail, public_detail(exc.detail)))


def of_failure(message: str, detail: Any = None) -> Disclosed:
    """A failure told as a message (an adapter's Failed, storage, our own): scrubbed."""
    return Disclosed(scrub(message), _stored(message, detail, public_detail(detail)) if detail is not None or scrub(message) != message else None)


def without_private(detail: Any) -> Any:
    """A stored error detail as a tenant sees it."""
    if isinstance(detail, Mapping) and PRIVATE in detail:
        rest = {k: v for k, v in detail.items() if k != PRIVATE}
        return rest or None
    return detail
