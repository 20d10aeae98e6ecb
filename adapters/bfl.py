"""Black Forest Labs (FLUX) over its async task API.

    submit  POST {base}/v1/{model}          x-key: <key>, JSON body
            200 {"id", "polling_url", "cost"?, "input_mp"?, "output_mp"?}
    poll    GET  {polling_url}              x-key: <key>   (never a URL built here: on the
            200 {"id", "status", "result", "progress", "details", "preview"}
                                            global host the task may live on another cluster)
    status  Pending ──► Ready (result.sample: signed URL, expires after ~10 min)
               ├──────► Request Moderated   input flagged   (details["Moderation Reasons"])
               ├──────► Content Moderated   output flagged
               ├──────► Error               (message in error / details / result)
               └──────► Task not found      unknown or expired id, still HTTP 200
    webhook POST {webhook_url}, body shaped like a poll answer; when we sent
            webhook_secret: X-BFL-Signature: sha256=<hex HMAC-SHA256(secret, raw body)>
    errors  401/403 auth · 402 out of credits · 422 FastAPI {"detail": [...]} ·
            429 concurrent-task limit (24; 6 for flux-kontext-max) · 500/503

The get_result mapping is one function, `task_result`, also used for Fireworks' FLUX
Kontext (the same task API behind a POST). There is no cancel endpoint and no idempotency key. FLUX makes one image per task, so
n > 1 is refused rather than fanned out (that would bill n tasks behind one job).
Sources: docs.bfl.ai API reference (OpenAPI), black-forest-labs/skills bfl-api references.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import dataclass, field
from typing import Any

import httpx

from adapters.base import Adapter, Backoff
from adapters.http import body_json, error_from_response, follow_up, send, unsupported
from core.errors import ErrorCode, ProviderError, ProviderErrorKind
from core.types import Done, Failed, OutputRef, Pending, PollResult, ProviderRequest, SubmitResult

PROVIDER = "bfl"
DEFAULT_BASE_URL = "https://api.bfl.ai"
POLL_SECONDS = 0.5  # BFL's own examples poll every 0.5 s
DEFAULT_RATE_LIMIT_WAIT = 5.0  # the 429 body is undocumented; BFL's guide backs off ~5 s
OUTPUT_FORMATS = ("jpeg", "png")
# FLUX takes any aspect ratio "between 21:9 and 9:21"; a size is mapped to the nearest of
# these when it is within RATIO_TOLERANCE of it (ratio models cannot honour exact pixels).
STANDARD_RATIOS = ("21:9", "16:9", "3:2", "4:3", "5:4", "1:1", "4:5", "3:4", "2:3", "9:16", "9:21")
MIN_RATIO, MAX_RATIO = 9 / 21, 21 / 9
RATIO_TOLERANCE = 0.05
TARGET_PIXELS = 1024 * 1024  # an aspect ratio on a width/height model becomes ~1 MP
# provider_params that only some models accept; anything else passes through untouched
GATED_PARAMS = frozenset({"steps", "guidance", "interval", "raw", "image_prompt_strength"})
RESERVED_PARAMS = frozenset({"webhook_url", "webhook_secret"})  # ours to set, per job
SIGNATURE_HEADER = "x-bfl-signature"


@dataclass(frozen=True, slots=True)
class ModelCaps:
    """What one BFL endpoint accepts (docs.bfl.ai API reference, checked per model)."""

    geometry: str  # "size": width/height; "ratio": aspect_ratio
    image_field: str  # "image_prompt" (one base64 image) or "input_image" (+ _2.._N)
    max_images: int
    safety_max: int  # safety_tolerance is 0..safety_max
    extras: frozenset[str] = field(default_factory=frozenset)  # allowed GATED_PARAMS
    grid: int = 32  # width/height multiple
    min_side: int = 256
    max_side: int | None = 1440
    max_pixels: int | None = None


def _flux1(*extras: str) -> ModelCaps:
    return ModelCaps("size", "image_prompt", max_images=1, safety_max=6, extras=frozenset(extras))


def _kontext() -> ModelCaps:
    return ModelCaps("ratio", "input_image", max_images=4, safety_max=6)


def _flux2(*extras: str) -> ModelCaps:
    return ModelCaps(
        "size", "input_image", max_images=8, safety_max=5, extras=frozenset(extras),
        grid=16, min_side=64, max_side=None, max_pixels=4 * 1024 * 1024,
    )


MODELS: dict[str, ModelCaps] = {
    "flux-pro-1.1": _flux1(),
    "flux-pro": _flux1("steps", "guidance", "interval"),
    "flux-dev": _flux1("steps", "guidance"),
    "flux-pro-1.1-ultra": ModelCaps(
        "ratio", "image_prompt", max_images=1, safety_max=6, extras=frozenset({"raw", "image_prompt_strength"})
    ),
    "flux-kontext-pro": _kontext(),
    "flux-kontext-max": _kontext(),
    "flux-2-pro": _flux2(),
    "flux-2-max": _flux2(),
    "flux-2-flex": _flux2("steps", "guidance"),
}


class BFLAdapter(Adapter):
    """FLUX image generation. Stateless: everything poll needs is in the handle."""

    name = "bfl"
    # 0.5 s (BFL's examples) for the first 20 s, then 1 s doubling every 30 s up to 5 s
    # (clients back off to 5 s too).
    backoff = Backoff(hold=20.0, start=1.0, double_every=30.0, cap=5.0)
    # width/height override the size mapping; the gated ones are checked per model below
    provider_params = {
        "image": frozenset({"width", "height", "steps", "guidance", "interval", "raw", "image_prompt_strength",
                            "safety_tolerance", "prompt_upsampling"}),
    }

    async def submit(self, request: ProviderRequest) -> SubmitResult:
        model = request.provider_model
        if request.modality != "image":
            raise unsupported("modality", request.modality, ["image"], model)
        body = build_body(model, request.input)  # refuses what the model cannot honour
        if request.callback_url:
            body["webhook_url"] = request.callback_url
            if request.callback_secret:
                body["webhook_secret"] = request.callback_secret
        url = f"{self.base_url(DEFAULT_BASE_URL)}/v1/{model}"
        resp = await send(self.http, "POST", url, provider=PROVIDER, create=True, json=body, headers=self._auth())
        if not resp.is_success:
            raise _error(resp)
        answer = body_json(resp)
        if not isinstance(answer, dict) or not answer.get("id") or not answer.get("polling_url"):
            # the task may exist and bill: not resend_safe, and no URL is guessed for it
            raise ProviderError(
                ProviderErrorKind.failed,
                "bfl accepted the task but answered without an id and polling_url",
                detail={"body": answer if answer is not None else resp.text[:500]},
            )
        handle = {
            "id": str(answer["id"]),
            "polling_url": str(answer["polling_url"]),
            "model": model,
            "output_format": body.get("output_format", "jpeg"),
            "usage": _usage(answer),
        }
        return Pending(handle=handle, poll_after=self.poll_interval(POLL_SECONDS), progress=0.0, message="submitted")

    async def poll(self, handle: dict[str, Any]) -> PollResult:
        url = str(handle["polling_url"])
        base = self.base_url(DEFAULT_BASE_URL)
        # the key goes to BFL's own hosts (the task may live on a regional one) or the base's
        headers = self._auth() if _key_may_go(url, base) else self.headers()
        resp = await follow_up(self.http, "GET", url, base=base, provider=PROVIDER, headers=headers)
        if not resp.is_success:
            raise _error(resp)
        answer = body_json(resp)
        if not isinstance(answer, dict):
            raise ProviderError(ProviderErrorKind.retryable, f"bfl poll answered non-JSON: {resp.text[:200]!r}")
        return self._result(answer, handle)

    async def cancel(self, handle: dict[str, Any]) -> None:
        """BFL has no cancel endpoint: the task runs (and bills) to the end. No-op."""
        return None

    async def verify_callback(
        self, headers: dict[str, str], body: bytes, handle: dict[str, Any], secret: str | None
    ) -> PollResult | None:
        """Check `X-BFL-Signature: sha256=<hex>` (HMAC-SHA256 of the raw body with the
        webhook_secret we sent) and map the body like a poll answer; None for Pending.
        The scheme carries no timestamp, so replays are stopped by the job state (a
        finished job is never finished twice), not here."""
        if not secret:
            raise ProviderError(ProviderErrorKind.auth, "bfl callback: this job was given no webhook secret")
        given = {k.lower(): v for k, v in headers.items()}.get(SIGNATURE_HEADER, "")
        scheme, _, digest = given.strip().partition("=")
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        if scheme.lower() != "sha256" or not hmac.compare_digest(digest.strip().lower().encode(), expected.encode()):
            raise ProviderError(ProviderErrorKind.auth, "bfl callback: missing or invalid X-BFL-Signature")
        try:
            answer = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ProviderError(ProviderErrorKind.invalid, "bfl callback: body is not JSON") from None
        if not isinstance(answer, dict) or str(answer.get("id")) != str(handle.get("id")):
            raise ProviderError(ProviderErrorKind.auth, "bfl callback: signed for another task id")
        result = self._result(answer, handle)
        return None if isinstance(result, Pending) else result

    # -- helpers -------------------------------------------------------------------------
    def _auth(self) -> dict[str, str]:
        if not self.api_key:
            raise ProviderError(
                ProviderErrorKind.auth,
                f"bfl: no API key (set {self.deployment.api_key_env or 'api_key_env'} for deployment {self.deployment.name!r})",
            )
        return {**self.headers(), "x-key": self.api_key}

    def _result(self, answer: dict[str, Any], handle: dict[str, Any]) -> PollResult:
        return task_result(answer, handle, provider=PROVIDER, poll_after=self.poll_interval(POLL_SECONDS))


# -- the get_result answer ---------------------------------------------------------------
def task_result(answer: dict[str, Any], handle: dict[str, Any], *, provider: str, poll_after: float) -> PollResult:
    """One get_result answer (`{id, status, result, progress, details}`) as a poll result.
    BFL's own API and hosts that serve BFL's models behind the same task API (Fireworks'
    FLUX Kontext) share it; `provider` names who answered in messages. `handle` is kept
    as it is and needs `id`, and `output_format` and `usage` when known."""
    status = str(answer.get("status") or "")
    if status == "Ready":
        return _done(answer, handle, provider)
    if status in ("Request Moderated", "Content Moderated"):
        stage = "input" if status == "Request Moderated" else "output"
        reasons = _moderation_reasons(answer.get("details"))
        suffix = f": {', '.join(reasons)}" if reasons else ""
        return Failed(
            code=ErrorCode.moderated,
            message=f"{provider} flagged the {stage} ({status}){suffix}",
            detail={"stage": stage, "reasons": reasons, "provider_status": status},
        )
    if status in ("Error", "Failed"):  # "Failed": Fireworks' clients also check for it
        return Failed(
            code=ErrorCode.provider_error,
            message=f"{provider} task failed: {_error_text(answer)}",
            detail={"provider_status": status, "body": answer},
        )
    if status == "Task not found":
        return Failed(
            code=ErrorCode.provider_error,
            message=f"{provider} has no task {handle.get('id')!r}: unknown id, or the result expired "
                    "(results are kept ~10 min)",
            detail={"provider_status": status},
        )
    progress = answer.get("progress")
    return Pending(
        handle=handle,
        poll_after=poll_after,
        progress=min(1.0, max(0.0, float(progress))) if isinstance(progress, int | float) else None,
        message=status or None,  # Pending, or a status newer than this adapter
    )


def _done(answer: dict[str, Any], handle: dict[str, Any], provider: str) -> PollResult:
    result = answer.get("result")
    sample = result.get("sample") if isinstance(result, dict) else None
    if not isinstance(sample, str) or not sample:
        return Failed(code=ErrorCode.provider_error, message=f"{provider} answered Ready without result.sample", detail=answer)
    fmt = handle.get("output_format", "jpeg")
    # the signed URL expires in ~10 min: returned at once, storage downloads it now; no
    # key on it (it is a delivery-host URL, the key must not leave the provider's API)
    ref = OutputRef(url=sample, content_type=f"image/{fmt}")
    return Done(outputs=[ref], handle=handle, usage=dict(handle.get("usage") or {}))


def _key_may_go(url: str, base: str) -> bool:
    """The x-key is sent to the base URL's host, or over https to bfl.ai and its subdomains
    (the regional hosts polling URLs name), never to another host an answer names."""
    try:
        u, b = httpx.URL(url), httpx.URL(base)
    except httpx.InvalidURL:
        return False
    if (u.scheme, u.host) == (b.scheme, b.host):
        return True
    return u.scheme == "https" and (u.host == "bfl.ai" or u.host.endswith(".bfl.ai"))


# -- request mapping ---------------------------------------------------------------------
def build_body(model: str, inp: dict[str, Any]) -> dict[str, Any]:
    """Our normalized image input -> BFL's JSON body; refuses before anything is sent."""
    caps = MODELS.get(model)
    if int(inp.get("n") or 1) != 1:
        raise unsupported("n", inp["n"], [1], model)
    if inp.get("negative_prompt"):
        raise unsupported("negative_prompt", inp["negative_prompt"], "not supported by FLUX (omit it)", model)
    fmt = inp.get("output_format") or "png"
    if fmt not in OUTPUT_FORMATS:
        raise unsupported("output_format", fmt, list(OUTPUT_FORMATS), model)
    body: dict[str, Any] = {"prompt": inp["prompt"], "output_format": fmt}
    if inp.get("seed") is not None:
        body["seed"] = int(inp["seed"])
    body.update(_geometry(model, caps, inp.get("size"), inp.get("aspect_ratio")))
    body.update(_images(model, caps, list(inp.get("input_images") or [])))
    body.update(_provider_params(model, caps, dict(inp.get("provider_params") or {})))
    return body


