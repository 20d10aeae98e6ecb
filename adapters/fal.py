"""fal.ai queue API adapter.

Wire format (docs.fal.ai/model-endpoints/queue, .../webhooks, docs.fal.ai/errors):

    POST {queue}/{owner}/{app}[/{sub}][?fal_webhook=<url>]      Authorization: Key <key>
         body = the model's input JSON               -> {status: IN_QUEUE, request_id,
                                                         status_url, response_url, cancel_url}
    GET  {status_url}?logs=1   202 IN_QUEUE {queue_position} | 202 IN_PROGRESS {logs[]}
                               200 COMPLETED {metrics.inference_time}
    GET  {response_url}        200 the model's output JSON (images[].url, video.url, ...)
                               4xx/5xx {detail: str | [{loc, msg, type}]}: the run failed
    PUT  {cancel_url}          202 CANCELLATION_REQUESTED | 400 ALREADY_COMPLETED

The status/response/cancel URLs name only owner/app (no subpath), so they are always
taken from the submit answer, never built. fal reports no percentage: progress is 0 while
queued and read from tqdm-style runner log lines while in progress, when there are any.

Webhooks: fal POSTs {request_id, gateway_request_id, status: OK|ERROR, payload, error?}
signed with ED25519: hex signature over
    f"{request_id}\\n{user_id}\\n{timestamp}\\n{sha256_hex(raw_body)}"
(headers X-Fal-Webhook-Request-Id / -User-Id / -Timestamp / -Signature), verified against
any Ed25519 key in fal's JWKS (deployment option `jwks_url`), timestamp within ±300 s.

Deployment options: `jwks_url`, `jwks_ttl` (seconds, default 24 h as fal suggests),
`object_expiration_seconds` (sent as X-Fal-Object-Lifecycle-Preference: we copy outputs
at once, so fal need not keep them long), `poll_interval`, `headers`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from adapters.base import Adapter, Backoff
from adapters.http import body_json, error_from_response, error_message, follow_up, moderated, send, unsupported
from core.errors import ErrorCode, ProviderError, ProviderErrorKind
from core.types import Done, Failed, OutputRef, Pending, PollResult, ProviderRequest, SubmitResult

PROVIDER = "fal"
DEFAULT_BASE = "https://queue.fal.run"
# fal's docs name rest.alpha.fal.ai; current verifiers use rest.fal.ai (same key set)
DEFAULT_JWKS_URL = "https://rest.alpha.fal.ai/.well-known/jwks.json"
DEFAULT_JWKS_TTL = 24 * 3600.0
JWKS_MIN_REFRESH = 300.0  # an unknown signer refetches the JWKS at most this often (key rotation)
WEBHOOK_TOLERANCE = 300  # seconds either side of now
REAL_POLL_INTERVAL = 1.0

# our aspect ratio -> fal's named image_size presets
NAMED_SIZES = {
    "1:1": "square_hd",
    "4:3": "landscape_4_3",
    "16:9": "landscape_16_9",
    "3:4": "portrait_4_3",
    "9:16": "portrait_16_9",
}
# defaults core.schemas fills in: we cannot tell them from a user's choice, so a model
# that has no such parameter simply does not get them (instead of refusing every job)
SCHEMA_DEFAULTS = {"duration_seconds": 4.0, "aspect_ratio": "16:9", "resolution": "720p", "output_format": "png", "n": 1}


@dataclass(frozen=True)
class ModelSpec:
    """What one fal model takes. Models not listed here are sent everything, permissively."""

    modality: str
    size: str | None = "image_size"  # "image_size" | "aspect_ratio" | None
    aspect_ratios: tuple[str, ...] | None = None
    output_formats: tuple[str, ...] = ("jpeg", "png")
    max_images: int = 1
    negative_prompt: bool = False
    images: str | None = None  # "image_url" | "image_urls" | None (no image input)
    durations: dict[float, str] | None = None  # our seconds -> fal's wire value
    resolutions: tuple[str, ...] | None = None
    seed: bool = True
    text_field: str = "prompt"  # audio: where the text goes


_FLUX = ModelSpec("image", max_images=4)
_ULTRA_RATIOS = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")
_KLING = {5.0: "5", 10.0: "10"}
_VEO = {4.0: "4s", 6.0: "6s", 8.0: "8s"}


def _veo(images: str | None = None) -> ModelSpec:
    return ModelSpec("video", size="aspect_ratio", aspect_ratios=("16:9", "9:16"), negative_prompt=True,
                     durations=_VEO, resolutions=("720p", "1080p"), images=images)


MODELS: dict[str, ModelSpec] = {
    "fal-ai/flux/dev": _FLUX,
    "fal-ai/flux/schnell": _FLUX,
    "fal-ai/flux-pro/v1.1": _FLUX,
    "fal-ai/flux-pro/v1.1-ultra": ModelSpec("image", size="aspect_ratio", aspect_ratios=_ULTRA_RATIOS, max_images=4),
    "fal-ai/flux-pro/kontext": ModelSpec("image", size="aspect_ratio", aspect_ratios=_ULTRA_RATIOS, max_images=4, images="image_url"),
    "fal-ai/fast-sdxl": ModelSpec("image", max_images=8, negative_prompt=True),
    "fal-ai/kling-video/v2.1/master/text-to-video": ModelSpec(
        "video", size="aspect_ratio", aspect_ratios=("16:9", "9:16", "1:1"), negative_prompt=True, durations=_KLING, seed=False
    ),
    "fal-ai/kling-video/v2.1/master/image-to-video": ModelSpec(
        "video", size=None, negative_prompt=True, durations=_KLING, seed=False, images="image_url"
    ),
    "fal-ai/veo3": _veo(),
    "fal-ai/veo3/fast": _veo(),
    "fal-ai/veo3/image-to-video": _veo(images="image_url"),
    "fal-ai/kokoro/american-english": ModelSpec("audio", size=None, seed=False),
    "fal-ai/stable-audio": ModelSpec("audio", size=None, seed=False),
}

_TQDM = re.compile(r"(\d{1,3})%\s*\|")
_STEPS = re.compile(r"\|\s*(\d+)\s*/\s*(\d+)\s*\[")
_HTTP_STATUS = re.compile(r"status code:?\s*(\d{3})", re.I)
# keys whose file objects are outputs, in the order models usually return them
_OUTPUT_KEYS = ("images", "image", "video", "videos", "audio", "audio_file", "audio_url", "file", "files", "mesh", "model_mesh")


@dataclass
class _Jwks:
    keys: list[Ed25519PublicKey] = field(default_factory=list)
    fetched_at: float = 0.0


class FalAdapter(Adapter):
    name = "fal"
    # 1 s for the first 30 s (fal suggests 0.5-2 s), then from 1 s doubling every 60 s to 5 s.
    backoff = Backoff(hold=30.0, start=1.0, double_every=60.0, cap=5.0)
    provider_params = {
        "image": frozenset({"num_inference_steps", "guidance_scale", "acceleration", "negative_prompt", "strength",
                            "safety_tolerance", "raw", "enhance_prompt", "expand_prompt", "seed"}),
        "video": frozenset({"negative_prompt", "enhance_prompt", "guidance_scale", "num_inference_steps", "cfg_scale",
                            "seed"}),
        "audio": frozenset({"seed", "guidance_scale"}),
    }
    # the JWKS per URL, shared by every instance (the API may build an adapter per callback)
    _jwks_cache: ClassVar[dict[str, _Jwks]] = {}

    # -- submit --------------------------------------------------------------------------
    async def submit(self, request: ProviderRequest) -> SubmitResult:
        model = request.provider_model.strip("/")
        body = build_input(model, request.modality, request.input)  # refuses before sending
        params = {"fal_webhook": request.callback_url} if request.callback_url else None
        resp = await send(
            self.http, "POST", f"{self.base_url(DEFAULT_BASE)}/{model}",
            provider=PROVIDER, create=True, json=body, params=params, headers=self._headers(submit=True),
        )
        if not resp.is_success:
            raise _request_error(resp)
        data = body_json(resp)
        urls = {k: data.get(k) for k in ("status_url", "response_url", "cancel_url")} if isinstance(data, dict) else {}
        if not isinstance(data, dict) or not data.get("request_id") or not all(urls.values()):
            # the task may exist upstream: never resend, and never guess the URLs
            raise ProviderError(ProviderErrorKind.failed, f"fal answered the submit without queue URLs: {resp.text[:200]}")
        handle = {
            "request_id": str(data["request_id"]),
            "gateway_request_id": data.get("gateway_request_id"),
            "model": model,
            "modality": request.modality,
            **{k: str(v) for k, v in urls.items()},
        }
        return Pending(
            handle=handle,
            poll_after=self.poll_interval(REAL_POLL_INTERVAL),
            progress=0.0,
            message="submitted",
            queue_position=_int(data.get("queue_position")),
        )

    # -- poll ------------------------------------------------------------------------------
    async def poll(self, handle: dict[str, Any]) -> PollResult:
        resp = await follow_up(self.http, "GET", handle["status_url"], base=self.base_url(DEFAULT_BASE), provider=PROVIDER,
                               params={"logs": "1"}, headers=self._headers(handle["status_url"]))
        if resp.status_code in (404, 410):
            return Failed(ErrorCode.provider_error, f"fal no longer knows request {handle['request_id']}", {"status": resp.status_code})
        if not resp.is_success:
            raise _request_error(resp)
        status = body_json(resp) or {}
        state = str(status.get("status", "")).upper()
        if state == "COMPLETED":
            return await self._fetch_result(handle, status)
        if state in ("CANCELED", "CANCELLED"):  # not documented; accepted in case fal reports it
            return Failed(ErrorCode.canceled, "fal request was canceled")
        if state in ("FAILED", "ERROR"):
            return Failed(ErrorCode.provider_error, f"fal request failed: {status.get('error') or state}", status)
        return self._pending(handle, state, status)

    def _pending(self, handle: dict[str, Any], state: str, status: dict[str, Any]) -> Pending:
        interval = self.poll_interval(REAL_POLL_INTERVAL)
        if state == "IN_QUEUE":
            position = _int(status.get("queue_position"))
            message = f"in queue (position {position})" if position is not None else "in queue"
            return Pending(handle, interval, progress=0.0, message=message, queue_position=position)
        logs = [str(entry.get("message", "")) for entry in status.get("logs") or [] if isinstance(entry, dict)]
        return Pending(handle, interval, progress=log_progress(logs), message=(logs[-1][:200] if logs else "in progress"))

    async def _fetch_result(self, handle: dict[str, Any], status: dict[str, Any]) -> PollResult:
        resp = await follow_up(self.http, "GET", handle["response_url"], base=self.base_url(DEFAULT_BASE), provider=PROVIDER,
                               headers=self._headers(handle["response_url"]))
        if not resp.is_success:
            return run_failure(resp.status_code, body_json(resp), resp)
        usage = {"request_id": handle["request_id"], **_usage(status)}
        if status.get("error"):
            return Failed(ErrorCode.provider_error, f"fal run failed: {status['error']}", status)
        return result_from_payload(body_json(resp), handle, usage)

    # -- cancel ----------------------------------------------------------------------------
    async def cancel(self, handle: dict[str, Any]) -> None:
        resp = await follow_up(self.http, "PUT", handle["cancel_url"], base=self.base_url(DEFAULT_BASE), provider=PROVIDER,
                               headers=self._headers(handle["cancel_url"]))
        # 400 ALREADY_COMPLETED / 404 NOT_FOUND: nothing left to stop
        if resp.is_success or resp.status_code in (400, 404):
            return
        raise _request_error(resp)

    # -- webhooks --------------------------------------------------------------------------
    async def verify_callback(
        self, headers: dict[str, str], body: bytes, handle: dict[str, Any], secret: str | None
    ) -> PollResult | None:
        h = {k.lower(): v for k, v in headers.items()}
        request_id, user_id = h.get("x-fal-webhook-request-id"), h.get("x-fal-webhook-user-id")
        timestamp, signature = h.get("x-fal-webhook-timestamp"), h.get("x-fal-webhook-signature")
        if not (request_id and user_id and timestamp and signature):
            raise _auth("fal webhook without its X-Fal-Webhook-* signature headers")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > WEBHOOK_TOLERANCE:
            raise _auth("fal webhook timestamp is stale or malformed")
        if handle.get("request_id") and request_id != handle["request_id"]:
            raise _auth("fal webhook is for another request")
        try:
            sig = bytes.fromhex(signature)
        except ValueError:
            raise _auth("fal webhook signature is not hex") from None
        message = "\n".join((request_id, user_id, timestamp, hashlib.sha256(body).hexdigest())).encode()
        if not await self._signed_by_fal(message, sig):
            raise _auth("fal webhook signature does not verify against fal's keys")
        try:
            event = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _auth("fal webhook body is not JSON") from None
        if not isinstance(event, dict) or event.get("request_id") not in (None, request_id):
            raise _auth("fal webhook body names another request")
        return webhook_result(event, handle)

    async def _signed_by_fal(self, message: bytes, sig: bytes) -> bool:
        jwks = await self._jwks(force=False)
        if _verify_any(jwks.keys, message, sig):
            return True
        # maybe fal rotated its keys: refetch, but not on every forged request
        if time.monotonic() - jwks.fetched_at >= JWKS_MIN_REFRESH:
            return _verify_any((await self._jwks(force=True)).keys, message, sig)
        return False

    async def _jwks(self, *, force: bool) -> _Jwks:
        url = str(self.deployment.options.get("jwks_url") or DEFAULT_JWKS_URL)
        ttl = float(self.deployment.options.get("jwks_ttl") or DEFAULT_JWKS_TTL)
        cached = self._jwks_cache.get(url)
        if cached and not force and time.monotonic() - cached.fetched_at < ttl:
            return cached
        resp = await send(self.http, "GET", url, provider=PROVIDER)
        if not resp.is_success:
            raise ProviderError(ProviderErrorKind.retryable, f"cannot fetch fal's webhook keys: HTTP {resp.status_code}")
        fresh = _Jwks(parse_jwks(body_json(resp)), time.monotonic())
        self._jwks_cache[url] = fresh
        return fresh

    # -- helpers ---------------------------------------------------------------------------
    def _headers(self, url: str | None = None, *, submit: bool = False) -> dict[str, str]:
        out = self.headers()
        # fal's public apps also answer without a key; and the key only goes to fal (or to
        # the configured base), whatever URL an answer names
        if self.api_key and (url is None or self._trusted(url)):
            out["Authorization"] = f"Key {self.api_key}"
        expiry = self.deployment.options.get("object_expiration_seconds")
        if submit and isinstance(expiry, int) and expiry > 0:
            out["X-Fal-Object-Lifecycle-Preference"] = json.dumps({"expiration_duration_seconds": expiry})
        return out

    def _trusted(self, url: str) -> bool:
        target, base = httpx.URL(url), httpx.URL(self.base_url(DEFAULT_BASE))
        if (target.scheme, target.host, target.port) == (base.scheme, base.host, base.port):
            return True
        return target.scheme == "https" and (target.host in ("fal.run", "fal.ai") or target.host.endswith((".fal.run", ".fal.ai")))


# -- input mapping ---------------------------------------------------------------------------


def build_input(model: str, modality: str, inp: dict[str, Any]) -> dict[str, Any]:
    """Our normalized input -> the model's fal input; refuses what a known model cannot take."""
    spec = MODELS.get(model)
    if spec is not None and spec.modality != modality:
        raise unsupported("modality", modality, [spec.modality], model)
    build = {"image": _image_input, "video": _video_input, "audio": _audio_input}.get(modality)
    if build is None:
        raise unsupported("modality", modality, ["image", "video", "audio"], model)
    body = build(model, spec, inp)
    body.update(inp.get("provider_params") or {})  # pass-through wins: the user knows the model
    return body


