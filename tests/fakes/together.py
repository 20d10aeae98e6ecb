"""A fake Together AI API (providers.md §7e): images, async videos, chat.

    python -m tests.fakes.together --port 9300     # the file host runs on a free port beside it

Routes (`Authorization: Bearer <api_key>`: 401 without, 401 `invalid_api_key` when wrong):

    POST /v1/images/generations   Together's body on OpenAI's path: `size` and `quality`
                                  are refused with 400 (width/height instead); width/height
                                  integers 64..1792; steps 1..12 on FLUX.1-schnell, 1..50
                                  elsewhere; n 1..4; response_format base64 | url (default
                                  url); output_format jpeg | png; image_url only on models
                                  that take one -> {id, model, object: list, data: [...]}
    POST /v2/videos               {model, prompt, width, height, seconds (1-10, number or
                                  numeric string), fps 15-60, steps 10-50, output_format
                                  MP4 | WEBM, frame_images [{input_image: URL or bare base64,
                                  frame: first | last | int}] (a data: prefix is not base64)}
                                  -> {id}
    GET  /v2/videos/{id}          (and the older /v2/videos/status?id=) one step per poll:
                                  queued -> in_progress -> completed {outputs.video_url, cost}
                                  | failed {error, info.errors}; 404 for an unknown id
    POST /v1/chat/completions     OpenAI's format (served by tests.fakes.openai's chat)
    GET  /_control/stats, POST /_control/reset, POST /_control/config, GET /_control/requests,
    POST /_control/cancel/{id} (the video is stopped on Together's side: `cancelled`)

Result files (image URLs, videos) live on another host (`create_files_app`, run on its own
port): plain links that answer 403 once `file_ttl` has passed and 400 to a request that
carries an Authorization header (a presigned link refuses a second credential), so a
client that leaks the API key to the file host fails.

Prompt keywords (tests/contract.py): [moderated] (400 flagged prompt), [moderated-output]
(video: failed, the output flagged), [fail] (video: failed), [429] (429 with x-ratelimit-*
headers and no Retry-After), [500], [poll500], [slow], [expired] (the file has expired).
The error and 429 bodies follow OpenAI's shape, as Together's do; the exact words and
headers of Together's refusals are unverified.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes import openai as openai_fake
from tests.fakes.server import Running, run_main

API_KEY = "together-test-key"
# model -> max steps, whether it takes image_url
IMAGE_MODELS: dict[str, tuple[int, bool]] = {
    "black-forest-labs/FLUX.1-schnell": (12, False),
    "black-forest-labs/FLUX.1-schnell-Free": (12, False),
    "black-forest-labs/FLUX.1-dev": (50, False),
    "black-forest-labs/FLUX.1.1-pro": (50, False),
    "black-forest-labs/FLUX.1-kontext-pro": (50, True),
    "black-forest-labs/FLUX.1-kontext-max": (50, True),
}
# model -> USD per video (outputs.cost)
VIDEO_MODELS: dict[str, float] = {
    "minimax/hailuo-02": 0.49,
    "google/veo-3.0-fast": 0.80,
    "ByteDance/Seedance-1.0-lite": 0.14,
    "Wan-AI/Wan2.2-T2V-A14B": 0.66,
}


@dataclass
class TogetherState:
    """What the API and the file host share; one lock, as uvicorn runs each in a thread."""

    api_key: str = API_KEY
    video_polls: int = 2  # in_progress polls before the end
    slow_polls: int = 20
    file_ttl: float = 3600.0
    files_url: str = ""  # where result links point (set when the file host runs)
    lock: threading.Lock = field(default_factory=threading.Lock)
    videos: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.initial = {k: getattr(self, k) for k in ("video_polls", "slow_polls", "file_ttl")}
        self.reset()

    def reset(self) -> None:
        with self.lock:
            for k, v in self.initial.items():
                setattr(self, k, v)
            self.videos.clear()
            self.files.clear()
            self.requests.clear()
            self.stats.clear()
            self.stats.update({"creates": 0, "polls": 0, "file_gets": 0, "file_saw_key": 0})

    def add_file(self, data: bytes, ctype: str, expired: bool) -> str:
        fid = uuid.uuid4().hex
        with self.lock:
            self.files[fid] = {"data": data, "type": ctype, "expires": time.time() + (-1 if expired else self.file_ttl)}
        return f"{self.files_url}/shrt/{fid}"


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status, headers=headers)


def create_app(state: TogetherState | None = None, files_url: str | None = None, **options: Any) -> Starlette:
    state = state or TogetherState(**options)
    if files_url:
        state.files_url = files_url.rstrip("/")
    chat_app = openai_fake.create_app(api_key=state.api_key)

    def denied(request: Request) -> Response | None:
        got = request.headers.get("authorization", "")
        if not got:
            return error(401, "Missing API key. Pass it as Authorization: Bearer <key>.", code="missing_api_key")
        if got != f"Bearer {state.api_key}":
            return error(401, "Invalid API key provided. You can find your API key at https://api.together.xyz/settings/api-keys.",
                         code="invalid_api_key")
        return None

    async def json_body(request: Request) -> dict[str, Any] | Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "Request body is not valid JSON.")
        if not isinstance(body, dict):
            return error(400, "Request body must be a JSON object.")
        return body

    def record(endpoint: str, body: dict[str, Any]) -> None:
        shown = {k: (v[:40] + "..." if isinstance(v, str) and len(v) > 60 else v) for k, v in body.items()}
        with state.lock:
            state.stats["creates"] += 1
            state.requests[:] = [*state.requests[-49:], {"endpoint": endpoint, "body": shown}]

    def scripted(prompt: str) -> Response | None:
        if "[429]" in prompt:
            return error(429, "You have reached the rate limit specific to this model. The maximum rate limit for this "
                         "model is 9.0 queries per minute.", type_="rate_limit", code="rate_limit_exceeded",
                         headers={"x-ratelimit-limit": "9", "x-ratelimit-remaining": "0", "x-ratelimit-reset": "2"})
        if "[500]" in prompt:
            return error(500, "Internal server error", type_="server_error")
        if "[moderated]" in prompt:
            return error(400, "Your prompt was flagged as NSFW by our safety checker. Please revise it.", code="content_policy_violation")
        return None

    # -- images -------------------------------------------------------------------------
    async def images(request: Request) -> Response:
        if (refused := denied(request)) is not None:
            with state.lock:
                state.stats["creates"] += 1
            return refused
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        record("images", body)
        model = str(body.get("model") or "")
        if not model:
            return error(400, "model is required", param="model")
        if model not in IMAGE_MODELS:
            return error(404, f"Unable to access model {model}. Please visit https://api.together.ai/models to view the "
                         "list of supported models.", code="model_not_available")
        max_steps, takes_image = IMAGE_MODELS[model]
        for name in ("size", "quality"):
            if name in body:
                return error(400, f"'{name}' is not a supported parameter; use width and height", param=name)
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            return error(400, "prompt is required", param="prompt")
        w, h = body.get("width", 1024), body.get("height", 1024)
        for name, v in (("width", w), ("height", h)):
            if isinstance(v, bool) or not isinstance(v, int) or not 64 <= v <= 1792:
                return error(400, f"{name} must be an integer between 64 and 1792", param=name)
        steps = body.get("steps", 4)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= max_steps:
            return error(400, f"steps must be between 1 and {max_steps} for {model}", param="steps")
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 4:
            return error(400, "n must be between 1 and 4", param="n")
        fmt = body.get("output_format", "jpeg")
        if fmt not in ("jpeg", "png"):
            return error(400, "output_format must be 'jpeg' or 'png'", param="output_format")
        answer_as = body.get("response_format", "url")
        if answer_as not in ("url", "base64"):
            return error(400, "response_format must be 'url' or 'base64'", param="response_format")
        if "image_url" in body and not takes_image:
            return error(400, f"image_url is not supported for {model}", param="image_url")
        prompt = str(body["prompt"])
        if (problem := scripted(prompt)) is not None:
            return problem
        data = []
        for i in range(n):
            image = render_image(f"{prompt}|{body.get('seed')}|{i}", w, h, fmt)
            if answer_as == "base64":
                data.append({"index": i, "b64_json": base64.b64encode(image).decode()})
            else:
                data.append({"index": i, "url": state.add_file(image, f"image/{fmt}", "[expired]" in prompt)})
        return JSONResponse({"id": uuid.uuid4().hex, "model": model, "object": "list", "data": data})

    # -- videos -------------------------------------------------------------------------
    async def video_create(request: Request) -> Response:
        if (refused := denied(request)) is not None:
            with state.lock:
                state.stats["creates"] += 1
            return refused
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        record("videos", body)
        model = str(body.get("model") or "")
        if model not in VIDEO_MODELS:
            return error(404, f"Unable to access model {model}.", code="model_not_available")
        if problem := _video_problem(body):
            return error(400, problem[1], param=problem[0])
        prompt = str(body["prompt"])
        if (scripted_answer := scripted(prompt)) is not None:
            return scripted_answer
        vid = f"vid_{uuid.uuid4().hex[:16]}"
        seconds = float(body.get("seconds", 5))
        with state.lock:
            state.videos[vid] = {
                "id": vid, "model": model, "prompt": prompt, "step": 0, "status": "queued",
                "polls": state.slow_polls if "[slow]" in prompt else state.video_polls,
                "poll500": "[poll500]" in prompt, "seconds": seconds,
                "size": (int(body.get("width", 1366)), int(body.get("height", 768))),
                "format": str(body.get("output_format", "MP4")), "inputs": body, "created": time.time(),
            }
        return JSONResponse({"id": vid})

    async def video_get(request: Request) -> Response:
        if (refused := denied(request)) is not None:
            return refused
        vid = request.path_params.get("vid") or request.query_params.get("id", "")
        with state.lock:
            state.stats["polls"] += 1
            v = state.videos.get(vid)
            if v is not None and v["poll500"]:
                v["poll500"] = False
                return error(500, "Internal server error", type_="server_error")
        if v is None:
            return error(404, f"Video {vid} not found", code="not_found")
        _advance(state, v)
        return JSONResponse(_video_object(v))

    # -- control ------------------------------------------------------------------------
    async def stats(request: Request) -> Response:
        with state.lock:
            return JSONResponse(dict(state.stats))

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse({"ok": True})

    async def config(request: Request) -> Response:
        changes = await request.json()
        unknown = set(changes) - set(state.initial)
        if unknown:
            return JSONResponse({"detail": f"unknown settings {sorted(unknown)}"}, status_code=400)
        with state.lock:
            for k, v in changes.items():
                setattr(state, k, v)
        return JSONResponse({"ok": True})

    async def recent(request: Request) -> Response:
        with state.lock:
            return JSONResponse(list(state.requests))

    async def cancel_from_console(request: Request) -> Response:
        """A video stopped on Together's side (its console): the API then says `cancelled`."""
        with state.lock:
            v = state.videos.get(request.path_params["vid"])
            if v is None:
                return JSONResponse({"detail": "no such video"}, status_code=404)
            v["status"], v["done_at"] = "cancelled", time.time()
        return JSONResponse({"ok": True})

    return Starlette(routes=[
        Route("/v1/images/generations", images, methods=["POST"]),
        Route("/v2/videos", video_create, methods=["POST"]),
        Route("/v2/videos/status", video_get, methods=["GET"]),
        Route("/v2/videos/{vid}", video_get, methods=["GET"]),
        Route("/v1/chat/completions", chat_app, methods=["POST"]),
        # also under /v1: a deployment's base URL (and tests.contract.Fake.url) may end in /v1
        *(Route(f"{prefix}/_control/stats", stats, methods=["GET"]) for prefix in ("", "/v1")),
        *(Route(f"{prefix}/_control/reset", reset, methods=["POST"]) for prefix in ("", "/v1")),
        *(Route(f"{prefix}/_control/config", config, methods=["POST"]) for prefix in ("", "/v1")),
        *(Route(f"{prefix}/_control/requests", recent, methods=["GET"]) for prefix in ("", "/v1")),
        Route("/_control/cancel/{vid}", cancel_from_console, methods=["POST"]),
    ])