def _geometry(model: str, caps: ModelCaps | None, size: str | None, ratio: str | None) -> dict[str, Any]:
    if caps is None:  # unknown model: pass what was asked, the provider decides
        if size:
            w, h = (int(x) for x in size.split("x"))
            return {"width": w, "height": h}
        return {"aspect_ratio": ratio} if ratio else {}
    if caps.geometry == "ratio":
        if size:
            return {"aspect_ratio": _nearest_ratio(model, size)}
        if ratio:
            a, b = (int(x) for x in ratio.split(":"))
            if not MIN_RATIO <= a / b <= MAX_RATIO:
                raise unsupported("aspect_ratio", ratio, "between 21:9 and 9:21", model)
            return {"aspect_ratio": ratio}
        return {}
    if size:
        w, h = (int(x) for x in size.split("x"))
        _check_size(model, caps, size, w, h)
        return {"width": w, "height": h}
    if ratio:
        w, h = _size_for_ratio(model, caps, ratio)
        return {"width": w, "height": h}
    return {}


def _size_rule(caps: ModelCaps) -> str:
    top = f"..{caps.max_side}" if caps.max_side else ""
    total = f", at most {caps.max_pixels // 2**20} MP" if caps.max_pixels else ""
    return f"WxH with sides {caps.min_side}{top}, multiples of {caps.grid}{total}"


