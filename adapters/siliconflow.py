"""SiliconFlow images and video (providers.md §7a). Chat is OpenAI's format and runs on
`openai_compatible`; its error bodies are mapped by `flat_error` below.

Wire format (base `https://api.siliconflow.cn/v1`, or `.com/v1` for the international
site, which has its own keys; `Authorization: Bearer sk-...`):

    image  POST /images/generations   {model, prompt, negative_prompt, image_size:"WxH",
                                       batch_size (Kolors only), seed, num_inference_steps,
                                       guidance_scale (Kolors), cfg (Qwen-Image), image}
             -> {images:[{url}], timings:{inference}, seed}      synchronous, seconds
                the URLs are signed OSS links valid for 1 hour (403 XML afterwards)
    video  POST /video/submit         {model, prompt, negative_prompt, image_size, image, seed}
             -> {requestId}
           POST /video/status         {requestId}
             -> {status, reason, position, results:{videos:[{url}], timings, seed}}
    status InQueue (position) ─► InProgress ─► Succeed (results)
                                          └──► Failed (reason)
           result URLs may last only 10 minutes: storage downloads them at once

    errors not OpenAI's {"error": {...}}:
      400 {"code":20012,"message":"Model does not exist..."}     the catalog's model: operator
      400 {"code":20015,"message":"The parameter is invalid..."} the request: invalid_input
      400 a message about sensitive words                        moderated (input)
      401 the bare JSON string "Invalid token"                   provider_auth
      402/403 {"code":30001,"message":"...balance is insufficient"}  out of credits (quota)
      429 {"message":"...Details:TPM limit reached.","data":null}  no Retry-After: we wait
          RATE_LIMIT_WAIT (per-minute limits) or DAILY_LIMIT_WAIT (per-day limits)
      503 {"code":50505,"message":"Model service overloaded..."}  retryable, nothing started
      every answer carries x-siliconcloud-trace-id: logged and kept in error details

There is no cancel, no webhook and no idempotency key.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from adapters.base import Adapter
from adapters.http import body_json, error_from_response, moderated, retry_after, send, unsupported
from core.errors import ErrorCode, Fault, ProviderError, ProviderErrorKind
from core.types import Done, Failed, OutputRef, Pending, PollResult, ProviderRequest, SubmitResult

log = logging.getLogger("genroute.adapters.siliconflow")

PROVIDER = "siliconflow"
DEFAULT_BASE_URL = "https://api.siliconflow.cn/v1"
TRACE_HEADER = "x-siliconcloud-trace-id"
VIDEO_POLL_SECONDS = 5.0  # Wan 2.2 clips take minutes; the dify plugin polls every 5 s
RATE_LIMIT_WAIT = 10.0  # a per-minute window (RPM/TPM/IPM) frees places within seconds
DAILY_LIMIT_WAIT = 3600.0  # RPD/TPD/IPD: nothing frees soon (the router caps what it honours)
_LIMIT = re.compile(r"\b([RTI]P[MD])\b")
# SiliconFlow's refusal of flagged content is undocumented; clients report a 400 whose
# message says the content holds sensitive words (in English or Chinese)
_SENSITIVE = re.compile(r"sensitive|敏感|违规|content (?:policy|moderation|security)|inappropriate", re.IGNORECASE)
SCHEMA_DEFAULTS = {"duration_seconds": 4.0, "resolution": "720p", "aspect_ratio": "16:9"}  # core.schemas fills these


# -- capabilities --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageModel:
    """What one image model takes (docs.siliconflow.cn images-generations)."""

    sizes: tuple[str, ...] | None  # recommended image_size values; None: any WxH; (): no image_size
    max_batch: int = 1  # batch_size: Kolors only, 1..4
    image: str = "no"  # "no" | "optional" | "required": the `image` field
    extras: frozenset[str] = field(default_factory=frozenset)  # guidance_scale / cfg where the model has it


_QWEN_EDIT = ImageModel(sizes=(), image="required")
IMAGE_MODELS: dict[str, ImageModel] = {
    "Kwai-Kolors/Kolors": ImageModel(
        ("1024x1024", "960x1280", "768x1024", "720x1440", "720x1280"), max_batch=4, image="optional",
        extras=frozenset({"guidance_scale"}),
    ),
    "Qwen/Qwen-Image": ImageModel(
        ("1328x1328", "1664x928", "928x1664", "1472x1140", "1140x1472", "1584x1056", "1056x1584"),
        extras=frozenset({"cfg"}),
    ),
    "Qwen/Qwen-Image-Edit": _QWEN_EDIT,
    "Qwen/Qwen-Image-Edit-2509": _QWEN_EDIT,
    "black-forest-labs/FLUX.1-schnell": ImageModel(sizes=None),
}
GATED = frozenset({"guidance_scale", "cfg"})
RATIO_TOLERANCE = 0.05


@dataclass(frozen=True, slots=True)
class VideoModel:
    image: str  # "no" | "required"


VIDEO_MODELS: dict[str, VideoModel] = {
    "Wan-AI/Wan2.2-T2V-A14B": VideoModel(image="no"),
    "Wan-AI/Wan2.2-I2V-A14B": VideoModel(image="required"),
}
VIDEO_SIZES = {"16:9": "1280x720", "9:16": "720x1280", "1:1": "960x960"}
VIDEO_SECONDS = 5.0  # Wan 2.2 makes ~5 s clips; there is no duration field


# -- the adapter ---------------------------------------------------------------------


class SiliconFlowAdapter(Adapter):
    """SiliconFlow images (synchronous, own body) and Wan video (submit + status POSTs).
    Stateless: the video handle holds the requestId."""
    # images are synchronous: the create is the whole generation
    default_timeouts: ClassVar[dict[str, float]] = {**Adapter.default_timeouts, "create": 180.0}

    name = "siliconflow"
    provider_params = {
        "image": frozenset({"num_inference_steps", "guidance_scale", "cfg"}),
        "video": frozenset(),
    }

    async def submit(self, request: ProviderRequest) -> SubmitResult:
        model = request.provider_model or self.deployment.model
        if request.modality == "image":
            return await self._image(model, request.input)
        if request.modality == "video":
            return await self._video(model, request.input)
        # the catalog routed another modality here: chat runs on the openai_compatible adapter
        raise ProviderError(ProviderErrorKind.invalid,
                            f"siliconflow adapter serves image and video, not {request.modality} "
                            "(route SiliconFlow chat through the openai_compatible adapter)",
                            fault=Fault.operator, resend_safe=True)

    async def poll(self, handle: dict[str, Any]) -> PollResult:
        if handle.get("kind") != "video":  # images finish inside submit
            return Failed(ErrorCode.internal, f"siliconflow: a {handle.get('kind')} handle has nothing to poll")
        resp = await self._post("/video/status", {"requestId": handle["request_id"]}, create=False)
        if not resp.is_success:
            exc = error(resp)
            if exc.kind in (ProviderErrorKind.invalid, ProviderErrorKind.failed) and resp.status_code < 500:
                # the reply to an unknown requestId is undocumented: a 4xx on a read means
                # SiliconFlow no longer knows the task (it is not the user's input)
                return Failed(ErrorCode.provider_error,
                              f"siliconflow no longer knows video request {handle['request_id']!r}: {exc.message}",
                              detail=exc.detail)
            raise exc
        answer = body_json(resp)
        if not isinstance(answer, dict):
            raise ProviderError(ProviderErrorKind.retryable, f"siliconflow status answered non-JSON: {resp.text[:200]!r}")
        return self._video_result(handle, answer)

    async def cancel(self, handle: dict[str, Any]) -> None:
        """SiliconFlow has no cancel: the request runs (and bills) to the end. No-op."""
        return None

    # -- plumbing ----------------------------------------------------------------------
    def _auth(self) -> dict[str, str]:
        if not self.api_key:
            raise ProviderError(
                ProviderErrorKind.auth,
                f"siliconflow: no API key (set {self.deployment.api_key_env or 'api_key_env'} "
                f"for deployment {self.deployment.name!r})",
            )
        return {**self.headers(), "Authorization": f"Bearer {self.api_key}"}

    async def _post(self, path: str, body: dict[str, Any], *, create: bool) -> httpx.Response:
        url = self.base_url(DEFAULT_BASE_URL) + path
        resp = await send(self.http, "POST", url, provider=PROVIDER, create=create, json=body, headers=self._auth())
        log.log(logging.INFO if create else logging.DEBUG, "siliconflow %s answered %s", path, resp.status_code,
                extra={"trace_id": resp.headers.get(TRACE_HEADER), "status": resp.status_code})
        return resp

    # -- images ------------------------------------------------------------------------
    async def _image(self, model: str, inp: dict[str, Any]) -> Done:
        body = image_body(model, inp)  # refuses what the model cannot honour
        resp = await self._post("/images/generations", body, create=True)
        if not resp.is_success:
            raise error(resp)
        answer = body_json(resp)
        images = answer.get("images") if isinstance(answer, dict) else None
        urls = [str(i["url"]) for i in images or [] if isinstance(i, dict) and i.get("url")]
        if not urls:
            raise ProviderError(ProviderErrorKind.failed, "siliconflow answered without images[].url",
                                detail={"body": answer, "trace_id": resp.headers.get(TRACE_HEADER)})
        # signed OSS links, valid for an hour: returned at once and stored now, with no
        # Authorization header (the key must not leave SiliconFlow's API host)
        outputs = [OutputRef(url=u) for u in urls]
        handle = {"kind": "image", "model": model, "trace_id": resp.headers.get(TRACE_HEADER)}
        return Done(outputs=outputs, handle=handle, usage=_usage(answer, images=len(urls)))

    # -- video -------------------------------------------------------------------------
    async def _video(self, model: str, inp: dict[str, Any]) -> Pending:
        body = video_body(model, inp)
        resp = await self._post("/video/submit", body, create=True)
        if not resp.is_success:
            raise error(resp)
        answer = body_json(resp)
        request_id = answer.get("requestId") if isinstance(answer, dict) else None
        if not request_id:
            # the request may exist and bill: not resend_safe
            raise ProviderError(ProviderErrorKind.failed, "siliconflow accepted the video but answered without a requestId",
                                detail={"body": answer if answer is not None else resp.text[:500]})
        handle = {"kind": "video", "request_id": str(request_id), "model": model, "trace_id": resp.headers.get(TRACE_HEADER)}
        return Pending(handle=handle, poll_after=self.poll_interval(VIDEO_POLL_SECONDS), progress=0.0, message="submitted")

    def _video_result(self, handle: dict[str, Any], answer: dict[str, Any]) -> PollResult:
        status = str(answer.get("status") or "")
        interval = self.poll_interval(VIDEO_POLL_SECONDS)
        if status == "Succeed":
            results: dict[str, Any] = r if isinstance(r := answer.get("results"), dict) else {}
            videos = [v for v in results.get("videos") or [] if isinstance(v, dict) and v.get("url")]
            if not videos:
                return Failed(ErrorCode.provider_error, "siliconflow answered Succeed without results.videos[].url", detail=answer)
            # valid 10 minutes (the status page says an hour): stored at once
            outputs = [OutputRef(url=str(v["url"]), content_type="video/mp4") for v in videos]
            return Done(outputs=outputs, handle=handle, usage=_usage(results))
        if status == "Failed":
            reason = str(answer.get("reason") or "no reason given")
            if _SENSITIVE.search(reason):
                stage = "input" if re.search(r"prompt|input|image", reason, re.IGNORECASE) else "output"
                return Failed(ErrorCode.moderated, f"siliconflow refused the video: {reason}",
                              detail={"stage": stage, "reasons": [reason], "provider_status": status})
            return Failed(ErrorCode.provider_error, f"siliconflow video failed: {reason}",
                          detail={"provider_status": status, "reason": reason})
        if status == "InQueue":
            position = answer.get("position")
            pos = int(position) if isinstance(position, int | float) and not isinstance(position, bool) and position >= 0 else None
            return Pending(handle=handle, poll_after=interval, progress=0.0,
                           message="in queue" if pos is None else f"in queue (position {pos})", queue_position=pos)
        if status == "InProgress":
            return Pending(handle=handle, poll_after=interval, progress=None, message="in progress")
        # a status newer than this adapter: keep polling, say what it was
        return Pending(handle=handle, poll_after=interval, progress=None, message=status or None)


# -- request mapping -----------------------------------------------------------------


def image_body(model: str, inp: dict[str, Any]) -> dict[str, Any]:
    """Our normalized image input -> SiliconFlow's body; refuses before anything is sent."""
    caps = IMAGE_MODELS.get(model)
    params = dict(inp.get("provider_params") or {})
    n = int(inp.get("n") or 1)
    max_batch = caps.max_batch if caps else 1  # others return one image whatever batch_size says
    if n > max_batch:
        batching = [m for m, c in IMAGE_MODELS.items() if c.max_batch > 1]
        raise unsupported("n", n, f"1..{max_batch} (batch_size is honoured only by {batching})", model)
    if (inp.get("output_format") or "png") != "png":
        raise unsupported("output_format", inp["output_format"], "png (SiliconFlow takes no output_format)", model)
    body: dict[str, Any] = {"model": model, "prompt": inp["prompt"]}
    if inp.get("negative_prompt"):
        body["negative_prompt"] = inp["negative_prompt"]
    if inp.get("seed") is not None:
        body["seed"] = int(inp["seed"])
    if n > 1:
        body["batch_size"] = n
    size = _image_size(model, caps, inp.get("size"), inp.get("aspect_ratio"))
    if size is not None:
        body["image_size"] = size
    body.update(_input_image(model, caps, list(inp.get("input_images") or [])))
    body.update(_image_params(model, caps, params))
    return body


