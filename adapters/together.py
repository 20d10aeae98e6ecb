"""Together AI: FLUX and other image models, and its async video API.

Wire format (`Authorization: Bearer <key>`; base `https://api.together.xyz`, a base URL
ending in `/v1`, as chat deployments give it, is accepted too):

    image  POST /v1/images/generations   {model, prompt, width, height, steps, n, seed,
                                          negative_prompt, image_url, output_format,
                                          response_format: "base64" | "url"}
             -> {id, model, object: "list", data: [{index, b64_json} | {index, url}]}
           Together's own body on OpenAI's path: there is no `size` and no `quality`
           (a `size` is refused with 400), so our size becomes width/height here.
    video  POST /v2/videos               {model, prompt, width, height, seconds, fps, steps,
                                          seed, guidance_scale, negative_prompt, output_format,
                                          frame_images: [{input_image, frame: first|last}], ...}
             -> {id}
           GET  /v2/videos/{id}          queued -> in_progress -> completed (outputs.video_url,
                                          outputs.cost in USD) | failed (error / info.errors)
                                          | cancelled
    errors {"error": {"message", "type", "param", "code"}} (OpenAI's shape); a 429 names the
           limit in its message and carries x-ratelimit-limit / -remaining / -reset headers

Images answer synchronously (submit returns Done). Videos report no progress. Together
documents no cancel for /v2/videos, so `cancel` asks nothing: the job is canceled on our
side and the render runs (and bills) to its end. No webhooks, no idempotency key.
Sources: togethercomputer/together-python (types/images.py, types/videos.py,
resources/videos.py), docs.together.ai/reference/get-videos-id; providers.md §7e.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import time
from typing import Any, ClassVar

import httpx

from adapters.base import Adapter
from adapters.http import body_json, error_from_response, moderated, retry_after, send, unsupported
from core.errors import ErrorCode, ProviderError, ProviderErrorKind
from core.types import Done, Failed, OutputRef, Pending, PollResult, ProviderRequest, SubmitResult

PROVIDER = "together"
DEFAULT_BASE_URL = "https://api.together.xyz"
VIDEO_POLL_SECONDS = 5.0  # renders take 30 s to minutes; public clients poll every 5-15 s
DEFAULT_RATE_LIMIT_WAIT = 5.0  # when a 429 carries neither Retry-After nor x-ratelimit-reset
MAX_IMAGES = 4  # n
IMAGE_FORMATS = ("jpeg", "png")
IMAGE_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
VIDEO_FORMATS = {"MP4": "video/mp4", "WEBM": "video/webm"}
SECONDS_RANGE = (1.0, 10.0)
FPS_RANGE = (15, 60)
STEPS_RANGE = (10, 50)  # video denoising steps
TARGET_PIXELS = 1024 * 1024  # an aspect ratio becomes ~1 MP on the 16 px grid
GRID = 16
# words Together's refusals use for a prompt or image its safety checker flagged
_FLAGGED = re.compile(r"nsfw|safety|flagged|moderat|content polic|inappropriate", re.IGNORECASE)
_OUTPUT_STAGE = re.compile(r"output|generated", re.IGNORECASE)


class TogetherAdapter(Adapter):
    """Together's images and videos. Stateless: everything poll needs is in the handle."""
    # images are synchronous: the create is the whole generation
    default_timeouts: ClassVar[dict[str, float]] = {**Adapter.default_timeouts, "create": 180.0}

    name = "together"
    provider_params = {
        # width/height override the size mapping; response_format "url" asks for links
        "image": frozenset({"width", "height", "steps", "guidance_scale", "disable_safety_checker",
                            "response_format", "image_loras"}),
        # last_frame: an image (URL or data: URI) for the final frame, beside our `image`
        "video": frozenset({"width", "height", "steps", "guidance_scale", "output_format", "output_quality",
                            "last_frame", "reference_images"}),
    }

    async def submit(self, request: ProviderRequest) -> SubmitResult:
        model = request.provider_model
        if request.modality == "image":
            return await self._image(model, request.input)
        if request.modality == "video":
            return await self._video(model, request.input)
        raise unsupported("modality", request.modality, ["image", "video"], model)

    async def poll(self, handle: dict[str, Any]) -> PollResult:
        if handle.get("kind") != "video":  # images finish inside submit
            return Failed(ErrorCode.internal, f"{PROVIDER}: a {handle.get('kind')} handle has nothing to poll")
        resp = await send(self.http, "GET", f"{self._root()}/v2/videos/{handle['id']}", provider=PROVIDER,
                          headers=self._auth())
        if resp.status_code == 404:
            return Failed(ErrorCode.provider_error, f"{PROVIDER}: video {handle['id']} not found (deleted or expired)")
        if not resp.is_success:
            raise _error(resp)
        video = body_json(resp)
        if not isinstance(video, dict):
            raise ProviderError(ProviderErrorKind.retryable, f"{PROVIDER}: video status answered non-JSON: {resp.text[:200]!r}")
        return self._video_result(video, handle)

    async def cancel(self, handle: dict[str, Any]) -> None:
        """Together documents no cancel for /v2/videos and images finish inside submit:
        nothing to ask. The job is canceled on our side; the render runs to its end."""
        return None

    # -- images -------------------------------------------------------------------------
    async def _image(self, model: str, inp: dict[str, Any]) -> Done:
        body = image_body(model, inp)  # refuses what cannot be sent
        resp = await send(self.http, "POST", f"{self._root()}/v1/images/generations", provider=PROVIDER, create=True,
                          json=body, headers=self._auth())
        if not resp.is_success:
            raise _error(resp)
        answer = body_json(resp)
        items = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(items, list) or not items:
            raise ProviderError(ProviderErrorKind.failed, f"{PROVIDER}: the image answer holds no images",
                                detail={"body": answer if answer is not None else resp.text[:500]})
        fmt = str(body.get("output_format", "jpeg"))
        outputs = [_image_output(item, fmt) for item in items]
        handle = {"kind": "image", "id": answer.get("id"), "model": model}
        return Done(outputs=outputs, handle=handle, usage={"images": len(outputs)})

    # -- videos -------------------------------------------------------------------------
    async def _video(self, model: str, inp: dict[str, Any]) -> Pending:
        body = video_body(model, inp)
        resp = await send(self.http, "POST", f"{self._root()}/v2/videos", provider=PROVIDER, create=True,
                          json=body, headers=self._auth())
        if not resp.is_success:
            raise _error(resp)
        answer = body_json(resp)
        if not isinstance(answer, dict) or not answer.get("id"):
            # the task may exist and bill: not resend_safe
            raise ProviderError(ProviderErrorKind.failed, f"{PROVIDER} accepted the video but answered without an id",
                                detail={"body": answer if answer is not None else resp.text[:500]})
        handle = {"kind": "video", "id": str(answer["id"]), "model": model,
                  "output_format": body.get("output_format", "MP4")}
        return Pending(handle=handle, poll_after=self.poll_interval(VIDEO_POLL_SECONDS), message="queued")

    def _video_result(self, video: dict[str, Any], handle: dict[str, Any]) -> PollResult:
        status = str(video.get("status") or "")
        if status == "completed":
            outputs = _object(video.get("outputs"))
            url = outputs.get("video_url")
            if not isinstance(url, str) or not url:
                return Failed(ErrorCode.provider_error, f"{PROVIDER}: video completed without outputs.video_url", detail=video)
            ctype = VIDEO_FORMATS.get(str(handle.get("output_format", "MP4")).upper(), "video/mp4")
            usage: dict[str, Any] = {}
            if isinstance(outputs.get("cost"), int | float) and not isinstance(outputs.get("cost"), bool):
                # Together reports USD; billed as provider credits of 1 USD (catalog per_credit: 1000000)
                usage["cost_credits"] = outputs["cost"]
                usage["cost_unit"] = "usd"
            # a plain link (no key: ours stays with Together's API), fetched at once by storage
            return Done(outputs=[OutputRef(url=url, content_type=ctype)], handle=handle, usage=usage)
        if status == "failed":
            return _video_failure(video)
        if status == "cancelled":
            return Failed(ErrorCode.canceled, f"{PROVIDER}: video {handle['id']} was cancelled", detail={"provider_status": status})
        # queued, in_progress, or a status newer than this adapter: keep waiting
        return Pending(handle=handle, poll_after=self.poll_interval(VIDEO_POLL_SECONDS), message=status or None)

    # -- plumbing -----------------------------------------------------------------------
    def _root(self) -> str:
        """The API root: chat deployments name `…/v1`, images and videos live at /v1 and /v2."""
        return self.base_url(DEFAULT_BASE_URL).removesuffix("/v1")

    def _auth(self) -> dict[str, str]:
        if not self.api_key:
            raise ProviderError(
                ProviderErrorKind.auth,
                f"{PROVIDER}: no API key (set {self.deployment.api_key_env or 'api_key_env'} for deployment {self.deployment.name!r})",
            )
        return {**self.headers(), "Authorization": f"Bearer {self.api_key}"}