def _refuse_default_aware(name: str, value: Any, allowed: Any, model: str) -> bool:
    """True: drop the parameter (a schema default the model lacks). Raises for a real choice."""
    if SCHEMA_DEFAULTS.get(name) == value:
        return True
    raise unsupported(name, value, allowed, model)


def _common(model: str, spec: ModelSpec | None, inp: dict[str, Any], body: dict[str, Any]) -> None:
    if inp.get("negative_prompt") is not None:
        if spec is not None and not spec.negative_prompt:
            raise unsupported("negative_prompt", inp["negative_prompt"], "not supported", model)
        body["negative_prompt"] = inp["negative_prompt"]
    if inp.get("seed") is not None:
        if spec is not None and not spec.seed:
            raise unsupported("seed", inp["seed"], "not supported", model)
        body["seed"] = inp["seed"]


def _images(model: str, spec: ModelSpec | None, param: str, images: list[str], body: dict[str, Any]) -> None:
    """fal takes public URLs and data: URIs alike, so both are passed as they are."""
    if not images:
        return
    mode = spec.images if spec is not None else ("image_url" if len(images) == 1 else "image_urls")
    if mode is None or (mode == "image_url" and len(images) > 1):
        raise unsupported(param, f"{len(images)} image(s)", "none" if mode is None else "one image", model)
    if mode == "image_url":
        body["image_url"] = images[0]
    else:
        body["image_urls"] = list(images)