def create_files_app(state: TogetherState) -> Starlette:
    """The host result links point at (run it on another port)."""

    async def shrt(request: Request) -> Response:
        with state.lock:
            state.stats["file_gets"] += 1
            if request.headers.get("authorization"):
                state.stats["file_saw_key"] += 1
            f = state.files.get(request.path_params["fid"])
        if request.headers.get("authorization"):
            return Response("<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>",
                            status_code=400, media_type="application/xml")
        if f is None:
            return Response("Not Found", status_code=404)
        if time.time() > f["expires"]:
            return Response("<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
                            status_code=403, media_type="application/xml")
        return Response(f["data"], media_type=f["type"])

    return Starlette(routes=[Route("/shrt/{fid}", shrt, methods=["GET"])])


def _video_problem(body: dict[str, Any]) -> tuple[str, str] | None:
    if not isinstance(body.get("prompt"), str) or not body["prompt"]:
        return "prompt", "prompt is required"
    seconds = body.get("seconds")
    if seconds is not None:
        try:
            value = float(seconds) if not isinstance(seconds, bool) else -1.0
        except (TypeError, ValueError):
            value = -1.0
        if not 1 <= value <= 10:
            return "seconds", "seconds must be between 1 and 10"
    for name, lo, hi in (("fps", 15, 60), ("steps", 10, 50), ("width", 256, 1920), ("height", 256, 1920)):
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi):
            return name, f"{name} must be an integer between {lo} and {hi}"
    if body.get("output_format", "MP4") not in ("MP4", "WEBM"):
        return "output_format", "output_format must be 'MP4' or 'WEBM'"
    frames = body.get("frame_images")
    if frames is not None:
        if not isinstance(frames, list) or len(frames) > 2:
            return "frame_images", "frame_images must be a list of at most 2 frames"
        for i, frame in enumerate(frames):
            if not isinstance(frame, dict) or not isinstance(frame.get("input_image"), str):
                return f"frame_images[{i}]", "each frame needs input_image (a URL or base64)"
            if frame.get("frame", 0) not in (0, "first", "last") and not isinstance(frame.get("frame"), int):
                return f"frame_images[{i}].frame", "frame must be 'first', 'last' or a frame number"
            image = frame["input_image"]
            if not image.startswith(("http://", "https://")):
                try:
                    base64.b64decode(image, validate=True)
                except (binascii.Error, ValueError):
                    return f"frame_images[{i}].input_image", "input_image is neither a URL nor valid base64"
    return None


