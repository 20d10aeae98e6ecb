"""A faithful fake of the Black Forest Labs (FLUX) API (providers.md §2 and §8).

    POST /v1/{model}            x-key required (401 none / 403 wrong) -> {id, polling_url, cost, input_mp, output_mp}
    GET  /v1/get_result?id=     x-key required -> {id, status, result, progress, details, preview}
    GET  /results/{id}/sample.{jpeg|png}?se=<expiry>&sig=<sig>   signed delivery URL, no auth;
                                403 (Azure-style AuthenticationFailed) once expired or forged, 404 unknown

`polling_url` points at `polling_base` when given, and get_result answers "Task not found"
on any other host:port, as BFL's global API does for a task living on another cluster:
run the same app on two ports to prove a client polls the URL it was given.

Behaviour by prompt keyword (tests/contract.py):
    [moderated]         Request Moderated on the first poll, details {"Moderation Reasons": [...]}
    [moderated-output]  Pending for N polls, then Content Moderated
    [fail]              one Pending poll, then Error with a top-level "error" string
    [429]               429 {"error": "rate_limit_exceeded", ...} + Retry-After
    [500]               500 on create
    [poll500]           the first get_result for the task answers 500
    [slow]              Pending for `slow_polls` polls, progress rising
    [expired]           Ready, but result.sample has already expired (403)
Otherwise Pending for `pending_polls` polls (progress rising), then Ready.

429s carry Retry-After and {"error": "rate_limit_exceeded", "message", "retry_after"};
with `retry_after_header=False` just {"detail": ...}, no hint at all.
Errors: 422 FastAPI `detail` list for bad width/height/aspect_ratio/output_format/
safety_tolerance/images (a `data:` prefix on an image is refused: BFL wants bare base64
or a URL); 402 when `out_of_credits` (POST /_control/config); 429 when more than
`concurrency_limit` (24; 6 for flux-kontext-max) tasks are unfinished; 404 unknown model.
Tasks expire `result_ttl` seconds after finishing: get_result then says "Task not found".

Webhooks: with `webhook_url` the task also runs on its own (one step per `webhook_tick`
seconds) and its final get_result body is POSTed there, signed with
`X-BFL-Signature: sha256=<hex HMAC-SHA256(webhook_secret, raw body)>` when a secret was sent.

Control: GET /_control/stats, POST /_control/reset, POST /_control/config (JSON merged into
the settings), GET /_control/requests (recent create bodies, images shortened).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import io
import json
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image, ImageDraw
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.server import run_main

PENDING, READY = "Pending", "Ready"
REQUEST_MODERATED, CONTENT_MODERATED = "Request Moderated", "Content Moderated"
ERROR, NOT_FOUND = "Error", "Task not found"
TERMINAL = frozenset({READY, REQUEST_MODERATED, CONTENT_MODERATED, ERROR})
RATIO_RE = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class Spec:
    """One endpoint's schema, as docs.bfl.ai's OpenAPI declares it."""

    geometry: str  # "size" or "ratio"
    images: tuple[str, ...]  # image fields it reads
    safety_max: int
    cost: float
    grid: int = 32
    min_side: int = 256
    max_side: int | None = 1440
    max_pixels: int | None = None
    default_size: tuple[int, int] = (1024, 768)


def _flux1(cost: float) -> Spec:
    return Spec("size", ("image_prompt",), safety_max=6, cost=cost)


def _kontext(cost: float) -> Spec:
    return Spec("ratio", ("input_image", "input_image_2", "input_image_3", "input_image_4"), safety_max=6, cost=cost)


def _flux2(cost: float) -> Spec:
    images = ("input_image", *(f"input_image_{i}" for i in range(2, 9)))
    return Spec(
        "size", images, safety_max=5, cost=cost, grid=16, min_side=64, max_side=None,
        max_pixels=4 * 1024 * 1024, default_size=(1024, 1024),
    )


SPECS: dict[str, Spec] = {
    "flux-pro-1.1": _flux1(4.0),
    "flux-pro": _flux1(5.0),
    "flux-dev": _flux1(2.5),
    "flux-pro-1.1-ultra": Spec("ratio", ("image_prompt",), safety_max=6, cost=6.0),
    "flux-kontext-pro": _kontext(4.0),
    "flux-kontext-max": _kontext(8.0),
    "flux-2-pro": _flux2(3.0),
    "flux-2-max": _flux2(7.0),
    "flux-2-flex": _flux2(6.0),
}


@dataclass
class Task:
    id: str
    model: str
    prompt: str
    seed: int
    width: int
    height: int
    fmt: str
    outcome: str  # ok | moderated | moderated-output | fail | expired
    pending_polls: int
    poll500: bool
    webhook_url: str | None = None
    webhook_secret: str | None = None
    delivery_base: str = ""  # where result.sample points (the polling host, like a regional CDN)
    step: int = 0
    status: str = PENDING
    started: float = field(default_factory=time.time)
    finished: float | None = None
    image: bytes | None = None


class State:
    def __init__(self, options: dict[str, Any]) -> None:
        self.initial = dict(options)
        self.lock = threading.Lock()  # two servers (two threads, two loops) share this
        self.key = uuid.uuid4().bytes  # signs delivery URLs
        self.background: set[asyncio.Task[None]] = set()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.config = dict(self.initial)
            self.tasks: dict[str, Task] = {}
            self.creates = 0
            self.polls = 0
            self.polls_by_host: Counter[str] = Counter()
            self.peak_inflight = 0
            self.webhooks: list[dict[str, Any]] = []
            self.requests: list[dict[str, Any]] = []

    def inflight(self, model: str | None = None) -> int:
        return sum(1 for t in self.tasks.values() if t.status not in TERMINAL and (model is None or t.model == model))


def create_app(
    *,
    api_key: str = "bfl-test-key",
    polling_base: str | None = None,
    pending_polls: int = 2,
    slow_polls: int = 25,
    result_ttl: float = 600.0,
    concurrency_limit: int = 24,
    kontext_max_limit: int = 6,
    retry_after: int = 2,
    retry_after_header: bool = True,
    webhook_tick: float = 0.01,
    out_of_credits: bool = False,
) -> Starlette:
    state = State(
        {
            "api_key": api_key, "polling_base": polling_base, "pending_polls": pending_polls,
            "slow_polls": slow_polls, "result_ttl": result_ttl, "concurrency_limit": concurrency_limit,
            "kontext_max_limit": kontext_max_limit, "retry_after": retry_after,
            "retry_after_header": retry_after_header,
            "webhook_tick": webhook_tick, "out_of_credits": out_of_credits,
        }
    )

    async def submit(request: Request) -> Response:
        with state.lock:
            state.creates += 1
        model = request.path_params["model"]
        if (denied := _auth(request, state)) is not None:
            return denied
        spec = SPECS.get(model)
        if spec is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _invalid([_problem(["body"], "JSON decode error", "json_invalid")])
        if not isinstance(body, dict):
            return _invalid([_problem(["body"], "Input should be a valid dictionary", "dict_type")])
        problems, size = _validate(spec, body)
        if problems:
            return _invalid(problems)
        _record(state, model, body)
        prompt = str(body.get("prompt") or "")
        if state.config["out_of_credits"]:
            return JSONResponse({"detail": "Insufficient credits. Add credits at https://dashboard.bfl.ai"}, status_code=402)
        if "[500]" in prompt:
            return Response("Internal Server Error", status_code=500, media_type="text/plain")
        with state.lock:
            limit = state.config["kontext_max_limit"] if model == "flux-kontext-max" else state.config["concurrency_limit"]
            busy = state.inflight(model if model == "flux-kontext-max" else None)
            if "[429]" in prompt or busy >= limit:
                return _too_many(state, f"Too many active tasks ({busy}/{limit})")
            task = _new_task(state, model, spec, body, size)
            polling = (state.config["polling_base"] or str(request.base_url)).rstrip("/")
            task.delivery_base = polling
            state.tasks[task.id] = task
            state.peak_inflight = max(state.peak_inflight, state.inflight())
        if task.webhook_url:
            _spawn(state, _run_for_webhook(state, task))
        return JSONResponse(
            {
                "id": task.id,
                "polling_url": f"{polling}/v1/get_result?id={task.id}",
                "cost": spec.cost,
                "input_mp": round(sum(1 for f in spec.images if body.get(f)) * 1.0, 2),
                "output_mp": round(task.width * task.height / 1e6, 2),
            }
        )

    async def get_result(request: Request) -> Response:
        if (denied := _auth(request, state)) is not None:
            return denied
        task_id = request.query_params.get("id", "")
        with state.lock:
            state.polls += 1
            state.polls_by_host[request.url.netloc] += 1
            task = state.tasks.get(task_id)
            polling_base = state.config["polling_base"]
            if polling_base and request.url.netloc != urlsplit(polling_base).netloc:
                task = None  # this "cluster" does not hold the task
            if task is not None and task.poll500:
                task.poll500 = False
                return Response("Internal Server Error", status_code=500, media_type="text/plain")
            if task is None or _expired(state, task):
                return JSONResponse({"id": task_id, "status": NOT_FOUND, "result": None, "progress": None, "details": None, "preview": None})
            _advance(state, task)
            answer = _answer(state, task)
        return JSONResponse(answer)

    async def sample(request: Request) -> Response:
        task_id, ext = request.path_params["task_id"], request.path_params["ext"]
        se, sig = request.query_params.get("se", ""), request.query_params.get("sig", "")
        with state.lock:
            task = state.tasks.get(task_id)
        if task is None or task.status != READY or ext != task.fmt:
            return _azure_error(404, "BlobNotFound", "The specified blob does not exist.")
        if not hmac.compare_digest(sig, _sign(state, task_id, ext, se)):
            return _azure_error(403, "AuthenticationFailed", "Signature did not match.")
        try:
            expired = time.time() > float(se)
        except ValueError:
            expired = True
        if expired:
            return _azure_error(403, "AuthenticationFailed", "Signed expiry time must be after signed start time.")
        if task.image is None:
            task.image = await asyncio.to_thread(render_image, task.prompt, task.seed, task.width, task.height, task.fmt)
        return Response(task.image, media_type=f"image/{task.fmt}")

    async def stats(request: Request) -> Response:
        with state.lock:
            return JSONResponse(
                {
                    "creates": state.creates, "polls": state.polls, "inflight": state.inflight(),
                    "peak_inflight": state.peak_inflight, "polls_by_host": dict(state.polls_by_host),
                    "webhooks_sent": len(state.webhooks), "tasks": len(state.tasks),
                }
            )

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

    return Starlette(
        routes=[
            Route("/v1/get_result", get_result, methods=["GET"]),
            Route("/v1/{model}", submit, methods=["POST"]),
            Route("/results/{task_id}/sample.{ext}", sample, methods=["GET"]),
            Route("/_control/stats", stats, methods=["GET"]),
            Route("/_control/reset", reset, methods=["POST"]),
            Route("/_control/config", config, methods=["POST"]),
            Route("/_control/requests", recent, methods=["GET"]),
        ]
    )


# -- create ------------------------------------------------------------------------------
def _auth(request: Request, state: State) -> Response | None:
    key = request.headers.get("x-key")
    if not key:
        return JSONResponse({"detail": "Not authenticated"}, status_code=401)
    if not hmac.compare_digest(key, str(state.config["api_key"])):
        return JSONResponse({"detail": "Invalid API key"}, status_code=403)
    return None


def _too_many(state: State, message: str) -> Response:
    """The 429 body is undocumented: BFL's skills repo shows this one with Retry-After;
    `retry_after_header=False` answers the bare FastAPI shape clients must also survive."""
    wait = int(state.config["retry_after"])
    if not state.config["retry_after_header"]:
        return JSONResponse({"detail": message}, status_code=429)
    body = {"error": "rate_limit_exceeded", "message": message, "retry_after": wait}
    return JSONResponse(body, status_code=429, headers={"Retry-After": str(wait)})


def _problem(loc: list[Any], msg: str, kind: str, value: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg}
    if value is not None:
        out["input"] = value if not isinstance(value, str) else value[:100]
    return out


def _invalid(problems: list[dict[str, Any]]) -> Response:
    return JSONResponse({"detail": problems}, status_code=422)


def _validate(spec: Spec, body: dict[str, Any]) -> tuple[list[dict[str, Any]], tuple[int, int]]:
    problems: list[dict[str, Any]] = []
    if not isinstance(body.get("prompt"), str) or not body["prompt"]:
        problems.append(_problem(["body", "prompt"], "Field required", "missing"))
    fmt = body.get("output_format")
    if fmt is not None and fmt not in ("jpeg", "png"):
        problems.append(_problem(["body", "output_format"], "Input should be 'jpeg' or 'png'", "enum", fmt))
    if body.get("seed") is not None and (isinstance(body["seed"], bool) or not isinstance(body["seed"], int)):
        problems.append(_problem(["body", "seed"], "Input should be a valid integer", "int_type", body["seed"]))
    tol = body.get("safety_tolerance")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, int) or not 0 <= tol <= spec.safety_max):
        problems.append(_problem(["body", "safety_tolerance"], f"Input should be less than or equal to {spec.safety_max}", "less_than_equal", tol))
    if "prompt_upsampling" in body and not isinstance(body["prompt_upsampling"], bool):
        problems.append(_problem(["body", "prompt_upsampling"], "Input should be a valid boolean", "bool_type", body["prompt_upsampling"]))
    for name in spec.images:
        problems += _check_image(name, body.get(name))
    size = _size_problems(spec, body, problems)
    return problems, size


def _size_problems(spec: Spec, body: dict[str, Any], problems: list[dict[str, Any]]) -> tuple[int, int]:
    if spec.geometry == "ratio":
        ratio = body.get("aspect_ratio") or "1:1"
        m = RATIO_RE.match(str(ratio))
        if not m or int(m[2]) == 0 or not 9 / 21 <= int(m[1]) / int(m[2]) <= 21 / 9:
            problems.append(_problem(["body", "aspect_ratio"], "Aspect ratio must be between 21:9 and 9:21", "value_error", ratio))
            return 1024, 1024
        a, b = int(m[1]), int(m[2])
        return _grid((1024 * 1024 * a / b) ** 0.5), _grid((1024 * 1024 * b / a) ** 0.5)
    w, h = body.get("width", spec.default_size[0]), body.get("height", spec.default_size[1])
    for name, v in (("width", w), ("height", h)):
        if isinstance(v, bool) or not isinstance(v, int):
            problems.append(_problem(["body", name], "Input should be a valid integer", "int_type", v))
        elif v < spec.min_side or (spec.max_side and v > spec.max_side):
            problems.append(_problem(["body", name], f"Input should be between {spec.min_side} and {spec.max_side}", "value_error", v))
        elif v % spec.grid:
            problems.append(_problem(["body", name], f"Value error, must be a multiple of {spec.grid}", "value_error", v))
    if isinstance(w, int) and isinstance(h, int) and spec.max_pixels and w * h > spec.max_pixels:
        problems.append(_problem(["body"], "Value error, output is larger than 4 megapixels", "value_error"))
    return (w, h) if isinstance(w, int) and isinstance(h, int) else spec.default_size


def _grid(x: float) -> int:
    return max(32, round(x / 32) * 32)


def _check_image(name: str, value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, str):
        return [_problem(["body", name], "Input should be a valid string", "string_type")]
    if value.startswith(("http://", "https://")):
        return []
    try:  # bare base64 only: "data:image/png;base64,..." is not base64
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return [_problem(["body", name], "Value error, input image is neither a URL nor valid base64", "value_error", value)]
    return []


def _record(state: State, model: str, body: dict[str, Any]) -> None:
    shown = {k: (v[:40] + "..." if isinstance(v, str) and len(v) > 60 else v) for k, v in body.items()}
    with state.lock:
        state.requests = [*state.requests[-49:], {"model": model, "body": shown}]


def _new_task(state: State, model: str, spec: Spec, body: dict[str, Any], size: tuple[int, int]) -> Task:
    prompt = str(body["prompt"])
    outcome = "ok"
    for word in ("moderated-output", "moderated", "fail", "expired"):
        if f"[{word}]" in prompt:
            outcome = word
            break
    polls = int(state.config["slow_polls"] if "[slow]" in prompt else state.config["pending_polls"])
    return Task(
        id=str(uuid.uuid4()),
        model=model,
        prompt=prompt,
        seed=int(body.get("seed") or 0),
        width=size[0],
        height=size[1],
        fmt=str(body.get("output_format") or "jpeg"),
        outcome=outcome,
        pending_polls=polls,
        poll500="[poll500]" in prompt,
        webhook_url=body.get("webhook_url"),
        webhook_secret=body.get("webhook_secret"),
    )


# -- lifecycle ---------------------------------------------------------------------------
def _advance(state: State, task: Task) -> None:
    """One step of a task's life (a poll, or a webhook tick). Caller holds the lock."""
    if task.status in TERMINAL:
        return
    task.step += 1
    if task.outcome == "moderated":
        final = REQUEST_MODERATED
    elif task.outcome == "fail" and task.step > 1:
        final = ERROR
    elif task.step > task.pending_polls:
        final = CONTENT_MODERATED if task.outcome == "moderated-output" else READY
    else:
        return
    task.status, task.finished = final, time.time()


