"""Fake OpenAI-style `/v1/videos` relays (providers.md §7b CometAPI, §7c DMXAPI, §7d poloapi), over real HTTP.

    python -m tests.fakes.openai_relay --port 9300            # CometAPI flavour
    create_app(flavor="cometapi" | "dmxapi" | "poloapi")

Routes (under /v1):

    POST /videos                create; CometAPI and DMXAPI take multipart only (their docs show
                                nothing else), poloapi JSON or multipart
    GET  /videos/{id}           the video object, one step per poll
    GET  /videos/{id}/content   Sora's bytes (CometAPI, DMXAPI; ?variant=thumbnail on CometAPI
                                only), or poloapi's JSON object with `video_url`
    GET  /cdn/{name}.mp4        a relay's CDN link, no auth; 403 after `url_ttl`
    GET  /_control/stats        POST /_control/reset

The flavours:

    cometapi  sora-2 / sora-2-pro as OpenAI's (Sora sizes, seconds "4"|"8"|"12", bytes at
              /content); Veo aliases veo3 / veo3-fast / veo3-pro where `size` is the orientation
              hint 16x9 | 9x16 (WxH refused), the reply's `model` is the backend id
              (veo3-fast -> veo_3_1-fast), ids are `task_…`, `seconds` is "", the poll adds
              `task_id`, and a completed task carries `video_url` (its /content answers 404)
    dmxapi    sora-2 / sora-2-pro only; /content bytes kept `content_ttl` (2 h for real);
              no thumbnail variant (400)
    poloapi   veo3.1 / veo3.1-fast / veo3.1-pro; ids like `veo3.1:1764899481-jTkhPerTVj`;
              statuses queued -> processing -> completed | failed; the completed object has
              `video_url`; /content answers that JSON object, not bytes; the key is sent bare
              (`Authorization: sk-…`) or with Bearer

Errors are the relays' envelope `{"error": {"message": "… (request id: …)", "type", "code"}}`
(type comet_api_error on CometAPI, new_api_error on the others); no Retry-After on 429.
Prompt keywords (tests/contract.py): [moderated] [moderated-output] [fail] [429] [500]
[poll500] [slow] [expired]; poloapi also [no-url-in-poll] (the link only at /content).
"""

from __future__ import annotations

import re
import secrets
import threading
import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.openai import make_image, make_mp4
from tests.fakes.server import run_main

API_KEY = "sk-relay-key"
SORA = {"sora-2": ("720x1280", "1280x720"), "sora-2-pro": ("720x1280", "1280x720", "1024x1792", "1792x1024")}
COMET_VEO = {"veo3": "veo_3_1", "veo3-fast": "veo_3_1-fast", "veo3-pro": "veo_3_1-4K"}
POLO_VEO = ("veo3.1", "veo3.1-fast", "veo3.1-pro")
MODELS = {"cometapi": (*SORA, *COMET_VEO), "dmxapi": tuple(SORA), "poloapi": POLO_VEO}
SIZE = re.compile(r"^(\d{2,5})x(\d{2,5})$")