def _check_size(model: str, caps: ModelCaps, size: str, w: int, h: int) -> None:
    ok = all(s % caps.grid == 0 and s >= caps.min_side and (caps.max_side is None or s <= caps.max_side) for s in (w, h))
    if not ok or (caps.max_pixels is not None and w * h > caps.max_pixels):
        raise unsupported("size", size, _size_rule(caps), model)


def _size_for_ratio(model: str, caps: ModelCaps, ratio: str) -> tuple[int, int]:
    """~1 MP at the ratio, on the model's grid and inside its limits; refused when that
    cannot stay within RATIO_TOLERANCE of the ratio asked for."""
    a, b = (int(x) for x in ratio.split(":"))
    w, h = math.sqrt(TARGET_PIXELS * a / b), math.sqrt(TARGET_PIXELS * b / a)
    if caps.max_side and max(w, h) > caps.max_side:
        scale = caps.max_side / max(w, h)
        w, h = w * scale, h * scale
    gw, gh = (max(caps.grid, round(s / caps.grid) * caps.grid) for s in (w, h))
    if caps.max_side:
        gw, gh = min(gw, caps.max_side), min(gh, caps.max_side)
    if min(gw, gh) < caps.min_side or abs(math.log((gw / gh) / (a / b))) > math.log1p(RATIO_TOLERANCE):
        raise unsupported("aspect_ratio", ratio, f"a ratio that fits {_size_rule(caps)}", model)
    return gw, gh


