"""Prices (core/billing/pricing.py): tables, the estimate held before work runs, the actual cost
settled after it on each basis, and the errors a bad price in a catalog gives."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from core.billing.pricing import (
    DEFAULT_AUDIO_SECONDS,
    DEFAULT_MAX_OUTPUT_TOKENS,
    DEFAULT_VIDEO_SECONDS,
    Cost,
    Price,
    actual_cost,
    chat_cost,
    estimate_cost,
)
from core.routing.catalog import CatalogError, load_catalog

# GPT Image 1 at its list prices (micro-USD), token prices for what it reports afterwards
GPT_IMAGE = Price(
    per_image={"default": 167_000, "low": 11_000, "medium": 42_000, "high": 167_000,
               "1024x1536": 250_000, "1024x1536/low": 16_000, "1024x1536/medium": 63_000},
    per_1k_input_tokens=5_000,
    per_1k_output_tokens=40_000,
)
VEO = Price(per_second={"default": 400_000, "720p": 150_000})
BFL = Price(per_image=40_000, per_credit=10_000)  # per_image: the estimate, until BFL reports `cost`
REPLICATE = Price(per_compute_second=1_400, hold=50_000)  # an A100, $0.0014 a second
TTS = Price(per_1k_characters=15_000)


def image(**kw: Any) -> dict[str, Any]:
    return {"prompt": "a cat", **kw}


def units(price: Price, modality: str, request: dict[str, Any], usage: dict[str, Any] | None = None,
          outputs: int = 1, seconds: float | None = None) -> Cost:
    return actual_cost(price, modality, request, usage or {}, outputs=outputs, output_seconds=seconds)


# --- tables -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_, rate",
    [
        (image(size="1024x1536", provider_params={"quality": "low"}), 16_000),  # size/quality
        (image(size="1024x1536", provider_params={"quality": "high"}), 250_000),  # no 1024x1536/high: size
        (image(size="1024x1536"), 250_000),  # size
        (image(size="512x512", provider_params={"quality": "medium"}), 42_000),  # no 512x512: quality
        (image(size="512x512", quality="low", provider_params={"quality": "high"}), 11_000),  # request's own first
        (image(size="512x512"), 167_000),  # default
        (image(), 167_000),
    ],
)
def test_image_table_lookup_order(request_: dict[str, Any], rate: int) -> None:
    assert GPT_IMAGE.image_rate(request_) == rate
    assert estimate_cost(GPT_IMAGE, "image", {**request_, "n": 3}) == 3 * rate


def test_per_second_table_by_resolution() -> None:
    assert VEO.second_rate({"resolution": "720p"}) == 150_000
    assert VEO.second_rate({"resolution": "1080p"}) == 400_000  # not listed: default
    assert VEO.second_rate({}) == 400_000
    assert Price(per_second=7).second_rate({"resolution": "720p"}) == 7


# --- estimates ------------------------------------------------------------------------------------------


def test_estimates_per_modality() -> None:
    assert estimate_cost(Price(per_second=500_000, per_request=1), "video", {"duration_seconds": 8}) == 4_000_001
    assert estimate_cost(VEO, "video", {"duration_seconds": 6, "resolution": "720p"}) == 900_000
    # no duration named: the provider picks one, so hold for the longest usual default
    assert estimate_cost(VEO, "video", {"prompt": "sea"}) == 400_000 * DEFAULT_VIDEO_SECONDS
    assert estimate_cost(TTS, "audio", {"text": "x" * 2000}) == 30_000
    # per second of speech: its length follows the text (15 characters a second)
    assert estimate_cost(Price(per_second=1_000), "audio", {"text": "x" * 150}) == 10_000
    assert estimate_cost(Price(per_second=1_000), "audio", {"prompt": "jazz"}) == 1_000 * DEFAULT_AUDIO_SECONDS
    assert estimate_cost(Price(per_second=1_000), "audio", {"prompt": "jazz", "duration_seconds": 12.5}) == 12_500
    chat = {"messages": [{"role": "user", "content": "x" * 4000}], "max_tokens": 100}
    # 1000 input tokens at 2.5 USD/M, 100 output tokens at 10 USD/M
    assert estimate_cost(Price(per_1k_input_tokens=2_500, per_1k_output_tokens=10_000), "text", chat) == 3_500
    del chat["max_tokens"]
    assert estimate_cost(Price(per_1k_output_tokens=1_000), "text", chat) == DEFAULT_MAX_OUTPUT_TOKENS
    assert estimate_cost(Price(per_1k_output_tokens=1_000), "text", {**chat, "max_completion_tokens": 2000}) == 2_000


def test_hold_is_the_least_estimate() -> None:
    assert estimate_cost(REPLICATE, "image", image(n=4)) == 50_000
    held = Price(per_image=40_000, per_credit=10_000, hold=100_000)
    assert estimate_cost(held, "image", image(n=2)) == 100_000
    assert estimate_cost(held, "image", image(n=4)) == 160_000  # the computed estimate is larger


# --- actual cost ------------------------------------------------------------------------------------------


def test_provider_reported_credits() -> None:
    # BFL answers cost 4.5 credits ($0.045): that is the price, not per_image
    usage = {"cost_credits": 4.5, "input_mp": 0.0, "output_mp": 1.05}
    assert units(BFL, "image", image(), usage) == Cost(45_000, "provider_cost")
    assert units(BFL.model_copy(update={"per_request": 7}), "image", image(), usage) == Cost(45_007, "provider_cost")
    # an older model reports no cost: the images delivered
    assert units(BFL, "image", image(), {}) == Cost(40_000, "units")


def test_compute_time_is_exact() -> None:
    # 0.14 s × 1400: as floats 196.00000000000003, which would round up to 197
    assert units(REPLICATE, "video", {}, {"predict_time": 0.14, "total_time": 6}) == Cost(196, "compute_time")
    assert units(REPLICATE, "image", image(), {"predict_time": 0.012683}) == Cost(18, "compute_time")  # 17.76 up
    assert units(Price(per_compute_second=1_000, hold=1), "image", image(), {"inference_time": 1.83}) == Cost(1_830, "compute_time")  # fal
    # credits win over compute time
    both = Price(per_credit=10_000, per_compute_second=1_000, hold=1)
    assert units(both, "image", image(), {"cost_credits": 1, "predict_time": 100}).basis == "provider_cost"


def test_tokens_for_chat_and_gpt_image() -> None:
    usage = {"total_tokens": 4300, "input_tokens": 50, "output_tokens": 4250,
             "input_tokens_details": {"text_tokens": 50, "image_tokens": 0}}
    # 50 × $5/M + 4250 × $40/M = $0.17025, not the table's $0.167
    assert units(GPT_IMAGE, "image", image(n=1), usage) == Cost(170_250, "tokens")
    chat = Price(per_request=3, per_1k_input_tokens=150, per_1k_output_tokens=600)
    assert units(chat, "text", {}, {"prompt_tokens": 1000, "completion_tokens": 10, "total_tokens": 1010}) == Cost(159, "tokens")
    assert units(chat, "text", {}, {"input_tokens": 1000, "output_tokens": 10}) == Cost(159, "tokens")
    # a table-only image price ignores token usage; a video never bills by tokens
    assert units(Price(per_image=40_000), "image", image(), usage) == Cost(40_000, "units")
    assert units(Price(per_second=10, per_1k_output_tokens=1), "video", {"duration_seconds": 4}, usage).basis == "units"


def test_units_delivered() -> None:
    # four asked, three stored (say one was refused by a safety checker): three are paid
    assert units(GPT_IMAGE, "image", image(n=4, size="1024x1536", quality="low"), outputs=3) == Cost(48_000, "units")
    assert units(Price(per_image=40_000, per_request=5), "image", image(n=4), outputs=0) == Cost(5, "units")
    veo = {"duration_seconds": 8, "resolution": "720p"}
    assert units(VEO, "video", veo, {"videos": 2, "video_seconds": 16}, outputs=2) == Cost(2_400_000, "units")
    assert units(VEO, "video", veo, {"model": "sora-2", "seconds": "4", "size": "1280x720"}) == Cost(600_000, "units")
    assert units(VEO, "video", veo, {}, seconds=7.5) == Cost(1_125_000, "units")  # the stored file's length
    assert units(VEO, "video", veo, {}) == Cost(1_200_000, "units")  # the length asked
    assert units(VEO, "video", {}, {}) == Cost(400_000 * DEFAULT_VIDEO_SECONDS, "units")
    speech = Price(per_1k_characters=15_000, per_second=100)
    assert units(speech, "audio", {"text": "x" * 1000}, {"input_characters": 2000}, seconds=61.5) == Cost(36_150, "units")
    assert units(speech, "audio", {"text": "x" * 1500}) == Cost(32_500, "units")  # 100 s to speak it
    # a chat job whose provider reported nothing: the input we sent, no output
    assert units(Price(per_1k_input_tokens=1_000, per_1k_output_tokens=9_000), "text",
                 {"messages": [{"role": "user", "content": "x" * 400}]}) == Cost(100, "units")


@pytest.mark.parametrize(
    "usage",
    [
        {"cost_credits": "a lot"}, {"cost_credits": None}, {"cost_credits": -4}, {"cost_credits": True},
        {"cost_credits": float("nan")}, {"cost_credits": float("inf")}, {"cost_credits": "1e999999999"}, {"cost_credits": [4]},
        {"predict_time": "soon"}, {"predict_time": -1.0}, {"predict_time": None}, {"predict_time": "1/0"},
        {"input_tokens": "many", "output_tokens": 4250}, {"prompt_tokens": 10, "completion_tokens": None},
        {"output_tokens": -5},
    ],
)
def test_malformed_usage_falls_back_to_units(usage: dict[str, Any]) -> None:
    price = GPT_IMAGE.model_copy(update={"per_credit": 10_000, "per_compute_second": 1_000})
    assert units(price, "image", image(n=2), usage, outputs=2) == Cost(334_000, "units")


def test_malformed_media_usage_and_no_usage_at_all() -> None:
    veo = {"duration_seconds": 4, "resolution": "720p"}
    for usage in ({"video_seconds": -8}, {"video_seconds": "eight"}, {"seconds": None}, {"seconds": {}}):
        assert units(VEO, "video", veo, usage) == Cost(600_000, "units"), usage
    assert units(TTS, "audio", {"text": "x" * 1000}, {"input_characters": "?"}) == Cost(15_000, "units")
    assert actual_cost(BFL, "image", image(), None, outputs=1, output_seconds=None) == Cost(40_000, "units")


def test_estimate_bounds_units_priced_work() -> None:
    """The hold covers what is settled: fewer images stored than asked, and every length a
    provider may make when none was asked, cost no more than the estimate."""
    for size, quality, n in itertools.product([None, "512x512", "1024x1536"], [None, "low", "high"], [1, 3]):
        req = image(n=n, **({"size": size} if size else {}), provider_params={"quality": quality} if quality else {})
        held = estimate_cost(GPT_IMAGE, "image", req)
        for stored in range(n + 1):
            assert units(GPT_IMAGE, "image", req, outputs=stored).amount <= held
    for req in ({"resolution": "720p", "duration_seconds": 6}, {"resolution": "1080p"}, {}):
        held = estimate_cost(VEO, "video", req)
        made = req.get("duration_seconds")
        for usage in [{"video_seconds": s} for s in ((made,) if made else (4, 5, 8))]:
            assert units(VEO, "video", req, usage).amount <= held
        assert units(VEO, "video", req).amount == held  # nothing reported: the length asked (or its default)
    req = {"text": "hello " * 300}
    assert units(TTS, "audio", req, {"input_characters": 1800}).amount == estimate_cost(TTS, "audio", req)


# --- chat_cost -----------------------------------------------------------------------------------------------


def test_chat_cost() -> None:
    assert chat_cost(None, 10, 10) is None
    # 1000 × $0.15/M + 10 × $0.60/M = $0.000156, plus a flat 3 micro-USD
    assert chat_cost(Price(per_request=3, per_1k_input_tokens=150, per_1k_output_tokens=600), 1000, 10) == 159


# --- validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "price, loc, needle",
    [
        ({"per_image": {"high": 167_000}}, ("per_image",), "needs a `default` entry"),
        ({"per_second": {"720p": 1}}, ("per_second",), "needs a `default` entry"),
        ({"per_image": -1}, ("per_image",), "0 or more"),
        ({"per_image": {"default": 1, "high": -5}}, ("per_image",), "high: must be a whole number of micro-USD"),
        ({"per_second": {"default": 1.5}}, ("per_second",), "default: must be a whole number"),
        ({"per_request": 0.04}, ("per_request",), "$0.04 is 40000"),
        ({"hold": -1, "per_credit": 1}, ("hold",), "0 or more"),
        ({"per_credit": -1}, ("per_credit",), "0 or more"),
        ({"per_image": {"default": 1, "1024*1024": 2}}, ("per_image",), "'1024*1024' is not a key of this price table"),
        ({"per_second": {"default": 1, 1080: 2}}, ("per_second",), "1080 is not a key"),
        ({"per_credit": 10_000}, (), "set `hold`"),
        ({"per_compute_second": 1_400, "per_image": {"default": 0}}, (), "set `hold`"),
        ({"per_image": 1, "per_pixel": 2}, ("per_pixel",), "Extra inputs are not permitted"),
    ],
)
def test_invalid_prices(price: dict[str, Any], loc: tuple[str, ...], needle: str) -> None:
    with pytest.raises(ValidationError) as exc:
        Price.model_validate(price)
    [err] = exc.value.errors()
    assert err["loc"] == loc and needle in err["msg"], err


def test_provider_priced_work_with_another_estimate_needs_no_hold() -> None:
    assert BFL.hold is None and estimate_cost(BFL, "image", image()) == 40_000
    assert Price(per_compute_second=1_400, per_request=10_000).hold is None


def test_bad_price_in_a_catalog_says_where_and_what_to_fix(tmp_path: Path) -> None:
    f = tmp_path / "cat.yaml"
    f.write_text(
        "models:\n"
        "  - id: flux\n"
        "    modality: image\n"
        "    deployments:\n"
        "      - name: bfl\n"
        "        adapter: bfl\n"
        "        model: flux-pro-1.1\n"
        "        price: {per_credit: 10000}\n"
        "      - name: gpt\n"
        "        adapter: openai\n"
        "        model: gpt-image-1\n"
        "        price:\n"
        "          per_image: {high: 167000}\n"
    )
    with pytest.raises(CatalogError) as exc:
        load_catalog(f)
    message = str(exc.value)
    assert f"{f}:8: models.0.deployments.0.price: set `hold`" in message, message
    assert f"{f}:13: models.0.deployments.1.price.per_image: a price table needs a `default` entry" in message, message


def test_default_catalog_prices_serialize_and_apply() -> None:
    from core.routing.catalog import Price as CatalogPrice

    assert CatalogPrice is Price
    catalog = load_catalog()
    shown = {d.name: d.price.model_dump(exclude_defaults=True) if d.price else None
             for m in catalog.models for d in m.deployments}  # as GET /v1/models shows them
    assert json.loads(json.dumps(shown)) == shown
    assert shown["local-image"]["per_image"]["1024x1536/low"] == 16_000
    img = catalog.get("local-image")
    assert img is not None and img.deployments[0].price is not None
    assert estimate_cost(img.deployments[0].price, "image", image(size="1024x1536", n=2)) == 500_000
    for name, price in shown.items():  # a round trip through the dump gives the same price
        assert price is None or Price.model_validate(price).model_dump(exclude_defaults=True) == price, name
    assert yaml.safe_load(yaml.safe_dump(shown)) == shown
