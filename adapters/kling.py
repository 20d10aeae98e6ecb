"""Kling video in its native task format, as the CometAPI and DMXAPI relays serve it.

Wire format (`Authorization: Bearer <relay key>`, JSON; paths under `path_prefix`, `/kling`
by default, so base_url is the relay's host: https://api.cometapi.com, https://www.dmxapi.cn):

    submit  POST {base}/kling/v1/videos/text2video      {model_name, prompt, negative_prompt,
            POST {base}/kling/v1/videos/image2video       duration: "5"|"10", aspect_ratio
                                                          (text2video), mode: std|pro, image
                                                          (image2video: URL or bare base64), ...}
            -> {"code": 0, "message", "request_id", "data": {"task_id", "task_status": "submitted"}}
    poll    GET  {base}/kling/v1/videos/{text2video|image2video}/{task_id}
            -> {"code": 0, "data": {"task_id", "task_status", "task_status_msg",
                                    "task_result": {"videos": [{"id", "url", "duration": "5.1"}]}}}
    status  submitted ──► processing ──► succeed   task_result.videos[].url (fetched at once)
                                   └──► failed     task_status_msg (moderation wording -> moderated)

"200 OK" is not success: a reply is good only with `code: 0`. Kling's codes, on any HTTP
status (Kling answers them with 4xx/5xx, some relays with 200):

    1000-1004 auth   1100-1102 account / arrears / resource pack empty (quota, never retried)
    1103 forbidden   1200-1201 bad parameters (the user's)   1202-1203 no such method or model
    1300-1301 platform / content-security policy (moderated, input)
    1302-1303 rate / concurrency limit (rate_limited; no Retry-After: we wait 5 s / 10 s)
    1304 IP allowlist (the operator's)   5000-5002 server error, unavailable, timeout (retryable)

The relays' own errors (bad relay key, no balance) come in their OpenAI-style envelope
`{"error": {"message", "type": "comet_api_error"|"new_api_error", "code"}}` and take the
shared status mapping; CometAPI's 500 with `code: invalid_request` is a malformed request.

Kling has no cancel endpoint: cancel is local (the job ends on our side and is no longer
polled; the task runs to its end upstream and is billed there). Kling reports no progress.
Result URLs live 30 days on Kling (the relays' lifetimes are undocumented): fetched at once.
Sources: Kling API docs (text2video, image2video, error codes), CometAPI and DMXAPI Kling pages.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import httpx

from adapters.base import Adapter
from adapters.http import body_json, error_from_response, moderated, retry_after, send, unsupported
from core.errors import ErrorCode, Fault, ProviderError, ProviderErrorKind
from core.types import Done, Failed, OutputRef, Pending, PollResult, ProviderRequest, SubmitResult

PROVIDER = "kling"
POLL_SECONDS = 10.0  # renders take one to several minutes; Kling reports no progress to poll for
RATE_LIMIT_WAIT = 5.0  # 1302: too many requests; Kling sends no Retry-After
CONCURRENCY_WAIT = 10.0  # 1303: too many tasks in flight for the resource pack
MAX_PROMPT_CHARS = 2500  # Kling's limit for prompt and negative_prompt
MAX_IMAGE_BYTES = 10 * 2**20  # Kling's limit for an input image
DURATIONS = ("5", "10")
ASPECT_RATIOS = ("16:9", "9:16", "1:1")  # text2video; image2video follows the image
MODES = {"720p": "std", "1080p": "pro"}  # our resolution -> Kling's mode (std 720p, pro 1080p)
KINDS = ("text2video", "image2video")
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg")
# Kling's words for a refusal of the content: risk control, content security, sensitive...
_MODERATION = re.compile(
    r"risk control|content security|security polic|sensitive|moderat|inappropriate|violat|nsfw|审核|敏感|违规|风控",
    re.IGNORECASE,
)
_INPUT_WORDS = re.compile(r"\b(prompt|input|upload(?:ed)?|reference image|image you provided)\b", re.IGNORECASE)
_AUTH = frozenset({1000, 1001, 1002, 1003, 1004, 1103, 1304})
_QUOTA = frozenset({1100, 1101, 1102})
_INVALID = frozenset({1200, 1201})
_MISCONFIGURED = frozenset({1202, 1203})
_POLICY = frozenset({1300, 1301})
_SERVER = frozenset({5000, 5001, 5002})


class KlingAdapter(Adapter):
    """Kling text-to-video and image-to-video over a relay. Deployment options:
    `path_prefix` (default `/kling`; `""` for a host serving Kling's paths at its root),
    `auth_header` / `auth_scheme` (defaults `Authorization` / `Bearer`; `""`: the bare key),
    `headers`, `poll_interval`."""

    name = "kling"
    # mode and duration change the price: they come from the request's resolution and
    # duration_seconds, never from provider_params; callback_url and external_task_id are ours
    provider_params = {
        "video": frozenset({"cfg_scale", "camera_control", "image_tail", "static_mask", "dynamic_masks"}),
    }

    async def submit(self, request: ProviderRequest) -> SubmitResult:
        model = request.provider_model or self.deployment.model
        if request.modality != "video":
            raise unsupported("modality", request.modality, ["video"], model)
        kind, body = build_body(model, request.input)  # refuses before anything is sent
        resp = await send(self.http, "POST", self._url(kind), provider=PROVIDER, create=True,
                          headers=self._auth(), json=body)
        data = _data(resp, create=True)
        task_id = data.get("task_id")
        if not isinstance(task_id, str | int) or not str(task_id):
            # the task may exist and bill: not resend_safe, and no id is guessed for it
            raise ProviderError(ProviderErrorKind.failed, f"{PROVIDER}: the create answered code 0 without data.task_id",
                                detail={"body": body_json(resp)})
        handle = {"task_id": str(task_id), "kind": kind, "model": model}
        result = self._result(handle, data)
        if isinstance(result, Pending):
            return result
        if isinstance(result, Failed):  # refused at once: a submit error, with its own code
            kind_ = ProviderErrorKind.moderated if result.code == ErrorCode.moderated else ProviderErrorKind.failed
            raise ProviderError(kind_, result.message, detail=result.detail, code=result.code)
        return result

    async def poll(self, handle: dict[str, Any]) -> PollResult:
        url = f"{self._url(handle['kind'])}/{handle['task_id']}"
        resp = await send(self.http, "GET", url, provider=PROVIDER, headers=self._auth())
        if resp.status_code == 404 or _code(resp) in _MISCONFIGURED:
            return Failed(ErrorCode.provider_error, f"{PROVIDER}: task {handle['task_id']} is not known upstream (expired or deleted)",
                          detail={"status": resp.status_code, "body": body_json(resp)})
        return self._result(handle, _data(resp, create=False))

    async def cancel(self, handle: dict[str, Any]) -> None:
        """Kling has no cancel endpoint. The job is canceled on our side and its polls stop;
        the task runs to its end at Kling (and is billed there)."""
        return None

    # -- helpers -------------------------------------------------------------------------
    def _url(self, kind: str) -> str:
        if not self.deployment.base_url:
            raise ProviderError(ProviderErrorKind.invalid, f"deployment {self.deployment.name!r} needs a base_url (the relay's host)",
                                fault=Fault.operator, resend_safe=True)
        prefix = str(self.deployment.options.get("path_prefix", "/kling") or "").rstrip("/")
        return f"{self.base_url('')}{prefix}/v1/videos/{kind}"

    def _auth(self) -> dict[str, str]:
        if not self.api_key:
            raise ProviderError(
                ProviderErrorKind.auth,
                f"{PROVIDER}: no API key (set {self.deployment.api_key_env or 'api_key_env'} for deployment {self.deployment.name!r})",
            )
        opts = self.deployment.options
        header = str(opts.get("auth_header") or "Authorization")
        scheme = str(opts.get("auth_scheme", "Bearer") or "")
        return {**self.headers(), header: f"{scheme} {self.api_key}" if scheme else self.api_key}

    def _result(self, handle: dict[str, Any], data: dict[str, Any]) -> PollResult:
        status = str(data.get("task_status") or "")
        if status in ("submitted", "processing"):
            return Pending(handle=handle, poll_after=self.poll_interval(POLL_SECONDS), message=status)
        if status == "succeed":
            return _done(handle, data)
        if status == "failed":
            return _failure(handle, str(data.get("task_status_msg") or ""))
        return Failed(ErrorCode.provider_error, f"{PROVIDER}: unknown task_status {status!r}", detail={"data": data})


# -- request mapping ---------------------------------------------------------------------
def build_body(model: str, inp: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Our normalized video input -> (text2video | image2video, Kling's JSON body)."""
    for key, why in (("seed", "no seed"), ("fps", "no frame rate")):
        if inp.get(key) is not None:
            raise unsupported(key, inp[key], f"none (Kling takes {why})", model)
    for key in ("prompt", "negative_prompt"):
        if len(inp.get(key) or "") > MAX_PROMPT_CHARS:
            raise unsupported(key, f"{len(inp[key])} characters", f"at most {MAX_PROMPT_CHARS} characters", model)
    kind = "image2video" if inp.get("image") else "text2video"
    body: dict[str, Any] = {"model_name": model, "prompt": inp["prompt"]}
    if inp.get("negative_prompt"):
        body["negative_prompt"] = inp["negative_prompt"]
    if inp.get("duration_seconds") is not None:
        seconds = float(inp["duration_seconds"])
        if not seconds.is_integer() or str(int(seconds)) not in DURATIONS:
            raise unsupported("duration_seconds", inp["duration_seconds"], [float(d) for d in DURATIONS], model)
        body["duration"] = str(int(seconds))
    if inp.get("resolution") is not None:
        if inp["resolution"] not in MODES:
            raise unsupported("resolution", inp["resolution"], list(MODES), model)
        body["mode"] = MODES[inp["resolution"]]
    if inp.get("aspect_ratio") is not None:
        if kind == "image2video":
            raise unsupported("aspect_ratio", inp["aspect_ratio"], "none (image-to-video follows the image's shape)", model)
        if inp["aspect_ratio"] not in ASPECT_RATIOS:
            raise unsupported("aspect_ratio", inp["aspect_ratio"], list(ASPECT_RATIOS), model)
        body["aspect_ratio"] = inp["aspect_ratio"]
    if kind == "image2video":
        body["image"] = _image(model, inp["image"])
    params = dict(inp.get("provider_params") or {})
    if "image_tail" in params:
        if kind != "image2video":
            raise unsupported("provider_params.image_tail", "(set)", "only with an image (image-to-video)", model)
        params["image_tail"] = _image(model, str(params["image_tail"]), "provider_params.image_tail")
    if "cfg_scale" in params:
        cfg = params["cfg_scale"]
        if isinstance(cfg, bool) or not isinstance(cfg, int | float) or not 0 <= cfg <= 1:
            raise unsupported("provider_params.cfg_scale", cfg, "a number 0..1", model)
    return kind, body | params


def _image(model: str, ref: str, field: str = "image") -> str:
    """A URL as it is (Kling fetches it); a data: URI as the bare base64 Kling wants (it
    refuses the `data:image/png;base64,` prefix), PNG or JPEG only, at most 10 MB."""
    if not ref.startswith("data:"):
        return ref
    header, _, payload = ref.partition(",")
    mime = header[5:].split(";")[0].lower()
    if mime not in _IMAGE_TYPES or ";base64" not in header:
        raise unsupported(field, mime or header[:40], "a PNG or JPEG image, as a URL or a base64 data: URI", model)
    try:
        size = len(base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError):
        raise unsupported(field, "(invalid base64)", "a PNG or JPEG image, as a URL or a base64 data: URI", model) from None
    if size > MAX_IMAGE_BYTES:
        raise unsupported(field, f"{size} bytes", f"at most {MAX_IMAGE_BYTES} bytes", model)
    return payload


# -- response mapping --------------------------------------------------------------------
def _code(resp: httpx.Response) -> int | None:
    body = body_json(resp)
    code = body.get("code") if isinstance(body, dict) else None
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def _data(resp: httpx.Response, *, create: bool) -> dict[str, Any]:
    """`data` of a `code: 0` answer; every other answer raised as its ProviderError."""
    code = _code(resp)
    body = body_json(resp)
    if resp.is_success and code == 0 and isinstance(body, dict) and isinstance(body.get("data"), dict):
        return dict(body["data"])
    if code is not None and code != 0:
        raise _kling_error(resp, code, create=create)
    if not resp.is_success:
        raise _relay_error(resp)
    # a 200 that is not Kling's envelope: a wrong path can answer a relay's HTML page
    detail = {"status": resp.status_code, "body": body if body is not None else resp.text[:500]}
    if create:
        raise ProviderError(ProviderErrorKind.failed, f"{PROVIDER}: the create answer is not Kling's (code 0 + data); "
                            "check the deployment's base_url and path_prefix", detail=detail)
    raise ProviderError(ProviderErrorKind.retryable, f"{PROVIDER}: the task answer is not Kling's (code 0 + data)", detail=detail)


def _kling_error(resp: httpx.Response, code: int, *, create: bool) -> ProviderError:
    body = body_json(resp)
    words = str(body.get("message") or "") if isinstance(body, dict) else ""
    message = f"{PROVIDER}: code {code}: {words or 'no message'}"
    detail = {"status": resp.status_code, "code": code, "body": body}
    if code in _AUTH:
        return ProviderError(ProviderErrorKind.auth, message, detail=detail)
    if code in _QUOTA:  # sent as HTTP 429, but retrying cannot help: the account is out
        return ProviderError(ProviderErrorKind.quota, message, detail=detail, resend_safe=True)
    if code in _INVALID:
        return ProviderError(ProviderErrorKind.invalid, message, detail=detail, resend_safe=True)
    if code in _MISCONFIGURED:
        return ProviderError(ProviderErrorKind.invalid, f"{message} (the deployment is misconfigured: check its model and base_url)",
                             detail=detail, fault=Fault.operator, resend_safe=True)
    if code in _POLICY:
        return moderated(message, "input", [words] if words else [])
    if code in (1302, 1303):
        wait = CONCURRENCY_WAIT if code == 1303 else RATE_LIMIT_WAIT
        return ProviderError(ProviderErrorKind.rate_limited, message, detail=detail, resend_safe=True,
                             retry_after=retry_after(resp) or wait)
    if code in _SERVER or resp.status_code >= 500:
        # a create may have been accepted behind a gateway timeout: never resent
        return ProviderError(ProviderErrorKind.retryable, message, detail=detail, resend_safe=not create)
    return ProviderError(ProviderErrorKind.failed, message, detail=detail)


def _relay_error(resp: httpx.Response) -> ProviderError:
    """The relay's own envelope: the shared status map, a default wait on its 429s, and
    CometAPI's 500 `invalid_request`, which is a malformed request, not an outage."""
    body = body_json(resp)
    err = body.get("error") if isinstance(body, dict) else None
    if resp.status_code == 500 and isinstance(err, dict) and err.get("code") == "invalid_request":
        return ProviderError(ProviderErrorKind.invalid, f"{PROVIDER}: the relay refused the request: {err.get('message')}",
                             detail={"status": 500, "body": body}, resend_safe=True)
    exc = error_from_response(resp, PROVIDER)
    if exc.kind is ProviderErrorKind.rate_limited and exc.retry_after is None:
        exc.retry_after = RATE_LIMIT_WAIT
    return exc


def _done(handle: dict[str, Any], data: dict[str, Any]) -> PollResult:
    result: dict[str, Any] = r if isinstance(r := data.get("task_result"), dict) else {}
    videos = [v for v in result.get("videos") or [] if isinstance(v, dict) and isinstance(v.get("url"), str) and v["url"]]
    if not videos:
        return Failed(ErrorCode.provider_error, f"{PROVIDER}: task {handle['task_id']} succeeded without task_result.videos",
                      detail={"data": data})
    # no auth header on these: they are CDN links, the relay key must not leave the relay
    outputs = [OutputRef(url=str(v["url"]), content_type="video/mp4") for v in videos]
    usage: dict[str, Any] = {"task_id": handle["task_id"], "videos": len(videos)}
    # Kling reports a clip's real length ("5.041") and bills the nominal 5 or 10 s
    seconds = [_seconds(v.get("duration")) for v in videos]
    if seconds and all(s is not None for s in seconds):
        usage["video_seconds"] = sum(round(s) for s in seconds if s is not None)
    if data.get("final_unit_deduction") not in (None, ""):
        usage["units_deducted"] = data["final_unit_deduction"]  # Kling's own units, for the operator
    return Done(outputs=outputs, handle=handle, usage=usage)


def _seconds(value: Any) -> float | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if 0 < seconds < 3600 else None


def _failure(handle: dict[str, Any], words: str) -> Failed:
    message = f"{PROVIDER}: task {handle['task_id']} failed: {words or 'no reason given'}"
    if _MODERATION.search(words):
        stage = "input" if _INPUT_WORDS.search(words) else "output"
        return Failed(ErrorCode.moderated, message, detail={"stage": stage, "reasons": [words], "task_id": handle["task_id"]})
    return Failed(ErrorCode.provider_error, message, detail={"task_status_msg": words, "task_id": handle["task_id"]})