def _image_size(model: str, caps: ImageModel | None, size: str | None, ratio: str | None) -> str | None:
    if caps is not None and caps.sizes == ():
        if size or ratio:
            raise unsupported("size" if size else "aspect_ratio", size or ratio,
                              "none (this edit model keeps the input image's size)", model)
        return None
    sizes = caps.sizes if caps is not None else None
    if size:
        if sizes is not None and size not in sizes:
            raise unsupported("size", size, list(sizes), model)
        return size
    if ratio:
        a, b = (int(x) for x in ratio.split(":"))
        if sizes is None:  # any WxH: ~1 MP at the ratio on a 64 px grid
            w, h = (max(64, round(math.sqrt(2**20 * x / y) / 64) * 64) for x, y in ((a, b), (b, a)))
            return f"{w}x{h}"
        best = min(sizes, key=lambda s: abs(math.log(_ratio_of(s) / (a / b))))
        if abs(math.log(_ratio_of(best) / (a / b))) > math.log1p(RATIO_TOLERANCE):
            shapes = sorted({_ratio_name(s) for s in sizes})
            raise unsupported("aspect_ratio", ratio, f"one near the model's sizes {list(sizes)} ({', '.join(shapes)})", model)
        return best
    # image_size is required: the model's first recommended size
    return sizes[0] if sizes else "1024x1024"