def _nearest_ratio(model: str, size: str) -> str:
    w, h = (int(x) for x in size.split("x"))
    best = min(STANDARD_RATIOS, key=lambda r: abs(math.log((w / h) / _ratio_value(r))))
    if abs(math.log((w / h) / _ratio_value(best))) > math.log1p(RATIO_TOLERANCE):
        raise unsupported("size", size, f"a size near one of the aspect ratios {list(STANDARD_RATIOS)} (this model takes aspect_ratio, not pixels)", model)
    return best


def _ratio_value(ratio: str) -> float:
    a, b = (int(x) for x in ratio.split(":"))
    return a / b


def _images(model: str, caps: ModelCaps | None, images: list[str]) -> dict[str, str]:
    if not images:
        return {}
    field_name = caps.image_field if caps else "input_image"
    limit = caps.max_images if caps else 8
    if len(images) > limit:
        raise unsupported("input_images", f"{len(images)} images", f"at most {limit}", model)
    if field_name == "image_prompt":
        if not images[0].startswith("data:"):
            raise unsupported("input_images", images[0][:80], "one image as a data: URI (this model takes base64 only)", model)
        return {"image_prompt": _strip_data_uri(images[0])}
    # input_image, input_image_2 ... input_image_N: a URL (BFL fetches it) or bare base64
    return {("input_image" if i == 0 else f"input_image_{i + 1}"): _strip_data_uri(ref) for i, ref in enumerate(images)}


