"""OpenRouter's routing options, as a deployment sets them in the catalog (adapters/openrouter.py
sends them; core/routing/catalog.py checks them at load through `check_options`).

    models:      [fallback/model, ...]      OpenRouter tries them, in order, after the model
    provider:    {order, allow_fallbacks, only, ignore, sort, max_price, data_collection, zdr,
                  require_parameters, quantizations, enforce_distillable_text}
    modalities:  [image, text] | [image]    for image models
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_FALLBACK_MODELS = 10


class MaxPrice(BaseModel):
    """USD per million tokens (prompt, completion), per image, per request."""

    model_config = ConfigDict(extra="forbid")

    prompt: float | None = Field(default=None, ge=0)
    completion: float | None = Field(default=None, ge=0)
    image: float | None = Field(default=None, ge=0)
    request: float | None = Field(default=None, ge=0)


Slugs = list[str]


class ProviderRouting(BaseModel):
    """OpenRouter's `provider` object (openrouter.ai/docs/features/provider-routing)."""

    model_config = ConfigDict(extra="forbid")

    order: Slugs | None = None
    allow_fallbacks: bool | None = None
    require_parameters: bool | None = None
    data_collection: Literal["allow", "deny"] | None = None
    zdr: bool | None = None
    enforce_distillable_text: bool | None = None
    only: Slugs | None = None
    ignore: Slugs | None = None
    quantizations: list[Literal["int4", "int8", "fp4", "fp6", "fp8", "fp16", "bf16", "fp32", "unknown"]] | None = None
    sort: Literal["price", "throughput", "latency"] | None = None
    max_price: MaxPrice | None = None

    @field_validator("order", "only", "ignore")
    @classmethod
    def _slugs(cls, value: Slugs | None) -> Slugs | None:
        if value is not None:
            if not value or any(not s.strip() for s in value):
                raise ValueError("give a non-empty list of provider slugs (e.g. [openai, azure])")
            if len(set(value)) != len(value):
                raise ValueError("names a provider slug twice")
        return value


class Routing(BaseModel):
    """The routing options of one OpenRouter deployment (catalog `options`)."""

    model_config = ConfigDict(extra="ignore")  # the other options are the adapter's own

    models: list[str] | None = Field(default=None, min_length=1, max_length=MAX_FALLBACK_MODELS)
    provider: ProviderRouting | None = None
    modalities: list[Literal["image", "text"]] | None = None

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if any(not m.strip() for m in value):
                raise ValueError("every entry must be an OpenRouter model id (e.g. anthropic/claude-3.5-haiku)")
            if len(set(value)) != len(value):
                raise ValueError("names a model twice")
        return value

    @field_validator("modalities")
    @classmethod
    def _image(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and "image" not in value:
            raise ValueError("must include image (e.g. [image, text], or [image] for image-only models)")
        return value


def routing_of(options: Mapping[str, Any]) -> Routing:
    """The routing options, validated; ValueError names the option and what to fix."""
    try:
        return Routing.model_validate(dict(options))
    except ValidationError as exc:
        problems = []
        for e in exc.errors(include_url=False):
            where = ".".join(str(p) for p in e["loc"])
            problems.append(f"options.{where}: {e['msg'].removeprefix('Value error, ')}")
        raise ValueError("; ".join(problems)) from None
