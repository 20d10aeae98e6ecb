"""A faithful fake of GrsAi's task APIs (providers.md §6 and §8).

    draw      POST /v1/draw/nano-banana | /v1/draw/completions | /v1/draw/flux
                   /v1/video/veo | /v1/video/sora-video          Authorization: Bearer <key>
                webHook "-1"   -> {"code": 0, "msg": "success", "data": {"id"}}
                webHook <url>  -> the same, then the result object POSTed there, unsigned
                               (every step, or only the final one with shutProgress: true)
                no webHook     -> a stream of `data: {…}` lines (only the final with shutProgress)
              POST /v1/draw/result {"id"} -> {"code": 0, "data": {id, status, progress, results,
                               failure_reason, error}} (flux and veo add a top-level url)
                               | {"code": -22, "msg": "...", "data": null}
    generate  POST /v1/api/generate {..., "images", "replyType": async|json|stream}
                               flat replies: {"id", "status": "running", ...}; a refusal {"error"}
              GET  /v1/api/result?id= -> {id, status (running|succeeded|failed|violation),
                               progress, results, error, failureReason, code} | {"code": -22}
    files     GET  /files/{task}/{n}.{png|jpeg|mp4}   no auth; 404 once `file_ttl` has passed

Strict where GrsAi is strict and stricter where it is silent: a model on the wrong route, a
value outside a model's list, or a field the route does not take (say `images` on the draw
API, `urls` on the new one) is refused with HTTP 200 and `code != 0` (draw) or an `error`
and no id (generate), as GrsAi reports API errors. 401 without the right Bearer key. 429
(`{"code": -1, "msg": ...}`, no Retry-After, as clients see it) for `[429]` or past
`concurrency_limit` unfinished tasks. A new task is unknown (-22) to its first `init_polls`
result requests, as GrsAi can be right after a submit; tasks are forgotten `task_ttl`
seconds after they finish.

Prompt keywords (tests/contract.py): [moderated] input moderation at the first poll (draw:
failed + failure_reason input_moderation; generate: violation + failureReason), [moderated-
output] the same for the output after the pending polls, [fail] failed + failure_reason
error, [429], [500] on create, [poll500] the first result request answers 500, [slow]
`slow_polls` running polls, [expired] succeeded with files already gone.

Control: GET /_control/stats, POST /_control/reset, POST /_control/config (merged into the
settings), GET /_control/requests (recent create bodies, images shortened), GET
/_control/callbacks (what was POSTed to webHook URLs).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from PIL import Image, ImageDraw
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.openai import make_mp4
from tests.fakes.server import run_main

API_KEY = "sk-grsai-test"
BASE_RATIOS = ("auto", "1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "5:4", "4:5", "21:9")
WIDE_RATIOS = (*BASE_RATIOS, "1:4", "4:1", "1:8", "8:1")
FLUX_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9", "9:21")
GPT2_SIZES = ("auto", "1024x1024", "1536x1024", "1024x1536", "1448x1086", "1086x1448", "1774x887", "887x1774")
BANANA_TIERS = {
    "nano-banana": (), "nano-banana-fast": (), "nano-banana-2": ("1K", "2K", "4K"), "nano-banana-2-cl": ("1K", "2K"),
    "nano-banana-2-4k-cl": ("4K",), "nano-banana-pro": ("1K", "2K", "4K"), "nano-banana-pro-vt": ("1K", "2K", "4K"),
    "nano-banana-pro-cl": ("1K", "2K", "4K"), "nano-banana-pro-vip": ("1K", "2K"), "nano-banana-pro-4k-vip": ("4K",),
}
ROUTES: dict[str, frozenset[str]] = {
    "/v1/draw/nano-banana": frozenset(BANANA_TIERS),
    "/v1/draw/completions": frozenset({"gpt-image-2", "gpt-image-2-vip", "sora-image"}),
    "/v1/draw/flux": frozenset({"flux-kontext-pro", "flux-kontext-max"}),
    "/v1/video/veo": frozenset({"veo3-fast", "veo3-pro", "veo3.1-fast", "veo3.1-pro"}),
    "/v1/video/sora-video": frozenset({"sora-2", "sora-2-pro"}),
}
GENERATE_MODELS = frozenset(BANANA_TIERS) | {"gpt-image-2", "gpt-image-2-vip", "gpt-image-2.5", "minimax-h3"}
# fields each route takes (beyond model, prompt, webHook, shutProgress)
DRAW_FIELDS = {
    "/v1/draw/nano-banana": {"urls", "aspectRatio", "imageSize"},
    "/v1/draw/completions": {"urls", "aspectRatio", "quality", "background", "variants"},
    "/v1/draw/flux": {"urls", "aspectRatio", "seed", "output_format", "safetyTolerance", "promptUpsampling",
                      "guidance", "steps"},
    "/v1/video/veo": {"urls", "aspectRatio", "duration", "durationSeconds"},
    "/v1/video/sora-video": {"url", "aspectRatio", "duration", "size", "remixTargetId"},
}
GENERATE_FIELDS = {"images", "aspectRatio", "imageSize", "quality", "background", "mask", "duration", "resolution",
                   "seed", "audios", "replyType"}
RUNNING, SUCCEEDED, FAILED, VIOLATION = "running", "succeeded", "failed", "violation"
TERMINAL = frozenset({SUCCEEDED, FAILED, VIOLATION})


class Refused(Exception):
    """A request GrsAi refuses at the API level (HTTP 200, code != 0)."""


@dataclass
class Task:
    id: str
    api: str  # draw | generate
    route: str
    model: str
    prompt: str
    video: bool
    width: int
    height: int
    seconds: int
    outcome: str  # ok | moderated | moderated-output | fail | expired
    pending_polls: int
    unknown_polls: int  # result requests still answered -22 (not registered yet)
    poll500: bool
    fmt: str = "png"
    webhook: str | None = None
    shut_progress: bool = False
    step: int = 0
    status: str = RUNNING
    finished: float | None = None
    files: dict[int, bytes] = field(default_factory=dict)


class State:
    def __init__(self, options: dict[str, Any]) -> None:
        self.initial = dict(options)
        self.lock = threading.Lock()
        self.background: set[asyncio.Task[None]] = set()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.config = dict(self.initial)
            self.tasks: dict[str, Task] = {}
            self.creates = 0
            self.polls = 0
            self.streams = 0
            self.requests: list[dict[str, Any]] = []
            self.callbacks: list[dict[str, Any]] = []

    def inflight(self) -> int:
        return sum(1 for t in self.tasks.values() if t.status not in TERMINAL)


def create_app(
    *,
    api_key: str = API_KEY,
    pending_polls: int = 2,
    slow_polls: int = 20,
    init_polls: int = 1,
    file_ttl: float = 7200.0,  # GrsAi keeps images about 2 hours
    task_ttl: float = 7200.0,
    concurrency_limit: int = 50,
    tick: float = 0.01,  # one step of a task nobody polls (streams, webHook runs)
    out_of_credits: bool = False,
) -> Starlette:
    state = State({
        "api_key": api_key, "pending_polls": pending_polls, "slow_polls": slow_polls, "init_polls": init_polls,
        "file_ttl": file_ttl, "task_ttl": task_ttl, "concurrency_limit": concurrency_limit, "tick": tick,
        "out_of_credits": out_of_credits,
    })

    async def draw(request: Request) -> Response:
        route = request.url.path
        with state.lock:
            state.creates += 1
        if (denied := _auth(request, state)) is not None:
            return denied
        body = await _json_body(request)
        if body is None:
            return _api_error(-1, "request body is not a JSON object")
        try:
            _check_draw(route, body)
        except Refused as exc:
            return _api_error(-1, str(exc))
        if (early := _early(state, body)) is not None:
            return early
        webhook = body.get("webHook")
        task = _new_task(state, "draw", route, body, str(request.base_url), webhook if webhook not in (None, "-1") else None)
        if webhook is None:  # the streaming reply: the connection stays open for the whole render
            return _stream(state, task, lambda t: _draw_data(state, t, str(request.base_url)), bool(body.get("shutProgress")))
        if task.webhook:
            _spawn(state, _run_for_webhook(state, task, str(request.base_url)))
        return JSONResponse({"code": 0, "msg": "success", "data": {"id": task.id}})

    async def draw_result(request: Request) -> Response:
        if (denied := _auth(request, state)) is not None:
            return denied
        body = await _json_body(request)
        if body is None or not isinstance(body.get("id"), str):
            return _api_error(-1, "id is required")
        with state.lock:
            state.polls += 1
            task = _visible(state, body["id"])
            if isinstance(task, Response):
                return task
            if task is None:
                return JSONResponse({"code": -22, "msg": "task not found", "data": None})
            _advance(state, task)
            data = _draw_data(state, task, str(request.base_url))
        return JSONResponse({"code": 0, "msg": "success", "data": data})

    async def generate(request: Request) -> Response:
        with state.lock:
            state.creates += 1
        if (denied := _auth(request, state)) is not None:
            return denied
        body = await _json_body(request)
        if body is None:
            return JSONResponse({"error": "request body is not a JSON object", "code": -1})
        try:
            _check_generate(body)
        except Refused as exc:
            return JSONResponse({"error": str(exc), "code": -1})
        if (early := _early(state, body)) is not None:
            return early
        task = _new_task(state, "generate", "/v1/api/generate", body, str(request.base_url), None)
        reply = body.get("replyType") or "json"
        base = str(request.base_url)
        if reply == "stream":
            return _stream(state, task, lambda t: _generate_data(state, t, base), False)
        if reply == "json":  # the final object, once the task is finished
            while True:
                with state.lock:
                    _advance(state, task)
                    if task.status in TERMINAL:
                        return JSONResponse(_generate_data(state, task, base))
                await asyncio.sleep(float(state.config["tick"]))
        with state.lock:
            return JSONResponse(_generate_data(state, task, base))

    async def generate_result(request: Request) -> Response:
        if (denied := _auth(request, state)) is not None:
            return denied
        task_id = request.query_params.get("id", "")
        with state.lock:
            state.polls += 1
            task = _visible(state, task_id)
            if isinstance(task, Response):
                return task
            if task is None or task.api != "generate":
                return JSONResponse({"id": task_id, "code": -22, "msg": "task not found"})
            _advance(state, task)
            return JSONResponse(_generate_data(state, task, str(request.base_url)))

    async def file(request: Request) -> Response:
        task_id, name = request.path_params["task_id"], request.path_params["name"]
        with state.lock:
            task = state.tasks.get(task_id)
            ttl = float(state.config["file_ttl"])
        want = "mp4" if task is not None and task.video else (task.fmt if task is not None else "")
        if task is None or task.status != SUCCEEDED or name != f"0.{want}":
            return Response("Not Found", status_code=404, media_type="text/plain")
        assert task.finished is not None
        if task.outcome == "expired" or time.time() > task.finished + ttl:
            return Response("Not Found", status_code=404, media_type="text/plain")
        if 0 not in task.files:
            task.files[0] = await asyncio.to_thread(_render, task)
        kind = "video/mp4" if task.video else f"image/{task.fmt}"
        return Response(task.files[0], media_type=kind)

    async def stats(request: Request) -> Response:
        with state.lock:
            return JSONResponse({"creates": state.creates, "polls": state.polls, "inflight": state.inflight(),
                                 "streams": state.streams, "callbacks_sent": len(state.callbacks),
                                 "tasks": len(state.tasks)})

    async def reset(request: Request) -> Response:
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

    async def callbacks(request: Request) -> Response:
        with state.lock:
            return JSONResponse(list(state.callbacks))

    return Starlette(routes=[
        *(Route(path, draw, methods=["POST"]) for path in ROUTES),
        Route("/v1/draw/result", draw_result, methods=["POST"]),
        Route("/v1/api/generate", generate, methods=["POST"]),
        Route("/v1/api/result", generate_result, methods=["GET"]),
        Route("/files/{task_id}/{name}", file, methods=["GET"]),
        Route("/_control/stats", stats, methods=["GET"]),
        Route("/_control/reset", reset, methods=["POST"]),
        Route("/_control/config", config, methods=["POST"]),
        Route("/_control/requests", recent, methods=["GET"]),
        Route("/_control/callbacks", callbacks, methods=["GET"]),
    ])


# -- requests ----------------------------------------------------------------------------
def _auth(request: Request, state: State) -> Response | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), str(state.config["api_key"]).encode()):
        return JSONResponse({"code": -1, "msg": "invalid api key"}, status_code=401)
    return None


async def _json_body(request: Request) -> dict[str, Any] | None:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def _api_error(code: int, msg: str) -> Response:
    return JSONResponse({"code": code, "msg": msg, "data": None})


def _early(state: State, body: dict[str, Any]) -> Response | None:
    """The refusals that come before a task exists: credits, 429s, a 500."""
    prompt = str(body.get("prompt") or "")
    with state.lock:
        _record(state, body)
        if state.config["out_of_credits"]:
            return _api_error(-1, "insufficient credits, please top up")
        if "[500]" in prompt:
            return Response("Internal Server Error", status_code=500, media_type="text/plain")
        if "[429]" in prompt or state.inflight() >= int(state.config["concurrency_limit"]):
            return JSONResponse({"code": -1, "msg": "too many requests, please slow down"}, status_code=429)
    return None


def _check_common(body: dict[str, Any], allowed: set[str]) -> None:
    if not isinstance(body.get("prompt"), str) or not body["prompt"].strip():
        raise Refused("prompt is required")
    extra = sorted(set(body) - allowed - {"model", "prompt", "webHook", "shutProgress"})
    if extra:
        raise Refused(f"unknown parameter {extra[0]}")
    hook = body.get("webHook")
    if hook is not None and (not isinstance(hook, str) or (hook != "-1" and not hook.startswith(("http://", "https://")))):
        raise Refused("webHook must be -1 or a URL")


def _check_images(name: str, value: Any, limit: int = 14) -> None:
    if value is None:
        return
    items = [value] if name == "url" else value
    if not isinstance(items, list) or (name != "url" and len(items) > limit):
        raise Refused(f"{name} must be a list of at most {limit} images")
    for item in items:
        if not isinstance(item, str):
            raise Refused(f"{name}: each image is a URL or base64")
        if item.startswith(("http://", "https://")):
            continue
        payload = item.partition(",")[2] if item.startswith("data:image/") else item
        try:
            base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise Refused(f"{name}: an image is neither a URL nor valid base64") from None


def _check_draw(route: str, body: dict[str, Any]) -> None:
    model = body.get("model")
    if model not in ROUTES[route]:
        raise Refused(f"model {model!r} is not supported on {route}")
    _check_common(body, DRAW_FIELDS[route])
    ratio, images = body.get("aspectRatio"), "url" if route.endswith("sora-video") else "urls"
    _check_images(images, body.get(images))
    if route == "/v1/draw/nano-banana":
        _one_of("aspectRatio", ratio, WIDE_RATIOS if str(model).startswith("nano-banana-2") else BASE_RATIOS)
        if body.get("imageSize") is not None:
            _one_of("imageSize", body["imageSize"], BANANA_TIERS[str(model)])
    elif route == "/v1/draw/completions":
        if model == "gpt-image-2":
            _one_of("aspectRatio", ratio, GPT2_SIZES)
        elif model == "sora-image":
            _one_of("aspectRatio", ratio, ("1:1", "3:2", "2:3"))
        elif ratio is not None and not re.fullmatch(r"auto|\d{3,4}x\d{3,4}", str(ratio)):
            raise Refused("aspectRatio must be auto or a pixel size")
        _one_of("quality", body.get("quality"), ("auto", "low", "medium", "high"))
        _one_of("background", body.get("background"), ("auto", "transparent", "opaque"))
    elif route == "/v1/draw/flux":
        _one_of("aspectRatio", ratio, FLUX_RATIOS)
        _one_of("output_format", body.get("output_format"), ("png", "jpeg"))
        for name, kind in (("seed", int), ("steps", int), ("safetyTolerance", int), ("promptUpsampling", bool)):
            v = body.get(name)
            if v is not None and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
                raise Refused(f"{name} has the wrong type")
        if body.get("safetyTolerance") is not None and not 0 <= body["safetyTolerance"] <= 6:
            raise Refused("safetyTolerance must be 0..6")
    elif route == "/v1/video/veo":
        _one_of("aspectRatio", ratio, ("16:9", "9:16"))
        for name in ("duration", "durationSeconds"):
            _one_of(name, body.get(name), (8,))
    else:
        _one_of("aspectRatio", ratio, ("16:9", "9:16"))
        _one_of("duration", body.get("duration"), (10, 15))
        _one_of("size", body.get("size"), ("small", "large"))


def _check_generate(body: dict[str, Any]) -> None:
    model = body.get("model")
    if model not in GENERATE_MODELS:
        raise Refused(f"model {model!r} is not supported")
    _check_common(body, GENERATE_FIELDS)
    _one_of("replyType", body.get("replyType"), ("json", "stream", "async"))
    _check_images("images", body.get("images"))
    ratio = body.get("aspectRatio")
    if model == "minimax-h3":
        _one_of("aspectRatio", ratio, ("portrait", "landscape"))
        _one_of("resolution", body.get("resolution"), ("480p", "768p", "1080p"))
        d = body.get("duration")
        if d is not None and (not isinstance(d, int) or not 1 <= d <= 15):
            raise Refused("duration must be 1..15")
    elif str(model).startswith("nano-banana"):
        _one_of("aspectRatio", ratio, WIDE_RATIOS if str(model).startswith("nano-banana-2") else BASE_RATIOS)
        if body.get("imageSize") is not None:
            _one_of("imageSize", body["imageSize"], BANANA_TIERS[str(model)])
    elif ratio is not None and not re.fullmatch(r"auto|\d{3,4}x\d{3,4}|\d{1,2}:\d{1,2}", str(ratio)):
        raise Refused("aspectRatio must be auto, a ratio or a pixel size")


def _one_of(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value is not None and value not in allowed:
        raise Refused(f"{name} {value!r} is invalid; supported: {', '.join(map(str, allowed)) or 'none'}")


def _record(state: State, body: dict[str, Any]) -> None:
    def short(v: Any) -> Any:
        if isinstance(v, str) and len(v) > 60 and not v.startswith(("http://", "https://")):
            return v[:40] + "..."
        return [short(x) for x in v] if isinstance(v, list) else v

    state.requests = [*state.requests[-49:], {k: short(v) for k, v in body.items()}]


def _geometry(route: str, model: str, body: dict[str, Any]) -> tuple[int, int]:
    ratio = str(body.get("aspectRatio") or "auto")
    m = re.fullmatch(r"(\d+)x(\d+)", ratio)
    if m:
        return int(m[1]), int(m[2])
    m = re.fullmatch(r"(\d+):(\d+)", ratio)
    a, b = (int(m[1]), int(m[2])) if m else ((16, 9) if route.startswith("/v1/video") else (1, 1))
    long = {"2K": 2048, "4K": 4096}.get(str(body.get("imageSize")), 1024)
    if route.startswith("/v1/video") or model == "minimax-h3":
        long = 1280 if body.get("size") != "large" else 1792
    if a >= b:
        return long, max(1, round(long * b / a))
    return max(1, round(long * a / b)), long


def _new_task(state: State, api: str, route: str, body: dict[str, Any], base: str, webhook: str | None) -> Task:
    prompt = str(body["prompt"])
    outcome = next((w for w in ("moderated-output", "moderated", "fail", "expired") if f"[{w}]" in prompt), "ok")
    model = str(body["model"])
    video = route.startswith("/v1/video") or model == "minimax-h3"
    w, h = _geometry(route, model, body)
    with state.lock:
        task = Task(
            id=uuid.uuid4().hex[:16] + "-" + str(int(time.time())), api=api, route=route, model=model, prompt=prompt,
            video=video, width=w, height=h, seconds=int(body.get("duration") or body.get("durationSeconds") or 8),
            outcome=outcome, pending_polls=int(state.config["slow_polls" if "[slow]" in prompt else "pending_polls"]),
            unknown_polls=int(state.config["init_polls"]), poll500="[poll500]" in prompt, webhook=webhook,
            shut_progress=bool(body.get("shutProgress")), fmt="jpeg" if body.get("output_format") == "jpeg" else "png",
        )
        state.tasks[task.id] = task
    return task


def _visible(state: State, task_id: str) -> Task | Response | None:
    """The task a result request sees (caller holds the lock): None for -22, a 500 once."""
    task = state.tasks.get(task_id)
    if task is None:
        return None
    if task.unknown_polls > 0:
        task.unknown_polls -= 1
        return None
    if task.poll500:
        task.poll500 = False
        return Response("Internal Server Error", status_code=500, media_type="text/plain")
    if task.finished is not None and time.time() > task.finished + float(state.config["task_ttl"]):
        return None
    return task


# -- lifecycle ---------------------------------------------------------------------------
def _advance(state: State, task: Task) -> None:
    """One step of a task's life (a poll, a stream tick). Caller holds the lock."""
    if task.status in TERMINAL:
        return
    task.step += 1
    if task.outcome == "moderated":
        task.status = VIOLATION if task.api == "generate" else FAILED
    elif task.outcome == "fail" and task.step > 1:
        task.status = FAILED
    elif task.step > task.pending_polls:
        if task.outcome == "moderated-output":
            task.status = VIOLATION if task.api == "generate" else FAILED
        else:
            task.status = SUCCEEDED
    if task.status in TERMINAL:
        task.finished = time.time()


