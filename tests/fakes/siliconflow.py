"""A faithful fake of SiliconFlow's API (providers.md §7a "Fake").

    POST /v1/images/generations   Bearer key -> {images:[{url}], timings:{inference}, seed}
    POST /v1/video/submit         Bearer key -> {requestId}
    POST /v1/video/status         Bearer key, {requestId} -> {status, reason, position, results}
    POST /v1/chat/completions     Bearer key, JSON or SSE; every stream chunk carries the
                                  running `usage` (the last one is final); no separate usage
                                  chunk, whatever stream_options says; reasoning models
                                  send delta.reasoning_content first
    GET  /files/{id}.{png|mp4}?OSSAccessKeyId=&Expires=<epoch>&Signature=   signed OSS-style
                                  result links, no auth: 403 XML AccessDenied "Request has
                                  expired." after the TTL (images 1 h, videos 10 min by default)

Strict where the real API is, and answering as it does:
    no or wrong key            401 with the bare JSON string "Invalid token"
    unknown model              400 {"code":20012,"message":"Model does not exist. Please check it carefully.","data":null}
    bad or missing parameter   400 {"code":20015,"message":"...","data":null}: image_size missing or not one of the
                               model's sizes (Kolors, Qwen-Image), image_size on an edit model, edit model without
                               `image`, batch_size outside 1..4, seed outside 0..9999999999, num_inference_steps
                               outside 1..100, guidance_scale outside 0..20 or on a model other than Kolors, video
                               image_size not 1280x720/720x1280/960x960, I2V without `image`, T2V with one
    batch_size                 honoured by Kolors only: other models return one image
    unknown path               plain text "404 page not found"
    every answer               x-siliconcloud-trace-id

Behaviour by prompt keyword (tests/contract.py), on every route:
    [moderated]         400 {"code":20015,"message":"The content you entered contains sensitive words..."}
                        (undocumented; reported by clients: the words, not the code, say moderation)
    [moderated-output]  video: InQueue/InProgress, then Failed with a reason about the generated content
    [fail]              video: one InProgress poll, then Failed with a `reason`; images: 500
    [429]               429 {"message":"Request was rejected due to rate limiting...Details:IPM limit reached.",
                        "data":null}, no Retry-After, no x-ratelimit-* (chat: TPM, with code 50602)
    [500]               500, a plain-text "unknown error"
    [503]               503 {"code":50505,"message":"Model service overloaded. Please try again later.","data":null}
    [poll500]           video: the first status poll answers 500
    [slow]              video: InQueue for `slow_polls` polls, `position` counting down, then InProgress
    [expired]           the result link has already expired (403 XML)
    [broke]             account balance empty: 403 {"code":30001,...}
Otherwise a video is InQueue for `queue_polls` polls (position counting down), InProgress for
`progress_polls`, then Succeed. The reply to an unknown requestId is undocumented: 400 20015 here.

Control (at the root and under /v1): GET /_control/stats, POST /_control/reset, POST /_control/config,
GET /_control/requests.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import io
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.fakes.bfl import render_image
from tests.fakes.openai import make_mp4
from tests.fakes.server import run_main

API_KEY = "sk-siliconflow-test"
KOLORS_SIZES = ("1024x1024", "960x1280", "768x1024", "720x1440", "720x1280")
QWEN_SIZES = ("1328x1328", "1664x928", "928x1664", "1472x1140", "1140x1472", "1584x1056", "1056x1584")
IMAGE_MODELS: dict[str, tuple[str, ...] | None] = {  # model -> allowed image_size (None: any WxH; (): none taken)
    "Kwai-Kolors/Kolors": KOLORS_SIZES,
    "Qwen/Qwen-Image": QWEN_SIZES,
    "Qwen/Qwen-Image-Edit": (),
    "Qwen/Qwen-Image-Edit-2509": (),
    "black-forest-labs/FLUX.1-schnell": None,
}
EDIT_MODELS = frozenset({"Qwen/Qwen-Image-Edit", "Qwen/Qwen-Image-Edit-2509"})
VIDEO_MODELS = {"Wan-AI/Wan2.2-T2V-A14B": False, "Wan-AI/Wan2.2-I2V-A14B": True}  # model -> needs image
VIDEO_SIZES = ("1280x720", "720x1280", "960x960")
CHAT_MODELS = {"Qwen/Qwen2.5-7B-Instruct": False, "deepseek-ai/DeepSeek-R1": True, "Pro/deepseek-ai/DeepSeek-R1": True}
MAX_SEED = 9_999_999_999
RATE_LIMIT = "Request was rejected due to rate limiting. If you want more, please contact contact@siliconflow.cn. Details:{} limit reached."
SENSITIVE = "The content you entered contains sensitive words. Please modify it and try again."


@dataclass
class Video:
    id: str
    model: str
    prompt: str
    size: tuple[int, int]
    seed: int
    outcome: str  # ok | moderated-output | fail | expired
    queue_polls: int
    progress_polls: int
    poll500: bool
    step: int = 0
    status: str = "InQueue"
    finished: float | None = None


@dataclass
class File:
    kind: str  # image | video
    prompt: str
    seed: int
    size: tuple[int, int]
    expires: float
    data: bytes | None = None


@dataclass
class State:
    config: dict[str, Any]
    initial: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    key: bytes = field(default_factory=lambda: uuid.uuid4().bytes)

    def __post_init__(self) -> None:
        self.initial = dict(self.config)
        self.reset()

    def reset(self) -> None:
        self.config = dict(self.initial)
        self.videos: dict[str, Video] = {}
        self.files: dict[str, File] = {}
        self.creates = 0
        self.polls = 0
        self.chats = 0
        self.requests: list[dict[str, Any]] = []


class TraceIds:
    """Every answer carries x-siliconcloud-trace-id, errors and 404s included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_trace(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-siliconcloud-trace-id", uuid.uuid4().hex.encode())]
            await send(message)

        await self.app(scope, receive, with_trace)


def create_app(
    *,
    api_key: str = API_KEY,
    image_ttl: float = 3600.0,
    video_ttl: float = 600.0,
    queue_polls: int = 2,
    progress_polls: int = 2,
    slow_polls: int = 12,
) -> ASGIApp:
    state = State({"api_key": api_key, "image_ttl": image_ttl, "video_ttl": video_ttl, "queue_polls": queue_polls,
                   "progress_polls": progress_polls, "slow_polls": slow_polls})

    async def images(request: Request) -> Response:
        with state.lock:
            state.creates += 1
        if (denied := _auth(request, state)) is not None:
            return denied
        body = await _json(request)
        if not isinstance(body, dict):
            return _bad("The parameter is invalid. Please check again.")
        _record(state, "images", body)
        model = body.get("model")
        if model not in IMAGE_MODELS:
            return _no_model()
        if (scripted := _scripted(str(body.get("prompt") or ""), "IPM")) is not None:
            return scripted
        problem = _image_problem(str(model), body)
        if problem:
            return _bad(problem)
        prompt = str(body["prompt"])
        if "[fail]" in prompt:
            return PlainTextResponse("unknown error", status_code=500)
        seed = int(body.get("seed") if body.get("seed") is not None else uuid.uuid4().int % 10**9)
        count = int(body.get("batch_size") or 1) if model == "Kwai-Kolors/Kolors" else 1  # others: one image
        size = _edit_size(body.get("image")) if model in EDIT_MODELS else _size(str(body.get("image_size") or "1024x1024"))
        ttl = float(state.config["image_ttl"])
        expires = time.time() - 1 if "[expired]" in prompt else time.time() + ttl
        urls = []
        with state.lock:
            for i in range(count):
                urls.append(_file(state, request, File("image", prompt, seed + i, size, expires), "png"))
        return _ok({"images": [{"url": u} for u in urls], "timings": {"inference": 1.23}, "seed": seed})

    async def submit(request: Request) -> Response:
        with state.lock:
            state.creates += 1
        if (denied := _auth(request, state)) is not None:
            return denied
        body = await _json(request)
        if not isinstance(body, dict):
            return _bad("The parameter is invalid. Please check again.")
        _record(state, "video", body)
        model = body.get("model")
        if model not in VIDEO_MODELS:
            return _no_model()
        prompt = str(body.get("prompt") or "")
        if (scripted := _scripted(prompt, "RPM", code=50603)) is not None:
            return scripted
        problem = _video_problem(str(model), body)
        if problem:
            return _bad(problem)
        outcome = next((w for w in ("moderated-output", "fail", "expired") if f"[{w}]" in prompt), "ok")
        slow = "[slow]" in prompt
        video = Video(
            id=uuid.uuid4().hex, model=str(model), prompt=prompt, size=_size(str(body.get("image_size") or "1280x720")),
            seed=int(body.get("seed") or 0), outcome=outcome,
            queue_polls=int(state.config["slow_polls"] if slow else state.config["queue_polls"]),
            progress_polls=int(state.config["progress_polls"]), poll500="[poll500]" in prompt,
        )
        with state.lock:
            state.videos[video.id] = video
        return _ok({"requestId": video.id})

    async def status(request: Request) -> Response:
        if (denied := _auth(request, state)) is not None:
            return denied
        body = await _json(request)
        rid = body.get("requestId") if isinstance(body, dict) else None
        with state.lock:
            state.polls += 1
            video = state.videos.get(str(rid)) if isinstance(rid, str) else None
            if video is None:
                return _bad("The parameter is invalid. Please check again.")
            if video.poll500:
                video.poll500 = False
                return PlainTextResponse("unknown error", status_code=500)
            _advance(video)
            answer: dict[str, Any] = {"status": video.status, "reason": "", "results": None}
            if video.status == "InQueue":
                answer["position"] = video.queue_polls - video.step
            elif video.status == "Failed":
                answer["reason"] = ("The generated video contains sensitive content and was blocked."
                                    if video.outcome == "moderated-output" else "Inference failed: CUDA out of memory (fake [fail])")
            elif video.status == "Succeed":
                assert video.finished is not None
                expires = video.finished - 1 if video.outcome == "expired" else video.finished + float(state.config["video_ttl"])
                f = File("video", video.prompt, video.seed, video.size, expires)
                url = _file(state, request, f, "mp4", key=video.id)
                answer["results"] = {"videos": [{"url": url}], "timings": {"inference": 95.5}, "seed": video.seed}
        return _ok(answer)

    async def chat(request: Request) -> Response:
        with state.lock:
            state.chats += 1
        if (denied := _auth(request, state)) is not None:
            return denied
        body = await _json(request)
        if not isinstance(body, dict):
            return _bad("The parameter is invalid. Please check again.")
        _record(state, "chat", body)
        model = body.get("model")
        if model not in CHAT_MODELS:
            return _no_model()
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _bad("Input validation error: messages must not be empty")
        prompt = " ".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
        if (scripted := _scripted(prompt, "TPM", code=50602)) is not None:
            return scripted
        reasoning = CHAT_MODELS[str(model)]
        words = [f"word{i}" for i in range(1, 6)]
        thoughts = ["think", "then", "answer"] if reasoning else []
        prompt_tokens = max(1, len(prompt.split()))
        cid, created = uuid.uuid4().hex, int(time.time())

        def usage(completion: int) -> dict[str, Any]:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
                    "completion_tokens_details": {"reasoning_tokens": len(thoughts)},
                    "prompt_tokens_details": {"cached_tokens": 0},
                    "prompt_cache_hit_tokens": 0, "prompt_cache_miss_tokens": prompt_tokens}

        total = len(words) + len(thoughts)
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": " ".join(words)}
            if reasoning:
                message["reasoning_content"] = " ".join(thoughts)
            return _ok({"id": cid, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": "",
                        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage(total)})

        async def events() -> Any:
            done = 0
            pieces = [("reasoning_content", t) for t in thoughts] + [("content", w + " ") for w in words]
            for i, (key, text) in enumerate(pieces):
                done += 1
                last = i == len(pieces) - 1
                delta = {"role": "assistant", key: text, ("content" if key == "reasoning_content" else "reasoning_content"): None}
                chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                         "system_fingerprint": "", "choices": [{"index": 0, "delta": delta,
                                                                "finish_reason": "stop" if last else None}],
                         "usage": usage(done)}  # a running count in every chunk: the last is the total
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                await asyncio.sleep(0)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def files(request: Request) -> Response:
        fid, ext = request.path_params["fid"], request.path_params["ext"]
        q = request.query_params
        with state.lock:
            f = state.files.get(fid)
        if f is None or ext != ("png" if f.kind == "image" else "mp4"):
            return _oss_error(404, "NoSuchKey", "The specified key does not exist.")
        if q.get("OSSAccessKeyId") != "LTAIfake" or not hmac.compare_digest(q.get("Signature", ""), _sign(state, fid, q.get("Expires", ""))):
            return _oss_error(403, "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided.")
        try:
            expired = time.time() > float(q.get("Expires", ""))
        except ValueError:
            expired = True
        if expired:
            return _oss_error(403, "AccessDenied", "Request has expired.")
        if f.data is None:
            if f.kind == "image":
                f.data = await asyncio.to_thread(render_image, f.prompt, f.seed, f.size[0], f.size[1], "png")
            else:
                f.data = make_mp4(5, *f.size)
        return Response(f.data, media_type="image/png" if f.kind == "image" else "video/mp4")

    async def stats(request: Request) -> Response:
        with state.lock:
            return JSONResponse({"creates": state.creates, "polls": state.polls, "chats": state.chats,
                                 "videos": len(state.videos), "files": len(state.files)})

    async def reset(request: Request) -> Response:
        with state.lock:
            state.reset()
        return JSONResponse({"ok": True})

    async def config(request: Request) -> Response:
        changes = await request.json()
        with state.lock:
            unknown = set(changes) - set(state.config)
            if unknown:
                return JSONResponse({"detail": f"unknown settings {sorted(unknown)}"}, status_code=400)
            state.config.update(changes)
            return JSONResponse(state.config)

    async def recent(request: Request) -> Response:
        with state.lock:
            return JSONResponse(list(state.requests))

    async def not_found(request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 404
        return PlainTextResponse("404 page not found" if code == 404 else "405 method not allowed", status_code=code)

    app = Starlette(
        routes=[
            Route("/v1/images/generations", images, methods=["POST"]),
            Route("/v1/video/submit", submit, methods=["POST"]),
            Route("/v1/video/status", status, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/files/{fid}.{ext}", files, methods=["GET"]),
            # control routes at the root and under /v1 (the base URL a deployment is given)
            *(Route(f"{prefix}/_control/stats", stats, methods=["GET"]) for prefix in ("", "/v1")),
            *(Route(f"{prefix}/_control/reset", reset, methods=["POST"]) for prefix in ("", "/v1")),
            *(Route(f"{prefix}/_control/config", config, methods=["POST"]) for prefix in ("", "/v1")),
            *(Route(f"{prefix}/_control/requests", recent, methods=["GET"]) for prefix in ("", "/v1")),
        ],
        exception_handlers={404: not_found, 405: not_found},
    )
    return TraceIds(app)


# -- answers -------------------------------------------------------------------------------
def _ok(body: dict[str, Any]) -> Response:
    return JSONResponse(body)


def _bad(message: str, code: int = 20015) -> Response:
    return JSONResponse({"code": code, "message": message, "data": None}, status_code=400)


def _no_model() -> Response:
    return _bad("Model does not exist. Please check it carefully.", 20012)


def _auth(request: Request, state: State) -> Response | None:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), str(state.config["api_key"]).encode()):
        return Response(json.dumps("Invalid token"), status_code=401, media_type="application/json")
    return None


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _scripted(prompt: str, limit: str, *, code: int | None = None) -> Response | None:
    """The keyword-scripted refusals every route shares."""
    if "[moderated]" in prompt:
        return _bad(SENSITIVE)
    if "[429]" in prompt:
        body: dict[str, Any] = {"message": RATE_LIMIT.format(limit), "data": None}
        if code is not None:
            body = {"code": code, **body}
        return JSONResponse(body, status_code=429)  # no Retry-After, no x-ratelimit-*
    if "[500]" in prompt:
        return PlainTextResponse("unknown error", status_code=500)
    if "[503]" in prompt:
        return JSONResponse({"code": 50505, "message": "Model service overloaded. Please try again later.", "data": None},
                            status_code=503)
    if "[broke]" in prompt:
        return JSONResponse({"code": 30001, "message": "Sorry, your account balance is insufficient", "data": None},
                            status_code=403)
    return None


