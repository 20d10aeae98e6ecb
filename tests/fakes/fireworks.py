"""A fake Fireworks AI API (providers.md §7f): FLUX image workflows, and chat.

    python -m tests.fakes.fireworks --port 9400    # base URL http://127.0.0.1:9400/inference/v1

Routes under /inference/v1 (`Authorization: Bearer <api_key>`: 401 without or wrong):

    POST /workflows/accounts/fireworks/models/{flux-1-schnell-fp8|flux-1-dev-fp8}/text_to_image
         {prompt, aspect_ratio (one of 11), guidance_scale, num_inference_steps, seed}; other
         fields are refused (400). Accept image/jpeg | image/png -> the raw image with
         Finish-Reason and Seed headers; application/json (or none) -> {id, base64: [data URI
         of a PNG], finishReason, seed}; any other Accept -> 406
    POST /workflows/accounts/fireworks/models/{flux-kontext-pro|flux-kontext-max}
         {prompt, input_image (URL, data URI or base64), aspect_ratio (21:9..9:21), seed,
          output_format jpeg|png, safety_tolerance 0..6 (0..2 with an input image),
          prompt_upsampling, webhook_url, webhook_secret} -> {request_id}; 400 {error_message}
    POST /workflows/accounts/fireworks/models/{model}/get_result  {"id"} -> BFL's get_result:
         Pending (progress) -> Ready {result.sample} | Request Moderated | Content Moderated |
         Error; "Task not found" for an id unknown to that model, or once `result_ttl` passed
    POST /chat/completions        OpenAI's format (served by tests.fakes.openai's chat)
    GET  /_control/stats, POST /_control/reset, POST /_control/config, GET /_control/requests
         (also at the root)

`result.sample` points at another host (`create_delivery_app`, run on its own port): a
signed link that answers 403 once expired and 400 to a request carrying an Authorization
header, so a client that sends the Fireworks key there fails.

Prompt keywords (tests/contract.py): [moderated] (text_to_image: CONTENT_FILTERED; Kontext:
Request Moderated), [moderated-output] (text_to_image: CONTENT_FILTERED; Kontext: Content
Moderated after some polls), [fail] (Kontext: Error), [429] (429, x-ratelimit-* headers,
no Retry-After), [500], [poll500], [slow], [expired] (the sample has already expired).
The 429 body and headers are Fireworks' OpenAI-like shape as public clients see it
(unverified in detail).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import math
import re
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
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.fakes import openai as openai_fake
from tests.fakes.server import Running, run_main

API_KEY = "fw-test-key"
BASE = "/inference/v1"
MODELS = f"{BASE}/workflows/accounts/fireworks/models"
RATIOS = ("1:1", "21:9", "16:9", "3:2", "5:4", "4:5", "2:3", "9:16", "9:21", "4:3", "3:4")
SYNC_MODELS = {"flux-1-schnell-fp8": 12, "flux-1-dev-fp8": 50}  # model -> max num_inference_steps
ASYNC_MODELS = ("flux-kontext-pro", "flux-kontext-max")
SYNC_FIELDS = frozenset({"prompt", "aspect_ratio", "guidance_scale", "num_inference_steps", "seed", "safety_check"})
KONTEXT_FIELDS = frozenset({"prompt", "input_image", "seed", "aspect_ratio", "output_format", "webhook_url",
                            "webhook_secret", "prompt_upsampling", "safety_tolerance"})
RATIO_RE = re.compile(r"^(\d+):(\d+)$")
TERMINAL = ("Ready", "Request Moderated", "Content Moderated", "Error")


@dataclass
class FireworksState:
    api_key: str = API_KEY
    pending_polls: int = 2
    slow_polls: int = 20
    result_ttl: float = 600.0
    delivery_url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    key: bytes = field(default_factory=lambda: uuid.uuid4().bytes)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.initial = {k: getattr(self, k) for k in ("pending_polls", "slow_polls", "result_ttl")}
        self.reset()

    def reset(self) -> None:
        with self.lock:
            for k, v in self.initial.items():
                setattr(self, k, v)
            self.tasks.clear()
            self.requests.clear()
            self.stats.clear()
            self.stats.update({"creates": 0, "polls": 0, "sample_gets": 0, "sample_saw_key": 0})


class _At:
    """Serve `app` as if the request had come to `path` (the OpenAI fake's chat under /inference)."""

    def __init__(self, app: ASGIApp, path: str) -> None:
        self.app, self.path = app, path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app({**scope, "path": self.path, "raw_path": self.path.encode(), "root_path": ""}, receive, send)


def error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"object": "error", "type": type_, "code": code, "message": message}}, status, headers=headers)


