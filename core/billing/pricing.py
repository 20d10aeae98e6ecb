"""Prices in the units providers bill, and what a request costs before and after it runs.

Money is integer micro-USD (1 USD = 1,000,000). Sums are exact fractions, rounded up once
at the end, so a price never drifts by float error.

    submit ──► estimate_cost(price, modality, request)      the upper bound held before the work
    done   ──► actual_cost(price, ..., usage, outputs=...)   what was delivered, from the best basis:
                 provider_cost  usage.cost_credits × per_credit        (BFL, OpenRouter)
                 compute_time   usage.predict_time × per_compute_second (Replicate; fal's inference_time)
                 tokens         reported tokens × per_1k token prices    (chat, GPT Image)
                 units          images stored, seconds made, characters spoken
    chat   ──► chat_cost(price, prompt_tokens, completion_tokens, usage)   (provider_cost, else tokens)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PlainValidator, model_validator
from pydantic_core import PydanticCustomError

from core.types import text_of

CHARS_PER_TOKEN = 4  # the usual rough rule for English text with BPE tokenizers
DEFAULT_MAX_OUTPUT_TOKENS = 512  # the output bound when a chat request names no max_tokens
SPEECH_CHARS_PER_SECOND = 15  # ~150 words a minute
# When a request names no duration the provider picks one (Veo 8 s, Kling 5 s, Sora 4 s;
# music models about 30 s): hold for the longest of them.
DEFAULT_VIDEO_SECONDS = 8
DEFAULT_AUDIO_SECONDS = 30


# --- the catalog's price ------------------------------------------------------------------------


def _micros(value: Any, where: str = "") -> int:
    """Money from the catalog. Strict on purpose: a price written in dollars (0.04) is refused."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise PydanticCustomError(
        "micro_usd",
        "{where}must be a whole number of micro-USD, 0 or more (1 USD = 1000000, so $0.04 is 40000); got {value}",
        {"where": where, "value": repr(value)},
    )


def _amount(value: Any) -> int:  # one parameter: pydantic would pass `info` to a second
    return _micros(value)


def _optional_amount(value: Any) -> int | None:
    return None if value is None else _micros(value)


def _rate(keys: str, hint: str) -> PlainValidator:
    """A flat price, or a table of prices by `keys` (a regex) that must have a `default`."""
    pattern = re.compile(rf"default|{keys}")

    def check(value: Any) -> int | dict[str, int]:
        if not isinstance(value, dict):
            return _micros(value)
        for key in value:
            if not isinstance(key, str) or not pattern.fullmatch(key):
                raise PydanticCustomError(
                    "price_table_key", "{key} is not a key of this price table; use {hint}", {"key": repr(key), "hint": hint}
                )
        if "default" not in value:
            raise PydanticCustomError(
                "price_table_default", "a price table needs a `default` entry: the price when no other key matches"
            )
        return {key: _micros(v, f"{key}: ") for key, v in value.items()}

    return PlainValidator(check, json_schema_input_type=NonNegativeInt | dict[str, NonNegativeInt])


Micros = Annotated[int, PlainValidator(_amount, json_schema_input_type=NonNegativeInt)]
ImageRate = Annotated[
    int | dict[str, int],
    _rate(r"\d+x\d+(/[\w-]+)?|[A-Za-z][\w-]*", "`default`, a size (`1024x1536`), a quality (`high`) or both (`1024x1536/high`)"),
]
SecondRate = Annotated[int | dict[str, int], _rate(r"[\w-]+", "`default` or a resolution (`720p`, `1080p`)")]


