"""Shapes clients see: job input per modality, job create/public, assets, models.

Table models live in core/models.py; nothing here is a table, so no column leaks out.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

Prompt = Annotated[str, StringConstraints(min_length=1, max_length=4000, strip_whitespace=True)]
LongText = Annotated[str, StringConstraints(max_length=4000)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
SIZE_RE = re.compile(r"^(\d{2,5})x(\d{2,5})$")
RATIO_RE = re.compile(r"^(\d{1,2}):(\d{1,2})$")
# an input image: an https/http URL or a data: URI with base64 bytes
ImageRef = Annotated[str, StringConstraints(min_length=1, max_length=7_000_000, pattern=r"^(https?://|data:image/)")]


def check_ratio(v: str) -> str:
    m = RATIO_RE.match(v)
    if not m or int(m[1]) == 0 or int(m[2]) == 0:
        raise ValueError("aspect_ratio must look like 16:9")
    return v


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider_params: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to the provider as-is (the local provider reads latency_seconds, progress_steps, fail).",
    )

    @field_validator("provider_params")
    @classmethod
    def _small(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(v) > 64:
            raise ValueError("at most 64 provider_params")
        return v


class ImageInput(_Input):
    prompt: Prompt
    negative_prompt: LongText | None = None
    size: str | None = Field(default=None, description="WIDTHxHEIGHT, e.g. 1024x1024")
    aspect_ratio: str | None = Field(default=None, description="W:H, e.g. 16:9")
    n: Annotated[int, Field(ge=1, le=10)] = 1
    seed: Seed | None = None
    output_format: Literal["png", "jpeg", "webp"] = "png"
    input_images: list[ImageRef] = Field(default_factory=list, max_length=16)

    @field_validator("size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is not None:
            m = SIZE_RE.match(v)
            if not m or not (16 <= int(m[1]) <= 8192 and 16 <= int(m[2]) <= 8192):
                raise ValueError("size must look like 1024x1024 (16..8192 on each side)")
        return v

    @field_validator("aspect_ratio")
    @classmethod
    def _ratio(cls, v: str | None) -> str | None:
        return None if v is None else check_ratio(v)

    @model_validator(mode="after")
    def _one_of(self) -> ImageInput:
        if self.size and self.aspect_ratio:
            raise ValueError("give size or aspect_ratio, not both")
        return self


class VideoInput(_Input):
    prompt: Prompt
    negative_prompt: LongText | None = None
    duration_seconds: Annotated[float, Field(gt=0, le=120)] = 4
    aspect_ratio: str = "16:9"
    resolution: str = "720p"
    fps: Annotated[int, Field(ge=1, le=60)] | None = None
    seed: Seed | None = None
    image: ImageRef | None = Field(default=None, description="first frame, for image-to-video")

    @field_validator("aspect_ratio")
    @classmethod
    def _ratio(cls, v: str) -> str:
        return check_ratio(v)


class AudioInput(_Input):
    text: LongText | None = None
    prompt: Prompt | None = None
    voice: Annotated[str, StringConstraints(max_length=100)] | None = None
    format: Literal["wav", "mp3", "flac", "opus", "aac", "pcm"] = "wav"
    duration_seconds: Annotated[float, Field(gt=0, le=600)] | None = None
    seed: Seed | None = None

    @model_validator(mode="after")
    def _text_or_prompt(self) -> AudioInput:
        if not (self.text or self.prompt):
            raise ValueError("give text (speech) or prompt (music/sound)")
        return self


class ChatMessage(BaseModel):
    """One OpenAI chat message; content is text or OpenAI content parts."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, StringConstraints(max_length=200_000)] | list[dict[str, Any]] | None = None


