"""Plain types shared by the worker, adapters and storage.

An adapter receives a `ProviderRequest`, answers `Done` or `Pending` from submit, and
`Pending | Done | Failed` from poll. Outputs are `OutputRef`s: bytes in hand, or a URL
(with any headers it needs) that storage streams from. Handles are JSON-able dicts so they
can be persisted on the job row before anything else happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.errors import ErrorCode


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    job_id: str
    tenant: str
    modality: str
    provider_model: str  # the deployment's model id at the provider
    input: dict[str, Any]  # normalized, validated input (see core.schemas)
    options: dict[str, Any] = field(default_factory=dict)  # deployment options from the catalog
    # where the provider may POST its completion webhook (set only for deployments that
    # are reachable from outside: catalog option `callbacks: true`); polling stays on
    callback_url: str | None = None
    callback_secret: str | None = None  # a per-job secret for providers that sign with ours (BFL)


@dataclass(frozen=True, slots=True)
class OutputRef:
    """Where an output can be read from. Exactly one of `data`, `url` and `path` is set.
    `path` is a temporary file the adapter streamed a response into (e.g. speech audio);
    storage takes ownership and deletes it after storing."""

    data: bytes | None = None
    url: str | None = None
    path: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None  # a hint; storage sniffs the bytes anyway
    role: str = "output"  # "output" or e.g. "thumbnail" for a provider-made preview

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.data, self.url, self.path)) != 1:
            raise ValueError("OutputRef needs exactly one of data, url or path")


@dataclass(frozen=True, slots=True)
class Done:
    outputs: list[OutputRef]
    handle: dict[str, Any] = field(default_factory=dict)
    # provider-reported usage and cost where known (OpenAI `usage`, BFL `cost` in credits,
    # Replicate `metrics.predict_time`): kept on the job for billing
    usage: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Pending:
    handle: dict[str, Any]
    poll_after: float  # seconds until the next poll
    progress: float | None = None  # 0..1 where known
    message: str | None = None
    queue_position: int | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    code: ErrorCode
    message: str
    detail: Any = None


@dataclass(frozen=True, slots=True)
class PollNow:
    """What an unsigned provider callback may say (verify_callback): the task moved, but the
    body is not trusted as a result. The job's next poll is made due now; only its answer counts."""

    reason: str = ""


PollResult = Pending | Done | Failed
SubmitResult = Pending | Done


def text_of(content: Any) -> str:
    """The text of a chat message's `content`: a string, or OpenAI content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""
