"""GrsAi (grsaiapi.com), an aggregator of image and video models, over its task APIs.

Two APIs, chosen per deployment (option `api`, default by model family, see `route_for`):

    draw      POST {base}{path}  {"model", "prompt", ..., "webHook": "-1"}   Authorization: Bearer <key>
              path by family:  /v1/draw/nano-banana   nano-banana*
                               /v1/draw/completions   gpt-image*, sora-image
                               /v1/draw/flux          flux-kontext*
                               /v1/video/veo          veo*
                               /v1/video/sora-video   sora-2*
              200 {"code": 0, "msg", "data": {"id"}}              (webHook "-1": the id at once)
         poll POST {base}/v1/draw/result {"id"}
              200 {"code": 0, "data": {"id", "status", "progress": 0-100, "results": [{"url"}],
                   "url"?, "failure_reason"?, "error"?}}           flux/veo may carry a top-level url
    generate  POST {base}/v1/api/generate {"model", "prompt", "images", ..., "replyType": "async"}
              200 {"id", "status": "running", ...}  flat; a refusal carries "error" and no id
         poll GET  {base}/v1/api/result?id=
              200 {"id", "status", "progress", "results", "error", "failureReason", "code"}

    status    running ──► succeeded (results[].url: plain HTTPS, images kept ~2 h: stored at once)
                 ├──────► failed     failure_reason input_moderation | output_moderation | error
                 └──────► violation  a moderation stop (failureReason says input or output)
    code      != 0 on HTTP 200 is an API error (its words in `msg`); -22: no such task. Right
              after a submit GrsAi may not know the task yet, so -22 is waited out for a grace
              period (`not_found_grace_polls` polls and `not_found_grace_seconds`) before it
              counts as expired; once the task was seen, -22 means it is gone.
    errors    401 bad key · 429 too frequent (no Retry-After seen: we wait 5 s) · 5xx

Never the streaming reply (no webHook / replyType "stream"): it holds the connection for the
whole render. With `callbacks: true` a draw deployment gives GrsAi our callback URL as
webHook (and shutProgress, so only the final object comes); that POST is unsigned, so it is
never taken as a result: it only makes the job's next poll due now (`PollNow`).
GrsAi has no cancel endpoint and no idempotency key. Its Midjourney-proxy routes are not
covered here. Sources: providers.md §6/§9 (vendor plugin, grsai-cli, public clients).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from adapters.base import Adapter
from adapters.http import body_json, error_from_response, send, unsupported
from core.errors import ErrorCode, Fault, ProviderError, ProviderErrorKind
from core.types import Done, Failed, OutputRef, Pending, PollNow, PollResult, ProviderRequest, SubmitResult

PROVIDER = "grsai"
DEFAULT_BASE_URL = "https://grsaiapi.com"
DRAW_RESULT = "/v1/draw/result"
GENERATE, GENERATE_RESULT = "/v1/api/generate", "/v1/api/result"
NOT_FOUND = -22
# clients poll 5 s, 5 s, then every 10 s; sora-2 every 15 s (renders take minutes)
FIRST_POLLS_SECONDS, POLL_SECONDS, SORA_POLL_SECONDS = 5.0, 10.0, 15.0
FIRST_POLLS_WINDOW = 10.0  # seconds after submit polled at the faster cadence
GRACE_POLLS, GRACE_SECONDS = 3, 15.0  # -22 right after submit: "not registered yet"
GRACE_POLL_SECONDS = 2.0  # polled this often while waiting for it to register
DEFAULT_RATE_LIMIT_WAIT = 5.0
TERMINAL = frozenset({"succeeded", "failed", "violation"})

BASE_RATIOS = ("auto", "1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "5:4", "4:5", "21:9")
WIDE_RATIOS = (*BASE_RATIOS, "1:4", "4:1", "1:8", "8:1")  # the nano-banana-2 family
FLUX_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9", "9:21")
GPT_IMAGE_2_SIZES = ("1024x1024", "1536x1024", "1024x1536", "1448x1086", "1086x1448", "1774x887", "887x1774")
GPT_IMAGE_2_VIP_SIZES = (
    *GPT_IMAGE_2_SIZES, "2048x2048", "2880x2880", "2048x1360", "3504x2336", "1360x2048", "2336x3504",
    "2048x1632", "3200x2560", "1632x2048", "2560x3200", "2048x1152", "3840x2160", "1152x2048", "2160x3840",
    "2048x880", "3840x1648", "880x2048", "1648x3840", "688x2048", "1280x3840", "2048x688", "3840x1280",
    "2048x1024", "3840x1920", "1024x2048", "1920x3840",
)
RATIO_TOLERANCE = 0.02  # a size maps to a ratio (or a listed size) this close to its shape
# sora-2's size tiers by our resolution
SORA_SIZES = {"720p": "small", "1024p": "large", "1080p": "large"}


@dataclass(frozen=True, slots=True)
class Family:
    """What one GrsAi model family takes on the draw API (providers.md §6)."""

    modality: str
    path: str  # the draw route
    geometry: str  # "ratio": aspectRatio from a ratio list; "pixels": aspectRatio is WxH; "video"
    ratios: tuple[str, ...] = ()
    sizes: tuple[str, ...] | None = None  # "pixels": the sizes it renders (None: any WxH)
    image_sizes: tuple[str, ...] = ()  # imageSize tiers ((): the model takes none)
    params: frozenset[str] = field(default_factory=frozenset)  # provider_params it reads
    durations: tuple[int, ...] = ()
    seed: bool = False
    output_formats: tuple[str, ...] = ()  # (): the model picks its own format
    image_field: str = "urls"  # "urls" (a list) | "url" (one reference) | "" (no image input)


_FLUX_PARAMS = frozenset({"safetyTolerance", "promptUpsampling", "guidance", "steps"})
_GPT_PARAMS = frozenset({"quality", "background"})


def family_of(model: str) -> Family | None:
    """The model's family by its id, or None for a model this adapter does not know."""
    if model.startswith("nano-banana"):
        if model in ("nano-banana", "nano-banana-fast"):
            tiers: tuple[str, ...] = ()
        elif model in ("nano-banana-2-cl", "nano-banana-pro-vip"):
            tiers = ("1K", "2K")
        elif "-4k-" in model:
            tiers = ("4K",)
        else:
            tiers = ("1K", "2K", "4K")
        ratios = WIDE_RATIOS if model.startswith("nano-banana-2") else BASE_RATIOS
        return Family("image", "/v1/draw/nano-banana", "ratio", ratios, image_sizes=tiers,
                      params=frozenset({"imageSize"}) if tiers else frozenset())
    if model.startswith("gpt-image"):
        sizes = {"gpt-image-2": GPT_IMAGE_2_SIZES, "gpt-image-2-vip": GPT_IMAGE_2_VIP_SIZES}.get(model)
        return Family("image", "/v1/draw/completions", "pixels", sizes=sizes, params=_GPT_PARAMS)
    if model == "sora-image":
        return Family("image", "/v1/draw/completions", "ratio", ("1:1", "3:2", "2:3"))
    if model.startswith("flux-kontext"):
        return Family("image", "/v1/draw/flux", "ratio", FLUX_RATIOS, params=_FLUX_PARAMS, seed=True,
                      output_formats=("png", "jpeg"))
    if model.startswith("veo"):
        # the first-frame field of GrsAi's veo route is not in our reference: no image input
        return Family("video", "/v1/video/veo", "video", ("16:9", "9:16"), durations=(8,), image_field="")
    if model.startswith("sora-2"):
        return Family("video", "/v1/video/sora-video", "video", ("16:9", "9:16"), durations=(10, 15),
                      params=frozenset({"remixTargetId"}), image_field="url")
    return None


