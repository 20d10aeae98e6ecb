"""A fake Kling task API as CometAPI and DMXAPI relay it (providers.md §7b/§7c, §9), over real HTTP.

    python -m tests.fakes.kling --port 9200     # base_url http://127.0.0.1:9200, paths under /kling

Routes (`Authorization: Bearer <api_key>`; a missing or wrong key is the relay's 401 in
its OpenAI-style envelope `{"error": {"message", "type": "comet_api_error", "code"}}`):

    POST /kling/v1/videos/text2video     {model_name, prompt, negative_prompt, duration "5"|"10",
    POST /kling/v1/videos/image2video     aspect_ratio, mode std|pro, cfg_scale, image, ...}
         -> {"code": 0, "message": "SUCCEED", "request_id", "data": {"task_id", "task_status": "submitted", ...}}
    GET  /kling/v1/videos/{kind}/{task_id}   submitted -> processing -> succeed | failed, one step per poll
    GET  /cdn/{file}.mp4?Expires=&Signature=  the result, no auth; 403 AccessDenied after `url_ttl`
    GET  /_control/stats   POST /_control/reset   POST /_control/config {max_concurrency, url_ttl}

Kling's errors carry its own codes, with the HTTP status Kling gives them: 400 1200/1201
(bad parameters, with the reason), 404 1203 (no such model, no such task), 400 1301
(content security policy), 429 1302 (rate limit) / 1303 (concurrency over the resource pack),
429 1102 (resource pack empty), 500 5000. No Retry-After is sent: Kling documents none.
Validation is Kling's: prompt ≤ 2500 characters, duration the string "5" or "10",
aspect_ratio 16:9 | 9:16 | 1:1, mode std | pro, cfg_scale 0..1 and not on kling-v2.x,
image2video's image a URL (fetched) or bare base64 (a `data:` prefix is refused), JPEG or
PNG, ≥ 300 px a side, ratio within 1:2.5..2.5:1, ≤ 10 MB; unknown body fields are refused.

Prompt keywords (tests/contract.py): [moderated] 400 code 1301; [moderated-output] the task
fails "Failure to pass the risk control system"; [fail] the task fails; [429] 429 code 1302;
[500] 500 code 5000; [poll500] the first poll answers 500 5000; [slow] many polls; [expired]
the result URL answers 403 at once; also [quota] 429 code 1102, [http200] the scripted error
comes with HTTP 200 (as some relays send Kling's codes), [relay500] CometAPI's 500
`invalid_request` envelope.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.google_veo import mp4_bytes
from tests.fakes.server import run_main

API_KEY = "kling-relay-key"
TEXT_MODELS = ("kling-v1", "kling-v1-6", "kling-v2-master", "kling-v2-1-master", "kling-v2-5-turbo", "kling-v2-6")
IMAGE_MODELS = (*TEXT_MODELS, "kling-v1-5", "kling-v2-1")
ASPECTS = {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (960, 960)}
COMMON_FIELDS = {"model_name", "prompt", "negative_prompt", "cfg_scale", "mode", "camera_control", "duration",
                 "callback_url", "external_task_id", "sound", "watermark_info"}
FIELDS = {
    "text2video": COMMON_FIELDS | {"aspect_ratio"},
    "image2video": COMMON_FIELDS | {"image", "image_tail", "static_mask", "dynamic_masks", "voice_list"},
}
MAX_IMAGE_BYTES = 10 * 2**20


@dataclass
class KlingState:
    api_key: str = API_KEY
    polls: int = 3  # polls until a task finishes
    slow_polls: int = 12
    url_ttl: float = 3600.0  # seconds a result URL works (Kling keeps videos 30 days)
    max_concurrency: int | None = None  # unfinished tasks before 1303 (None: no limit)
    error_type: str = "comet_api_error"  # the relay's envelope type (DMXAPI: new_api_error)
    lock: threading.Lock = field(default_factory=threading.Lock)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tasks.clear()
        self.files.clear()
        self.stats = {"creates": 0, "accepted": 0, "polls": 0, "inflight": 0, "peak_inflight": 0,
                      "polls_by_task": {}, "cdn_gets": 0, "cdn_saw_key": 0, "last": None}


def _rid() -> str:
    return str(uuid.uuid4())


def kling(code: int, message: str, status: int, data: Any = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message, "request_id": _rid(), "data": data}, status)


def create_app(state: KlingState | None = None, path_prefix: str = "/kling", **options: Any) -> Starlette:
    state = state or KlingState(**options)

    def relay_error(status: int, message: str, code: str = "") -> JSONResponse:
        return JSONResponse({"error": {"message": f"{message} (request id: {_rid()})", "type": state.error_type,
                                       "param": "", "code": code}}, status)

    def authorized(request: Request) -> Response | None:
        got = request.headers.get("authorization")
        if not got:
            return relay_error(401, "No token provided")
        if got != f"Bearer {state.api_key}":
            return relay_error(401, "Invalid token")
        return None

    def scripted(prompt: str) -> Response | None:
        status_of = (lambda s: 200) if "[http200]" in prompt else (lambda s: s)
        if "[429]" in prompt:
            return kling(1302, "API request too fast, exceeding rate limit", status_of(429))
        if "[quota]" in prompt:
            return kling(1102, "Resource pack depleted or expired", status_of(429))
        if "[500]" in prompt:
            return kling(5000, "Server internal error", status_of(500))
        if "[relay500]" in prompt:
            return relay_error(500, "invalid request body", code="invalid_request")
        if "[moderated]" in prompt:
            return kling(1301, "Trigger the content security policy of the platform", status_of(400))
        return None

    async def image_problem(ref: Any, name: str) -> str | None:
        if not isinstance(ref, str) or not ref:
            return f"{name} is required"
        if ref.startswith("data:"):
            return f"{name} must be a URL or base64 without the data: prefix"
        if ref.startswith(("http://", "https://")):
            try:
                async with httpx.AsyncClient(timeout=5) as client:
                    got = await client.get(ref)
            except httpx.HTTPError:
                return f"{name} url is not accessible"
            if got.status_code != 200:
                return f"{name} url is not accessible"
            data = got.content
        else:
            try:
                data = base64.b64decode(ref, validate=True)
            except (binascii.Error, ValueError):
                return f"{name} is not valid base64"
        if len(data) > MAX_IMAGE_BYTES:
            return f"{name} must be at most 10MB"
        try:
            img = Image.open(io.BytesIO(data))
        except OSError:
            return f"{name} is not an image"
        if img.format not in ("JPEG", "PNG"):
            return f"{name} format must be jpg, jpeg or png"
        w, h = img.size
        if min(w, h) < 300:
            return f"{name} width and height must be at least 300px"
        if not 1 / 2.5 <= w / h <= 2.5:
            return f"{name} aspect ratio must be between 1:2.5 and 2.5:1"
        return None

    async def validate(kind: str, body: dict[str, Any]) -> Response | None:
        def bad(message: str) -> Response:
            return kling(1201, message, 400)

        unknown = sorted(set(body) - FIELDS[kind])
        if unknown:
            return bad(f"unknown parameter: {unknown[0]}")
        model = body.get("model_name", "kling-v1")
        if model not in (IMAGE_MODELS if kind == "image2video" else TEXT_MODELS):
            return kling(1203, f"model_name {model} is not supported for {kind}", 404)
        prompt = body.get("prompt")
        if kind == "text2video" and (not isinstance(prompt, str) or not prompt):
            return bad("prompt is required")
        for key in ("prompt", "negative_prompt"):
            if key in body and (not isinstance(body[key], str) or len(body[key]) > 2500):
                return bad(f"{key} must be a string of at most 2500 characters")
        if "duration" in body and body["duration"] not in ("5", "10"):
            return bad("duration value is invalid, must be one of: 5, 10")
        if "aspect_ratio" in body and body["aspect_ratio"] not in ASPECTS:
            return bad("aspect_ratio value is invalid, must be one of: 16:9, 9:16, 1:1")
        if "mode" in body and body["mode"] not in ("std", "pro"):
            return bad("mode value is invalid, must be one of: std, pro")
        if "cfg_scale" in body:
            cfg = body["cfg_scale"]
            if model.startswith("kling-v2"):
                return bad(f"cfg_scale is not supported by {model}")
            if isinstance(cfg, bool) or not isinstance(cfg, int | float) or not 0 <= cfg <= 1:
                return bad("cfg_scale must be a number in [0, 1]")
        if kind == "image2video":
            if (problem := await image_problem(body.get("image"), "image")) is not None:
                return bad(problem)
            if "image_tail" in body and (problem := await image_problem(body["image_tail"], "image_tail")) is not None:
                return bad(problem)
            if "image_tail" in body and "camera_control" in body:
                return bad("image_tail and camera_control cannot be used together")
        return None

    def task_data(task: dict[str, Any]) -> dict[str, Any]:
        data = {k: task[k] for k in ("task_id", "task_status", "task_info", "created_at", "updated_at")}
        if task["task_status"] in ("succeed", "failed"):
            data["task_status_msg"] = task.get("task_status_msg", "")
        if task["task_status"] == "succeed":
            data["task_result"] = {"videos": task["videos"]}
            data["final_unit_deduction"] = "1" if task["duration"] == "5" else "2"
        return data

    def finish(task: dict[str, Any], base: str) -> None:
        prompt = task["prompt"]
        state.stats["inflight"] -= 1
        task["updated_at"] = int(time.time() * 1000)
        if "[moderated-output]" in prompt:
            task |= {"task_status": "failed", "task_status_msg": "Failure to pass the risk control system"}
            return
        if "[fail]" in prompt:
            task |= {"task_status": "failed", "task_status_msg": "The task failed due to an internal error, please try again"}
            return
        seconds = int(task["duration"]) + 0.041  # Kling reports the clip's real length ("5.041")
        w, h = task["size"]
        name = secrets.token_hex(8)
        expires = time.time() + (-1 if "[expired]" in prompt else state.url_ttl)
        sig = hashlib.sha256(f"{name}{int(expires)}".encode()).hexdigest()[:20]
        state.files[name] = {"data": mp4_bytes(seconds, w, h, prompt), "expires": expires}
        task |= {"task_status": "succeed", "task_status_msg": "", "videos": [
            {"id": secrets.token_hex(6), "url": f"{base}/cdn/{name}.mp4?Expires={int(expires)}&Signature={sig}",
             "duration": f"{seconds:.3f}"}]}

    async def create(request: Request) -> Response:
        kind = request.path_params["kind"]
        with state.lock:
            state.stats["creates"] += 1
        if kind not in FIELDS:
            return kling(1202, "invalid request method", 404)
        if (denied := authorized(request)) is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            return kling(1200, "Invalid request parameters: the body is not JSON", 400)
        if not isinstance(body, dict):
            return kling(1200, "Invalid request parameters: the body is not an object", 400)
        with state.lock:
            state.stats["last"] = {"kind": kind, "body": body}
        if (problem := scripted(str(body.get("prompt", "")))) is not None:
            return problem
        if (problem := await validate(kind, body)) is not None:
            return problem
        now = int(time.time() * 1000)
        task_id = f"{secrets.randbelow(10**18):018d}"
        with state.lock:
            if state.max_concurrency is not None and state.stats["inflight"] >= state.max_concurrency:
                return kling(1303, "Concurrency or QPS exceeds prepaid resource package limit", 429)
            state.stats["accepted"] += 1
            state.stats["inflight"] += 1
            state.stats["peak_inflight"] = max(state.stats["peak_inflight"], state.stats["inflight"])
            size = ASPECTS.get(body.get("aspect_ratio", "16:9"), (1280, 720))
            if body.get("mode") == "pro":
                size = (size[0] * 3 // 2, size[1] * 3 // 2)
            task = {"task_id": task_id, "kind": kind, "task_status": "submitted", "created_at": now, "updated_at": now,
                    "task_info": {"external_task_id": body.get("external_task_id", "")}, "prompt": str(body.get("prompt", "")),
                    "duration": body.get("duration", "5"), "size": size, "polls": 0}
            state.tasks[task_id] = task
            return kling(0, "SUCCEED", 200, task_data(task))

    async def query(request: Request) -> Response:
        if (denied := authorized(request)) is not None:
            return denied
        kind, task_id = request.path_params["kind"], request.path_params["task_id"]
        with state.lock:
            state.stats["polls"] += 1
            task = state.tasks.get(task_id)
            if task is None or task["kind"] != kind:
                return kling(1203, f"task {task_id} does not exist", 404)
            by_task = state.stats["polls_by_task"]
            by_task[task_id] = by_task.get(task_id, 0) + 1
            task["polls"] += 1
            if "[poll500]" in task["prompt"] and task["polls"] == 1:
                return kling(5000, "Server internal error", 500)
            if task["task_status"] in ("submitted", "processing"):
                total = state.slow_polls if "[slow]" in task["prompt"] else state.polls
                if task["polls"] >= total:
                    finish(task, str(request.base_url).rstrip("/"))
                elif task["polls"] >= 2:
                    task["task_status"] = "processing"
                    task["updated_at"] = int(time.time() * 1000)
            return kling(0, "SUCCEED", 200, task_data(task))

    async def cdn(request: Request) -> Response:
        name = request.path_params["name"]
        with state.lock:
            state.stats["cdn_gets"] += 1
            if request.headers.get("authorization"):
                state.stats["cdn_saw_key"] += 1
            f = state.files.get(name)
        if f is None or time.time() > f["expires"]:
            return Response("<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
                            "<Message>Request has expired</Message></Error>", 403, media_type="application/xml")
        return Response(f["data"], media_type="video/mp4")

    async def stats(request: Request) -> Response:
        with state.lock:
            return JSONResponse(dict(state.stats))

    async def reset(request: Request) -> Response:
        with state.lock:
            state.reset()
        return JSONResponse({"ok": True})

    async def config(request: Request) -> Response:
        body = await request.json()
        with state.lock:
            for key in ("max_concurrency", "url_ttl", "polls", "slow_polls"):
                if key in body:
                    setattr(state, key, body[key])
        return JSONResponse({"ok": True})

    prefix = path_prefix.rstrip("/")
    app = Starlette(routes=[
        Route(f"{prefix}/v1/videos/{{kind}}", create, methods=["POST"]),
        Route(f"{prefix}/v1/videos/{{kind}}/{{task_id}}", query, methods=["GET"]),
        Route("/cdn/{name}.mp4", cdn, methods=["GET"]),
        Route("/_control/stats", stats, methods=["GET"]),
        Route("/_control/reset", reset, methods=["POST"]),
        Route("/_control/config", config, methods=["POST"]),
    ])
    app.state.kling = state
    return app


if __name__ == "__main__":
    run_main(create_app, "fake Kling task API (as CometAPI / DMXAPI relay it)")