def _expired(state: State, task: Task) -> bool:
    return task.finished is not None and time.time() > task.finished + float(state.config["result_ttl"])


def _answer(state: State, task: Task) -> dict[str, Any]:
    out: dict[str, Any] = {"id": task.id, "status": task.status, "result": None, "progress": None, "details": None, "preview": None}
    if task.status == PENDING:
        out["progress"] = round(task.step / (task.pending_polls + 1), 3)
    elif task.status == READY:
        ttl = float(state.config["result_ttl"])
        assert task.finished is not None
        expiry = task.finished - 1 if task.outcome == "expired" else task.finished + ttl
        se = f"{expiry:.3f}"
        out["result"] = {
            "sample": f"{task.delivery_base}/results/{task.id}/sample.{task.fmt}?se={se}&sig={_sign(state, task.id, task.fmt, se)}",
            "prompt": task.prompt,
            "seed": task.seed,
            "start_time": task.started,
            "end_time": task.finished,
            "duration": round(task.finished - task.started, 3),
        }
    elif task.status in (REQUEST_MODERATED, CONTENT_MODERATED):
        reasons = ["Derivative Works Filter"] if task.status == REQUEST_MODERATED else ["NSFW"]
        out["details"] = {"Moderation Reasons": reasons}
    elif task.status == ERROR:
        out["error"] = "Generation failed: internal error while sampling (fake [fail])"
    return out


