"""A fake fal.ai queue API (providers.md §5 and §8 "fal fake"), served over real HTTP.

    POST /{owner}/{app}[/{sub...}][?fal_webhook=URL]   Authorization: Key <key>
    GET  /{owner}/{app}/requests/{id}/status[?logs=1]   202 IN_QUEUE | 202 IN_PROGRESS | 200 COMPLETED
    GET  /{owner}/{app}/requests/{id}                   the model's JSON | 400 before completion | error
    PUT  /{owner}/{app}/requests/{id}/cancel            202 CANCELLATION_REQUESTED | 400 ALREADY_COMPLETED
    GET  /cdn/{token}/{name}                            result files (real bytes), 404 once expired
    GET  /.well-known/jwks.json                         the test Ed25519 key that signs webhooks
    GET  /_control/stats, POST /_control/reset

Like fal, the queue URLs name owner/app only; the subpath variants answer 404. A request is
IN_QUEUE for `queue_polls` status polls (queue_position counting down), IN_PROGRESS for
`progress_polls` polls (tqdm-like log lines, only with ?logs=1), then COMPLETED. At most
`concurrency` requests are IN_PROGRESS at once; the rest wait IN_QUEUE (fal never answers
429 for concurrency). With ?fal_webhook= the request also runs on its own and its result is
POSTed, signed the way fal signs, retried on non-2xx.

Prompt keywords (tests/contract.py): [moderated] (the run ends in a 422
content_policy_violation on the prompt), [moderated-submit] (that 422 at submit),
[moderated-output] (has_nsfw_concepts [true] and a black image, as fal's safety checker
does), [fail] (422 validation detail from the result endpoint), [fail500] (500 with
X-Fal-Retryable: false), [429], [500], [poll500], [slow], [expired].

Canceling: fal documents only IN_QUEUE / IN_PROGRESS / COMPLETED. A canceled request here
reports COMPLETED and its result answers 400 {"detail": "Request was cancelled"} (the exact
upstream body is not documented; the adapter also accepts a CANCELED status).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import struct
import time
import uuid
import wave
from dataclasses import dataclass, field
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from PIL import Image, ImageDraw
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.server import run_main

API_KEY = "fal-test-key"
USER_ID = "fake-user-7f3a"
KEY_SEED = "genroute-fal-fake"
NAMED = {
    "square_hd": (1024, 1024), "square": (512, 512), "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024), "landscape_4_3": (1024, 768), "landscape_16_9": (1024, 576),
}
RATIO = {"21:9": (1568, 672), "16:9": (1024, 576), "4:3": (1024, 768), "3:2": (1024, 683), "1:1": (1024, 1024),
         "2:3": (683, 1024), "3:4": (768, 1024), "9:16": (576, 1024), "9:21": (672, 1568)}


def signing_key(seed: str = KEY_SEED) -> Ed25519PrivateKey:
    """The fake's webhook key, deterministic so a standalone fake keeps one JWKS."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed.encode()).digest())


def sign(key: Ed25519PrivateKey, request_id: str, user_id: str, timestamp: str, body: bytes) -> str:
    message = "\n".join((request_id, user_id, timestamp, hashlib.sha256(body).hexdigest())).encode()
    return key.sign(message).hex()


def jwk(key: Ed25519PrivateKey, kid: str = "fake-1") -> dict[str, str]:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode(),
            "kid": kid, "alg": "EdDSA", "use": "sig"}


@dataclass
class Req:
    id: str
    owner_app: str
    model: str
    input: dict[str, Any]
    seq: int
    queue_left: int
    progress_total: int
    state: str = "IN_QUEUE"
    progress_done: int = 0
    polls: int = 0
    canceled: bool = False
    webhook: str | None = None
    ttl: float | None = None
    completed_at: float | None = None
    result: tuple[int, dict[str, Any], dict[str, str]] | None = None
    logs: list[dict[str, str]] = field(default_factory=list)

    def has(self, word: str) -> bool:
        return word in str(self.input.get("prompt") or self.input.get("text") or "")