# -- request mapping ---------------------------------------------------------------------
def image_body(model: str, inp: dict[str, Any]) -> dict[str, Any]:
    """Our normalized image input -> Together's images body; refuses before sending."""
    params = dict(inp.get("provider_params") or {})
    n = int(inp.get("n") or 1)
    if not 1 <= n <= MAX_IMAGES:
        raise unsupported("n", n, f"1..{MAX_IMAGES}", model)
    fmt = inp.get("output_format") or "png"
    if fmt not in IMAGE_FORMATS:
        raise unsupported("output_format", fmt, list(IMAGE_FORMATS), model)
    body: dict[str, Any] = {"model": model, "prompt": inp["prompt"], "output_format": fmt}
    if n != 1:
        body["n"] = n
    if inp.get("size"):
        body["width"], body["height"] = (int(x) for x in str(inp["size"]).split("x"))
    elif inp.get("aspect_ratio"):
        body["width"], body["height"] = size_for_ratio(str(inp["aspect_ratio"]))
    for key in ("seed", "negative_prompt"):
        if inp.get(key) is not None:
            body[key] = inp[key]
    images = list(inp.get("input_images") or [])
    if len(images) > 1:
        raise unsupported("input_images", f"{len(images)} images", "at most 1 (sent as image_url)", model)
    if images:
        if images[0].startswith("data:"):
            raise unsupported("input_images", images[0][:40], "an http(s) URL (Together's image_url takes a link)", model)
        body["image_url"] = images[0]
    fmt_answer = params.pop("response_format", "base64")
    if fmt_answer not in ("base64", "url"):
        raise unsupported("provider_params.response_format", fmt_answer, ["base64", "url"], model)
    # base64 by default: the bytes arrive with the answer and cannot expire
    body["response_format"] = fmt_answer
    for key in ("width", "height"):
        if key in params and (isinstance(params[key], bool) or not isinstance(params[key], int) or params[key] <= 0):
            raise unsupported(f"provider_params.{key}", params[key], "a positive integer (pixels)", model)
    steps = params.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise unsupported("provider_params.steps", steps, "a positive integer", model)
    return body | params