def _record(state: State, route: str, body: dict[str, Any]) -> None:
    shown = {k: (v[:40] + "..." if isinstance(v, str) and len(v) > 60 else v) for k, v in body.items()}
    with state.lock:
        state.requests = [*state.requests[-49:], {"route": route, "body": shown}]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _image_problem(model: str, body: dict[str, Any]) -> str | None:
    if not isinstance(body.get("prompt"), str) or not body["prompt"].strip():
        return "Input validation error: prompt is required"
    sizes = IMAGE_MODELS[model]
    size = body.get("image_size")
    if sizes == ():
        if size is not None:
            return f"image_size is not supported by {model}"
        if not _image_ref(body.get("image")):
            return f"image is required for {model}: a URL or a data:image/...;base64 URI"
    elif size is None:
        return "image_size is required"
    elif not isinstance(size, str) or (sizes is not None and size not in sizes) or _size(size) == (0, 0):
        return f"Invalid image_size {size!r}" + (f"; supported: {', '.join(sizes)}" if sizes else "")
    if body.get("image") is not None and (not _image_ref(body["image"]) or model in ("Qwen/Qwen-Image", "black-forest-labs/FLUX.1-schnell")):
        return "The parameter is invalid. Please check again. (image)"
    if "batch_size" in body and (not _is_int(body["batch_size"]) or not 1 <= body["batch_size"] <= 4):
        return "batch_size must be between 1 and 4"
    if "seed" in body and (not _is_int(body["seed"]) or not 0 <= body["seed"] <= MAX_SEED):
        return f"seed must be between 0 and {MAX_SEED}"
    steps = body.get("num_inference_steps")
    if steps is not None and (not _is_int(steps) or not 1 <= steps <= 100):
        return "num_inference_steps must be between 1 and 100"
    scale = body.get("guidance_scale")
    if scale is not None and (model != "Kwai-Kolors/Kolors" or not _is_number(scale) or not 0 <= scale <= 20):
        return "guidance_scale must be between 0 and 20 (Kolors)"
    return None