def _sign(state: State, task_id: str, ext: str, se: str) -> str:
    return hmac.new(state.key, f"{task_id}/{ext}/{se}".encode(), hashlib.sha256).hexdigest()[:43]


def _azure_error(status: int, code: str, message: str) -> Response:
    xml = f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
    return Response(xml, status_code=status, media_type="application/xml")


# -- webhooks ----------------------------------------------------------------------------
def _spawn(state: State, coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    state.background.add(task)
    task.add_done_callback(state.background.discard)


async def _run_for_webhook(state: State, task: Task) -> None:
    """The task runs on its own when nobody polls, then its result is POSTed."""
    while True:
        await asyncio.sleep(float(state.config["webhook_tick"]))
        with state.lock:
            if task.id not in state.tasks:
                return  # reset
            _advance(state, task)
            if task.status not in TERMINAL:
                continue
            payload = json.dumps(_answer(state, task), separators=(",", ":")).encode()
        break
    headers = {"content-type": "application/json"}
    if task.webhook_secret:
        digest = hmac.new(task.webhook_secret.encode(), payload, hashlib.sha256).hexdigest()
        headers["X-BFL-Signature"] = f"sha256={digest}"
    async with httpx.AsyncClient(timeout=5) as client:
        for attempt in range(3):
            try:
                resp = await client.post(str(task.webhook_url), content=payload, headers=headers)
                ok = resp.is_success
            except httpx.HTTPError:
                ok = False
            with state.lock:
                state.webhooks.append({"id": task.id, "attempt": attempt + 1, "ok": ok})
            if ok:
                return
            await asyncio.sleep(0.05 * (attempt + 1))


# -- media -------------------------------------------------------------------------------
def render_image(prompt: str, seed: int, width: int, height: int, fmt: str) -> bytes:
    """A real JPEG/PNG at the task's size: a gradient with a few shapes from the prompt."""
    digest = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()
    img = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    tint = Image.new("RGB", (width, height), (digest[0], digest[1], digest[2]))
    img = Image.blend(img, tint, 0.6)
    draw = ImageDraw.Draw(img)
    for i in range(4):
        x, y = digest[3 + i] * width // 256, digest[7 + i] * height // 256
        r = max(8, min(width, height) // (4 + i))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(digest[11 + i], digest[15 + i], digest[19 + i]))
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if fmt == "jpeg" else "PNG", quality=85)
    return buf.getvalue()


if __name__ == "__main__":
    run_main(create_app, "Fake Black Forest Labs (FLUX) API")
