"""A fake OpenAI API (images, videos, speech, chat), faithful to providers.md §4 and §8.

    python -m tests.fakes.openai --port 9100     # then OPENAI_BASE_URL=http://127.0.0.1:9100/v1

Routes (under /v1, `Authorization: Bearer <api_key>`, or the header given as `auth_header`):

    POST /images/generations   JSON; b64_json (gpt-image, dall-e) or url (dall-e; the file
                               answers 403 after `url_ttl`); `stream: true` -> SSE events
    POST /images/edits         multipart: image | image[] (+ mask)
    POST /videos               JSON or multipart (input_reference); `seconds` must be the
                               string "4" | "8" | "12"
    GET  /videos/{id}          queued -> in_progress (10..90) -> completed | failed, one step per poll
    GET  /videos/{id}/content  404 until completed and after expires_at; ?variant=thumbnail|spritesheet
    DELETE /videos/{id}
    POST /audio/speech         audio bytes, chunked (real WAV, MP3 frames, ...)
    POST /chat/completions     JSON, or SSE chunks + optional usage chunk + `data: [DONE]`
    GET  /files/{name}         dall-e URL outputs (public, like Azure blob SAS links)
    GET  /_control/stats, POST /_control/reset

Prompt keywords (tests/contract.py): [moderated] [moderated-output] [fail] [429] [500]
[poll500] [slow] [expired]; also [quota] (429 insufficient_quota) and [503]; chat also
[flagged] (400 invalid_prompt: a flagged prompt), [model404] (404 model_not_found) and
[slow-stream] (a long streamed answer, a word every 0.2 s).
A project webhook (`webhook_url` + `webhook_secret` options) gets `video.completed` /
`video.failed` signed per Standard Webhooks; videos then finish on their own after
`webhook_delay` seconds instead of per poll.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import secrets
import struct
import time
import wave
from datetime import UTC, datetime
from typing import Any

import httpx
from PIL import Image, ImageDraw
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.server import run_main

GPT_IMAGE_SIZES = ("1024x1024", "1536x1024", "1024x1536")
IMAGE_SIZES = {
    "gpt-image-1": (*GPT_IMAGE_SIZES, "auto"),
    "gpt-image-1-mini": (*GPT_IMAGE_SIZES, "auto"),
    "dall-e-3": ("1024x1024", "1792x1024", "1024x1792"),
    "dall-e-2": ("256x256", "512x512", "1024x1024"),
}
QUALITIES = {"gpt-image": ("low", "medium", "high", "auto"), "dall-e-3": ("standard", "hd", "auto"), "dall-e-2": ("standard", "auto")}
VIDEO_SIZES = {"sora-2": ("720x1280", "1280x720"), "sora-2-pro": ("720x1280", "1280x720", "1024x1792", "1792x1024")}
TTS1_VOICES = ("alloy", "ash", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer")
VOICES = {"tts-1": TTS1_VOICES, "tts-1-hd": TTS1_VOICES, "gpt-4o-mini-tts": (*TTS1_VOICES, "ballad", "verse", "marin", "cedar")}
AUDIO_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm"}
RATE_HEADERS = {
    "x-ratelimit-limit-requests": "500",
    "x-ratelimit-remaining-requests": "499",
    "x-ratelimit-reset-requests": "120ms",
    "x-ratelimit-limit-tokens": "100000",
    "x-ratelimit-remaining-tokens": "99000",
    "x-ratelimit-reset-tokens": "600ms",
}


# -- media --------------------------------------------------------------------------


def make_image(w: int, h: int, fmt: str, seed: str, transparent: bool = False) -> bytes:
    hue = sum(seed.encode()) % 255
    mode = "RGBA" if transparent and fmt in ("png", "webp") else "RGB"
    img = Image.new(mode, (w, h), (hue, 120, 255 - hue, 0) if mode == "RGBA" else (hue, 120, 255 - hue))
    ImageDraw.Draw(img).rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(255 - hue, 200, hue))
    out = io.BytesIO()
    img.save(out, {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}[fmt], **({"quality": 60} if fmt != "png" else {"compress_level": 1}))
    return out.getvalue()


def _box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", 8 + len(body)) + kind + body


def make_mp4(seconds: int, w: int, h: int) -> bytes:
    """A minimal ISO-BMFF file: ftyp, moov{mvhd(timescale, duration)}, mdat."""
    ftyp = _box(b"ftyp", b"isom" + struct.pack(">I", 0x200) + b"isomiso2avc1mp41")
    matrix = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    now = int(time.time()) + 2082844800  # seconds since 1904, as MP4 counts them
    mvhd = _box(
        b"mvhd",
        struct.pack(">B3xIIII", 0, now, now, 1000, seconds * 1000)
        + struct.pack(">IH10x", 0x10000, 0x100) + matrix + bytes(24) + struct.pack(">I", 2),
    )
    mdat = _box(b"mdat", f"fake sora {w}x{h} {seconds}s ".encode() * 64)
    return ftyp + _box(b"moov", mvhd) + mdat


def make_audio(fmt: str, text: str) -> bytes:
    seconds = min(5.0, 0.4 + 0.05 * len(text))
    if fmt in ("wav", "pcm"):
        rate = 24000
        samples = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate))) for i in range(int(rate * seconds)))
        if fmt == "pcm":
            return samples
        out = io.BytesIO()
        with wave.open(out, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(samples)
        return out.getvalue()
    if fmt == "mp3":  # MPEG-1 Layer III, 128 kbps, 44.1 kHz, mono: 417-byte frames
        frame = b"\xff\xfb\x90\xc0" + bytes(413)
        return frame * int(seconds * 44100 / 1152)
    head = {"opus": b"OggS\x00\x02", "flac": b"fLaC\x00\x00\x00\x22", "aac": b"\xff\xf1\x50\x80"}[fmt]
    return head + bytes(int(seconds * 4000))


# -- errors -------------------------------------------------------------------------


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}
    return JSONResponse(body, status, headers={"x-request-id": f"req_{secrets.token_hex(8)}", **(headers or {})})


def scripted(text: str, *, output_moderation_now: bool) -> Response | None:
    """The create-time outcomes the prompt asks for."""
    if "[429]" in text:
        return error(429, "Rate limit reached for requests per min (RPM): Limit 500, Used 500, Requested 1.",
                     "requests", code="rate_limit_exceeded",
                     headers={**RATE_HEADERS, "x-ratelimit-remaining-requests": "0", "retry-after": "2", "retry-after-ms": "1500"})
    if "[quota]" in text:
        return error(429, "You exceeded your current quota, please check your plan and billing details.",
                     "insufficient_quota", code="insufficient_quota")
    if "[500]" in text:
        return error(500, "The server had an error while processing your request. Sorry about that!", "server_error",
                     headers={"x-should-retry": "true"})
    if "[503]" in text:
        return error(503, "The engine is currently overloaded, please try again later.", "server_error",
                     headers={"x-should-retry": "true"})
    if "[moderated]" in text or ("[moderated-output]" in text and output_moderation_now):
        stage = "output" if "[moderated-output]" in text else "input"
        return error(400, "Your request was rejected by the safety system. If you believe this is an error, contact us "
                     "at help.openai.com and include the request ID. safety_violations=[sexual].",
                     "image_generation_user_error", code="moderation_blocked",
                     moderation_details={"moderation_stage": stage, "categories": ["sexual"]})
    if "[fail]" in text and output_moderation_now:  # a synchronous endpoint that broke for good
        return error(500, "The model failed to produce an output.", "server_error", headers={"x-should-retry": "false"})
    return None


# -- the app ------------------------------------------------------------------------


class State:
    def __init__(self) -> None:
        self.videos: dict[str, dict[str, Any]] = {}
        self.files: dict[str, tuple[bytes, str, float]] = {}  # name -> bytes, type, expires
        self.stats: dict[str, Any] = {"creates": 0, "polls": 0, "inflight": 0, "peak_inflight": 0, "last": {}, "slow_words": 0}

    def created(self, endpoint: str, fields: dict[str, Any]) -> None:
        self.stats["last"][endpoint] = fields

    def inflight(self, delta: int) -> None:
        self.stats["inflight"] += delta
        self.stats["peak_inflight"] = max(self.stats["peak_inflight"], self.stats["inflight"])


def create_app(
    *,
    api_key: str = "sk-test-openai",
    auth_header: str = "Authorization",
    auth_scheme: str = "Bearer",
    url_ttl: float = 3600.0,
    content_ttl: float = 3600.0,
    video_polls: int = 3,
    slow_polls: int = 12,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    webhook_delay: float = 0.2,
) -> Starlette:
    st = State()
    tasks: set[asyncio.Task[None]] = set()

    def authorized(request: Request) -> Response | None:
        got = request.headers.get(auth_header)
        if not got:
            return error(401, "You didn't provide an API key. You need to provide your API key in an Authorization "
                         "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        want = f"{auth_scheme} {api_key}" if auth_scheme else api_key
        if got != want:
            return error(401, f"Incorrect API key provided: {got[-6:]}. You can find your API key at "
                         "https://platform.openai.com/account/api-keys.", code="invalid_api_key")
        return None

    def ok(body: Any, status: int = 200) -> JSONResponse:
        return JSONResponse(body, status, headers={**RATE_HEADERS, "x-request-id": f"req_{secrets.token_hex(8)}"})

    # -- images -----------------------------------------------------------------------
    def image_problem(model: str, f: dict[str, Any], edit: bool) -> Response | None:
        base = model.split("/")[-1]  # aggregators prefix ids: openai/gpt-image-1
        gpt = base.startswith("gpt-image")
        if base not in IMAGE_SIZES:
            return error(400, f"Invalid value: '{model}'. Value must be one of {sorted(IMAGE_SIZES)}.", param="model", code="invalid_value")
        if edit and base == "dall-e-3":
            return error(400, "Image editing is not supported for dall-e-3.", param="model", code="invalid_value")
        if gpt and "response_format" in f:
            return error(400, "Unknown parameter: 'response_format'.", param="response_format", code="unknown_parameter")
        for key in ("output_format", "background", "output_compression", "moderation"):
            if not gpt and key in f:
                return error(400, f"Unknown parameter: '{key}'.", param=key, code="unknown_parameter")
        size = f.get("size")
        if size is not None and size not in IMAGE_SIZES[base]:
            allowed = ", ".join(f"'{s}'" for s in IMAGE_SIZES[base])
            return error(400, f"Invalid value: '{size}'. Supported values are: {allowed}.", param="size", code="invalid_value")
        n = int(f.get("n", 1))
        if base == "dall-e-3" and n != 1:
            return error(400, "Invalid 'n': integer above maximum value. You must provide n=1 for this model.", param="n", code="integer_above_max_value")
        if not 1 <= n <= 10:
            return error(400, f"Invalid 'n': {n}. Must be between 1 and 10.", param="n", code="invalid_value")
        quality = f.get("quality")
        if quality is not None and quality not in QUALITIES["gpt-image" if gpt else base]:
            return error(400, f"Invalid value: '{quality}'.", param="quality", code="invalid_value")
        if f.get("background") == "transparent" and f.get("output_format") == "jpeg":
            return error(400, "Transparent background requires output_format png or webp.", param="background", code="invalid_value")
        if f.get("output_format", "png") not in ("png", "jpeg", "webp"):
            return error(400, f"Invalid value: '{f['output_format']}'.", param="output_format", code="invalid_value")
        return None

    def image_answer(model: str, f: dict[str, Any], request: Request) -> dict[str, Any]:
        base = model.split("/")[-1]
        gpt = base.startswith("gpt-image")
        size = f.get("size") or ("1024x1024" if base != "dall-e-2" else "1024x1024")
        w, h = (1024, 1024) if size == "auto" else (int(x) for x in size.split("x"))
        fmt = f.get("output_format", "png") if gpt else "png"
        transparent = f.get("background") == "transparent"
        data = []
        for i in range(int(f.get("n", 1))):
            img = make_image(w, h, fmt, f"{f['prompt']}{i}", transparent)
            if gpt or f.get("response_format") == "b64_json":
                item: dict[str, Any] = {"b64_json": base64.b64encode(img).decode()}
            else:
                expired = "[expired]" in f["prompt"]
                name = f"img-{secrets.token_hex(8)}.png"
                expires = time.time() + (-1 if expired else url_ttl)
                st.files[name] = (img, "image/png", expires)
                item = {"url": f"{request.base_url}files/{name}?se={int(expires)}&sp=r&sig={secrets.token_urlsafe(16)}"}
            if base == "dall-e-3":
                item["revised_prompt"] = f"A vivid rendering of: {f['prompt']}"
            data.append(item)
        body: dict[str, Any] = {"created": int(time.time()), "data": data}
        if gpt:
            body |= {
                "background": "transparent" if transparent else "opaque",
                "output_format": fmt,
                "quality": f.get("quality") if f.get("quality") not in (None, "auto") else "medium",
                "size": f"{w}x{h}",
                "usage": {"total_tokens": 50 + 1056 * len(data), "input_tokens": 50, "output_tokens": 1056 * len(data),
                          "input_tokens_details": {"text_tokens": 50, "image_tokens": 0}},
            }
        return body

    def image_stream(body: dict[str, Any], partials: int, prefix: str) -> StreamingResponse:
        async def events() -> Any:
            b64 = body["data"][0]["b64_json"]
            common = {k: body[k] for k in ("size", "quality", "background", "output_format")}
            for i in range(partials):
                event = {"type": f"{prefix}.partial_image", "b64_json": b64, "partial_image_index": i, "created_at": body["created"], **common}
                yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
            done = {"type": f"{prefix}.completed", "b64_json": b64, "created_at": body["created"], **common, "usage": body["usage"]}
            yield f"event: {done['type']}\ndata: {json.dumps(done)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=RATE_HEADERS)

    async def generations(request: Request) -> Response:
        st.stats["creates"] += 1
        if (denied := authorized(request)) is not None:
            return denied
        try:
            f = await request.json()
        except ValueError:
            return error(400, "We could not parse the JSON body of your request.")
        if not isinstance(f.get("prompt"), str) or not f["prompt"]:
            return error(400, "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
        st.created("images.generations", dict(f.items()))
        model = str(f.get("model") or "dall-e-2")
        if (problem := scripted(f["prompt"], output_moderation_now=True) or image_problem(model, f, edit=False)) is not None:
            return problem
        body = image_answer(model, f, request)
        if f.get("stream") and model.split("/")[-1].startswith("gpt-image"):
            return image_stream(body, int(f.get("partial_images") or 0), "image_generation")
        return ok(body)

    async def edits(request: Request) -> Response:
        st.stats["creates"] += 1
        if (denied := authorized(request)) is not None:
            return denied
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return error(400, "Invalid Content-Type header (application/json), expected multipart/form-data.")
        form = await request.form()
        uploads = [(k, v) for k, v in form.multi_items() if k in ("image", "image[]") and isinstance(v, UploadFile)]
        f = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        if not uploads:
            return error(400, "Missing required parameter: 'image'.", param="image", code="missing_required_parameter")
        if not f.get("prompt"):
            return error(400, "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
        sizes = []
        for _, up in uploads:
            try:
                sizes.append(Image.open(io.BytesIO(await up.read())).size)
            except OSError:
                return error(400, "Invalid image file or mode for image 1, please check your image file.", param="image", code="invalid_image_file")
        mask = form.get("mask")
        if isinstance(mask, UploadFile):
            raw = await mask.read()
            if not raw.startswith(b"\x89PNG") or Image.open(io.BytesIO(raw)).size != sizes[0]:
                return error(400, "Invalid mask image: it must be a PNG of the same size as the image.", param="mask", code="invalid_image_file")
        st.created("images.edits", f | {"parts": [k for k, _ in uploads], "image_sizes": sizes, "mask": isinstance(mask, UploadFile)})
        model = str(f.get("model") or "dall-e-2")
        for key in ("n", "partial_images", "output_compression"):
            if key in f:
                f[key] = int(f[key])
        if model.split("/")[-1] == "dall-e-2" and (len(uploads) > 1 or sizes[0][0] != sizes[0][1]):
            return error(400, "Invalid input image - format must be a single square PNG for dall-e-2.", param="image", code="invalid_image_format")
        if (problem := scripted(f["prompt"], output_moderation_now=True) or image_problem(model, f, edit=True)) is not None:
            return problem
        body = image_answer(model, f, request)
        if f.get("stream") == "true" and model.split("/")[-1].startswith("gpt-image"):
            return image_stream(body, int(f.get("partial_images") or 0), "image_edit")
        return ok(body)

    async def files(request: Request) -> Response:
        item = st.files.get(request.path_params["name"])
        if item is None:
            return Response("<Error><Code>BlobNotFound</Code></Error>", 404, media_type="application/xml")
        data, ct, expires = item
        if time.time() > expires:
            return Response("<Error><Code>AuthenticationFailed</Code><Message>Signed expiry time has passed</Message></Error>",
                            403, media_type="application/xml")
        return Response(data, media_type=ct)

    # -- videos -----------------------------------------------------------------------
    def public(v: dict[str, Any]) -> dict[str, Any]:
        return {k: v[k] for k in ("id", "object", "created_at", "completed_at", "expires_at", "status", "progress",
                                  "model", "seconds", "size", "prompt", "remixed_from_video_id", "error")}

    def finish(v: dict[str, Any]) -> None:
        script = v["_script"]
        if v["status"] in ("completed", "failed"):
            return
        st.inflight(-1)
        v["completed_at"] = int(time.time())
        if "[moderated-output]" in script:
            v |= {"status": "failed", "error": {"code": "moderation_blocked", "message": "The generated video was blocked by our moderation system."}}
        elif "[fail]" in script:
            v |= {"status": "failed", "error": {"code": "internal_error", "message": "Video generation failed. Please try again."}}
        else:
            expired = "[expired]" in script
            v |= {"status": "completed", "progress": 100, "expires_at": int(time.time() + (-1 if expired else content_ttl))}

    async def send_webhook(v: dict[str, Any]) -> None:
        await asyncio.sleep(webhook_delay)
        finish(v)
        event = {"id": f"evt_{secrets.token_hex(12)}", "object": "event", "created_at": int(time.time()),
                 "type": f"video.{v['status']}", "data": {"id": v["id"]}}
        payload = json.dumps(event)
        msg_id = f"wh_{secrets.token_hex(12)}"
        now = datetime.now(tz=UTC)
        signature = Webhook(str(webhook_secret)).sign(msg_id, now, payload)
        headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": signature,
                   "content-type": "application/json"}
        async with httpx.AsyncClient(timeout=5) as client:
            for _ in range(3):  # redelivered with the same webhook-id on failure
                try:
                    if (await client.post(str(webhook_url), content=payload, headers=headers)).is_success:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)

    async def video_create(request: Request) -> Response:
        st.stats["creates"] += 1
        if (denied := authorized(request)) is not None:
            return denied
        ref_size = None
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            f: dict[str, Any] = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            ref = form.get("input_reference")
            if isinstance(ref, UploadFile):
                try:
                    ref_size = Image.open(io.BytesIO(await ref.read())).size
                except OSError:
                    return error(400, "Invalid input_reference: not an image.", param="input_reference", code="invalid_value")
        else:
            try:
                f = await request.json()
            except ValueError:
                return error(400, "We could not parse the JSON body of your request.")
        st.created("videos", f | {"input_reference_size": ref_size})
        prompt = f.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return error(400, "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
        model = str(f.get("model") or "sora-2")
        if model not in VIDEO_SIZES:
            return error(400, f"Invalid value: '{model}'. Supported values are: 'sora-2' and 'sora-2-pro'.", param="model", code="invalid_value")
        seconds = f.get("seconds", "4")
        if not isinstance(seconds, str):
            return error(400, f"Invalid type for 'seconds': expected one of '4', '8', or '12', but got {type(seconds).__name__} instead.",
                         param="seconds", code="invalid_type")
        if seconds not in ("4", "8", "12"):
            return error(400, f"Invalid value: '{seconds}'. Supported values are: '4', '8', and '12'.", param="seconds", code="invalid_value")
        size = str(f.get("size") or "720x1280")
        if size not in VIDEO_SIZES[model]:
            allowed = ", ".join(f"'{s}'" for s in VIDEO_SIZES[model])
            return error(400, f"Invalid value: '{size}'. Supported values are: {allowed}.", param="size", code="invalid_value")
        if ref_size is not None and f"{ref_size[0]}x{ref_size[1]}" != size:
            return error(400, "Inpaint image must match the requested width and height", param="input_reference", code="invalid_value")
        if (problem := scripted(prompt, output_moderation_now=False)) is not None:
            return problem
        vid = f"video_{secrets.token_hex(12)}"
        v = {"id": vid, "object": "video", "created_at": int(time.time()), "completed_at": None, "expires_at": None,
             "status": "queued", "progress": 0, "model": model, "seconds": seconds, "size": size, "prompt": prompt,
             "remixed_from_video_id": None, "error": None, "_polls": 0, "_script": prompt}
        st.videos[vid] = v
        st.inflight(1)
        if webhook_url:
            task = asyncio.create_task(send_webhook(v))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return ok(public(v))

    async def video_get(request: Request) -> Response:
        if (denied := authorized(request)) is not None:
            return denied
        v = st.videos.get(request.path_params["vid"])
        if v is None:
            return error(404, f"Video with id '{request.path_params['vid']}' not found.", param="video_id", code="not_found")
        st.stats["polls"] += 1
        v["_polls"] += 1
        if "[poll500]" in v["_script"] and v["_polls"] == 1:
            return error(500, "The server had an error while processing your request. Sorry about that!", "server_error",
                         headers={"x-should-retry": "true"})
        if not webhook_url and v["status"] in ("queued", "in_progress"):
            total = slow_polls if "[slow]" in v["_script"] else video_polls
            k = v["_polls"]
            if k >= total:
                finish(v)
            elif k >= 2:
                v["status"] = "in_progress"
                v["progress"] = 10 + (80 * (k - 2)) // max(1, total - 3)
        return ok(public(v))

    async def video_content(request: Request) -> Response:
        if (denied := authorized(request)) is not None:
            return denied
        v = st.videos.get(request.path_params["vid"])
        if v is None or v["status"] != "completed":
            return error(404, "Video is not ready yet, use GET /v1/videos/{video_id} to check status.", param="video_id", code="not_found")
        if v["expires_at"] is not None and time.time() > v["expires_at"]:
            return error(404, "The assets for this video have expired.", param="video_id", code="not_found")
        w, h = (int(x) for x in v["size"].split("x"))
        variant = request.query_params.get("variant", "video")
        if variant == "video":
            return Response(make_mp4(int(v["seconds"]), w, h), media_type="video/mp4")
        if variant in ("thumbnail", "spritesheet"):
            fmt = "webp" if variant == "thumbnail" else "jpeg"
            return Response(make_image(w // 4, h // 4, fmt, v["prompt"]), media_type=f"image/{fmt}")
        return error(400, f"Invalid value: '{variant}'.", param="variant", code="invalid_value")

    async def video_delete(request: Request) -> Response:
        if (denied := authorized(request)) is not None:
            return denied
        v = st.videos.get(request.path_params["vid"])
        if v is None:
            return error(404, "Video not found.", param="video_id", code="not_found")
        if v["status"] in ("queued", "in_progress"):
            return error(400, "Video is still being generated and cannot be deleted.", param="video_id", code="invalid_state")
        del st.videos[v["id"]]
        return ok({"id": v["id"], "object": "video.deleted", "deleted": True})

    # -- speech -----------------------------------------------------------------------
    async def speech(request: Request) -> Response:
        st.stats["creates"] += 1
        if (denied := authorized(request)) is not None:
            return denied
        f = await request.json()
        st.created("audio.speech", f)
        model, voice, fmt = f.get("model"), f.get("voice"), f.get("response_format", "mp3")
        if model not in VOICES:
            return error(400, f"Invalid value: '{model}'.", param="model", code="invalid_value")
        if not isinstance(f.get("input"), str) or not f["input"] or len(f["input"]) > 4096:
            return error(400, "'input' must be a string of 1 to 4096 characters.", param="input", code="invalid_value")
        if voice not in VOICES[model]:
            return error(400, f"Invalid value: '{voice}'. Supported values are: {', '.join(VOICES[model])}.", param="voice", code="invalid_value")
        if fmt not in AUDIO_TYPES:
            return error(400, f"Invalid value: '{fmt}'.", param="response_format", code="invalid_value")
        if "instructions" in f and model != "gpt-4o-mini-tts":
            return error(400, "Instructions are not supported for this model.", param="instructions", code="unsupported_parameter")
        if not 0.25 <= float(f.get("speed", 1.0)) <= 4.0:
            return error(400, "Invalid 'speed'.", param="speed", code="invalid_value")
        if (problem := scripted(f["input"], output_moderation_now=True)) is not None:
            return problem
        audio = make_audio(fmt, f["input"])

        async def chunks() -> Any:
            for i in range(0, len(audio), 16384):  # no content-length: chunked transfer
                yield audio[i : i + 16384]

        return StreamingResponse(chunks(), media_type=AUDIO_TYPES[fmt], headers=RATE_HEADERS)

    # -- chat -------------------------------------------------------------------------
    async def chat(request: Request) -> Response:
        st.stats["creates"] += 1
        if (denied := authorized(request)) is not None:
            return denied
        f = await request.json()
        st.created("chat.completions", f)
        messages = f.get("messages")
        if not f.get("model"):
            return error(400, "you must provide a model parameter", param="model")
        if not isinstance(messages, list) or not messages:
            return error(400, "Invalid 'messages': empty array. Expected an array with minimum length 1.", param="messages", code="empty_array")
        last = messages[-1].get("content", "")
        text = last if isinstance(last, str) else " ".join(p.get("text", "") for p in last if isinstance(p, dict))
        if "[flagged]" in text:  # a prompt the moderation layer refuses before the model sees it
            return error(400, "Invalid prompt: your prompt was flagged as potentially violating our usage policy. "
                         "Please try again with a different prompt: https://platform.openai.com/docs/guides/reasoning#advice-on-prompting",
                         param=None, code="invalid_prompt")
        if "[model404]" in text:  # the deployment names a model this account does not have
            return error(404, f"The model `{f['model']}` does not exist or you do not have access to it.",
                         param=None, code="model_not_found")
        # other than a flagged prompt, refusals are content: only the transport keywords apply
        if (problem := scripted(text.replace("[moderated", "["), output_moderation_now=False)) is not None:
            return problem
        reply = f"You said: {text}"
        pause = 0.0
        if "[slow-stream]" in text:  # a long answer, a word every 0.2 s (about a minute in all)
            reply, pause = reply + " and on" * 150, 0.2
        cid, created, model = f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), str(f["model"])
        usage = {"prompt_tokens": len(text.split()) + 5, "completion_tokens": len(reply.split()),
                 "total_tokens": len(text.split()) + 5 + len(reply.split())}
        if not f.get("stream"):
            return ok({"id": cid, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": "fp_fake",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": reply, "refusal": None},
                                    "logprobs": None, "finish_reason": "stop"}], "usage": usage})
        include_usage = bool((f.get("stream_options") or {}).get("include_usage"))

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": "fp_fake", "choices": choices, **extra}
            if include_usage and "usage" not in extra:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> Any:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None}, "logprobs": None, "finish_reason": None}])
            for i, word in enumerate(reply.split(" ")):
                yield chunk([{"index": 0, "delta": {"content": word if i == 0 else f" {word}"}, "logprobs": None, "finish_reason": None}])
                if pause:
                    st.stats["slow_words"] += 1
                    await asyncio.sleep(pause)
            yield chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])
            if include_usage:
                yield chunk([], usage=usage)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=RATE_HEADERS)

    # -- control ----------------------------------------------------------------------
    async def stats(request: Request) -> Response:
        return JSONResponse(st.stats)

    async def reset(request: Request) -> Response:
        st.__init__()  # type: ignore[misc]
        return JSONResponse({"ok": True})

    return Starlette(routes=[
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/images/edits", edits, methods=["POST"]),
        Route("/v1/videos", video_create, methods=["POST"]),
        Route("/v1/videos/{vid}", video_get, methods=["GET"]),
        Route("/v1/videos/{vid}", video_delete, methods=["DELETE"]),
        Route("/v1/videos/{vid}/content", video_content, methods=["GET"]),
        Route("/v1/audio/speech", speech, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/files/{name}", files, methods=["GET"]),
        # also under /v1: a deployment's base URL (and tests.contract.Fake.url) ends in /v1
        *(Route(f"{prefix}/_control/stats", stats, methods=["GET"]) for prefix in ("", "/v1")),
        *(Route(f"{prefix}/_control/reset", reset, methods=["POST"]) for prefix in ("", "/v1")),
    ])


if __name__ == "__main__":
    run_main(create_app, "fake OpenAI API (images, videos, speech, chat)")
