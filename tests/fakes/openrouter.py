"""A fake OpenRouter API (chat with fallbacks and provider routing, images through chat,
async videos), faithful to providers.md §6, §7g and §8.

    python -m tests.fakes.openrouter --port 9200    # then base_url http://127.0.0.1:9200/api/v1

Routes (under /api/v1, `Authorization: Bearer <api_key>`; errors in OpenRouter's envelope
`{"error": {"code": <status>, "message", "metadata"?}}`):

    POST /chat/completions     `models` (fallbacks, tried in order), `provider` (routing:
                               unknown keys refused, `order`/`only`/`ignore` against each
                               model's endpoints, `allow_fallbacks: false` + a down provider
                               -> 400 "No allowed providers are available ..."); the answer's
                               `model` names the model that answered, `provider` the endpoint,
                               `usage.cost` the USD it cost; streams carry `: OPENROUTER
                               PROCESSING` comment lines; image models answer
                               `message.images[]` data URLs only when `modalities` holds
                               "image" (image-only models refuse "text" with a 404)
    POST /videos               202 {id, polling_url, status: pending}; fields checked per model
    GET  /videos/{id}          pending -> in_progress -> completed (unsigned_urls, usage.cost)
                               | failed; `expired` once `content_ttl` has passed
    GET  /videos/{id}/content?index=N   MP4 bytes with the key; 404 before completion / expired
    GET  /_control/stats, POST /_control/reset

Prompt keywords (tests/contract.py): [moderated] (403 with metadata.reasons), [moderated-output]
(chat image: finish_reason content_filter and no image; video: failed, flagged), [fail]
(chat: an error inside a 200; video: failed), [429] (OpenRouter's 429: no Retry-After,
X-RateLimit-Reset epoch ms in headers and error.metadata.headers), [500], [poll500],
[slow], [expired], [cancelled] (video: status cancelled); also [primary-down] / [primary-429] / [primary-flagged] (the first
model of the request fails with a 503 / a 429 / a moderation 403, so `models` decides), [402] (out of credits), [far-poll] (a polling_url on another host).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.openai import make_image, make_mp4
from tests.fakes.server import run_main

API_KEY = "sk-or-v1-fake"
# model -> (endpoints by provider slug, USD per million prompt / completion tokens)
TEXT_MODELS: dict[str, tuple[tuple[str, ...], float, float]] = {
    "openai/gpt-4o-mini": (("openai", "azure"), 0.15, 0.60),
    "anthropic/claude-3.5-haiku": (("anthropic", "amazon-bedrock", "google-vertex"), 0.80, 4.00),
    "meta-llama/llama-3.1-8b-instruct": (("deepinfra", "together", "fireworks"), 0.02, 0.05),
}
# image model -> (output modalities it has, USD per image)
IMAGE_MODELS: dict[str, tuple[tuple[str, ...], float]] = {
    "google/gemini-2.5-flash-image": (("image", "text"), 0.039),
    "black-forest-labs/flux.2-pro": (("image",), 0.03),
}
IMAGE_RATIOS = {"1:1": (1024, 1024), "16:9": (1344, 768), "9:16": (768, 1344), "4:3": (1184, 864), "3:4": (864, 1184),
                "3:2": (1248, 832), "2:3": (832, 1248), "21:9": (1536, 672)}
# video model -> (durations, resolutions, aspect ratios, USD per second)
VIDEO_MODELS: dict[str, tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...], float]] = {
    "google/veo-3.1": ((4, 6, 8), ("720p", "1080p"), ("16:9", "9:16"), 0.40),
    "openai/sora-2": ((4, 8, 12), ("720p",), ("16:9", "9:16"), 0.10),
}
VIDEO_FIELDS = frozenset({"model", "prompt", "duration", "resolution", "aspect_ratio", "size", "frame_images",
                          "input_references", "generate_audio", "seed", "provider", "callback_url"})
PROVIDER_FIELDS = frozenset({"order", "allow_fallbacks", "require_parameters", "data_collection", "zdr",
                             "enforce_distillable_text", "only", "ignore", "quantizations", "sort", "max_price"})
PROCESSING = ": OPENROUTER PROCESSING\n\n"


def error(status: int, message: str, metadata: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {"code": status, "message": message}}
    if metadata is not None:
        body["error"]["metadata"] = metadata
    return JSONResponse(body, status, headers=headers)


def text_of(messages: list[Any]) -> str:
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.extend(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return " ".join(out)


class State:
    def __init__(self) -> None:
        self.videos: dict[str, dict[str, Any]] = {}
        self.stats: dict[str, Any] = {"creates": 0, "polls": 0, "downloads": 0, "last": {}, "attempts": []}


def create_app(*, api_key: str = API_KEY, down_providers: tuple[str, ...] = ("azure",), video_polls: int = 2,
               slow_polls: int = 30, content_ttl: float = 3600.0) -> Starlette:
    st = State()

    def authorized(request: Request) -> Response | None:
        got = request.headers.get("authorization", "")
        if not got:
            return error(401, "No auth credentials found")
        if got != f"Bearer {api_key}":
            return error(401, "User not found.")
        return None

    def scripted(text: str) -> Response | None:
        if "[429]" in text:
            reset = str(int((time.time() + 3) * 1000))
            limits = {"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset}
            return error(429, "Rate limit exceeded: limit_rpm/openai/gpt-4o-mini. High demand for this model right now.",
                         {"headers": limits}, headers=limits)
        if "[402]" in text:
            return error(402, "This request requires more credits, or fewer max_tokens. You requested up to 4096 tokens, "
                         "but can only afford 12. To increase, visit https://openrouter.ai/settings/credits")
        if "[500]" in text:
            return error(500, "Internal Server Error")
        if "[moderated]" in text:
            return error(403, "openai/gpt-4o-mini requires moderation on OpenAI. Your input was flagged for \"sexual\". "
                         "No credits were charged.",
                         {"reasons": ["sexual"], "flagged_input": text[:100], "provider_name": "OpenAI", "model_slug": "openai/gpt-4o-mini"})
        return None

    def primary_failure(model: str, text: str) -> Response | None:
        """The first model's failure the prompt asks for: OpenRouter then tries `models`."""
        if "[primary-down]" in text:
            return error(503, f"{model} is temporarily unavailable: every provider is down")
        if "[primary-429]" in text:
            return error(429, f"{model} is temporarily rate-limited upstream. Please retry shortly.",
                         {"provider_name": endpoints(model)[0], "raw": "rate limited"})
        if "[primary-flagged]" in text:
            return error(403, f"{model} requires moderation. Your input was flagged for \"violence\".",
                         {"reasons": ["violence"], "flagged_input": text[:100], "model_slug": model})
        return None

    def endpoints(model: str) -> tuple[str, ...]:
        if model in TEXT_MODELS:
            return TEXT_MODELS[model][0]
        return ("google-ai-studio",) if model.startswith("google/") else ("black-forest-labs",)

    def route(model: str, routing: dict[str, Any]) -> tuple[str | None, str | None]:
        """(provider slug that serves, or None and why) under the request's routing."""
        up = [p for p in endpoints(model) if p not in down_providers]
        allowed = list(up)
        if routing.get("only"):
            allowed = [p for p in allowed if p in routing["only"]]
        if routing.get("ignore"):
            allowed = [p for p in allowed if p not in routing["ignore"]]
        order = routing.get("order") or []
        if order:
            first = [p for p in order if p in allowed]
            if routing.get("allow_fallbacks") is False:
                allowed = first
            else:
                allowed = first + [p for p in allowed if p not in first]
        if not allowed:
            return None, "No allowed providers are available for the selected model."
        return allowed[0], None

    # -- chat -------------------------------------------------------------------------
    async def chat(request: Request) -> Response:
        st.stats["creates"] += 1
        if (denied := authorized(request)) is not None:
            return denied
        try:
            f = await request.json()
        except ValueError:
            return error(400, "Invalid JSON body")
        st.stats["last"]["chat"] = f
        messages = f.get("messages")
        if not isinstance(messages, list) or not messages:
            return error(400, "Input required: specify \"prompt\" or \"messages\"")
        models = f.get("models")
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
            return error(400, "\"models\" must be an array of model ids")
        order = [f["model"]] if isinstance(f.get("model"), str) else []
        order += [m for m in models or [] if m not in order]
        if not order:
            return error(400, "No models provided")
        routing = f.get("provider") or {}
        if not isinstance(routing, dict) or set(routing) - PROVIDER_FIELDS:
            bad = sorted(set(routing) - PROVIDER_FIELDS) if isinstance(routing, dict) else ["provider"]
            return error(400, f"Invalid provider preferences: unrecognized key(s) {bad}")
        if routing.get("sort") not in (None, "price", "throughput", "latency"):
            return error(400, f"Invalid provider preferences: sort must be price, throughput or latency, got {routing['sort']!r}")
        text = text_of(messages)
        if (problem := scripted(text)) is not None:
            return problem
        modalities = f.get("modalities") or ["text"]
        last_error: Response | None = None
        for i, model in enumerate(order):
            st.stats["attempts"].append(model)
            if model not in TEXT_MODELS and model not in IMAGE_MODELS:
                last_error = error(400, f"{model} is not a valid model ID")
                continue
            if i == 0 and (failed := primary_failure(model, text)) is not None:
                last_error = failed
                continue
            if model in IMAGE_MODELS:
                have = IMAGE_MODELS[model][0]
                missing = [m for m in modalities if m not in have]
                if missing:
                    last_error = error(404, f"No endpoints found that support the requested output modalities: {', '.join(modalities)}")
                    continue
            elif "image" in modalities:
                last_error = error(404, "No endpoints found that support the requested output modalities: image, text")
                continue
            slug, why = route(model, routing)
            if slug is None:
                last_error = error(400, str(why))
                if routing.get("allow_fallbacks") is False:
                    return last_error  # no other model either: fallbacks are off
                continue
            return answer(f, model, slug, text, modalities)
        assert last_error is not None
        return last_error

    def answer(f: dict[str, Any], model: str, slug: str, text: str, modalities: list[str]) -> Response:
        cid, created = f"gen-{int(time.time())}-{secrets.token_hex(8)}", int(time.time())
        images: list[dict[str, Any]] = []
        finish = "stop"
        if model in IMAGE_MODELS and "image" in modalities:
            ratio = (f.get("image_config") or {}).get("aspect_ratio", "1:1")
            if ratio not in IMAGE_RATIOS:
                return error(400, f"Invalid image_config.aspect_ratio {ratio!r}; supported: {sorted(IMAGE_RATIOS)}")
            if "[moderated-output]" in text:
                finish, reply = "content_filter", ""
            else:
                w, h = IMAGE_RATIOS[ratio]
                png = make_image(w, h, "png", text)
                images = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}]
                reply = "Here is your image." if "text" in modalities else ""
        else:
            reply = f"[{model}] You said: {text}"
        prompt_tokens = len(text.split()) + 5
        completion_tokens = max(1, len(reply.split())) + (1290 if images else 0)
        if model in TEXT_MODELS:
            _, pin, pout = TEXT_MODELS[model]
            cost = (prompt_tokens * pin + completion_tokens * pout) / 1e6
        else:
            cost = IMAGE_MODELS[model][1] * len(images)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens, "cost": round(cost, 8), "is_byok": False,
                 "cost_details": {"upstream_inference_cost": None}}
        if "[fail]" in text:  # the model broke after OpenRouter sent the status line: an error in a 200
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model, "provider": slug,
                                 "error": {"code": 502, "message": "Upstream error from provider: the model failed to respond",
                                           "metadata": {"provider_name": slug}},
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "error"}]})
        message: dict[str, Any] = {"role": "assistant", "content": reply, "refusal": None}
        if images:
            message["images"] = images
        if not f.get("stream"):
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model, "provider": slug,
                                 "choices": [{"index": 0, "message": message, "finish_reason": finish,
                                              "native_finish_reason": finish}], "usage": usage})

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "provider": slug,
                    "choices": choices, **extra}
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> Any:
            yield PROCESSING  # keep-alive comments while the model warms up
            yield PROCESSING
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            for i, word in enumerate(reply.split(" ")):
                yield chunk([{"index": 0, "delta": {"content": word if i == 0 else f" {word}"}, "finish_reason": None}])
                if i == 1:
                    yield PROCESSING
            yield chunk([{"index": 0, "delta": {}, "finish_reason": finish}])
            yield chunk([], usage=usage)  # OpenRouter always sends the usage chunk last
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- videos -----------------------------------------------------------------------
    async def video_create(request: Request) -> Response:
        st.stats["creates"] += 1
        if (denied := authorized(request)) is not None:
            return denied
        try:
            f = await request.json()
        except ValueError:
            return error(400, "Invalid JSON body")
        st.stats["last"]["videos"] = f
        if not isinstance(f, dict):
            return error(400, "The body must be a JSON object")
        unknown = sorted(set(f) - VIDEO_FIELDS)
        if unknown:
            return error(400, f"Unrecognized field(s): {unknown}")
        model = f.get("model")
        if model not in VIDEO_MODELS:
            return error(400, f"{model} is not a valid video model ID; see GET /api/v1/videos/models")
        prompt = f.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return error(400, "prompt is required")
        if (problem := scripted(prompt)) is not None:
            return problem
        durations, resolutions, ratios, _ = VIDEO_MODELS[model]
        if "duration" in f and (not isinstance(f["duration"], int) or f["duration"] not in durations):
            return error(400, f"duration {f['duration']!r} is not supported by {model}; supported_durations: {list(durations)}")
        if "resolution" in f and f["resolution"] not in resolutions:
            return error(400, f"resolution {f['resolution']!r} is not supported by {model}; supported_resolutions: {list(resolutions)}")
        if "aspect_ratio" in f and f["aspect_ratio"] not in ratios:
            return error(400, f"aspect_ratio {f['aspect_ratio']!r} is not supported by {model}; supported_aspect_ratios: {list(ratios)}")
        for frame in f.get("frame_images") or []:
            if not isinstance(frame, dict) or frame.get("frame_type") not in ("first_frame", "last_frame") \
                    or not str(((frame.get("image_url") or {}).get("url")) or "").startswith(("data:", "https://", "http://")):
                return error(400, "frame_images[]: each needs type image_url, image_url.url and frame_type first_frame|last_frame")
        vid = f"vgen_{secrets.token_hex(10)}"
        st.videos[vid] = {"fields": f, "polls": 0, "completed_at": None, "prompt": prompt}
        polling = f"/api/v1/videos/{vid}"
        if "[far-poll]" in prompt:
            polling = f"https://metadata.example.internal{polling}"
        return JSONResponse({"id": vid, "polling_url": polling, "status": "pending"}, 202)

    def video_object(vid: str, v: dict[str, Any], request: Request) -> dict[str, Any]:
        f, prompt = v["fields"], v["prompt"]
        steps = slow_polls if "[slow]" in prompt else video_polls
        body: dict[str, Any] = {"id": vid, "polling_url": f"/api/v1/videos/{vid}", "model": f["model"]}
        if v["polls"] <= steps // 2:
            return body | {"status": "pending"}
        if v["polls"] <= steps:
            return body | {"status": "in_progress"}
        if "[fail]" in prompt:
            return body | {"status": "failed", "error": "The provider could not render this video (internal error)"}
        if "[moderated-output]" in prompt:
            return body | {"status": "failed", "error": "The generated video was flagged by content moderation"}
        if "[cancelled]" in prompt:  # stopped at OpenRouter (its dashboard, or the upstream provider)
            return body | {"status": "cancelled"}
        if v["completed_at"] is None:
            v["completed_at"] = time.time() - (content_ttl + 1 if "[expired]" in prompt else 0)
        if time.time() > v["completed_at"] + content_ttl:
            return body | {"status": "expired"}
        seconds = int(f.get("duration", VIDEO_MODELS[f["model"]][0][-1]))
        cost = round(seconds * VIDEO_MODELS[f["model"]][3], 6)
        base = str(request.base_url).rstrip("/")
        return body | {"status": "completed", "generation_id": f"gen-{vid}",
                       "unsigned_urls": [f"{base}/api/v1/videos/{vid}/content?index=0"],
                       "usage": {"cost": cost, "is_byok": False}}

    async def video_get(request: Request) -> Response:
        st.stats["polls"] += 1
        if (denied := authorized(request)) is not None:
            return denied
        vid = request.path_params["vid"]
        v = st.videos.get(vid)
        if v is None:
            return error(404, "Video generation not found")
        v["polls"] += 1
        if "[poll500]" in v["prompt"] and v["polls"] == 1:
            return error(500, "Internal Server Error")
        return JSONResponse(video_object(vid, v, request))

    async def video_content(request: Request) -> Response:
        if (denied := authorized(request)) is not None:
            return denied
        vid = request.path_params["vid"]
        v = st.videos.get(vid)
        if v is None or v["completed_at"] is None:
            return error(404, "Video not found or not ready")
        if time.time() > v["completed_at"] + content_ttl:
            return error(404, "Video content has expired")
        try:
            index = int(request.query_params.get("index", "0"))
        except ValueError:
            return error(400, "index must be an integer")
        if index != 0:
            return error(400, f"index {index} is out of range")
        st.stats["downloads"] += 1
        f = v["fields"]
        seconds = int(f.get("duration", VIDEO_MODELS[f["model"]][0][-1]))
        return Response(make_mp4(seconds, 1280, 720), media_type="video/mp4")

    # -- control ----------------------------------------------------------------------
    async def stats(request: Request) -> Response:
        return JSONResponse(st.stats)

    async def reset(request: Request) -> Response:
        st.__init__()  # type: ignore[misc]
        return JSONResponse({"ok": True})

    return Starlette(routes=[
        Route("/api/v1/chat/completions", chat, methods=["POST"]),
        Route("/api/v1/videos", video_create, methods=["POST"]),
        Route("/api/v1/videos/{vid}", video_get, methods=["GET"]),
        Route("/api/v1/videos/{vid}/content", video_content, methods=["GET"]),
        # also under /api/v1: a deployment's base URL (and tests.contract.Fake.url) ends there
        *(Route(f"{prefix}/_control/stats", stats, methods=["GET"]) for prefix in ("", "/api/v1")),
        *(Route(f"{prefix}/_control/reset", reset, methods=["POST"]) for prefix in ("", "/api/v1")),
    ])


if __name__ == "__main__":
    run_main(create_app, "fake OpenRouter API (chat, images through chat, videos)")