def video_body(model: str, inp: dict[str, Any]) -> dict[str, Any]:
    """Our normalized video input -> Together's /v2/videos body; refuses before sending."""
    params = dict(inp.get("provider_params") or {})
    body: dict[str, Any] = {"model": model, "prompt": inp["prompt"]}
    if inp.get("duration_seconds") is not None:
        seconds = float(inp["duration_seconds"])
        if not SECONDS_RANGE[0] <= seconds <= SECONDS_RANGE[1]:
            raise unsupported("duration_seconds", seconds, f"{SECONDS_RANGE[0]:g}..{SECONDS_RANGE[1]:g}", model)
        body["seconds"] = str(int(seconds)) if seconds.is_integer() else str(seconds)
    if inp.get("fps") is not None:
        if not FPS_RANGE[0] <= int(inp["fps"]) <= FPS_RANGE[1]:
            raise unsupported("fps", inp["fps"], f"{FPS_RANGE[0]}..{FPS_RANGE[1]}", model)
        body["fps"] = int(inp["fps"])
    if inp.get("aspect_ratio") is not None or inp.get("resolution") is not None:
        body["width"], body["height"] = video_size(model, str(inp.get("aspect_ratio", "16:9")), str(inp.get("resolution", "720p")))
    for key in ("seed", "negative_prompt"):
        if inp.get(key) is not None:
            body[key] = inp[key]
    frames = []
    if inp.get("image"):
        frames.append({"input_image": _bare_base64(inp["image"]), "frame": "first"})
    last = params.pop("last_frame", None)
    if last is not None:
        if not isinstance(last, str) or not last.startswith(("http://", "https://", "data:image/")):
            raise unsupported("provider_params.last_frame", str(last)[:40], "an image URL or data:image/... URI", model)
        frames.append({"input_image": _bare_base64(last), "frame": "last"})
    if frames:
        body["frame_images"] = frames
    fmt = str(params.pop("output_format", "MP4")).upper()
    if fmt not in VIDEO_FORMATS:
        raise unsupported("provider_params.output_format", fmt, list(VIDEO_FORMATS), model)
    body["output_format"] = fmt
    steps = params.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not STEPS_RANGE[0] <= steps <= STEPS_RANGE[1]):
        raise unsupported("provider_params.steps", steps, f"an integer {STEPS_RANGE[0]}..{STEPS_RANGE[1]}", model)
    refs = params.get("reference_images")
    if refs is not None and not (isinstance(refs, list) and all(isinstance(r, str) for r in refs)):
        raise unsupported("provider_params.reference_images", "(not a list of strings)", "a list of image URLs or base64", model)
    return body | params