class TextInput(_Input):
    """A chat completion run as a job (batch-style): OpenAI's request fields, minus streaming.
    The job's output is the chat.completion JSON."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None


INPUT_SCHEMAS: dict[str, type[_Input]] = {"image": ImageInput, "video": VideoInput, "audio": AudioInput, "text": TextInput}

EventName = Literal["job.queued", "job.started", "job.progress", "job.output", "job.succeeded", "job.failed", "job.canceled"]

Priority = Literal["high", "normal", "low"]
PRIORITY_RANK: dict[str, int] = {"high": 0, "normal": 1, "low": 2}  # lower starts first

Metadata = dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=500)] | int | float | bool | None]


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    input: dict[str, Any]
    metadata: Metadata = Field(default_factory=dict)
    webhook_url: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = Field(
        default=None, description="http(s) URL called (signed, Standard Webhooks) with this job's events"
    )
    webhook_events: list[EventName] | None = Field(
        default=None, max_length=7, description="events sent to webhook_url (default: the terminal ones)"
    )
    cache: bool | None = Field(
        default=None,
        description="serve from the result cache: an identical earlier job of yours (same model, input and an "
        "explicit seed) that succeeded within the cache TTL answers at once, cost 0 (default: the key's or model's)",
    )
    priority: Priority | None = Field(default=None, description="high | normal | low (default: the key's, else normal)")
    start_within_seconds: Annotated[int, Field(ge=1, le=86400)] | None = Field(
        default=None, description="end the job, unbilled, if it has not started within this many seconds"
    )

    @field_validator("metadata")
    @classmethod
    def _few(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(v) > 32:
            raise ValueError("at most 32 metadata keys")
        return v

    @model_validator(mode="after")
    def _events_need_url(self) -> JobCreate:
        if self.webhook_events is not None and self.webhook_url is None:
            raise ValueError("webhook_events needs a webhook_url")
        return self


class AssetPublic(BaseModel):
    index: int
    url: str
    content_type: str
    bytes: int
    sha256: str
    width: int | None = None
    height: int | None = None
    duration_seconds: float | None = None
    thumbnail_url: str | None = None


class ProgressPublic(BaseModel):
    fraction: float
    message: str | None = None


class ErrorPublic(BaseModel):
    code: str
    message: str
    details: Any = None


class AttemptPublic(BaseModel):
    """One submit of the job to a deployment: where, how long, and how it failed if it did."""

    deployment: str
    model: str | None = None  # the model it served: the requested one, or a fallback
    started_at: datetime | None = None
    duration_ms: int | None = None
    error: ErrorPublic | None = None


class CostPublic(BaseModel):
    """Micro-USD (1 USD = 1,000,000). `held` is taken at submit; `settled` is what the job
    was charged at its end (0 when the hold was released: failures are never charged)."""

    unit: Literal["micro_usd"] = "micro_usd"
    status: Literal["held", "settled", "released"]
    held: int
    settled: int | None = None


class JobPublic(BaseModel):
    id: str
    object: Literal["job"] = "job"
    tenant: str | None = None
    model: str
    modality: str
    status: str
    input: dict[str, Any]
    metadata: dict[str, Any]
    progress: ProgressPublic
    queue_position: int | None = None
    eta_seconds: float | None = None  # while waiting for a slot: from the deployment's recent task durations
    outputs: list[AssetPublic]
    error: ErrorPublic | None = None
    deployment: str | None = None
    attempt: int
    attempts: list[AttemptPublic] = Field(default_factory=list)
    idempotency_key: str | None = None
    cost: CostPublic | None = None  # None: submitted before billing existed
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline_at: datetime | None = None
    cancel_after_at: datetime | None = None  # Cancel-After: canceled (error.details.reason "deadline") if not done by then
    start_by_at: datetime | None = None  # start_within_seconds: ended unbilled if not started by then
    priority: str = "normal"
    batch_id: str | None = None
    cached: bool = False  # served from the result cache: outputs shared with `cached_from`, cost 0
    cached_from: str | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
    next_cursor: str | None = None


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    modality: str
    description: str | None = None
    parameters: dict[str, Any]
    capabilities: dict[str, Any]
    providers: list[str]
    strategy: str = "priority"
    # each deployment in routing order: name, provider (adapter), price in micro-USD
    deployments: list[dict[str, Any]] = Field(default_factory=list)
    fallback_models: list[str] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]


# webhooks --------------------------------------------------------------------------------
DEFAULT_WEBHOOK_EVENTS: tuple[EventName, ...] = ("job.succeeded", "job.failed", "job.canceled")


class WebhookEndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, StringConstraints(min_length=1, max_length=2000)]
    events: list[EventName] = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS), min_length=1, max_length=7
    )
    description: Annotated[str, StringConstraints(max_length=500)] | None = None


class WebhookEndpointPublic(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    description: str | None = None
    created_at: datetime


class WebhookEndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEndpointPublic]


class WebhookSecretPublic(BaseModel):
    object: Literal["webhook_secret"] = "webhook_secret"
    secret: str
    previous_secret: str | None = None
    previous_expires_at: datetime | None = None
    rotated_at: datetime | None = None


class WebhookAttemptPublic(BaseModel):
    at: datetime
    status_code: int | None = None
    latency_ms: int
    error: str | None = None


class WebhookDeliveryPublic(BaseModel):
    id: str
    object: Literal["webhook_delivery"] = "webhook_delivery"
    job_id: str
    endpoint_id: str | None = None
    url: str
    event_id: str
    event_type: str
    seq: int
    status: str
    attempt_count: int
    next_attempt_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    attempts: list[WebhookAttemptPublic]
    created_at: datetime
    delivered_at: datetime | None = None


class WebhookDeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookDeliveryPublic]
    next_cursor: str | None = None


# usage (GET /v1/usage, api/usage.py) ---------------------------------------------------------
class UsageGroup(BaseModel):
    group: str | None = None  # the model, key id or day (YYYY-MM-DD); absent in `total`
    requests: int
    succeeded: int
    failed: int
    canceled: int
    incomplete: int  # streams that broke or were dropped (charged for what was generated)
    duration_ms_total: int
    duration_ms_avg: int
    prompt_tokens: int
    completion_tokens: int
    cost: int  # micro-USD charged (settled)


class Balance(BaseModel):
    budget: int | None
    spent: int
    held: int
    available: int | None


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    tenant: str
    unit: Literal["micro_usd"] = "micro_usd"
    start: datetime
    end: datetime
    group_by: str
    data: list[UsageGroup]
    total: UsageGroup
    balance: Balance


# events (GET /v1/jobs/{id}/events, api/events.py; core/events.py makes them) ----------------
class EventPublic(BaseModel):
    """One job event as the SSE/websocket streams and webhooks carry it."""

    id: str
    seq: int
    sub: int = 0  # > 0: a progress sub-event published without a row write (core/events.py)
    job_id: str
    type: str
    at: datetime
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.type in ("job.succeeded", "job.failed", "job.canceled")