def create_app(state: FireworksState | None = None, delivery_url: str | None = None, **options: Any) -> Starlette:
    state = state or FireworksState(**options)
    if delivery_url:
        state.delivery_url = delivery_url.rstrip("/")
    chat = _At(openai_fake.create_app(api_key=state.api_key), "/v1/chat/completions")

    def denied(request: Request) -> Response | None:
        got = request.headers.get("authorization", "")
        if got != f"Bearer {state.api_key}":
            return error(401, "The API key you provided is invalid." if got else "Missing API key",
                         type_="unauthorized", code="UNAUTHORIZED")
        return None

    async def read(request: Request, endpoint: str, counts: bool = True) -> dict[str, Any] | Response:
        if counts:
            with state.lock:
                state.stats["creates"] += 1
        if (refused := denied(request)) is not None:
            return refused
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "Request body is not valid JSON")
        if not isinstance(body, dict):
            return error(400, "Request body must be a JSON object")
        if counts:
            shown = {k: (v[:40] + "..." if isinstance(v, str) and len(v) > 60 else v) for k, v in body.items()}
            with state.lock:
                state.requests[:] = [*state.requests[-49:], {"endpoint": endpoint, "body": shown,
                                                             "accept": request.headers.get("accept")}]
        return body

    def transport_keywords(prompt: str) -> Response | None:
        if "[429]" in prompt:
            return error(429, "Request rate limit exceeded, please try again later", type_="rate_limit_error",
                         code="RATE_LIMIT_EXCEEDED",
                         headers={"x-ratelimit-limit-requests": "6", "x-ratelimit-remaining-requests": "0",
                                  "x-ratelimit-over-limit": "yes"})
        if "[500]" in prompt:
            return error(500, "Internal server error", type_="internal_server_error", code="INTERNAL")
        return None

    # -- text_to_image --------------------------------------------------------------------
    async def text_to_image(request: Request) -> Response:
        model = request.path_params["model"]
        body = await read(request, "text_to_image")
        if isinstance(body, Response):
            return body
        if model not in SYNC_MODELS:
            return error(404, f"Model accounts/fireworks/models/{model} not found", type_="not_found", code="NOT_FOUND")
        unknown = sorted(set(body) - SYNC_FIELDS)
        if unknown:
            return error(400, f"Extra inputs are not permitted: {unknown}")
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            return error(400, "prompt: Field required")
        ratio = body.get("aspect_ratio", "1:1")
        if ratio not in RATIOS:
            return error(400, f"aspect_ratio: Input should be one of {list(RATIOS)}")
        steps = body.get("num_inference_steps", 4)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= SYNC_MODELS[model]:
            return error(400, f"num_inference_steps must be between 1 and {SYNC_MODELS[model]}")
        guidance = body.get("guidance_scale", 3.5)
        if isinstance(guidance, bool) or not isinstance(guidance, int | float):
            return error(400, "guidance_scale: Input should be a valid number")
        seed = body.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            return error(400, "seed: Input should be a valid integer")
        accept = request.headers.get("accept", "application/json").split(",")[0].strip()
        if accept not in ("image/jpeg", "image/png", "application/json", "*/*"):
            return error(406, f"Unsupported Accept type {accept}; use image/jpeg, image/png or application/json")
        prompt = str(body["prompt"])
        if (problem := transport_keywords(prompt)) is not None:
            return problem
        filtered = "[moderated" in prompt
        reason = "CONTENT_FILTERED" if filtered else "SUCCESS"
        seed = seed or int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:3], "big")
        w, h = ratio_size(ratio)
        fmt = "jpeg" if accept == "image/jpeg" else "png"
        image = render_image(prompt, seed, w, h, fmt, blank=filtered)
        if accept.startswith("image/"):
            return Response(image, media_type=accept, headers={"Finish-Reason": reason, "Seed": str(seed)})
        return JSONResponse({"id": uuid.uuid4().hex, "base64": ["data:image/png;base64," + base64.b64encode(image).decode()],
                             "finishReason": reason, "seed": seed})

    # -- Kontext --------------------------------------------------------------------------
    async def kontext(request: Request) -> Response:
        model = request.path_params["model"]
        body = await read(request, "kontext")
        if isinstance(body, Response):
            return body
        if model not in ASYNC_MODELS:
            if model in SYNC_MODELS:
                return JSONResponse({"error_message": f"{model} is served on /text_to_image"}, status_code=400)
            return error(404, f"Model accounts/fireworks/models/{model} not found", type_="not_found", code="NOT_FOUND")
        if problem := _kontext_problem(body):
            return JSONResponse({"error_message": problem}, status_code=400)
        prompt = str(body["prompt"])
        if (scripted := transport_keywords(prompt)) is not None:
            return scripted
        rid = uuid.uuid4().hex
        outcome = next((w for w in ("moderated-output", "moderated", "fail", "expired") if f"[{w}]" in prompt), "ok")
        ratio = str(body.get("aspect_ratio") or "1:1")
        with state.lock:
            state.tasks[rid] = {
                "id": rid, "model": model, "prompt": prompt, "outcome": outcome, "step": 0, "status": "Pending",
                "polls": state.slow_polls if "[slow]" in prompt else state.pending_polls, "poll500": "[poll500]" in prompt,
                "fmt": str(body.get("output_format") or "png"), "size": ratio_size(ratio), "seed": int(body.get("seed") or 7),
                "finished": None, "image": None,
            }
        return JSONResponse({"request_id": rid})

    async def get_result(request: Request) -> Response:
        model = request.path_params["model"]
        body = await read(request, "get_result", counts=False)
        if isinstance(body, Response):
            return body
        rid = str(body.get("id") or "")
        with state.lock:
            state.stats["polls"] += 1
            task = state.tasks.get(rid)
            if task is not None and task["model"] != model:
                task = None
            if task is not None and task["poll500"]:
                task["poll500"] = False
                return error(500, "Internal server error", type_="internal_server_error", code="INTERNAL")
            if task is None or (task["finished"] and time.time() > task["finished"] + state.result_ttl):
                return JSONResponse({"id": rid, "status": "Task not found", "result": None, "progress": None, "details": None})
            _advance(task)
            return JSONResponse(_answer(state, task))

    # -- control --------------------------------------------------------------------------
    async def stats(request: Request) -> Response:
        with state.lock:
            return JSONResponse(dict(state.stats))

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse({"ok": True})

    async def config(request: Request) -> Response:
        changes = await request.json()
        if unknown := set(changes) - set(state.initial):
            return JSONResponse({"detail": f"unknown settings {sorted(unknown)}"}, status_code=400)
        with state.lock:
            for k, v in changes.items():
                setattr(state, k, v)
        return JSONResponse({"ok": True})

    async def recent(request: Request) -> Response:
        with state.lock:
            return JSONResponse(list(state.requests))

    return Starlette(routes=[
        Route(f"{MODELS}/{{model}}/text_to_image", text_to_image, methods=["POST"]),
        Route(f"{MODELS}/{{model}}/get_result", get_result, methods=["POST"]),
        Route(f"{MODELS}/{{model}}", kontext, methods=["POST"]),
        Route(f"{BASE}/chat/completions", chat, methods=["POST"]),
        *(Route(f"{prefix}/_control/stats", stats, methods=["GET"]) for prefix in ("", BASE)),
        *(Route(f"{prefix}/_control/reset", reset, methods=["POST"]) for prefix in ("", BASE)),
        *(Route(f"{prefix}/_control/config", config, methods=["POST"]) for prefix in ("", BASE)),
        *(Route(f"{prefix}/_control/requests", recent, methods=["GET"]) for prefix in ("", BASE)),
    ])