def _progress(task: Task) -> int:
    if task.status == SUCCEEDED:
        return 100
    return min(99, round(100 * task.step / (task.pending_polls + 1)))


def _file_urls(task: Task, base: str) -> list[str]:
    ext = "mp4" if task.video else task.fmt
    return [f"{base.rstrip('/')}/files/{task.id}/0.{ext}"]


def _failure(task: Task) -> tuple[str, str]:
    if task.outcome == "moderated":
        return "input_moderation", "The prompt violates the content policy"
    if task.outcome == "moderated-output":
        return "output_moderation", "The generated content was blocked by moderation"
    return "error", "Generation failed: upstream render error (fake [fail])"


def _draw_data(state: State, task: Task, base: str) -> dict[str, Any]:
    data: dict[str, Any] = {"id": task.id, "status": task.status, "progress": _progress(task), "results": [],
                            "failure_reason": "", "error": ""}
    if task.status == SUCCEEDED:
        urls = _file_urls(task, base)
        data["results"] = [{"url": u, "content": ""} for u in urls]
        if task.route in ("/v1/draw/flux", "/v1/video/veo"):
            data["url"] = urls[0]
    elif task.status == FAILED:
        data["failure_reason"], data["error"] = _failure(task)
    return data


def _generate_data(state: State, task: Task, base: str) -> dict[str, Any]:
    data: dict[str, Any] = {"id": task.id, "status": task.status, "progress": _progress(task), "results": [],
                            "error": "", "failureReason": "", "code": 0}
    if task.status == SUCCEEDED:
        data["results"] = [{"url": u} for u in _file_urls(task, base)]
    elif task.status in (FAILED, VIOLATION):
        data["failureReason"], data["error"] = _failure(task)
    return data