def _strip_data_uri(ref: str) -> str:
    if ref.startswith("data:"):
        _, _, payload = ref.partition(",")
        return payload
    return ref


def _provider_params(model: str, caps: ModelCaps | None, params: dict[str, Any]) -> dict[str, Any]:
    if reserved := sorted(RESERVED_PARAMS & params.keys()):
        raise unsupported(f"provider_params.{reserved[0]}", "(set)", "set by genroute from the job's callback settings", model)
    if caps is None:
        return params
    for key in sorted(GATED_PARAMS & params.keys()):
        if key not in caps.extras:
            allowed = [m for m, c in MODELS.items() if key in c.extras]
            raise unsupported(f"provider_params.{key}", params[key], f"only on {allowed}", model)
    tol = params.get("safety_tolerance")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, int) or not 0 <= tol <= caps.safety_max):
        raise unsupported("provider_params.safety_tolerance", tol, f"an integer 0..{caps.safety_max}", model)
    return params


# -- response mapping --------------------------------------------------------------------
def _usage(answer: dict[str, Any]) -> dict[str, Any]:
    usage: dict[str, Any] = {}
    if isinstance(answer.get("cost"), int | float):
        usage["cost_credits"] = answer["cost"]  # 1 credit = $0.01
    for key in ("input_mp", "output_mp"):
        if isinstance(answer.get(key), int | float):
            usage[key] = answer[key]
    return usage


def _moderation_reasons(details: Any) -> list[str]:
    if isinstance(details, dict):
        reasons = details.get("Moderation Reasons") or details.get("moderation_reasons") or []
        return [str(r) for r in reasons] if isinstance(reasons, list) else [str(reasons)]
    return []


def _error_text(answer: dict[str, Any]) -> str:
    """BFL's Error body is loosely specified: the words may be top-level, in details or
    in result."""
    for value in (answer.get("error"), answer.get("message"), answer.get("details"), answer.get("result")):
        if isinstance(value, str) and value:
            return value
        if isinstance(value, dict):
            for key in ("error", "message", "detail"):
                if isinstance(value.get(key), str) and value[key]:
                    return str(value[key])
    return "no reason given"


def _error(resp: httpx.Response) -> ProviderError:
    """The shared status mapping, plus BFL's undocumented 429: wait ~5 s when it says
    nothing."""
    exc = error_from_response(resp, PROVIDER)
    if exc.kind is ProviderErrorKind.rate_limited and exc.retry_after is None:
        exc.retry_after = DEFAULT_RATE_LIMIT_WAIT
    return exc