def create_delivery_app(state: FireworksState) -> Starlette:
    """The host `result.sample` points at (run it on another port)."""

    async def sample(request: Request) -> Response:
        rid, ext = request.path_params["rid"], request.path_params["ext"]
        se, sig = request.query_params.get("se", ""), request.query_params.get("sig", "")
        with state.lock:
            state.stats["sample_gets"] += 1
            if request.headers.get("authorization"):
                state.stats["sample_saw_key"] += 1
            task = state.tasks.get(rid)
        if request.headers.get("authorization"):
            return _xml(400, "InvalidAuthenticationInfo", "Server failed to authenticate the request: a signed URL takes no Authorization header.")
        if task is None or task["status"] != "Ready" or ext != task["fmt"]:
            return _xml(404, "BlobNotFound", "The specified blob does not exist.")
        if not hmac.compare_digest(sig, _sign(state, rid, ext, se)):
            return _xml(403, "AuthenticationFailed", "Signature did not match.")
        try:
            expired = time.time() > float(se)
        except ValueError:
            expired = True
        if expired:
            return _xml(403, "AuthenticationFailed", "Signed expiry time must be after signed start time.")
        if task["image"] is None:
            w, h = task["size"]
            task["image"] = render_image(task["prompt"], task["seed"], w, h, task["fmt"])
        return Response(task["image"], media_type=f"image/{task['fmt']}")

    return Starlette(routes=[Route("/results/{rid}/sample.{ext}", sample, methods=["GET"])])