@dataclass
class State:
    requests: dict[str, Req] = field(default_factory=dict)
    files: dict[str, tuple[str, dict[str, Any], float]] = field(default_factory=dict)  # token -> kind, spec, expires
    stats: dict[str, int] = field(default_factory=dict)
    seq: int = 0

    def reset(self) -> None:
        self.requests.clear()
        self.files.clear()
        self.seq = 0
        self.stats = dict.fromkeys(("creates", "polls", "results", "cancels", "inflight", "peak_inflight",
                                    "jwks_fetches", "webhook_attempts", "webhooks_delivered", "cdn_gets"), 0)

    def count_inflight(self) -> None:
        n = sum(1 for r in self.requests.values() if r.state != "COMPLETED")
        self.stats["inflight"] = n
        self.stats["peak_inflight"] = max(self.stats["peak_inflight"], n)


def create_app(
    *,
    api_key: str = API_KEY,
    concurrency: int = 4,
    queue_polls: int = 2,
    progress_polls: int = 2,
    slow_polls: int = 8,
    file_ttl: float = 7 * 24 * 3600.0,
    retry_after: int = 2,
    webhook_retries: int = 4,
    webhook_backoff: float = 0.05,
    key_seed: str = KEY_SEED,
) -> Starlette:
    st = State()
    st.reset()
    key = signing_key(key_seed)
    tasks: set[asyncio.Task[None]] = set()

    def err(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    def authorized(request: Request) -> bool:
        return request.headers.get("authorization", "") == f"Key {api_key}"

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    # -- lifecycle ---------------------------------------------------------------------------
    def running() -> int:
        return sum(1 for r in st.requests.values() if r.state == "IN_PROGRESS")

    def advance(r: Req, cdn: str) -> None:
        """One status poll's worth of time for this request."""
        if r.state == "IN_QUEUE":
            if r.queue_left > 0:
                r.queue_left -= 1
            elif running() < concurrency:
                r.state = "IN_PROGRESS"
                r.logs.append(_log("Starting generation"))
        elif r.state == "IN_PROGRESS":
            r.progress_done += 1
            pct = int(100 * r.progress_done / (r.progress_total + 1))
            r.logs.append(_log(f"{pct:3d}%|{'#' * (pct // 10):<10}| {r.progress_done}/{r.progress_total + 1} [00:01<00:01, 4.2it/s]"))
            if r.progress_done >= r.progress_total:
                complete(r, cdn)

    def queue_position(r: Req) -> int:
        # queued requests ahead of this one that are also waiting for a runner
        ahead = sum(1 for o in st.requests.values() if o.state == "IN_QUEUE" and o.seq < r.seq and o.queue_left == 0)
        return r.queue_left + ahead

    def complete(r: Req, cdn: str) -> None:
        r.state = "COMPLETED"
        r.completed_at = time.time()
        r.result = outcome(r, cdn)
        st.count_inflight()

    def outcome(r: Req, cdn: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        if r.canceled:
            return 400, {"detail": "Request was cancelled"}, {}
        if r.has("[moderated]"):
            return 422, {"detail": [{"loc": ["body", "prompt"], "type": "content_policy_violation",
                                     "msg": "The content could not be processed because it contained material flagged by a content checker.",
                                     "url": "https://docs.fal.ai/errors/#content_policy_violation"}]}, {}
        if r.has("[fail500]"):
            return 500, {"detail": [{"loc": ["body"], "type": "internal_server_error", "msg": "Internal server error"}]}, {"X-Fal-Retryable": "false"}
        if r.has("[fail]"):
            return 422, {"detail": [{"loc": ["body", "num_inference_steps"], "type": "less_than_equal",
                                     "msg": "Input should be less than or equal to 50", "ctx": {"le": 50}}]}, {}
        return 200, model_output(r, cdn), {}

    def add_file(kind: str, spec: dict[str, Any], r: Req, ext: str) -> str:
        token = uuid.uuid4().hex
        ttl = -1.0 if r.has("[expired]") else (r.ttl if r.ttl is not None else file_ttl)
        st.files[token] = (kind, spec, (r.completed_at or time.time()) + ttl)
        return token + "/output." + ext

    def model_output(r: Req, cdn: str) -> dict[str, Any]:
        inp, app = r.input, r.model.lower()
        seed = int(inp.get("seed", 42))
        if any(k in app for k in ("video", "kling", "veo")):
            seconds = float(str(inp.get("duration", "5")).rstrip("s") or 5)
            name = add_file("video", {"seconds": seconds}, r, "mp4")
            return {"video": {"url": f"{cdn}/{name}", "content_type": "video/mp4", "file_name": "output.mp4"}, "seed": seed}
        if any(k in app for k in ("audio", "tts", "kokoro", "music")):
            seconds = float(inp.get("seconds_total") or inp.get("duration") or 1.0)
            name = add_file("audio", {"seconds": min(seconds, 10.0)}, r, "wav")
            return {"audio": {"url": f"{cdn}/{name}", "content_type": "audio/wav", "file_name": "output.wav"}}
        w, h = image_dims(inp)
        fmt = "png" if inp.get("output_format") == "png" else "jpeg"
        nsfw = r.has("[moderated-output]")
        images = []
        for i in range(int(inp.get("num_images", 1))):
            name = add_file("image", {"w": w, "h": h, "fmt": fmt, "black": nsfw, "seed": seed + i}, r, "png" if fmt == "png" else "jpg")
            images.append({"url": f"{cdn}/{name}", "width": w, "height": h, "content_type": f"image/{fmt}"})
        return {"images": images, "timings": {"inference": 0.42}, "seed": seed,
                "has_nsfw_concepts": [nsfw] * len(images), "prompt": inp.get("prompt", "")}

    # -- webhooks ------------------------------------------------------------------------------
    async def run_for_webhook(r: Req, cdn: str) -> None:
        await asyncio.sleep(0.02)
        if r.state != "COMPLETED":
            complete(r, cdn)
        assert r.result is not None and r.webhook
        status, payload, _ = r.result
        event: dict[str, Any] = {"request_id": r.id, "gateway_request_id": r.id, "status": "OK" if status == 200 else "ERROR", "payload": payload}
        if status != 200:
            event["error"] = f"Invalid status code: {status}"
        body = json.dumps(event).encode()
        async with httpx.AsyncClient(timeout=5) as client:
            for attempt in range(webhook_retries + 1):
                ts = str(int(time.time()))
                headers = {"content-type": "application/json", "x-fal-webhook-request-id": r.id,
                           "x-fal-webhook-user-id": USER_ID, "x-fal-webhook-timestamp": ts,
                           "x-fal-webhook-signature": sign(key, r.id, USER_ID, ts, body)}
                st.stats["webhook_attempts"] += 1
                try:
                    resp = await client.post(r.webhook, content=body, headers=headers)
                    if resp.is_success:
                        st.stats["webhooks_delivered"] += 1
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(webhook_backoff * 2**attempt)

    # -- routes --------------------------------------------------------------------------------
    async def queue(request: Request) -> Response:
        parts = [p for p in request.path_params["path"].split("/") if p]
        if "requests" in parts:
            i = parts.index("requests")
            if i != 2 or len(parts) not in (4, 5):  # a subpath before /requests: fal has no such URL
                return err(404, "Not Found")
            return await request_op(request, "/".join(parts[:2]), parts[3], parts[4] if len(parts) == 5 else "")
        if request.method != "POST" or len(parts) < 2:
            return err(404, "Not Found")
        return await submit(request, parts)

    async def submit(request: Request, parts: list[str]) -> Response:
        if not authorized(request):
            return err(401, "Invalid authentication credentials. Use 'Authorization: Key <FAL_KEY>'.")
        try:
            body = await request.json()
        except ValueError:
            return err(422, [{"loc": ["body"], "msg": "invalid JSON", "type": "json_invalid"}])
        text = str(body.get("prompt") or body.get("text") or "") if isinstance(body, dict) else ""
        if "[429]" in text:
            return err(429, "Rate limit exceeded: too many requests in a short burst", {"Retry-After": str(retry_after)})
        if "[500]" in text:
            return err(500, [{"loc": ["body"], "msg": "Internal server error", "type": "internal_server_error"}])
        if "[moderated-submit]" in text:
            return err(422, [{"loc": ["body", "prompt"], "type": "content_policy_violation",
                              "msg": "The content could not be processed because it contained material flagged by a content checker."}])
        st.stats["creates"] += 1
        st.seq += 1
        rid = str(uuid.uuid4())
        ttl = None
        pref = request.headers.get("x-fal-object-lifecycle-preference")
        if pref:
            try:
                ttl = float(json.loads(pref)["expiration_duration_seconds"])
            except (ValueError, KeyError, TypeError):
                ttl = None
        slow = "[slow]" in text
        r = Req(rid, "/".join(parts[:2]), "/".join(parts), body, st.seq,
                queue_left=queue_polls + (2 if slow else 0), progress_total=slow_polls if slow else progress_polls,
                webhook=request.query_params.get("fal_webhook"), ttl=ttl)
        st.requests[rid] = r
        st.count_inflight()
        root = f"{base(request)}/{r.owner_app}/requests/{rid}"
        answer = {"status": "IN_QUEUE", "request_id": rid, "response_url": root, "status_url": f"{root}/status",
                  "cancel_url": f"{root}/cancel", "queue_position": queue_position(r)}
        if r.webhook:
            answer["gateway_request_id"] = rid
            task = asyncio.create_task(run_for_webhook(r, f"{base(request)}/cdn"))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return JSONResponse(answer)

    async def request_op(request: Request, owner_app: str, rid: str, op: str) -> Response:
        if not authorized(request):
            return err(401, "Invalid authentication credentials")
        r = st.requests.get(rid)
        if r is None or r.owner_app != owner_app:
            return JSONResponse({"status": "NOT_FOUND"} if op == "cancel" else {"detail": "Request not found"}, status_code=404)
        cdn = f"{base(request)}/cdn"
        if op == "status" and request.method == "GET":
            return status(request, r, cdn)
        if op == "cancel" and request.method == "PUT":
            st.stats["cancels"] += 1
            if r.state == "COMPLETED":
                return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
            r.canceled = True
            complete(r, cdn)  # queued: removed; running: the app honours the signal
            return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)
        if op == "" and request.method == "GET":
            st.stats["results"] += 1
            if r.state != "COMPLETED" or r.result is None:
                return err(400, "Request is still in progress")
            code, payload, headers = r.result
            return JSONResponse(payload, status_code=code, headers=headers)
        return err(405, "Method Not Allowed")

    def status(request: Request, r: Req, cdn: str) -> Response:
        st.stats["polls"] += 1
        r.polls += 1
        if r.polls == 1 and r.has("[poll500]"):
            return err(500, "Internal server error")
        advance(r, cdn)
        root = f"{base(request)}/{r.owner_app}/requests/{r.id}"
        body: dict[str, Any] = {"status": r.state, "request_id": r.id, "response_url": root,
                                "status_url": f"{root}/status", "cancel_url": f"{root}/cancel"}
        with_logs = request.query_params.get("logs") in ("1", "true")
        body["logs"] = list(r.logs) if with_logs and r.state != "IN_QUEUE" else None
        if r.state == "IN_QUEUE":
            body["queue_position"] = queue_position(r)
        if r.state == "COMPLETED":
            body["metrics"] = {"inference_time": 0.42 * (r.progress_total or 1)}
        return JSONResponse(body, status_code=200 if r.state == "COMPLETED" else 202)

    async def cdn_file(request: Request) -> Response:
        st.stats["cdn_gets"] += 1
        entry = st.files.get(request.path_params["token"])
        if entry is None or entry[2] < time.time():
            return Response("Not Found", status_code=404, media_type="text/plain")
        kind, spec, _ = entry
        data, ctype = await asyncio.to_thread(render, kind, spec)
        return Response(data, media_type=ctype)

    async def jwks(request: Request) -> Response:
        st.stats["jwks_fetches"] += 1
        return JSONResponse({"keys": [jwk(key)]})

    async def stats(request: Request) -> Response:
        st.count_inflight()
        return JSONResponse(st.stats)

    async def reset(request: Request) -> Response:
        st.reset()
        return JSONResponse({"ok": True})

    return Starlette(routes=[
        Route("/_control/stats", stats, methods=["GET"]),
        Route("/_control/reset", reset, methods=["POST"]),
        Route("/.well-known/jwks.json", jwks, methods=["GET"]),
        Route("/cdn/{token}/{name}", cdn_file, methods=["GET"]),
        Route("/{path:path}", queue, methods=["GET", "POST", "PUT"]),
    ])


def _log(message: str) -> dict[str, str]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
    return {"message": message, "level": "INFO", "source": "user", "timestamp": stamp}


def image_dims(inp: dict[str, Any]) -> tuple[int, int]:
    size = inp.get("image_size")
    if isinstance(size, dict):
        return int(size["width"]), int(size["height"])
    if isinstance(size, str) and size in NAMED:
        return NAMED[size]
    if inp.get("aspect_ratio") in RATIO:
        return RATIO[inp["aspect_ratio"]]
    return NAMED["landscape_4_3"]  # flux's default


# -- media ------------------------------------------------------------------------------------


def render(kind: str, spec: dict[str, Any]) -> tuple[bytes, str]:
    if kind == "image":
        return make_image(spec["w"], spec["h"], spec["fmt"], black=spec["black"], seed=spec["seed"]), f"image/{spec['fmt']}"
    if kind == "video":
        return make_mp4(spec["seconds"]), "video/mp4"
    return make_wav(spec["seconds"]), "audio/wav"


def make_image(w: int, h: int, fmt: str, *, black: bool, seed: int) -> bytes:
    color = (0, 0, 0) if black else ((seed * 67) % 256, (seed * 131) % 256, 180)
    img = Image.new("RGB", (w, h), color)
    if not black:
        ImageDraw.Draw(img).rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(240, 240, 240))
    buf = io.BytesIO()
    img.save(buf, format="PNG" if fmt == "png" else "JPEG")
    return buf.getvalue()


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def make_mp4(seconds: float, timescale: int = 1000) -> bytes:
    """A minimal ISO-BMFF file: ftyp, moov{mvhd (v0) with timescale and duration}, mdat."""
    ftyp = _box(b"ftyp", b"isom" + struct.pack(">I", 0x200) + b"isomiso2avc1mp41")
    matrix = struct.pack(">9I", 0x00010000, 0, 0, 0, 0x00010000, 0, 0, 0, 0x40000000)
    mvhd = _box(b"mvhd", struct.pack(">I", 0) + struct.pack(">IIII", 0, 0, timescale, int(seconds * timescale))
                + struct.pack(">IH", 0x00010000, 0x0100) + b"\0" * 10 + matrix + b"\0" * 24 + struct.pack(">I", 2))
    return ftyp + _box(b"moov", mvhd) + _box(b"mdat", b"\0" * 1024)


def make_wav(seconds: float, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(seconds * rate))
    return buf.getvalue()


if __name__ == "__main__":
    run_main(create_app, "fake fal.ai queue API")