def _video_problem(model: str, body: dict[str, Any]) -> str | None:
    if not isinstance(body.get("prompt"), str) or not body["prompt"].strip():
        return "Input validation error: prompt is required"
    if body.get("image_size") not in VIDEO_SIZES:
        return f"Invalid image_size {body.get('image_size')!r}; supported: {', '.join(VIDEO_SIZES)}"
    needs_image = VIDEO_MODELS[model]
    if needs_image and not _image_ref(body.get("image")):
        return f"image is required for {model}"
    if not needs_image and body.get("image") is not None:
        return f"image is not supported by {model}"
    if "seed" in body and (not _is_int(body["seed"]) or not 0 <= body["seed"] <= MAX_SEED):
        return f"seed must be between 0 and {MAX_SEED}"
    unknown = set(body) - {"model", "prompt", "negative_prompt", "image_size", "image", "seed"}
    if unknown:
        return f"The parameter is invalid. Please check again. ({', '.join(sorted(unknown))})"
    return None


def _image_ref(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    if value.startswith(("http://", "https://")):
        return True
    header, sep, payload = value.partition(",")
    if not (sep and header.startswith("data:image/") and header.endswith(";base64")):
        return False
    try:
        base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _size(size: str) -> tuple[int, int]:
    w, _, h = size.partition("x")
    return (int(w), int(h)) if w.isdigit() and h.isdigit() and 64 <= int(w) <= 2048 and 64 <= int(h) <= 2048 else (0, 0)


def _edit_size(image: Any) -> tuple[int, int]:
    """An edit keeps its input's size: read from a data URI; a linked image is not fetched here."""
    if isinstance(image, str) and image.startswith("data:"):
        try:
            with Image.open(io.BytesIO(base64.b64decode(image.partition(",")[2]))) as img:
                return img.size
        except (OSError, ValueError):
            pass
    return 1024, 1024


def _file(state: State, request: Request, f: File, ext: str, key: str | None = None) -> str:
    """A signed OSS-style link to a new result file. Caller holds the lock."""
    fid = key or uuid.uuid4().hex
    state.files.setdefault(fid, f)
    expires = f"{int(state.files[fid].expires)}"
    base = str(request.base_url).rstrip("/")
    return f"{base}/files/{fid}.{ext}?OSSAccessKeyId=LTAIfake&Expires={expires}&Signature={_sign(state, fid, expires)}"


def _sign(state: State, fid: str, expires: str) -> str:
    return base64.urlsafe_b64encode(hmac.new(state.key, f"{fid}\n{expires}".encode(), hashlib.sha1).digest()).decode().rstrip("=")


def _oss_error(status: int, code: str, message: str) -> Response:
    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n  <Code>{code}</Code>\n  <Message>{message}</Message>\n'
           f"  <RequestId>{uuid.uuid4().hex[:24].upper()}</RequestId>\n  <HostId>sc-maas.oss-cn-shanghai.aliyuncs.com</HostId>\n</Error>")
    return Response(xml, status_code=status, media_type="application/xml")


# -- lifecycle -----------------------------------------------------------------------------
def _advance(video: Video) -> None:
    """One status poll's step. Caller holds the lock."""
    if video.status in ("Succeed", "Failed"):
        return
    video.step += 1
    if video.step <= video.queue_polls:
        video.status = "InQueue"
        return
    running = video.step - video.queue_polls
    if video.outcome == "fail" and running > 1:
        video.status, video.finished = "Failed", time.time()
    elif running > video.progress_polls:
        video.status = "Failed" if video.outcome == "moderated-output" else "Succeed"
        video.finished = time.time()
    else:
        video.status = "InProgress"


if __name__ == "__main__":
    run_main(create_app, "Fake SiliconFlow API (images, video, chat)")