def _kontext_problem(body: dict[str, Any]) -> str | None:
    if unknown := sorted(set(body) - KONTEXT_FIELDS):
        return f"Extra inputs are not permitted: {unknown}"
    if not isinstance(body.get("prompt"), str) or not body["prompt"]:
        return "prompt: Field required"
    fmt = body.get("output_format", "png")
    if fmt not in ("jpeg", "png"):
        return "output_format: Input should be 'jpeg' or 'png'"
    ratio = body.get("aspect_ratio")
    if ratio is not None:
        m = RATIO_RE.match(str(ratio))
        if not m or int(m[2]) == 0 or not 9 / 21 <= int(m[1]) / int(m[2]) <= 21 / 9:
            return "aspect_ratio: must be between 21:9 and 9:21"
    image = body.get("input_image")
    if image is not None:
        if not isinstance(image, str):
            return "input_image: Input should be a valid string"
        if not image.startswith(("http://", "https://")):
            payload = image.partition(",")[2] if image.startswith("data:") else image
            try:
                base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                return "input_image: neither a URL nor valid base64"
    tol = body.get("safety_tolerance", 2)
    limit = 2 if image else 6
    if isinstance(tol, bool) or not isinstance(tol, int) or not 0 <= tol <= limit:
        return f"safety_tolerance: must be between 0 and {limit}" + (" for image to image" if image else "")
    if "prompt_upsampling" in body and not isinstance(body["prompt_upsampling"], bool):
        return "prompt_upsampling: Input should be a valid boolean"
    return None


def _advance(task: dict[str, Any]) -> None:
    """One step per get_result. Caller holds the lock."""
    if task["status"] in TERMINAL:
        return
    task["step"] += 1
    if task["outcome"] == "moderated":
        final = "Request Moderated"
    elif task["outcome"] == "fail" and task["step"] > 1:
        final = "Error"
    elif task["step"] > task["polls"]:
        final = "Content Moderated" if task["outcome"] == "moderated-output" else "Ready"
    else:
        return
    task["status"], task["finished"] = final, time.time()


def _answer(state: FireworksState, task: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"id": task["id"], "status": task["status"], "result": None, "progress": None, "details": None}
    if task["status"] == "Pending":
        out["progress"] = round(task["step"] / (task["polls"] + 1), 3)
    elif task["status"] == "Ready":
        expiry = task["finished"] - 1 if task["outcome"] == "expired" else task["finished"] + state.result_ttl
        se = f"{expiry:.3f}"
        sample = f"{state.delivery_url}/results/{task['id']}/sample.{task['fmt']}?se={se}&sig={_sign(state, task['id'], task['fmt'], se)}"
        out["result"] = {"sample": sample, "prompt": task["prompt"], "seed": task["seed"]}
    elif task["status"] in ("Request Moderated", "Content Moderated"):
        out["details"] = {"Moderation Reasons": ["Derivative Works Filter"] if task["status"] == "Request Moderated" else ["NSFW"]}
    elif task["status"] == "Error":
        out["error"] = "Generation failed: the sampler crashed (fake [fail])"
    return out


def _sign(state: FireworksState, rid: str, ext: str, se: str) -> str:
    return hmac.new(state.key, f"{rid}/{ext}/{se}".encode(), hashlib.sha256).hexdigest()[:43]


def _xml(status: int, code: str, message: str) -> Response:
    return Response(f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>',
                    status_code=status, media_type="application/xml")


def ratio_size(ratio: str) -> tuple[int, int]:
    """~1 MP at the ratio, sides on the 32 px grid (what FLUX renders for a ratio)."""
    a, b = (int(x) for x in ratio.split(":"))

    def side(x: int, y: int) -> int:
        return max(32, round(math.sqrt(1024 * 1024 * x / y) / 32) * 32)

    return side(a, b), side(b, a)


def render_image(prompt: str, seed: int, w: int, h: int, fmt: str, blank: bool = False) -> bytes:
    digest = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()
    img = Image.new("RGB", (w, h), (0, 0, 0) if blank else (digest[0], digest[1], digest[2]))
    if not blank:
        ImageDraw.Draw(img).rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(digest[3], digest[4], digest[5]))
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if fmt == "jpeg" else "PNG", **({"quality": 80} if fmt == "jpeg" else {"compress_level": 1}))
    return buf.getvalue()


def _standalone() -> Starlette:
    state = FireworksState()
    delivery = Running(create_delivery_app(state)).start()
    return create_app(state=state, delivery_url=delivery.url)


if __name__ == "__main__":
    run_main(_standalone, "Fake Fireworks AI API (FLUX workflows, chat) with a separate delivery host")