def route_for(model: str, options: dict[str, Any]) -> str:
    """"draw" or "generate": the deployment's `api` option, else draw for the families above
    and generate for models this adapter does not know (the newer API takes any model id)."""
    api = options.get("api")
    if api in ("draw", "generate"):
        return str(api)
    return "draw" if family_of(model) is not None or options.get("draw_path") else "generate"


class GrsAiAdapter(Adapter):
    """GrsAi images and videos. Stateless: everything poll needs is in the handle."""

    name = "grsai"
    provider_params = {
        "image": frozenset({"imageSize", "quality", "background", *_FLUX_PARAMS}),
        "video": frozenset({"remixTargetId"}),
    }

    # -- submit ---------------------------------------------------------------------------
    async def submit(self, request: ProviderRequest) -> SubmitResult:
        model = request.provider_model
        options = self.deployment.options
        if options.get("api") not in (None, "draw", "generate"):
            raise _misconfigured(f"option api must be draw or generate, not {options['api']!r}")
        api = route_for(model, options)
        family = family_of(model)
        allowed = [family.modality] if family is not None else ["image", "video"]
        if request.modality not in allowed:
            raise unsupported("modality", request.modality, allowed, model)
        body = build_body(model, request.modality, request.input, api=api)  # refuses before sending
        base = self.base_url(DEFAULT_BASE_URL)
        if api == "draw":
            path = str(options.get("draw_path") or (family.path if family else ""))
            if not path.startswith("/"):
                raise _misconfigured(f"no draw route known for {model!r}: set the deployment's draw_path "
                                     "option (e.g. /v1/draw/nano-banana) or api: generate")
            if request.callback_url:  # unsigned: it only makes us poll (verify_callback)
                body["webHook"], body["shutProgress"] = request.callback_url, True
            else:
                body["webHook"] = "-1"
            url = f"{base}{path}"
        else:
            body["replyType"] = "async"
            url = f"{base}{GENERATE}"
        resp = await send(self.http, "POST", url, provider=PROVIDER, create=True, json=body, headers=self._auth())
        if not resp.is_success:
            raise _error(resp)
        answer = body_json(resp)
        task_id = _submitted_id(answer, api, resp)
        handle = {"id": task_id, "api": api, "model": model, "submitted_at": time.time(), "seen": False, "misses": 0,
                  "modality": request.modality}
        if request.modality == "video":
            handle["video_seconds"] = body.get("duration") or (family.durations[0] if family and family.durations else None)
        return Pending(handle=handle, poll_after=self._cadence(handle), progress=0.0, message="submitted to GrsAi")

    # -- poll -----------------------------------------------------------------------------
    async def poll(self, handle: dict[str, Any]) -> PollResult:
        base = self.base_url(DEFAULT_BASE_URL)
        if handle.get("api") == "generate":
            resp = await send(self.http, "GET", f"{base}{GENERATE_RESULT}", provider=PROVIDER,
                              params={"id": handle["id"]}, headers=self._auth())
        else:
            resp = await send(self.http, "POST", f"{base}{DRAW_RESULT}", provider=PROVIDER,
                              json={"id": handle["id"]}, headers=self._auth())
        if not resp.is_success:
            raise _error(resp)
        answer = body_json(resp)
        if not isinstance(answer, dict):
            raise ProviderError(ProviderErrorKind.retryable, f"grsai result answered non-JSON: {resp.text[:200]!r}")
        code = answer.get("code", 0)
        if code == NOT_FOUND:
            return self._not_found(handle)
        if code not in (0, None):
            # an API-level error on a read: GrsAi's trouble, polled again (the poller caps it)
            raise ProviderError(ProviderErrorKind.retryable, f"grsai result answered code {code}: {_msg(answer)}",
                                detail={"body": answer})
        data = answer.get("data") if handle.get("api") != "generate" else answer
        if not isinstance(data, dict):
            raise ProviderError(ProviderErrorKind.retryable, "grsai result answered code 0 without data",
                                detail={"body": answer})
        return self._result(data, handle)

    async def cancel(self, handle: dict[str, Any]) -> None:
        """GrsAi has no cancel endpoint: the task runs (and bills) to the end. No-op."""
        return None

    async def verify_callback(
        self, headers: dict[str, str], body: bytes, handle: dict[str, Any], secret: str | None
    ) -> PollResult | PollNow | None:
        """GrsAi's callback is unsigned, so its body is never a result: one that claims the
        task finished makes the job's next poll due now, and only that poll's answer counts.
        A body for another task id is refused; progress bodies change nothing."""
        try:
            answer = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ProviderError(ProviderErrorKind.invalid, "grsai callback: body is not JSON") from None
        data = answer.get("data") if isinstance(answer, dict) and isinstance(answer.get("data"), dict) else answer
        if not isinstance(data, dict) or str(data.get("id")) != str(handle.get("id")):
            raise ProviderError(ProviderErrorKind.auth, "grsai callback: not about this job's task")
        if str(data.get("status") or "") in TERMINAL:
            return PollNow("grsai says the task finished (unsigned: verified by polling)")
        return None

    # -- helpers --------------------------------------------------------------------------
    def _auth(self) -> dict[str, str]:
        if not self.api_key:
            raise ProviderError(
                ProviderErrorKind.auth,
                f"grsai: no API key (set {self.deployment.api_key_env or 'api_key_env'} for deployment {self.deployment.name!r})",
            )
        return {**self.headers(), "Authorization": f"Bearer {self.api_key}"}

    def _cadence(self, handle: dict[str, Any]) -> float:
        if handle.get("modality") == "video":
            default = SORA_POLL_SECONDS if str(handle.get("model", "")).startswith("sora") else POLL_SECONDS
        else:
            young = time.time() - float(handle.get("submitted_at") or 0) < FIRST_POLLS_WINDOW
            default = FIRST_POLLS_SECONDS if young else POLL_SECONDS
        return self.poll_interval(default)

    def _grace(self) -> tuple[int, float]:
        opts = self.deployment.options
        polls = opts.get("not_found_grace_polls", GRACE_POLLS)
        seconds = opts.get("not_found_grace_seconds", GRACE_SECONDS)
        return (int(polls) if isinstance(polls, int) and polls >= 0 else GRACE_POLLS,
                float(seconds) if isinstance(seconds, int | float) and seconds >= 0 else GRACE_SECONDS)

    def _not_found(self, handle: dict[str, Any]) -> PollResult:
        """-22: right after submit, GrsAi may not have registered the task yet; after the
        grace period, or once the task was seen, it is gone (unknown id, or expired)."""
        misses = int(handle.get("misses") or 0) + 1
        polls, seconds = self._grace()
        waited = time.time() - float(handle.get("submitted_at") or 0)
        if not handle.get("seen") and (misses <= polls or waited < seconds):
            handle = {**handle, "misses": misses}
            return Pending(handle=handle, poll_after=min(self._cadence(handle), GRACE_POLL_SECONDS), progress=0.0,
                           message="GrsAi has not registered the task yet")
        return Failed(
            code=ErrorCode.provider_error,
            message=f"grsai has no task {handle.get('id')!r} (code -22): unknown id, or it expired "
                    "(GrsAi keeps images about 2 hours)",
            detail={"provider_code": NOT_FOUND, "seen": bool(handle.get("seen")), "polls_missed": misses},
        )

    def _result(self, data: dict[str, Any], handle: dict[str, Any]) -> PollResult:
        status = str(data.get("status") or "")
        if not handle.get("seen") or handle.get("misses"):
            handle = {**handle, "seen": True, "misses": 0}
        if status == "succeeded":
            return _done(data, handle)
        if status in ("failed", "violation"):
            return _failed(status, data)
        return Pending(handle=handle, poll_after=self._cadence(handle), progress=_progress(data.get("progress")),
                       message=f"GrsAi: {status}" if status and status != "running" else "GrsAi is generating")