def _ratio_of(size: str) -> float:
    w, h = (int(x) for x in size.split("x"))
    return w / h


def _ratio_name(size: str) -> str:
    w, h = (int(x) for x in size.split("x"))
    g = math.gcd(w, h)
    return f"{w // g}:{h // g}"


def _input_image(model: str, caps: ImageModel | None, images: list[str]) -> dict[str, str]:
    mode = caps.image if caps is not None else "optional"
    if len(images) > 1:
        raise unsupported("input_images", f"{len(images)} images", "at most 1", model)
    if mode == "required" and not images:
        raise unsupported("input_images", "none", "exactly 1 image (an edit model edits an input image)", model)
    if mode == "no" and images:
        takers = [m for m, c in IMAGE_MODELS.items() if c.image != "no"]
        raise unsupported("input_images", f"{len(images)} images", f"none (input images only on {takers})", model)
    # a URL (SiliconFlow fetches it) or a data:image/...;base64 URI, as the API takes both
    return {"image": images[0]} if images else {}


def _image_params(model: str, caps: ImageModel | None, params: dict[str, Any]) -> dict[str, Any]:
    if caps is None:
        return params  # an unlisted model: the provider judges
    for key in sorted(GATED & params.keys()):
        if key not in caps.extras:
            allowed = [m for m, c in IMAGE_MODELS.items() if key in c.extras]
            raise unsupported(f"provider_params.{key}", params[key], f"only on {allowed}", model)
    steps = params.get("num_inference_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 100):
        raise unsupported("provider_params.num_inference_steps", steps, "an integer 1..100", model)
    scale = params.get("guidance_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 <= scale <= 20):
        raise unsupported("provider_params.guidance_scale", scale, "a number 0..20", model)
    cfg = params.get("cfg")
    if cfg is not None and (isinstance(cfg, bool) or not isinstance(cfg, int | float) or cfg < 0):
        raise unsupported("provider_params.cfg", cfg, "a number 0 or more", model)
    return params


def video_body(model: str, inp: dict[str, Any]) -> dict[str, Any]:
    """Our normalized video input -> the /video/submit body; refuses before sending. The
    schema fills duration 4, 720p and 16:9 in: those defaults are not refused."""
    caps = VIDEO_MODELS.get(model)
    body: dict[str, Any] = {"model": model, "prompt": inp["prompt"]}
    if inp.get("negative_prompt"):
        body["negative_prompt"] = inp["negative_prompt"]
    if inp.get("seed") is not None:
        body["seed"] = int(inp["seed"])
    ratio = str(inp.get("aspect_ratio") or "16:9")
    if ratio in VIDEO_SIZES:
        body["image_size"] = VIDEO_SIZES[ratio]
    elif caps is not None:
        raise unsupported("aspect_ratio", ratio, sorted(VIDEO_SIZES), model)
    if caps is not None:
        duration = inp.get("duration_seconds")
        if duration is not None and float(duration) not in (VIDEO_SECONDS, SCHEMA_DEFAULTS["duration_seconds"]):
            raise unsupported("duration_seconds", duration, f"{VIDEO_SECONDS:g} (Wan 2.2 makes ~5 s clips)", model)
        resolution = inp.get("resolution")
        if resolution is not None and resolution != "720p":
            raise unsupported("resolution", resolution, ["720p"], model)
        if inp.get("fps") is not None:
            raise unsupported("fps", inp["fps"], "none (the frame rate is the model's)", model)
        if caps.image == "required" and not inp.get("image"):
            raise unsupported("image", None, "an image (image-to-video needs its first frame)", model)
        if caps.image == "no" and inp.get("image"):
            i2v = [m for m, c in VIDEO_MODELS.items() if c.image != "no"]
            raise unsupported("image", "(set)", f"none (text-to-video; use {i2v})", model)
    if inp.get("image"):
        body["image"] = inp["image"]
    return body | dict(inp.get("provider_params") or {})


# -- results and errors --------------------------------------------------------------


def _usage(answer: Any, *, images: int | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {}
    if not isinstance(answer, dict):
        return usage
    timings = answer.get("timings")
    if isinstance(timings, dict) and isinstance(timings.get("inference"), int | float):
        usage["inference_seconds"] = timings["inference"]
    if isinstance(answer.get("seed"), int):
        usage["seed"] = answer["seed"]
    if images is not None:
        usage["images"] = images
    return usage


def _words(resp: httpx.Response, body: Any) -> str:
    if isinstance(body, str):  # the 401's bare JSON string
        return body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    text = resp.text.strip()
    return text[:300] if text else resp.reason_phrase


def error(resp: httpx.Response, provider: str = PROVIDER) -> ProviderError:
    """SiliconFlow's error bodies -> ProviderError, with whose fault it is; anything else
    takes the shared mapping. The trace id goes into the detail for SiliconFlow support."""
    status = resp.status_code
    body = body_json(resp)
    code = body.get("code") if isinstance(body, dict) else None
    words = _words(resp, body)
    message = f"{provider} answered {status}: {words}"
    detail: dict[str, Any] = {"status": status, "body": body if body is not None else resp.text[:500]}
    if trace := resp.headers.get(TRACE_HEADER):
        detail["trace_id"] = trace
    if status == 429 or code in (50602, 50603):
        wait = retry_after(resp)
        if wait is None:  # no Retry-After, no x-ratelimit-*: back off by the limit named
            m = _LIMIT.search(words)
            wait = DAILY_LIMIT_WAIT if m and m[1].endswith("D") else RATE_LIMIT_WAIT
        return ProviderError(ProviderErrorKind.rate_limited, message, retry_after=wait, detail=detail, resend_safe=True)
    if code == 20012:  # the deployment names a model SiliconFlow does not have
        return ProviderError(ProviderErrorKind.invalid, f"{message} (the deployment is misconfigured: check its model)",
                             detail=detail, fault=Fault.operator, resend_safe=True)
    if code == 30001 or status == 402:  # the account's balance is empty
        return ProviderError(ProviderErrorKind.quota, message, detail=detail, resend_safe=True)
    if code == 50505:  # overloaded: it says no task was started
        return ProviderError(ProviderErrorKind.retryable, message, detail=detail, resend_safe=True)
    if status == 400 and _SENSITIVE.search(words):
        exc = moderated(message, "input", [words])
        exc.detail = {**exc.detail, **detail}
        return exc
    if status in (401, 403) or code == 30014:
        return ProviderError(ProviderErrorKind.auth, message, detail=detail)
    if code == 20015:
        return ProviderError(ProviderErrorKind.invalid, message, detail=detail)
    exc = error_from_response(resp, provider)
    if isinstance(exc.detail, dict) and trace:
        exc.detail["trace_id"] = trace
    return exc


def flat_error(resp: httpx.Response, provider: str) -> ProviderError | None:
    """For the OpenAI-format chat route on SiliconFlow: its errors are a flat
    {"code", "message", "data"} object or a bare JSON string, not OpenAI's {"error": {...}}.
    None when the body is not one of those (the caller maps it as OpenAI's)."""
    body = body_json(resp)
    flat = isinstance(body, str) or (isinstance(body, dict) and "error" not in body and isinstance(body.get("message"), str))
    return error(resp, provider) if flat else None