class Price(BaseModel):
    """What one call costs, in micro-USD. Every component present is added, e.g.
    per_request + per_image × n. per_image and per_second take a flat price or a table
    (see `image_rate`, `second_rate`). per_credit and per_compute_second price what the
    provider reports after the run; `hold` is what to hold before it (at least)."""

    model_config = ConfigDict(extra="forbid")

    per_request: Micros = 0
    per_image: ImageRate = Field(default=0, description="flat, or by size and quality: {default, 1024x1536, high, 1024x1536/high}")
    per_second: SecondRate = Field(default=0, description="of generated video or audio; flat, or by resolution: {default, 720p}")
    per_1k_characters: Micros = Field(default=0, description="of input text (speech)")
    per_1k_input_tokens: Micros = 0
    per_1k_output_tokens: Micros = 0
    per_credit: Micros = Field(default=0, description="per provider credit, when the provider reports its cost (BFL: 10000)")
    per_compute_second: Micros = Field(default=0, description="per second of provider-reported compute (Replicate predict_time)")
    hold: Annotated[int | None, PlainValidator(_optional_amount, json_schema_input_type=NonNegativeInt | None)] = Field(
        default=None, description="held per request at least, when the cost is known only afterwards"
    )

    @model_validator(mode="after")
    def _holdable(self) -> Price:
        upfront = (self.per_request, self.per_image, self.per_second, self.per_1k_characters,
                   self.per_1k_input_tokens, self.per_1k_output_tokens)
        if (self.per_credit or self.per_compute_second) and self.hold is None and not any(map(_nonzero, upfront)):
            raise PydanticCustomError(
                "price_hold",
                "set `hold`: per_credit and per_compute_second price the work only after it ran, and nothing else "
                "here gives a price before it, so say how many micro-USD to hold per request until then",
            )
        return self

    def image_rate(self, request: Mapping[str, Any]) -> int:
        """per_image for the request's size and quality: size/quality, size, quality, default."""
        size, quality = _param(request, "size"), _param(request, "quality")
        return _lookup(self.per_image, f"{size}/{quality}" if size and quality else None, size, quality)

    def second_rate(self, request: Mapping[str, Any]) -> int:
        """per_second for the request's video resolution, else the default."""
        return _lookup(self.per_second, _param(request, "resolution"))


def _nonzero(rate: int | dict[str, int]) -> bool:
    return any(rate.values()) if isinstance(rate, dict) else rate > 0


def _lookup(rate: int | dict[str, int], *keys: str | None) -> int:
    if isinstance(rate, int):
        return rate
    return next((rate[k] for k in keys if k is not None and k in rate), rate["default"])


def _param(request: Mapping[str, Any], name: str) -> str | None:
    """A request field, or the same name in provider_params (our image schema carries quality there)."""
    params = request.get("provider_params")
    value = request.get(name) or (params.get(name) if isinstance(params, Mapping) else None)
    return value if isinstance(value, str) else None


# --- before: the hold ------------------------------------------------------------------------------


def token_estimate(modality: str, request: Mapping[str, Any]) -> tuple[int, int]:
    """(input tokens, at most this many output tokens) of a text request; (0, 0) for media."""
    if modality != "text":
        return 0, 0
    chars = sum(len(text_of(m.get("content"))) for m in request.get("messages") or () if isinstance(m, dict))
    chars += len(text_of(request.get("prompt")))
    out = request.get("max_completion_tokens") or request.get("max_tokens") or DEFAULT_MAX_OUTPUT_TOKENS
    return math.ceil(chars / CHARS_PER_TOKEN), int(out)


def estimate_cost(price: Price, modality: str, request: Mapping[str, Any]) -> int:
    """The most `request` (a normalized input) should cost at `price`: what to hold before
    it runs. Text is bounded by max_tokens; `hold`, when set, is the least held."""
    total = Fraction(price.per_request)
    if modality == "image":
        total += price.image_rate(request) * (_number(request.get("n")) or 1)
    elif modality in ("video", "audio"):
        total += _media_cost(price, modality, request, seconds=None, characters=None)
    elif modality == "text":
        total += _token_cost(price, *token_estimate(modality, request))
    amount = math.ceil(total)
    return amount if price.hold is None else max(price.hold, amount)


# --- after: the settle -------------------------------------------------------------------------------

Basis = Literal["provider_cost", "compute_time", "tokens", "units"]


@dataclass(frozen=True, slots=True)
class Cost:
    amount: int  # micro-USD
    basis: Basis  # what it was priced on