def _advance(state: TogetherState, v: dict[str, Any]) -> None:
    with state.lock:
        if v["status"] in ("completed", "failed", "cancelled"):
            return
        v["step"] += 1
        if v["step"] == 1:
            v["status"] = "queued" if v["polls"] > 1 else "in_progress"
            if v["polls"] > 1:
                return
        if v["step"] <= v["polls"]:
            v["status"] = "in_progress"
            v.setdefault("claimed_at", time.time())
            return
        prompt = v["prompt"]
        v["done_at"] = time.time()
        if "[fail]" in prompt:
            v["status"], v["error"] = "failed", {"code": "internal_error", "message": "Video generation failed: the renderer crashed (fake [fail])"}
        elif "[moderated-output]" in prompt:
            v["status"], v["error"] = "failed", {"code": "output_moderation", "message": "The generated video was flagged by the content safety filter."}
        else:
            v["status"] = "completed"
    if v["status"] == "completed":
        w, h = v["size"]
        if v["format"] == "WEBM":
            data, ctype = make_webm(w, h), "video/webm"
        else:
            data, ctype = openai_fake.make_mp4(max(1, int(v["seconds"])), w, h), "video/mp4"
        v["video_url"] = state.add_file(data, ctype, "[expired]" in prompt)


def _iso(t: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else None


def _video_object(v: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": v["id"], "object": "video", "model": v["model"], "status": v["status"],
        "inputs": {k: val for k, val in v["inputs"].items() if k != "frame_images"},
        "created_at": _iso(v["created"]), "claimed_at": _iso(v.get("claimed_at")), "done_at": _iso(v.get("done_at")),
        "info": {"user_id": "user_fake", "errors": [v["error"]] if v.get("error") else None},
    }
    if v["status"] == "completed":
        out["outputs"] = {"video_url": v["video_url"], "cost": VIDEO_MODELS[v["model"]]}
    if v.get("error"):
        out["error"] = v["error"]
    return out


def make_webm(w: int, h: int) -> bytes:
    """An EBML header with DocType webm, then filler: what a WebM file starts with."""
    doctype = b"\x42\x82\x84webm"
    header = b"\x1a\x45\xdf\xa3" + bytes([0x80 | len(doctype)]) + doctype
    return header + f"fake together webm {w}x{h} ".encode() * 64


def render_image(seed: str, width: int, height: int, fmt: str) -> bytes:
    hue = sum(seed.encode()) % 255
    img = Image.new("RGB", (width, height), (hue, 90, 255 - hue))
    ImageDraw.Draw(img).ellipse((width // 5, height // 5, 4 * width // 5, 4 * height // 5), fill=(255 - hue, 220, hue))
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if fmt == "jpeg" else "PNG", **({"quality": 80} if fmt == "jpeg" else {"compress_level": 1}))
    return buf.getvalue()


def _standalone() -> Starlette:
    state = TogetherState()
    files = Running(create_files_app(state)).start()
    return create_app(state=state, files_url=files.url)


if __name__ == "__main__":
    run_main(_standalone, "Fake Together AI API (images, videos, chat) with a separate file host")