def create_app(
    *,
    flavor: str = "cometapi",
    api_key: str = API_KEY,
    video_polls: int = 3,
    slow_polls: int = 12,
    url_ttl: float = 3600.0,
    content_ttl: float = 7200.0,
) -> Starlette:
    if flavor not in MODELS:
        raise ValueError(f"unknown flavor {flavor!r}")
    lock = threading.Lock()
    videos: dict[str, dict[str, Any]] = {}
    files: dict[str, tuple[bytes, float]] = {}
    stats: dict[str, Any] = {}
    error_type = "comet_api_error" if flavor == "cometapi" else "new_api_error"

    def reset() -> None:
        videos.clear()
        files.clear()
        stats.clear()
        stats.update({"creates": 0, "polls": 0, "content_gets": 0, "cdn_gets": 0, "cdn_saw_key": 0, "last": None})

    reset()

    def relay_error(status: int, message: str, code: str = "", **extra: Any) -> JSONResponse:
        return JSONResponse({"error": {"message": f"{message} (request id: {uuid.uuid4().hex[:20]})", "type": error_type,
                                       "param": "", "code": code, **extra}}, status)

    def authorized(request: Request) -> Response | None:
        got = request.headers.get("authorization")
        if not got:
            return relay_error(401, "No token provided", "")
        ok = {f"Bearer {api_key}", api_key} if flavor == "poloapi" else {f"Bearer {api_key}"}
        return None if got in ok else relay_error(401, "Invalid token", "")

    def public(v: dict[str, Any]) -> dict[str, Any]:
        return {k: val for k, val in v.items() if not k.startswith("_")}

    async def create(request: Request) -> Response:
        with lock:
            stats["creates"] += 1
        if (denied := authorized(request)) is not None:
            return denied
        multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
        if not multipart and flavor != "poloapi":
            return relay_error(400, "Content-Type must be multipart/form-data", "invalid_request")
        if multipart:
            form = await request.form()
            f: dict[str, Any] = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            f["_files"] = [k for k, v in form.multi_items() if isinstance(v, UploadFile)]
        else:
            try:
                f = await request.json()
            except ValueError:
                return relay_error(400, "invalid JSON body", "invalid_request")
        with lock:
            stats["last"] = dict(f)
        prompt, model = f.get("prompt"), f.get("model")
        if not isinstance(prompt, str) or not prompt:
            return relay_error(400, "prompt is required", "invalid_request")
        if model not in MODELS[flavor]:
            return relay_error(503, f"No available channel for model {model}", "model_not_found")
        if "[429]" in prompt:
            return relay_error(429, "The upstream load of the current group is saturated, please try again later", "rate_limit")
        if "[500]" in prompt:
            return relay_error(500, "upstream error: do request failed", "do_request_failed")
        if "[moderated]" in prompt:
            return relay_error(400, "Your request was rejected by the safety system. safety_violations=[violence].",
                               "moderation_blocked")
        size, seconds = f.get("size"), f.get("seconds")
        if model in SORA:
            seconds = seconds or "4"
            size = size or "720x1280"
            if seconds not in ("4", "8", "12"):
                return relay_error(400, f"Invalid value: '{seconds}'. Supported values are: '4', '8', and '12'.", "invalid_value")
            if size not in SORA[str(model)]:
                return relay_error(400, f"Invalid value: '{size}'. Supported values are: {', '.join(SORA[str(model)])}.", "invalid_value")
        elif flavor == "cometapi":  # Veo: an orientation hint, 8 s clips
            if size not in (None, "16x9", "9x16"):
                return relay_error(400, f"size must be 16x9 or 9x16 for {model}, not {size}", "invalid_request")
            if seconds not in (None, "", "8"):
                return relay_error(400, f"seconds must be 8 for {model}", "invalid_request")
            size = size or "16x9"
        elif size is not None and not SIZE.match(str(size)) and size not in ("16:9", "9:16"):
            return relay_error(400, f"invalid size {size}", "invalid_request")
        now = int(time.time())
        if flavor == "poloapi":
            vid = f"{model}:{now}-{secrets.token_urlsafe(8)[:10]}"
        elif model in SORA:
            vid = f"video_{secrets.token_hex(12)}"
        else:
            vid = f"task_{secrets.token_hex(12)}"
        v: dict[str, Any] = {"id": vid, "object": "video", "created_at": now, "completed_at": None, "expires_at": None,
                             "status": "queued", "progress": 0, "model": COMET_VEO.get(str(model), model),
                             "seconds": str(seconds) if model in SORA else "", "size": size or "", "error": None,
                             "_prompt": prompt, "_polls": 0, "_sora": model in SORA}
        if flavor == "poloapi":
            v["seconds"] = str(seconds or "8")
        with lock:
            videos[vid] = v
            return JSONResponse(public(v))

    def finish(v: dict[str, Any], base: str) -> None:
        prompt = v["_prompt"]
        v["completed_at"] = int(time.time())
        if "[moderated-output]" in prompt:
            v |= {"status": "failed", "error": {"code": "moderation_blocked", "message": "The generated video was blocked by moderation."}}
            return
        if "[fail]" in prompt:
            v |= {"status": "failed", "error": {"code": "generation_failed", "message": "Video generation failed, please retry."}}
            return
        expires = time.time() + (-1 if "[expired]" in prompt else (content_ttl if v["_sora"] else url_ttl))
        w, h = (720, 1280) if v["size"] in ("720x1280", "1024x1792", "9x16", "9:16") else (1280, 720)
        seconds = int(v["seconds"] or 8)
        data = make_mp4(seconds, w, h)
        v |= {"status": "completed", "progress": 100, "_data": data}
        if v["_sora"]:
            v["expires_at"] = int(expires)
            v["_expires"] = expires
            return
        name = secrets.token_hex(8)
        files[name] = (data, expires)
        v["video_url"] = f"{base}/cdn/{name}.mp4"
        if flavor == "poloapi" and "[no-url-in-poll]" in prompt:
            v["_link"] = v.pop("video_url")

    async def get(request: Request) -> Response:
        if (denied := authorized(request)) is not None:
            return denied
        with lock:
            v = videos.get(request.path_params["vid"])
            if v is None:
                return relay_error(404, f"task {request.path_params['vid']} not found", "not_found")
            stats["polls"] += 1
            v["_polls"] += 1
            if "[poll500]" in v["_prompt"] and v["_polls"] == 1:
                return relay_error(500, "upstream error: do request failed", "do_request_failed")
            if v["status"] in ("queued", "in_progress", "processing"):
                total = slow_polls if "[slow]" in v["_prompt"] else video_polls
                k = v["_polls"]
                if k >= total:
                    finish(v, str(request.base_url).rstrip("/"))
                elif k >= 2:
                    v["status"] = "processing" if flavor == "poloapi" else "in_progress"
                    v["progress"] = 10 + (80 * (k - 2)) // max(1, total - 3)
            out = public(v)
            if flavor == "cometapi" and not v["_sora"]:
                out["task_id"] = v["id"]
            return JSONResponse(out)

    async def content(request: Request) -> Response:
        if (denied := authorized(request)) is not None:
            return denied
        with lock:
            stats["content_gets"] += 1
            v = videos.get(request.path_params["vid"])
        if v is None or v["status"] != "completed":
            return relay_error(404, "Video is not ready yet", "not_found")
        if flavor == "poloapi":  # the object again, the link in it: not bytes
            out = public(v)
            if "_link" in v:
                out["video_url"] = v["_link"]
            return JSONResponse(out)
        if not v["_sora"]:
            return relay_error(404, "use the task's video_url", "not_found")
        if time.time() > v["_expires"]:
            return relay_error(404, "The assets for this video have expired.", "not_found")
        variant = request.query_params.get("variant", "video")
        if variant == "video":
            return Response(v["_data"], media_type="video/mp4")
        if flavor == "cometapi" and variant == "thumbnail":
            return Response(make_image(320, 180, "webp", v["_prompt"]), media_type="image/webp")
        return relay_error(400, f"variant {variant} is not supported", "invalid_request")

    async def cdn(request: Request) -> Response:
        with lock:
            stats["cdn_gets"] += 1
            if request.headers.get("authorization"):
                stats["cdn_saw_key"] += 1
            f = files.get(request.path_params["name"])
        if f is None or time.time() > f[1]:
            return Response("<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>", 403,
                            media_type="application/xml")
        return Response(f[0], media_type="video/mp4")

    async def get_stats(request: Request) -> Response:
        with lock:
            return JSONResponse(dict(stats))

    async def do_reset(request: Request) -> Response:
        with lock:
            reset()
        return JSONResponse({"ok": True})

    return Starlette(routes=[
        Route("/v1/videos", create, methods=["POST"]),
        Route("/v1/videos/{vid}", get, methods=["GET"]),
        Route("/v1/videos/{vid}/content", content, methods=["GET"]),
        Route("/cdn/{name}.mp4", cdn, methods=["GET"]),
        *(Route(f"{p}/_control/stats", get_stats, methods=["GET"]) for p in ("", "/v1")),
        *(Route(f"{p}/_control/reset", do_reset, methods=["POST"]) for p in ("", "/v1")),
    ])


if __name__ == "__main__":
    run_main(create_app, "fake OpenAI-style /v1/videos relays (CometAPI, DMXAPI, poloapi)")