def actual_cost(
    price: Price,
    modality: str,
    request: Mapping[str, Any],
    usage: Mapping[str, Any] | None,
    *,
    outputs: int,
    output_seconds: float | None,
) -> Cost:
    """What the finished work cost at `price`, on the best basis the provider's `usage`
    (Done.usage) allows; a missing or malformed value falls through to the next basis.

    `outputs` counts the outputs stored (not the n asked); `output_seconds` is their total
    duration where storage probed it."""
    usage = usage if isinstance(usage, Mapping) else {}
    base = Fraction(price.per_request)
    reported = reported_cost(price, usage)
    if reported is not None:
        return _cost(base + reported, "provider_cost")
    compute = _first(usage.get("predict_time"), usage.get("inference_time"))  # Replicate; fal
    if price.per_compute_second and compute is not None:
        return _cost(base + compute * price.per_compute_second, "compute_time")
    tokens = _reported_tokens(usage)
    if modality in ("text", "image") and tokens is not None and (price.per_1k_input_tokens or price.per_1k_output_tokens):
        return _cost(base + _token_cost(price, *tokens), "tokens")
    if modality == "image":
        base += price.image_rate(request) * max(outputs, 0)
    elif modality == "video":
        # Veo: video_seconds over all its videos; Sora: seconds (a string) of its one video
        seconds = _first(usage.get("video_seconds"), usage.get("seconds"), output_seconds)
        base += _media_cost(price, modality, request, seconds=seconds, characters=None)
    elif modality == "audio":
        chars = _number(usage.get("input_characters"))  # OpenAI speech
        base += _media_cost(price, modality, request, seconds=_number(output_seconds), characters=chars)
    elif modality == "text":  # no usage reported: the input we sent, as estimated; the output is unknown
        base += _token_cost(price, token_estimate(modality, request)[0], 0)
    return _cost(base, "units")


def chat_cost(price: Price | None, prompt_tokens: int, completion_tokens: int,
              usage: Mapping[str, Any] | None = None) -> int | None:
    """Micro-USD for one chat call at `price` (None: the deployment has no price): the
    provider's reported cost when the price has per_credit and `usage` reports one (OpenRouter
    bills the model that answered, whichever of its fallbacks it was), else the tokens."""
    if price is None:
        return None
    reported = reported_cost(price, usage) if isinstance(usage, Mapping) else None
    if reported is not None:
        return math.ceil(price.per_request + reported)
    return math.ceil(price.per_request + _token_cost(price, prompt_tokens, completion_tokens))


def reported_cost(price: Price, usage: Mapping[str, Any]) -> Fraction | None:
    """usage.cost_credits × per_credit (BFL: 1 credit = $0.01; OpenRouter: 1 credit = $1),
    None when the price has no per_credit or the provider reported no cost."""
    credits = _number(usage.get("cost_credits"))
    return credits * price.per_credit if price.per_credit and credits is not None else None


# --- shared arithmetic ---------------------------------------------------------------------------------


def _number(value: Any) -> Fraction | None:
    """A finite number ≥ 0 from a request or a provider's usage (a numeric string too: Sora's
    `seconds` is one), exactly as written: 5.2 is 26/5, not its binary neighbour. Else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)  # parsed as a float first, so "1e999999" is inf, not a huge Fraction
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(number) or number < 0:
        return None
    return Fraction(value) if isinstance(value, int) else Fraction(repr(number))


def _first(*values: Any) -> Fraction | None:
    return next((n for n in map(_number, values) if n is not None), None)


def _reported_tokens(usage: Mapping[str, Any]) -> tuple[Fraction, Fraction] | None:
    """(input, output) tokens: OpenAI chat's prompt/completion or the input/output pair
    (GPT Image, Anthropic); None when absent or malformed."""
    for inp, out in (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens")):
        if inp in usage or out in usage:
            a, b = _number(usage.get(inp, 0)), _number(usage.get(out, 0))
            return (a, b) if a is not None and b is not None else None
    return None


def _token_cost(price: Price, inp: int | Fraction, out: int | Fraction) -> Fraction:
    return Fraction(price.per_1k_input_tokens * inp + price.per_1k_output_tokens * out) / 1000


def _media_cost(
    price: Price, modality: str, request: Mapping[str, Any], *, seconds: Fraction | None, characters: Fraction | None
) -> Fraction:
    """Seconds of video, or characters spoken plus seconds of audio. Unknown amounts (None)
    come from the request: its duration, the time to speak its text, or the defaults."""
    text: str = t if isinstance(t := request.get("text"), str) else ""
    if seconds is None:
        seconds = _number(request.get("duration_seconds"))
    if seconds is None:
        if modality == "video":
            seconds = Fraction(DEFAULT_VIDEO_SECONDS)
        else:
            seconds = Fraction(len(text), SPEECH_CHARS_PER_SECOND) if text else Fraction(DEFAULT_AUDIO_SECONDS)
    total = price.second_rate(request) * seconds
    if modality == "audio":
        total += Fraction(price.per_1k_characters) * (len(text) if characters is None else characters) / 1000
    return total


def _cost(amount: Fraction, basis: Basis) -> Cost:
    return Cost(math.ceil(amount), basis)