def _stream(state: State, task: Task, shape: Any, shut_progress: bool) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        with state.lock:
            state.streams += 1
        while True:
            await asyncio.sleep(float(state.config["tick"]))
            with state.lock:
                _advance(state, task)
                done = task.status in TERMINAL
                data = shape(task)
            if done or not shut_progress:
                yield f"data: {json.dumps(data)}\n\n".encode()
            if done:
                return

    return StreamingResponse(lines(), media_type="text/event-stream")


def _spawn(state: State, coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    state.background.add(task)
    task.add_done_callback(state.background.discard)


async def _run_for_webhook(state: State, task: Task, base: str) -> None:
    """The task runs on its own; the result object is POSTed, unsigned, to webHook."""
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            await asyncio.sleep(float(state.config["tick"]))
            with state.lock:
                if task.id not in state.tasks:
                    return  # reset
                _advance(state, task)
                done = task.status in TERMINAL
                payload = _draw_data(state, task, base)
            if not done and task.shut_progress:
                continue
            try:
                resp = await client.post(str(task.webhook), json=payload)
                status = resp.status_code
            except httpx.HTTPError:
                status = 0
            with state.lock:
                state.callbacks.append({"id": task.id, "status": payload["status"], "answered": status})
            if done:
                return


# -- media -------------------------------------------------------------------------------
def _render(task: Task) -> bytes:
    if task.video:
        return make_mp4(task.seconds, task.width, task.height)
    img = Image.new("RGB", (task.width, task.height), (40, 90 + len(task.prompt) % 100, 160))
    ImageDraw.Draw(img).ellipse((task.width // 4, task.height // 4, 3 * task.width // 4, 3 * task.height // 4),
                                fill=(230, 180, 40))
    buf = io.BytesIO()
    if task.fmt == "jpeg":
        img.save(buf, format="JPEG", quality=80)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


if __name__ == "__main__":
    run_main(create_app, "Fake GrsAi draw and generate APIs")