def _image_input(model: str, spec: ModelSpec | None, inp: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": inp["prompt"]}
    size_param = spec.size if spec is not None else "image_size"
    if inp.get("size"):
        if spec is not None and size_param != "image_size":  # unknown models take image_size
            raise unsupported("size", inp["size"], f"none; give aspect_ratio from {list(spec.aspect_ratios or ())}", model)
        w, h = (int(x) for x in inp["size"].split("x"))
        body["image_size"] = {"width": w, "height": h}
    elif inp.get("aspect_ratio"):
        ratio = inp["aspect_ratio"]
        if size_param == "image_size" and ratio in NAMED_SIZES:
            body["image_size"] = NAMED_SIZES[ratio]
        elif size_param == "image_size" and spec is not None:
            raise unsupported("aspect_ratio", ratio, sorted(NAMED_SIZES), model)
        elif spec is not None and spec.aspect_ratios is not None and ratio not in spec.aspect_ratios:
            raise unsupported("aspect_ratio", ratio, list(spec.aspect_ratios), model)
        else:
            body["aspect_ratio"] = ratio  # an unknown model: let fal decide
    n = int(inp.get("n", 1))
    if spec is not None and n > spec.max_images:
        raise unsupported("n", n, f"1..{spec.max_images}", model)
    if n != 1:
        body["num_images"] = n
    fmt = inp.get("output_format")
    if fmt:
        if spec is not None and fmt not in spec.output_formats:
            raise unsupported("output_format", fmt, list(spec.output_formats), model)
        body["output_format"] = fmt
    _common(model, spec, inp, body)
    _images(model, spec, "input_images", list(inp.get("input_images") or []), body)
    return body


def _video_input(model: str, spec: ModelSpec | None, inp: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": inp["prompt"]}
    seconds = inp.get("duration_seconds")
    if seconds is not None:
        seconds = float(seconds)
        if spec is None:
            body["duration"] = str(int(seconds)) if seconds.is_integer() else str(seconds)
        elif spec.durations and seconds in spec.durations:
            body["duration"] = spec.durations[seconds]
        else:
            _refuse_default_aware("duration_seconds", seconds, sorted(spec.durations or ()), model)
    ratio = inp.get("aspect_ratio")
    if ratio is not None:
        if spec is None or (spec.aspect_ratios is not None and ratio in spec.aspect_ratios):
            body["aspect_ratio"] = ratio
        else:
            _refuse_default_aware("aspect_ratio", ratio, list(spec.aspect_ratios or ()), model)
    resolution = inp.get("resolution")
    if resolution is not None:
        if spec is None or (spec.resolutions is not None and resolution in spec.resolutions):
            body["resolution"] = resolution
        else:
            _refuse_default_aware("resolution", resolution, list(spec.resolutions or ()), model)
    if inp.get("fps") is not None:
        if spec is not None:
            raise unsupported("fps", inp["fps"], "not supported", model)
        body["fps"] = inp["fps"]
    _common(model, spec, inp, body)
    _images(model, spec, "image", [inp["image"]] if inp.get("image") else [], body)
    return body


def _audio_input(model: str, spec: ModelSpec | None, inp: dict[str, Any]) -> dict[str, Any]:
    text = inp.get("text") or inp.get("prompt")
    field_name = spec.text_field if spec is not None else ("text" if inp.get("text") else "prompt")
    body: dict[str, Any] = {field_name: text}
    if inp.get("voice"):
        body["voice"] = inp["voice"]
    fmt = inp.get("format")
    if fmt and fmt != "wav":  # "wav" is the schema's default: not a choice we can see
        if spec is not None:
            raise unsupported("format", fmt, ["wav"], model)
        body["output_format"] = fmt
    if inp.get("duration_seconds") is not None:
        body["seconds_total" if model == "fal-ai/stable-audio" else "duration"] = inp["duration_seconds"]
    if inp.get("seed") is not None:
        if spec is not None and not spec.seed:
            raise unsupported("seed", inp["seed"], "not supported", model)
        body["seed"] = inp["seed"]
    return body


# -- results -----------------------------------------------------------------------------------


def result_from_payload(payload: Any, handle: dict[str, Any], usage: dict[str, Any]) -> PollResult:
    """The model's output JSON -> Done, or Failed when fal's safety checker blanked it all."""
    if not isinstance(payload, dict):
        return Failed(ErrorCode.provider_error, "fal returned a result that is not a JSON object")
    flags = payload.get("has_nsfw_concepts")
    images = payload.get("images")
    flagged = 0
    if isinstance(flags, list) and isinstance(images, list) and any(flags):
        # fal's checker replaces a flagged image by a black one: never store those
        kept = [img for i, img in enumerate(images) if not (i < len(flags) and flags[i])]
        flagged = len(images) - len(kept)
        payload = {**payload, "images": kept}
    outputs = find_outputs(payload)
    if flagged and not [o for o in outputs if o.role == "output"]:
        err = moderated("fal's safety checker flagged the output (has_nsfw_concepts)", "output", ["has_nsfw_concepts"])
        return Failed(err.code, err.message, err.detail)
    if not outputs:
        return Failed(ErrorCode.provider_error, "fal's result holds no media", {"keys": sorted(payload)[:20]})
    for key in ("seed", "timings"):
        if key in payload:
            usage[key] = payload[key]
    return Done(outputs=outputs, handle=handle, usage=usage)


def find_outputs(payload: dict[str, Any]) -> list[OutputRef]:
    """File objects ({url, content_type, ...}) at the top level of a result, known keys first."""
    keys = [k for k in _OUTPUT_KEYS if k in payload] + [k for k in payload if k not in _OUTPUT_KEYS]
    out: list[OutputRef] = []
    seen: set[str] = set()
    for key in keys:
        value = payload[key]
        for item in value if isinstance(value, list) else [value]:
            ref = _file_ref(key, item)
            if ref is None or (ref.url is not None and ref.url in seen):
                continue
            if ref.url is not None:
                seen.add(ref.url)
            out.append(ref)
    return out


def _file_ref(key: str, item: Any) -> OutputRef | None:
    if isinstance(item, str) and key in _OUTPUT_KEYS and item.startswith(("http", "data:")):
        item = {"url": item}
    if not isinstance(item, dict) or not isinstance(item.get("url"), str):
        return None
    if key not in _OUTPUT_KEYS and not ("content_type" in item or "file_name" in item):
        return None  # a dict with a url that is not a file (e.g. a source link)
    url, ctype = item["url"], item.get("content_type")
    role = "thumbnail" if "thumb" in key or "preview" in key else "output"
    if url.startswith("data:"):  # sync_mode results come inline
        head, _, data = url.partition(",")
        try:
            raw = base64.b64decode(data) if head.endswith(";base64") else data.encode()
        except (binascii.Error, ValueError):
            return None
        return OutputRef(data=raw, content_type=ctype or head[5:].split(";")[0] or None, role=role)
    return OutputRef(url=url, content_type=ctype, role=role)  # fal's CDN needs no auth


def run_failure(status: int, body: Any, resp: httpx.Response | None = None) -> PollResult:
    """A finished run's error (result endpoint or ERROR webhook) -> Failed, or raise when
    the answer is about the request, not the run (auth, throttling, a transient 5xx)."""
    message = _detail_message(body) or (error_message(resp) if resp is not None else f"HTTP {status}")
    if _mentions_cancel(body) or status == 499:
        return Failed(ErrorCode.canceled, "fal request was canceled")
    policy = _policy_violation(body)
    if policy is not None:
        return Failed(ErrorCode.moderated, f"fal refused the content: {message}", policy)
    if resp is not None and (status in (401, 403, 429) or (status >= 500 and _retryable(resp, body))):
        raise _request_error(resp)
    detail = {"status": status, "body": body}
    if status == 422:
        return Failed(ErrorCode.invalid_input, f"fal rejected the input: {message}", detail)
    return Failed(ErrorCode.provider_error, f"fal run failed (HTTP {status}): {message}", detail)


def webhook_result(event: dict[str, Any], handle: dict[str, Any]) -> PollResult:
    usage = {"request_id": event.get("request_id") or handle.get("request_id")}
    if str(event.get("status", "")).upper() == "OK":
        if event.get("payload") is None:
            return Failed(ErrorCode.provider_error, f"fal could not send the result: {event.get('payload_error')}")
        return result_from_payload(event["payload"], handle, usage)
    error = str(event.get("error") or "fal run failed")
    m = _HTTP_STATUS.search(error)
    return run_failure(int(m[1]) if m else 500, event.get("payload") or {"detail": error})


def log_progress(logs: list[str]) -> float | None:
    """The last tqdm-style progress line of the runner's logs, as 0..1."""
    for line in reversed(logs):
        if m := _TQDM.search(line):
            return min(1.0, int(m[1]) / 100)
        if (m := _STEPS.search(line)) and int(m[2]) > 0:
            return min(1.0, int(m[1]) / int(m[2]))
    return None


def _usage(status: dict[str, Any]) -> dict[str, Any]:
    metrics = status.get("metrics")
    if isinstance(metrics, dict) and metrics.get("inference_time") is not None:
        return {"inference_time": metrics["inference_time"]}
    return {}


# -- errors ------------------------------------------------------------------------------------


def _request_error(resp: httpx.Response) -> ProviderError:
    """An error answer to one of our requests (submit, status, cancel)."""
    body = body_json(resp)
    policy = _policy_violation(body)
    if policy is not None:
        return ProviderError(ProviderErrorKind.moderated, f"fal refused the content: {_detail_message(body)}", detail=policy)
    return error_from_response(resp, PROVIDER)


def _policy_violation(body: Any) -> dict[str, Any] | None:
    """fal's `content_policy_violation` error type -> {"stage", "reasons"}. A violation that
    points at an input field (loc ["body", "prompt"]) is an input refusal; one that points
    at the whole body was raised after generating (docs.fal.ai/errors)."""
    detail = body.get("detail") if isinstance(body, dict) else None
    items = [d for d in detail if isinstance(d, dict)] if isinstance(detail, list) else []
    hits = [d for d in items if d.get("type") == "content_policy_violation"]
    if not hits:
        return None
    stage = "input" if any(len(d.get("loc") or []) > 1 for d in hits) else "output"
    return {"stage": stage, "reasons": [str(d.get("msg", "content_policy_violation")) for d in hits]}


def _detail_message(body: Any) -> str:
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for d in detail[:5]:
            if isinstance(d, dict):
                loc = ".".join(str(x) for x in d.get("loc") or [] if x != "body")
                parts.append(f"{loc}: {d.get('msg', '')}" if loc else str(d.get("msg", "")))
        return "; ".join(parts)
    return ""


def _mentions_cancel(body: Any) -> bool:
    detail = body.get("detail") if isinstance(body, dict) else None
    return isinstance(detail, str) and "cancel" in detail.lower()


def _retryable(resp: httpx.Response, body: Any) -> bool:
    """A 5xx from the result endpoint is either the gateway hiccuping (retry the GET) or the
    run's own failure (stored: retrying returns it forever). fal's X-Fal-Retryable header
    says which; without it, an app-shaped `detail` body means the run failed."""
    flag = str(resp.headers.get("x-fal-retryable", "")).lower()
    if flag in ("true", "false"):
        return flag == "true"
    return not (isinstance(body, dict) and "detail" in body)


def _auth(message: str) -> ProviderError:
    return ProviderError(ProviderErrorKind.auth, message)


def parse_jwks(doc: Any) -> list[Ed25519PublicKey]:
    keys = []
    for jwk in doc.get("keys", []) if isinstance(doc, dict) else []:
        if isinstance(jwk, dict) and jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519" and isinstance(jwk.get("x"), str):
            try:
                raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
                keys.append(Ed25519PublicKey.from_public_bytes(raw))
            except (ValueError, binascii.Error):
                continue  # one malformed key must not hide the others
    return keys


def _verify_any(keys: list[Ed25519PublicKey], message: bytes, sig: bytes) -> bool:
    for key in keys:
        try:
            key.verify(sig, message)
            return True
        except InvalidSignature:
            continue
    return False


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
