"""A fake Gemini API for Veo (providers.md §3 and §8 "Veo fake"), over real HTTP.

    POST /v1beta/models/{model}:predictLongRunning   key: x-goog-api-key header or ?key=
         -> {"name": "models/{model}/operations/{id}"}
    GET  /v1beta/models/{model}/operations/{id}      done absent for N polls, then done:true
    GET  /v1beta/files/{fid}:download?alt=media      key required; 302 to the CDN server
    CDN  GET /blob/{fid}?sig=…                        video/mp4 (ftyp + moov/mvhd + mdat)

Errors are google.rpc.Status bodies like the real API's: a missing key is 403
PERMISSION_DENIED, a wrong key is 400 INVALID_ARGUMENT with ErrorInfo API_KEY_INVALID, bad
aspectRatio/durationSeconds/resolution are 400 INVALID_ARGUMENT.

Prompt keywords (tests/contract.py): [moderated] RAI-filtered operation with a prompt
reason; [moderated-output] RAI-filtered output; [blocked400] create refused with a 400
safety message; [fail] done + error{code:13}; [429] RESOURCE_EXHAUSTED + RetryInfo 30s;
[500] create 500; [poll500] first operation GET 500; [slow] pending for many polls;
[expired] the file URL answers 404 (deleted after its TTL); [filtered-at-create] plus
[moderated]: the create answers the operation already done and RAI-filtered.

The CDN is a second app (`create_cdn_app`) meant to run on another port, so a redirect
crosses origins; it records whether it ever saw the API key. Without `cdn_url` the main app
serves the CDN routes itself. `GET /_control/stats`, `POST /_control/reset`.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tests.fakes.server import Running, run_main

API_KEY = "veo-test-key"
MODELS = {
    "veo-3.1-generate-preview": {"durations": {4, 6, 8}, "resolutions": {"720p", "1080p"}},
    "veo-3.1-fast-generate-preview": {"durations": {4, 6, 8}, "resolutions": {"720p", "1080p"}},
    "veo-3.0-generate-001": {"durations": {4, 6, 8}, "resolutions": {"720p", "1080p"}},
    "veo-3.0-fast-generate-001": {"durations": {4, 6, 8}, "resolutions": {"720p", "1080p"}},
    "veo-2.0-generate-001": {"durations": {5, 6, 7, 8}, "resolutions": {"720p"}},
}
ASPECTS = {"16:9", "9:16"}
SIZES = {("720p", "16:9"): (1280, 720), ("720p", "9:16"): (720, 1280),
         ("1080p", "16:9"): (1920, 1080), ("1080p", "9:16"): (1080, 1920)}


@dataclass
class VeoState:
    """Everything both servers share; one lock because uvicorn runs each in a thread."""

    api_key: str = API_KEY
    pending_polls: int = 2
    slow_polls: int = 12
    file_ttl: float = 3600.0  # seconds a result file stays downloadable (2 days for real)
    lock: threading.Lock = field(default_factory=threading.Lock)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    bodies: list[dict[str, Any]] = field(default_factory=list)  # every create body, for tests
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.operations.clear()
        self.files.clear()
        self.bodies.clear()
        self.stats = {"creates": 0, "accepted": 0, "polls": 0, "inflight": 0, "peak_inflight": 0,
                      "downloads": 0, "cdn_gets": 0, "cdn_saw_key": 0}


def google_error(status: int, code_name: str, message: str, details: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    err: dict[str, Any] = {"code": status, "message": message, "status": code_name}
    if details:
        err["details"] = details
    return JSONResponse({"error": err}, status_code=status, headers=headers)


def _key_error(request: Request, state: VeoState) -> JSONResponse | None:
    key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
    if not key:
        return google_error(403, "PERMISSION_DENIED",
                            "Method doesn't allow unregistered callers (callers without established identity). "
                            "Please use API Key or other form of API consumer identity to call this API.")
    if key != state.api_key:
        return google_error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
             "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}])
    return None


def mp4_bytes(duration_seconds: float, width: int, height: int, seed: str) -> bytes:
    """A minimal valid ISO-BMFF: ftyp, moov{mvhd, trak{tkhd}}, mdat."""

    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I4s", 8 + len(payload), kind) + payload

    timescale = 1000
    duration = int(duration_seconds * timescale)
    matrix = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    mvhd = box(b"mvhd", struct.pack(">B3xIIII", 0, 0, 0, timescale, duration)
               + struct.pack(">IH10x", 0x10000, 0x100) + matrix + b"\x00" * 24 + struct.pack(">I", 2))
    tkhd = box(b"tkhd", struct.pack(">B3sIIIII", 0, b"\x00\x00\x03", 0, 0, 1, 0, duration)
               + b"\x00" * 8 + struct.pack(">hhhH", 0, 0, 0, 0) + matrix + struct.pack(">II", width << 16, height << 16))
    ftyp = box(b"ftyp", b"isom" + struct.pack(">I", 512) + b"isomiso2avc1mp41")
    payload = hashlib.sha256(seed.encode()).digest() * 64
    return ftyp + box(b"moov", mvhd + box(b"trak", tkhd)) + box(b"mdat", payload)


def create_app(state: VeoState | None = None, cdn_url: str | None = None, **options: Any) -> Starlette:
    state = state or VeoState(**options)

    async def create(request: Request) -> Response:
        model = request.path_params["model"]
        with state.lock:
            state.stats["creates"] += 1
        if (refused := _key_error(request, state)) is not None:
            return refused
        try:
            body = await request.json()
            instance = body["instances"][0]
            prompt = str(instance["prompt"])
            params = body.get("parameters") or {}
        except (ValueError, KeyError, IndexError, TypeError):
            return google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received: instances[0].prompt is required.")
        if model not in MODELS:
            return google_error(404, "NOT_FOUND", f"models/{model} is not found for API version v1beta, or is not supported for predictLongRunning.")
        if "[429]" in prompt:
            return google_error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota, please check your plan and billing details.", [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                    {"quotaMetric": "generativelanguage.googleapis.com/predict_long_running_requests",
                     "quotaId": "PredictLongRunningRequestsPerMinutePerProjectPerModel"}]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}])
        if "[500]" in prompt:
            return google_error(500, "INTERNAL", "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting")
        if "[blocked400]" in prompt:
            return google_error(400, "INVALID_ARGUMENT", "The prompt could not be submitted. "
                                "This prompt contains words that violate Vertex AI's usage guidelines (responsible AI / safety).")
        if (invalid := _validate(model, params, instance)) is not None:
            return google_error(400, "INVALID_ARGUMENT", invalid)
        op_id = uuid.uuid4().hex[:12]
        resolution = params.get("resolution", "720p")
        aspect = params.get("aspectRatio", "16:9")
        with state.lock:
            state.bodies.append(body)
            state.stats["accepted"] += 1
            state.stats["inflight"] += 1
            state.stats["peak_inflight"] = max(state.stats["peak_inflight"], state.stats["inflight"])
            state.operations[op_id] = {
                "model": model, "prompt": prompt, "polls": 0, "done": False,
                "duration": params.get("durationSeconds", 8), "size": SIZES.get((resolution, aspect), (1280, 720)),
                "samples": int(params.get("sampleCount", 1)),
            }
        name = f"models/{model}/operations/{op_id}"
        if "[filtered-at-create]" in prompt:  # the operation comes back already done and filtered
            return JSONResponse(_result(state, state.operations[op_id], name, str(request.base_url).rstrip("/")))
        return JSONResponse({"name": name})

    async def operation(request: Request) -> Response:
        if (refused := _key_error(request, state)) is not None:
            return refused
        model, op_id = request.path_params["model"], request.path_params["op"]
        with state.lock:
            state.stats["polls"] += 1
            op = state.operations.get(op_id)
            if op is None or op["model"] != model:
                return google_error(404, "NOT_FOUND", f"Operation models/{model}/operations/{op_id} not found.")
            op["polls"] += 1
            if "[poll500]" in op["prompt"] and op["polls"] == 1:
                return google_error(500, "INTERNAL", "An internal error has occurred.")
            wait = state.slow_polls if "[slow]" in op["prompt"] else state.pending_polls
            name = f"models/{model}/operations/{op_id}"
            if op["polls"] <= wait and "[moderated]" not in op["prompt"]:
                return JSONResponse({"name": name})  # real pending operations carry no `done`
            if not op["done"]:
                op["done"] = True
                state.stats["inflight"] -= 1
            result = _result(state, op, name, str(request.base_url).rstrip("/"))
        return JSONResponse(result)

    async def download(request: Request) -> Response:
        fid = request.path_params["fid"]
        if (refused := _key_error(request, state)) is not None:
            return refused
        with state.lock:
            state.stats["downloads"] += 1
            f = state.files.get(fid)
            gone = f is None or f["expired"] or time.time() > f["created"] + state.file_ttl
        if gone:
            return google_error(404, "NOT_FOUND", f"File files/{fid} not found or has expired.")
        sig = hashlib.sha256(f"{fid}{state.api_key}".encode()).hexdigest()[:24]
        base = (cdn_url or f"{str(request.base_url).rstrip('/')}/_cdn").rstrip("/")
        return RedirectResponse(f"{base}/blob/{fid}?sig={sig}&expires={int(time.time() + 300)}", status_code=302)

    async def stats(request: Request) -> Response:
        with state.lock:
            return JSONResponse(dict(state.stats))

    async def reset(request: Request) -> Response:
        with state.lock:
            state.reset()
        return JSONResponse({"ok": True})

    routes = [
        Route("/v1beta/models/{model}:predictLongRunning", create, methods=["POST"]),
        Route("/v1beta/models/{model}/operations/{op}", operation, methods=["GET"]),
        Route("/v1beta/files/{fid}:download", download, methods=["GET"]),
        Route("/_control/stats", stats, methods=["GET"]),
        Route("/_control/reset", reset, methods=["POST"]),
    ]
    if cdn_url is None:
        routes.append(Route("/_cdn/blob/{fid}", _blob_endpoint(state), methods=["GET"]))
    app = Starlette(routes=routes)
    app.state.veo = state
    return app


def create_cdn_app(state: VeoState) -> Starlette:
    """The storage host the download redirects to (run it on another port)."""
    return Starlette(routes=[Route("/blob/{fid}", _blob_endpoint(state), methods=["GET"])])


def _blob_endpoint(state: VeoState) -> Any:
    async def blob(request: Request) -> Response:
        fid = request.path_params["fid"]
        with state.lock:
            state.stats["cdn_gets"] += 1
            if request.headers.get("x-goog-api-key") or request.query_params.get("key"):
                state.stats["cdn_saw_key"] += 1
            f = state.files.get(fid)
        expected = hashlib.sha256(f"{fid}{state.api_key}".encode()).hexdigest()[:24]
        expires = request.query_params.get("expires", "0")
        if f is None or request.query_params.get("sig") != expected or not expires.isdigit() or int(expires) < time.time():
            return Response(b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>", status_code=403,
                            media_type="application/xml")
        return Response(f["data"], media_type="video/mp4")

    return blob


def _validate(model: str, params: dict[str, Any], instance: dict[str, Any]) -> str | None:
    caps = MODELS[model]
    aspect = params.get("aspectRatio", "16:9")
    if aspect not in ASPECTS:
        return f"Unsupported aspect ratio: {aspect}. Supported values are 16:9 and 9:16."
    duration = params.get("durationSeconds", 8)
    if isinstance(duration, bool) or not isinstance(duration, int) or duration not in caps["durations"]:
        return f"The number value for `durationSeconds` is out of bound. Please provide a value in {sorted(caps['durations'])}."
    resolution = params.get("resolution", "720p")
    if resolution not in caps["resolutions"]:
        return f"Unsupported resolution: {resolution} for model {model}."
    if resolution == "1080p" and model.startswith("veo-3.1") and duration != 8:
        return "1080p resolution is only supported with durationSeconds 8."
    if "fps" in params:
        return "Invalid JSON payload received. Unknown name \"fps\" at 'parameters': Cannot find field."
    image = instance.get("image")
    if image is not None and not (isinstance(image, dict) and image.get("bytesBase64Encoded") and image.get("mimeType")):
        return "instances[0].image must carry bytesBase64Encoded and mimeType."
    return None


def _result(state: VeoState, op: dict[str, Any], name: str, base: str) -> dict[str, Any]:
    prompt = op["prompt"]
    response_type = "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse"
    if "[fail]" in prompt:
        return {"name": name, "done": True, "error": {"code": 13, "message": "Video generation failed due to an internal error. Please try again."}}
    if "[moderated]" in prompt:
        reasons = ["We can't create videos from the prompt you provided because it may violate our usage guidelines. Try rephrasing the prompt."]
        return {"name": name, "done": True, "response": {"@type": response_type,
                "generateVideoResponse": {"raiMediaFilteredCount": 1, "raiMediaFilteredReasons": reasons}}}
    if "[moderated-output]" in prompt:
        reasons = ["The generated video was filtered because it may violate our usage guidelines (celebrity likeness)."]
        return {"name": name, "done": True, "response": {"@type": response_type,
                "generateVideoResponse": {"raiMediaFilteredCount": 1, "raiMediaFilteredReasons": reasons}}}
    samples = []
    for i in range(op["samples"]):
        fid = op.setdefault("fids", {}).get(i)
        if fid is None:
            fid = uuid.uuid4().hex[:16]
            op["fids"][i] = fid
            w, h = op["size"]
            state.files[fid] = {"data": mp4_bytes(float(op["duration"]), w, h, f"{prompt}{i}"),
                                "created": time.time(), "expired": "[expired]" in prompt}
        samples.append({"video": {"uri": f"{base}/v1beta/files/{fid}:download?alt=media"}})
    return {"name": name, "done": True, "response": {"@type": response_type,
            "generateVideoResponse": {"generatedSamples": samples}}}


def _standalone() -> Starlette:
    """`python -m tests.fakes.google_veo --port N`: the CDN runs on a free port beside it."""
    state = VeoState()
    cdn = Running(create_cdn_app(state)).start()
    return create_app(state=state, cdn_url=cdn.url)


if __name__ == "__main__":
    run_main(_standalone, "Fake Gemini API (Veo) with a cross-origin download CDN")