def size_for_ratio(ratio: str) -> tuple[int, int]:
    """~1 MP at W:H on the 16 px grid."""
    a, b = (int(x) for x in ratio.split(":"))
    w, h = math.sqrt(TARGET_PIXELS * a / b), math.sqrt(TARGET_PIXELS * b / a)
    return max(GRID, round(w / GRID) * GRID), max(GRID, round(h / GRID) * GRID)


def video_size(model: str, ratio: str, resolution: str) -> tuple[int, int]:
    """(width, height) for an aspect ratio at a resolution: the short side is the
    resolution's lines (720p -> 720), the long side follows the ratio, both even."""
    m = re.fullmatch(r"(\d{3,4})p", resolution)
    if not m:
        raise unsupported("resolution", resolution, "a height like 480p, 720p or 1080p", model)
    a, b = (int(x) for x in ratio.split(":"))
    short = int(m[1])
    long = round(short * max(a, b) / min(a, b) / 2) * 2
    return (long, short) if a >= b else (short, long)


def _bare_base64(ref: str) -> str:
    """Together's input_image takes a URL or bare base64 (its examples send no data: prefix)."""
    if ref.startswith("data:"):
        return ref.partition(",")[2]
    return ref


# -- response mapping --------------------------------------------------------------------
def _image_output(item: Any, fmt: str) -> OutputRef:
    ctype = IMAGE_TYPES.get(fmt, "image/jpeg")
    if isinstance(item, dict) and item.get("b64_json"):
        try:
            return OutputRef(data=base64.b64decode(str(item["b64_json"]), validate=True), content_type=ctype)
        except (binascii.Error, ValueError) as exc:
            raise ProviderError(ProviderErrorKind.failed, f"{PROVIDER} answered an image that is not base64") from exc
    if isinstance(item, dict) and item.get("url"):
        # a link that does not last: storage fetches it at once, without our key
        return OutputRef(url=str(item["url"]), content_type=ctype)
    raise ProviderError(ProviderErrorKind.failed, f"{PROVIDER} answered an image with neither b64_json nor url", detail=item)


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _video_failure(video: dict[str, Any]) -> Failed:
    error = _object(video.get("error"))
    errors = [e for e in _object(video.get("info")).get("errors") or [] if isinstance(e, dict)]
    first = error or (errors[0] if errors else {})
    code = str(first.get("code") or "")
    message = str(first.get("message") or "the video failed")
    if _FLAGGED.search(code) or _FLAGGED.search(message):
        stage = "input" if "input" in code.lower() or ("prompt" in message.lower() and not _OUTPUT_STAGE.search(message)) else "output"
        return Failed(ErrorCode.moderated, f"{PROVIDER}: {message}", detail={"stage": stage, "reasons": [code or message], "error": first})
    return Failed(ErrorCode.provider_error, f"{PROVIDER}: {message}", detail={"error": first, "errors": errors})


def _error(resp: httpx.Response) -> ProviderError:
    """Together's refusals first (a flagged prompt, a 429's reset), then the shared mapping."""
    body = body_json(resp)
    err = body.get("error") if isinstance(body, dict) else None
    message = str(err.get("message") or "") if isinstance(err, dict) else ""
    if resp.status_code in (400, 422) and _FLAGGED.search(message):
        return moderated(f"{PROVIDER}: {message}", "input", [str(err.get("code") or err.get("type") or "flagged")] if isinstance(err, dict) else [])
    exc = error_from_response(resp, PROVIDER)
    if exc.kind is ProviderErrorKind.rate_limited and exc.retry_after is None:
        exc.retry_after = _reset_seconds(resp) or DEFAULT_RATE_LIMIT_WAIT
    return exc


def _reset_seconds(resp: httpx.Response) -> float | None:
    """x-ratelimit-reset: seconds until the window resets (an epoch time is converted)."""
    if retry_after(resp) is not None:
        return retry_after(resp)
    raw = resp.headers.get("x-ratelimit-reset")
    try:
        value = float(raw) if raw else None
    except ValueError:
        return None
    if value is None or value <= 0:
        return None
    return max(0.0, value - time.time()) if value > 1e9 else value
