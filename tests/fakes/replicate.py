"""A faithful fake of Replicate's predictions API (providers.md §1 and §8).

    POST /v1/predictions                         {"version": hex | owner/name:hex | owner/name, "input"}
    POST /v1/models/{owner}/{name}/predictions   {"input", "webhook", "webhook_events_filter"}
    POST /v1/deployments/{owner}/{name}/predictions
    GET  /v1/predictions/{id}    POST /v1/predictions/{id}/cancel    GET /v1/predictions
    GET  /v1/webhooks/default/secret -> {"key": "whsec_..."}
    GET  /files/{id}/{name}      result files (real PNG/JPEG/WEBP, minimal MP4)
    GET  /_control/stats   POST /_control/reset   POST /_control/config {option: value}

Script per prediction: `starting` for `starting_polls` GETs, then `processing` for
`processing_polls` GETs (a tqdm line with a rising percentage appended to `logs` each
time), then terminal. Predictions with a webhook also advance on their own every
`tick` seconds, so webhooks arrive without polling. Keywords in `prompt`/`text`
(tests/contract.py) plus Replicate-specific ones:

    [moderated]         failed at once: "NSFW content detected in the input prompt..."
    [moderated-output]  failed after processing: "NSFW content detected. Try running it again..."
    [fail]              failed after processing with a CUDA error string
    [429] / [429body]   429 throttled (with / without a Retry-After header)
    [500]  [poll500]    500 on create / on the first GET
    [402]               402 insufficient credit
    [502-accepted]      the prediction is created, then a gateway answers 502 (the create's
                        outcome is unknown to the client)
    [slow]              `slow_polls` processing polls
    [expired]           output listed, files answer 410 already
    [data-removed]      data removed at completion: data_removed true, output/input null
    [aborted]           aborted (deadline passed before the run started)
    [slow-file]         result files trickle out: 16 chunks over `slow_file_seconds`
    [drop-file]         a result file's first fetch drops the connection after a third of the
                        body (its Content-Length promised all of it); `Range: bytes=N-` is
                        answered 206 from N, as Replicate's file CDN does

Output shape by model name: "dict-out" -> nested dict of URLs; video ("video", "wan",
"kling") -> one mp4 URL string; "schnell"/"flux-dev" -> list; "kontext" -> string;
others -> a list when num_outputs is given, else a string.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import os
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
from PIL import Image, ImageDraw
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.server import run_main

TERMINAL = {"succeeded", "failed", "canceled", "aborted"}
FLUX_BUCKETS = {
    "1:1": (1024, 1024), "16:9": (1344, 768), "21:9": (1536, 640), "3:2": (1216, 832),
    "2:3": (832, 1216), "4:5": (896, 1088), "5:4": (1088, 896), "3:4": (896, 1152),
    "4:3": (1152, 896), "9:16": (768, 1344), "9:21": (640, 1536),
}
VIDEO_SIZES = {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (720, 720)}
SCHNELL_FORMATS = {"webp", "jpg", "png"}
NSFW_INPUT = "NSFW content detected in the input prompt. Try a different prompt. (E005)"
NSFW_OUTPUT = "NSFW content detected. Try running it again, or try a different prompt."
CUDA_ERROR = "CUDA error: an illegal memory access was encountered"
DEFAULTS: dict[str, Any] = {
    "api_key": "r8_fake_token",
    "webhook_secret": None,  # whsec_<b64>; generated when None
    "starting_polls": 1,
    "processing_polls": 3,
    "slow_polls": 30,
    "slow_file_seconds": 8.0,  # how long a [slow-file] result takes to download
    "cancel_delay": 0.0,  # seconds a cancel call is held before the prediction is canceled
    "retry_after": 2,
    "data_ttl": None,  # seconds after completion until data_removed; None: never
    "wait_step": 0.05,  # seconds per script step while a Prefer: wait create is held
    "tick": 0.02,  # seconds per script step for predictions with a webhook
    "webhook_stale": False,  # sign with a timestamp 10 minutes old
    "webhook_extra_signature": False,  # send "v1,<bogus> v1,<real>"
    "webhook_retries": 3,
    "public_base": None,  # base URL written into urls.get/cancel (a proxy's upstream); None: our own
}


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"title": title, "detail": detail, "status": status}, status_code=status,
                        headers=headers, media_type="application/problem+json")


class Prediction:
    """One prediction and its script."""

    def __init__(self, state: State, model: str, version: str, inp: dict[str, Any], base: str,
                 body: dict[str, Any]) -> None:
        self.state = state
        self.id = uuid.uuid4().hex[:26]
        self.model, self.version, self.input, self.base = model, version, inp, base
        text = str(inp.get("prompt") or inp.get("text") or "")
        opts = state.options
        self.starting_left = int(opts["starting_polls"])
        self.processing_total = int(opts["slow_polls"] if "[slow]" in text else opts["processing_polls"])
        self.done_steps = 0
        self.outcome = next((k for k in ("moderated-output", "moderated", "fail", "aborted") if f"[{k}]" in text), "succeeded")
        self.expired_files = "[expired]" in text
        self.data_ttl: float | None = 0.0 if "[data-removed]" in text else opts["data_ttl"]
        self.poll500 = "[poll500]" in text
        self.slow_file = "[slow-file]" in text
        self.drop_file = "[drop-file]" in text
        self.dropped: set[str] = set()  # files whose first fetch was cut
        self.status = "starting"
        self.logs = ""
        self.output: Any = None
        self.error: str | None = None
        self.metrics: dict[str, Any] = {}
        self.created_at, self.started_at, self.completed_at = _now_iso(), None, None
        self.completed_mono: float | None = None
        self.webhook: str | None = body.get("webhook")
        self.events = body.get("webhook_events_filter") or ["start", "output", "logs", "completed"]
        self.files: dict[str, dict[str, Any]] = {}
        self.seed = int(inp.get("seed") or int(hashlib.sha256(self.id.encode()).hexdigest()[:6], 16))

    # -- the script ---------------------------------------------------------------
    def step(self) -> None:
        if self.status in TERMINAL:
            return
        before = (self.status, self.logs)
        if self.status == "starting":
            if self.starting_left > 0:
                self.starting_left -= 1
                return
            if self.outcome == "aborted":
                self._finish("aborted")
            elif self.outcome == "moderated":
                self._finish("failed", NSFW_INPUT)
            else:
                self.status, self.started_at = "processing", _now_iso()
                self.logs = f"Using seed: {self.seed}\n" + self._tqdm(0)
        else:
            self.done_steps += 1
            if self.done_steps > self.processing_total:
                if self.outcome == "fail":
                    self._finish("failed", CUDA_ERROR)
                elif self.outcome == "moderated-output":
                    self._finish("failed", NSFW_OUTPUT)
                else:
                    self.logs += "Generated output in 1.2sec\n"
                    self.output = self._make_output()
                    self._finish("succeeded")
            else:
                self.logs += self._tqdm(self.done_steps)
        if (self.status, self.logs) != before:
            self.state.changed(self)

    def _tqdm(self, done: int) -> str:
        total = self.processing_total
        pct = done * 100 // total if total else 100
        bar = "█" * (pct // 10)
        return f"{pct:3d}%|{bar:<10}| {done}/{total} [00:0{min(done, 9)}<00:03, 9.50it/s]\n"

    def _finish(self, status: str, error: str | None = None) -> None:
        self.status, self.error = status, error
        self.completed_at, self.completed_mono = _now_iso(), time.monotonic()
        if status == "succeeded":
            self.metrics = {"predict_time": 1.2 + self.processing_total * 0.01, "total_time": 1.5 + self.processing_total * 0.01}
            if not self._is_video():
                self.metrics["image_count"] = len(self.files)

    def cancel(self) -> None:
        if self.status not in TERMINAL:
            self._finish("canceled")
            self.state.changed(self)

    # -- outputs ------------------------------------------------------------------
    def _is_video(self) -> bool:
        name = self.model.lower()
        return any(k in name for k in ("video", "wan", "kling"))

    def _url(self, name: str, spec: dict[str, Any]) -> str:
        self.files[name] = spec
        return f"{self.base}/files/{self.id}/{name}"

    def _make_output(self) -> Any:
        name = self.model.lower().rsplit("/", 1)[-1]
        if self._is_video():
            ratio = str(self.input.get("aspect_ratio") or "16:9")
            w, h = VIDEO_SIZES.get(ratio, (1280, 720))
            if self.input.get("resolution") == "480p":
                w, h = w * 2 // 3, h * 2 // 3
            return self._url("output.mp4", {"kind": "video", "w": w, "h": h,
                                            "duration": float(self.input.get("duration") or 5)})
        w, h = self._image_size()
        fmt = str(self.input.get("output_format") or ("webp" if "schnell" in name else "png"))
        ext = {"jpeg": "jpg"}.get(fmt, fmt)
        spec = {"kind": "image", "w": w, "h": h, "fmt": ext}
        n = int(self.input.get("num_outputs") or 1)
        if "dict-out" in name:
            return {"image": self._url(f"out-0.{ext}", spec),
                    "extra": {"preview": self._url(f"preview.{ext}", {**spec, "w": w // 2, "h": h // 2}), "seed": self.seed},
                    "nsfw": False}
        urls = [self._url(f"out-{i}.{ext}", spec) for i in range(n)]
        if "kontext" in name or ("schnell" not in name and "flux-dev" not in name and "num_outputs" not in self.input):
            return urls[0]
        return urls

    def _image_size(self) -> tuple[int, int]:
        if self.input.get("width") and self.input.get("height"):
            return int(self.input["width"]), int(self.input["height"])
        return FLUX_BUCKETS.get(str(self.input.get("aspect_ratio")), (1024, 1024))

    # -- the wire object ----------------------------------------------------------
    def data_removed(self) -> bool:
        return (self.data_ttl is not None and self.completed_mono is not None
                and time.monotonic() >= self.completed_mono + self.data_ttl)

    def body(self) -> dict[str, Any]:
        removed = self.data_removed()
        api = self.state.options["public_base"] or self.base
        out = {
            "id": self.id, "model": self.model, "version": self.version,
            "input": None if removed else self.input,
            "logs": None if removed else self.logs,
            "output": None if removed else self.output,
            "data_removed": removed, "error": self.error, "status": self.status, "source": "api",
            "created_at": self.created_at, "started_at": self.started_at, "completed_at": self.completed_at,
            "metrics": self.metrics,
            "urls": {"get": f"{api}/v1/predictions/{self.id}",
                     "cancel": f"{api}/v1/predictions/{self.id}/cancel",
                     "web": f"{api}/p/{self.id}"},
        }
        if self.webhook:
            out["webhook"], out["webhook_events_filter"] = self.webhook, self.events
        return out


class State:
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.secret = options["webhook_secret"] or "whsec_" + base64.b64encode(os.urandom(24)).decode()
        self.predictions: dict[str, Prediction] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.reset()

    def reset(self) -> None:
        self.predictions.clear()
        self.creates = self.polls = self.cancels = self.peak_inflight = self.secret_fetches = 0
        self.file_fetches = 0
        self.file_ranges: list[str] = []  # the Range header of every file fetch that sent one
        self.file_digests: dict[str, str] = {}  # "pid/name" -> sha256 of the whole file served
        self.deliveries: list[dict[str, Any]] = []
        self.last_create: dict[str, Any] | None = None

    def inflight(self) -> int:
        return sum(p.status not in TERMINAL for p in self.predictions.values())

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def changed(self, p: Prediction) -> None:
        if not p.webhook:
            return
        # "start" went out at creation; later changes are new logs, then the end
        event = "completed" if p.status in TERMINAL else "logs"
        if event in p.events:
            self.spawn(self.deliver(p, event, json.dumps(p.body())))

    async def deliver(self, p: Prediction, event: str, body: str) -> None:
        """POST the prediction to its webhook, signed per Standard Webhooks; retried on
        non-2xx with the same webhook-id, as Replicate does."""
        msg_id = f"msg_{uuid.uuid4().hex}"
        record: dict[str, Any] = {"id": msg_id, "prediction": p.id, "event": event, "status": p.status,
                                  "attempts": 0, "responses": []}
        self.deliveries.append(record)
        key = base64.b64decode(self.secret.removeprefix("whsec_"))
        async with httpx.AsyncClient(timeout=5) as client:
            for attempt in range(int(self.options["webhook_retries"]) + 1):
                stamp = str(int(time.time()) - (600 if self.options["webhook_stale"] else 0))
                sig = base64.b64encode(hmac.new(key, f"{msg_id}.{stamp}.{body}".encode(), hashlib.sha256).digest()).decode()
                signature = f"v1,{sig}"
                if self.options["webhook_extra_signature"]:
                    signature = f"v1,{base64.b64encode(os.urandom(32)).decode()} {signature}"
                headers = {"content-type": "application/json", "webhook-id": msg_id,
                           "webhook-timestamp": stamp, "webhook-signature": signature}
                record["attempts"] = attempt + 1
                try:
                    resp = await client.post(str(p.webhook), content=body, headers=headers)
                    record["responses"].append(resp.status_code)
                    if resp.is_success:
                        return
                except httpx.HTTPError as exc:
                    record["responses"].append(type(exc).__name__)
                await asyncio.sleep(0.05 * (attempt + 1))

    async def tick(self, p: Prediction) -> None:
        while p.status not in TERMINAL:
            await asyncio.sleep(float(self.options["tick"]))
            p.step()


# -- request handling --------------------------------------------------------------
def _authorized(request: Request, state: State) -> bool:
    return request.headers.get("authorization") == f"Bearer {state.options['api_key']}"


def _unauthorized() -> JSONResponse:
    return _problem(401, "Unauthenticated", "You did not pass a valid authentication token")


def _validate(model: str, inp: dict[str, Any]) -> str | None:
    """The few schema checks a real model makes (enough to see a 422)."""
    name = model.rsplit("/", 1)[-1]
    problems = []
    if not (inp.get("prompt") or inp.get("text")):
        problems.append("- input: prompt is required")
    if "schnell" in name or "flux-dev" in name:
        if int(inp.get("num_outputs") or 1) > 4:
            problems.append("- input.num_outputs: Must be less than or equal to 4")
        if inp.get("aspect_ratio") and inp["aspect_ratio"] not in FLUX_BUCKETS:
            problems.append(f"- input.aspect_ratio: aspect_ratio must be one of: {', '.join(FLUX_BUCKETS)}")
        if inp.get("output_format") and inp["output_format"] not in SCHNELL_FORMATS:
            problems.append("- input.output_format: output_format must be one of: webp, jpg, png")
    return "\n".join(problems) + "\n" if problems else None


def _prefer_wait(request: Request) -> float | None:
    m = re.match(r"^\s*wait(?:\s*=\s*(\d+))?\s*$", request.headers.get("prefer", ""))
    if not m:
        return None
    return float(min(60, max(1, int(m[1])))) if m[1] else 60.0


async def _create(request: Request, state: State, model: str | None) -> Response:
    state.creates += 1
    if not _authorized(request, state):
        return _unauthorized()
    try:
        body = await request.json()
    except ValueError:
        return _problem(400, "Bad Request", "request body is not valid JSON")
    if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
        return _problem(422, "Input validation failed", "- input: input is required\n")
    state.last_create = {"path": request.url.path, "body": body, "prefer": request.headers.get("prefer")}
    version = "hidden"
    if model is None:
        raw = str(body.get("version") or "")
        m = re.match(r"^(?:([\w.-]+/[\w.-]+):)?([0-9a-f]{64})$", raw)
        if m:
            model, version = m[1] or "acme/versioned-model", m[2]
        elif re.match(r"^[\w.-]+/[\w.-]+$", raw):
            model = raw
        else:
            return _problem(422, "Invalid version", "Invalid version or not permitted")
    if "missing" in model:
        return _problem(404, "Not found", f"Model not found: {model}")
    inp: dict[str, Any] = body["input"]
    text = str(inp.get("prompt") or inp.get("text") or "")
    if "[429body]" in text or "[429]" in text:
        n = int(state.options["retry_after"]) if "[429]" in text else 7
        headers = {"Retry-After": str(n)} if "[429]" in text else None
        return JSONResponse({"detail": f"Request was throttled. Your rate limit resets in ~{n}s."}, 429, headers=headers)
    if "[500]" in text:
        return _problem(500, "Internal Server Error", "Something went wrong on our end.")
    if "[402]" in text:
        return _problem(402, "Insufficient credit", "You have insufficient credit to run this model. Go to "
                        "https://replicate.com/account/billing#billing to purchase credit.")
    invalid = _validate(model, inp)
    if invalid:
        return _problem(422, "Input validation failed", invalid)
    base = str(request.base_url).rstrip("/")
    p = Prediction(state, model, version, inp, base, body)
    state.predictions[p.id] = p
    state.peak_inflight = max(state.peak_inflight, state.inflight())
    if p.webhook:
        if "start" in p.events:
            state.spawn(state.deliver(p, "start", json.dumps(p.body())))
        state.spawn(state.tick(p))
    if "[502-accepted]" in text:
        return _problem(502, "Bad Gateway", "upstream connect error or disconnect/reset before headers")
    wait = _prefer_wait(request)
    if wait is not None:
        deadline = time.monotonic() + wait
        while p.status not in TERMINAL and time.monotonic() < deadline:
            await asyncio.sleep(float(state.options["wait_step"]))
            p.step()
    return JSONResponse(p.body(), status_code=201, headers={"Location": p.body()["urls"]["get"]})


def create_app(**options: Any) -> Starlette:
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown fake options: {sorted(unknown)}")
    state = State({**DEFAULTS, **options})

    async def create_version(request: Request) -> Response:
        return await _create(request, state, None)

    async def create_model(request: Request) -> Response:
        return await _create(request, state, f"{request.path_params['owner']}/{request.path_params['name']}")

    def find(request: Request) -> Prediction | Response:
        if not _authorized(request, state):
            return _unauthorized()
        p = state.predictions.get(request.path_params["pid"])
        return p if p is not None else _problem(404, "Not found", "The requested prediction was not found.")

    async def get_prediction(request: Request) -> Response:
        state.polls += 1
        p = find(request)
        if not isinstance(p, Prediction):
            return p
        if p.poll500:
            p.poll500 = False
            return _problem(500, "Internal Server Error", "Something went wrong on our end.")
        p.step()
        return JSONResponse(p.body())

    async def cancel_prediction(request: Request) -> Response:
        state.cancels += 1
        p = find(request)
        if not isinstance(p, Prediction):
            return p
        await asyncio.sleep(float(state.options["cancel_delay"]))
        p.cancel()  # a terminal prediction comes back unchanged
        return JSONResponse(p.body())

    async def list_predictions(request: Request) -> Response:
        if not _authorized(request, state):
            return _unauthorized()
        items = [p.body() for p in reversed(list(state.predictions.values()))][:100]
        return JSONResponse({"next": None, "previous": None, "results": items})

    async def webhook_secret(request: Request) -> Response:
        if not _authorized(request, state):
            return _unauthorized()
        state.secret_fetches += 1
        return JSONResponse({"key": state.secret})

    async def file(request: Request) -> Response:
        p = state.predictions.get(request.path_params["pid"])
        spec = p.files.get(request.path_params["name"]) if p else None
        if p is None or spec is None or p.data_removed():
            return Response("Not Found", 404, media_type="text/plain")
        if p.expired_files:
            return Response("Gone", 410, media_type="text/plain")
        data, ctype = await asyncio.to_thread(render_file, spec, p.seed)
        state.file_fetches += 1
        name = request.path_params["name"]
        state.file_digests[f"{p.id}/{name}"] = hashlib.sha256(data).hexdigest()
        rng = request.headers.get("range")
        if rng:
            state.file_ranges.append(rng)
        start = int(rng[6:-1]) if rng and rng.startswith("bytes=") and rng.endswith("-") and rng[6:-1].isdigit() else 0
        if 0 < start < len(data):
            return Response(data[start:], 206, media_type=ctype,
                            headers={"content-range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
        if p.drop_file and name not in p.dropped:
            p.dropped.add(name)
            cut = data[: len(data) // 3]

            async def dropped() -> AsyncIterator[bytes]:
                yield cut
                # the server closes the connection short of the promised Content-Length
                raise ConnectionResetError("[drop-file]: the connection drops mid-body")

            return StreamingResponse(dropped(), media_type=ctype, headers={"content-length": str(len(data))})
        if p.slow_file:
            pause = float(state.options["slow_file_seconds"]) / 16
            step = -(-len(data) // 16)

            async def trickle() -> AsyncIterator[bytes]:
                for at in range(0, len(data), step):
                    yield data[at:at + step]
                    await asyncio.sleep(pause)

            return StreamingResponse(trickle(), media_type=ctype, headers={"content-length": str(len(data))})
        return Response(data, media_type=ctype)

    async def stats(request: Request) -> Response:
        return JSONResponse({
            "creates": state.creates, "polls": state.polls, "cancels": state.cancels,
            "inflight": state.inflight(), "peak_inflight": state.peak_inflight,
            "secret_fetches": state.secret_fetches, "webhooks": state.deliveries,
            "file_fetches": state.file_fetches, "file_ranges": state.file_ranges,
            "file_digests": state.file_digests,
            "last_create": state.last_create,
        })

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse({"ok": True})

    async def config(request: Request) -> Response:
        changes = await request.json()
        bad = set(changes) - set(DEFAULTS) - {"api_key"}
        if bad:
            return JSONResponse({"error": f"unknown options {sorted(bad)}"}, 400)
        state.options.update(changes)
        return JSONResponse(state.options)

    return Starlette(routes=[
        Route("/v1/predictions", create_version, methods=["POST"]),
        Route("/v1/predictions", list_predictions, methods=["GET"]),
        Route("/v1/models/{owner}/{name}/predictions", create_model, methods=["POST"]),
        Route("/v1/deployments/{owner}/{name}/predictions", create_model, methods=["POST"]),
        Route("/v1/predictions/{pid}", get_prediction, methods=["GET"]),
        Route("/v1/predictions/{pid}/cancel", cancel_prediction, methods=["POST"]),
        Route("/v1/webhooks/default/secret", webhook_secret, methods=["GET"]),
        Route("/files/{pid}/{name}", file, methods=["GET"]),
        Route("/_control/stats", stats, methods=["GET"]),
        Route("/_control/reset", reset, methods=["POST"]),
        Route("/_control/config", config, methods=["POST"]),
    ])


# -- result files ------------------------------------------------------------------
def render_file(spec: dict[str, Any], seed: int) -> tuple[bytes, str]:
    if spec["kind"] == "video":
        return mp4_bytes(spec["w"], spec["h"], spec["duration"]), "video/mp4"
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[spec["fmt"]]
    color = ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256)
    im = Image.new("RGB", (spec["w"], spec["h"]), color)
    ImageDraw.Draw(im).rectangle((spec["w"] // 4, spec["h"] // 4, spec["w"] * 3 // 4, spec["h"] * 3 // 4), fill=(255, 255, 255))
    out = io.BytesIO()
    im.save(out, fmt, quality=80) if fmt != "PNG" else im.save(out, fmt)
    return out.getvalue(), f"image/{'jpeg' if fmt == 'JPEG' else fmt.lower()}"


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def mp4_bytes(width: int, height: int, duration: float) -> bytes:
    """A minimal ISO-BMFF file: ftyp, moov{mvhd (timescale 1000, duration)}, mdat."""
    ftyp = _box(b"ftyp", b"isom" + struct.pack(">I", 512) + b"isomiso2avc1mp41")
    matrix = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    mvhd = _box(b"mvhd", struct.pack(">B3xIIII", 0, 0, 0, 1000, int(duration * 1000))
                + struct.pack(">IH10x", 0x10000, 0x100) + matrix + b"\x00" * 24 + struct.pack(">I", 2))
    mdat = _box(b"mdat", struct.pack(">II", width, height) + b"\x00" * 1024)
    return ftyp + _box(b"moov", mvhd) + mdat


if __name__ == "__main__":
    run_main(create_app, "fake Replicate predictions API")