# -- request mapping ---------------------------------------------------------------------
def build_body(model: str, modality: str, inp: dict[str, Any], *, api: str = "draw") -> dict[str, Any]:
    """Our normalized input -> GrsAi's body (without webHook / replyType); refuses what the
    model cannot honour before anything is sent. Unknown models get what was asked."""
    fam = family_of(model)
    if inp.get("negative_prompt"):
        raise unsupported("negative_prompt", inp["negative_prompt"], "not supported by GrsAi (omit it)", model)
    body: dict[str, Any] = {"model": model, "prompt": inp["prompt"]}
    params = dict(inp.get("provider_params") or {})
    if fam is not None:
        for key in sorted(params):
            if key not in fam.params:
                raise unsupported(f"provider_params.{key}", params[key], sorted(fam.params) or "none for this model", model)
    if modality == "image":
        body.update(_image(model, fam, inp, params, api))
    else:
        body.update(_video(model, fam, inp, params, api))
    return body


def _image(model: str, fam: Family | None, inp: dict[str, Any], params: dict[str, Any], api: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if int(inp.get("n") or 1) != 1:  # one image per task: n tasks behind one job would bill n times
        raise unsupported("n", inp["n"], [1], model)
    if inp.get("seed") is not None:
        if fam is not None and not fam.seed:
            raise unsupported("seed", inp["seed"], "only on flux-kontext models", model)
        out["seed"] = int(inp["seed"])
    fmt = inp.get("output_format")
    if fmt is not None:
        if fam is not None and fmt not in fam.output_formats:
            allowed = list(fam.output_formats) or "none (this model picks its own format: omit output_format)"
            raise unsupported("output_format", fmt, allowed, model)
        out["output_format"] = fmt
    ratio = _geometry(model, fam, inp.get("size"), inp.get("aspect_ratio"))
    if ratio is not None:
        out["aspectRatio"] = ratio
    images = list(inp.get("input_images") or [])
    if images:
        out["images" if api == "generate" else "urls"] = images  # URLs or data: URIs, as GrsAi takes them
    tier = params.pop("imageSize", None)
    if tier is not None:
        if fam is not None and tier not in fam.image_sizes:
            raise unsupported("provider_params.imageSize", tier, list(fam.image_sizes), model)
        out["imageSize"] = tier
    out.update(params)
    return out


def _geometry(model: str, fam: Family | None, size: str | None, ratio: str | None) -> str | None:
    """The aspectRatio value: a ratio from the family's list, or WxH for gpt-image."""
    if fam is None:
        return size or ratio
    if fam.geometry == "pixels":
        if ratio:  # gpt-image takes sizes: the listed size of that shape
            if fam.sizes is None:
                return ratio
            size = _nearest(ratio, fam.sizes, model, "aspect_ratio")
        if size and fam.sizes is not None and size not in fam.sizes:
            raise unsupported("size", size, ["auto", *fam.sizes], model)
        return size
    if size:  # a ratio model: the listed ratio of that shape
        ratios = [r for r in fam.ratios if r != "auto"]
        return _nearest(size, ratios, model, "size")
    if ratio:
        if ratio not in fam.ratios:
            raise unsupported("aspect_ratio", ratio, list(fam.ratios), model)
        return ratio
    return None


_SHAPE = re.compile(r"^(\d+)[x:](\d+)$")


def _shape(value: str) -> float:
    m = _SHAPE.match(value)
    assert m is not None and int(m[2]) > 0
    return int(m[1]) / int(m[2])


def _nearest(value: str, choices: Any, model: str, param: str) -> str:
    best = min(choices, key=lambda c: abs(math.log(_shape(c) / _shape(value))))
    if abs(math.log(_shape(best) / _shape(value))) > math.log1p(RATIO_TOLERANCE):
        raise unsupported(param, value, f"a shape this model renders: {list(choices)}", model)
    return str(best)


def _video(model: str, fam: Family | None, inp: dict[str, Any], params: dict[str, Any], api: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("fps", "seed"):
        if inp.get(name) is not None and fam is not None:
            raise unsupported(name, inp[name], "not supported by GrsAi's video routes (omit it)", model)
    ratio = inp.get("aspect_ratio")
    if ratio is not None:
        if fam is not None and ratio not in fam.ratios:
            raise unsupported("aspect_ratio", ratio, list(fam.ratios), model)
        out["aspectRatio"] = ratio
    duration = inp.get("duration_seconds")
    if fam is not None and fam.durations:
        seconds = float(duration) if duration is not None else float(fam.durations[0])
        if not seconds.is_integer() or int(seconds) not in fam.durations:
            raise unsupported("duration_seconds", duration, list(fam.durations), model)
        if len(fam.durations) > 1:  # veo's length is fixed: nothing to send
            out["duration"] = int(seconds)
    elif duration is not None:
        out["duration"] = int(duration) if float(duration).is_integer() else duration
    resolution = inp.get("resolution")
    if fam is not None and fam.path.endswith("sora-video"):
        if resolution is not None:
            if resolution not in SORA_SIZES:
                raise unsupported("resolution", resolution, list(SORA_SIZES), model)
            out["size"] = SORA_SIZES[resolution]
    elif resolution is not None:
        if fam is not None:
            raise unsupported("resolution", resolution, "none (GrsAi's veo route takes no resolution: omit it)", model)
        out["resolution"] = resolution
    image = inp.get("image")
    if image:
        if fam is not None and not fam.image_field:
            raise unsupported("image", image[:60], "none (no first-frame input on this route)", model)
        if api == "generate":
            out["images"] = [image]
        else:
            out[fam.image_field if fam else "url"] = image
    out.update(params)
    return out


# -- response mapping --------------------------------------------------------------------
def _submitted_id(answer: Any, api: str, resp: httpx.Response) -> str:
    """The task id from a submit answer, or the ProviderError its refusal means."""
    if not isinstance(answer, dict):
        raise ProviderError(ProviderErrorKind.failed, f"grsai answered a submit with non-JSON: {resp.text[:200]!r}",
                            detail={"body": resp.text[:500]})
    if api == "generate":
        task_id, code = answer.get("id"), answer.get("code", 0)
        if task_id and code in (0, None):
            return str(task_id)
        raise _refusal(code, str(answer.get("error") or _msg(answer)), answer)
    code = answer.get("code")
    data = answer.get("data")
    if code == 0 and isinstance(data, dict) and data.get("id"):
        return str(data["id"])
    if code == 0:  # accepted, yet no id: the task may exist and bill, so nothing is resent
        raise ProviderError(ProviderErrorKind.failed, "grsai accepted the task but answered without data.id",
                            detail={"body": answer})
    raise _refusal(code, _msg(answer), answer)


_QUOTA = re.compile(r"credit|balance|insufficient|余额|积分|点数", re.IGNORECASE)
_AUTH = re.compile(r"api ?key|apikey|token|unauthori[sz]ed|密钥", re.IGNORECASE)
_BUSY = re.compile(r"busy|try again|overload|繁忙|稍后", re.IGNORECASE)
_FLAGGED = re.compile(r"moderation|sensitive|violat|违规|敏感", re.IGNORECASE)
_MODEL = re.compile(r"\bmodel\b|模型", re.IGNORECASE)


def _refusal(code: Any, message: str, answer: dict[str, Any]) -> ProviderError:
    """A submit refused with `code != 0` (HTTP 200): no task was made, so it is safe to send
    again elsewhere; what kind of refusal it is, GrsAi says only in words."""
    text = f"grsai refused the task (code {code}): {message}"
    detail = {"provider_code": code, "body": answer}
    if _QUOTA.search(message):
        return ProviderError(ProviderErrorKind.quota, text, detail=detail, resend_safe=True)
    if _AUTH.search(message):
        return ProviderError(ProviderErrorKind.auth, text, detail=detail, resend_safe=True)
    if _BUSY.search(message):
        return ProviderError(ProviderErrorKind.retryable, text, detail=detail, resend_safe=True)
    if _FLAGGED.search(message):
        return ProviderError(ProviderErrorKind.moderated, text, detail={**detail, "stage": "input", "reasons": [message]},
                             resend_safe=True)
    if _MODEL.search(message):  # a model id GrsAi does not serve (on this route): the catalog's mistake
        return ProviderError(ProviderErrorKind.invalid, f"{text} (check the deployment's model, api and draw_path)",
                             detail=detail, fault=Fault.operator, resend_safe=True)
    return ProviderError(ProviderErrorKind.invalid, text, detail=detail, resend_safe=True)


def _msg(answer: dict[str, Any]) -> str:
    for key in ("msg", "message", "error"):
        if isinstance(answer.get(key), str) and answer[key]:
            return str(answer[key])
    return "no message"


def _progress(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return min(1.0, max(0.0, float(value) / 100))


def _done(data: dict[str, Any], handle: dict[str, Any]) -> PollResult:
    urls = [str(r["url"]) for r in data.get("results") or [] if isinstance(r, dict) and r.get("url")]
    if not urls and isinstance(data.get("url"), str) and data["url"]:
        urls = [data["url"]]  # flux (and, per some clients, veo) answer a top-level url
    if not urls:
        return Failed(ErrorCode.provider_error, "grsai answered succeeded without a result URL",
                      detail={"provider_status": "succeeded", "body": data})
    video = handle.get("modality") == "video"
    # plain HTTPS, no auth (our key must not leave GrsAi's API); they expire: stored at once
    outputs = [OutputRef(url=u, content_type="video/mp4" if video else None) for u in urls]
    usage: dict[str, Any] = {"videos": len(urls)} if video else {"images": len(urls)}
    if video and handle.get("video_seconds"):
        usage["video_seconds"] = int(handle["video_seconds"]) * len(urls)
    return Done(outputs=outputs, handle=handle, usage=usage)


def _failed(status: str, data: dict[str, Any]) -> Failed:
    reason = str(data.get("failure_reason") or data.get("failureReason") or "")
    error = str(data.get("error") or "")
    if status == "violation" or reason in ("input_moderation", "output_moderation"):
        stage = "input" if reason == "input_moderation" else "output"
        reasons = [r for r in (reason, error) if r]
        return Failed(
            code=ErrorCode.moderated,
            message=f"grsai flagged the {stage}" + (f": {error}" if error else f" ({reason or status})"),
            detail={"stage": stage, "reasons": reasons, "provider_status": status},
        )
    return Failed(
        code=ErrorCode.provider_error,
        message=f"grsai task failed: {error or reason or 'no reason given'}",
        detail={"provider_status": status, "failure_reason": reason or None, "error": error or None},
    )


def _error(resp: httpx.Response) -> ProviderError:
    """The shared status map; GrsAi's 429 carries no Retry-After, so we wait ~5 s."""
    exc = error_from_response(resp, PROVIDER)
    if exc.kind is ProviderErrorKind.rate_limited and exc.retry_after is None:
        exc.retry_after = DEFAULT_RATE_LIMIT_WAIT
    return exc


def _misconfigured(why: str) -> ProviderError:
    """The deployment cannot work as configured: the operator's to fix, never the user's."""
    return ProviderError(ProviderErrorKind.invalid, f"grsai: {why}", fault=Fault.operator, resend_safe=True)
