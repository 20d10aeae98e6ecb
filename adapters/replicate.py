"""Replicate: any model, one predictions API (DESIGN.md §4; providers.md §1).

Wire format (verified against replicate-python `prediction.py`, replicate-javascript
`lib/util.js`, and the model pages' input schemas):

    POST {base}/v1/models/{owner}/{name}/predictions      model "owner/name"
    POST {base}/v1/predictions  {"version": "<64 hex>"}    model "owner/name:<hex>" or "<hex>"
         Authorization: Bearer r8_...   [Prefer: wait=N]   (deployment option sync_wait)
         {"input": {...}, "webhook": url, "webhook_events_filter": ["start", "completed"]}
      -> 201 prediction {id, status: starting, urls: {get, cancel, web}, logs, output, metrics}
    GET  urls.get     -> the same object; status starting | processing | succeeded | failed
                         | canceled | aborted; progress only as tqdm lines in `logs`
    POST urls.cancel  -> the object (a terminal prediction comes back unchanged)
    GET  {base}/v1/webhooks/default/secret -> {"key": "whsec_..."}  (the ACCOUNT secret)

`output` is a URL string, a list of URLs or a dict (nested) of them: every http(s) or
data: URL becomes an OutputRef; other values (seeds, flags, text) are ignored. Files on
replicate.delivery expire after about an hour, so they are handed to storage at once.
Errors are problem+json `{"title", "detail", "status"}`; a throttled create is 429 with
`"detail": "Request was throttled. Your rate limit resets in ~Ns."` (Retry-After may be
absent, so N is read from the detail). Webhooks are Standard Webhooks (webhook-id,
webhook-timestamp, webhook-signature `v1,<b64>` list; HMAC-SHA256 over
`{id}.{timestamp}.{body}` keyed with the base64-decoded part after `whsec_`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

import httpx

from adapters.base import Adapter, Backoff
from adapters.http import body_json, error_from_response, moderated, send, unsupported
from core.errors import ErrorCode, Fault, ProviderError, ProviderErrorKind
from core.types import Done, Failed, OutputRef, Pending, PollResult, ProviderRequest, SubmitResult

PROVIDER = "replicate"
DEFAULT_BASE_URL = "https://api.replicate.com"
POLL_SECONDS = 1.0  # the official clients sleep 0.5-1 s between GETs
WEBHOOK_TOLERANCE = 300  # seconds; Standard Webhooks' replay window
WEBHOOK_EVENTS = ("start", "output", "logs", "completed")
DEFAULT_WEBHOOK_EVENTS = ["start", "completed"]
MAX_SYNC_WAIT = 60  # Prefer: wait accepts 1..60 s

_VERSION_ID = re.compile(r"^[0-9a-f]{64}$")
# Both official clients parse the last log line matching this (tqdm's bar).
_TQDM = re.compile(r"^\s*(\d+)%\s*\|.+?\|\s*(\d+)/(\d+)")
_THROTTLE_SECONDS = re.compile(r"~\s*(\d+(?:\.\d+)?)\s*s")
# Safety-checker failures as models word them: cog-stable-diffusion's "NSFW content
# detected...", BFL models' "flagged as sensitive (E005)", Google's "safety filter".
_MODERATION = re.compile(r"nsfw|flagged as sensitive|safety (checker|filter|system)|content policy|\(E005\)", re.I)
# Only words that say the INPUT was flagged make it input-stage: the usual NSFW text
# ("...try a different prompt") names the prompt as advice, about a flagged output.
_INPUT_STAGE = re.compile(
    r"\b(in|on|from) (the |your )?(input|prompt)\b|\b(input|prompt) (was |is |has been )?(flagged|rejected|blocked)", re.I)
_TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})


# -- model families ------------------------------------------------------------------
FLUX_RATIOS = ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]


@dataclass(frozen=True, slots=True)
class Family:
    """What a family of Replicate models takes, and under which input names.
    None for a capability means: not checked (pass it and let the model decide)."""

    name: str
    aspect_ratios: list[str] | None = None
    output_formats: list[str] | None = None  # in Replicate's spelling (jpg, not jpeg)
    max_n: int | None = None  # None: n>1 is sent as num_outputs unchecked
    sizes: tuple[int, int, int] | None = None  # min, max, multiple for width/height
    size_ok: bool = True  # False: the model has no width/height inputs
    negative_prompt: bool = True
    image_field: str | None = "image"  # where the (single) input image goes
    durations: list[float] | None = None
    fps: list[int] | None = None
    seed: bool = True


FAMILIES: dict[str, Family] = {
    # black-forest-labs/flux-schnell: 1 MP buckets by aspect ratio, no image input
    "flux": Family("flux", FLUX_RATIOS, ["webp", "jpg", "png"], 4, size_ok=False, negative_prompt=False,
                   image_field=None),
    # flux-dev: the same, plus an img2img `image`
    "flux-dev": Family("flux-dev", FLUX_RATIOS, ["webp", "jpg", "png"], 4, size_ok=False, negative_prompt=False),
    # flux-1.1-pro / flux-pro: width/height with aspect_ratio "custom"
    "flux-pro": Family("flux-pro", [*FLUX_RATIOS], ["webp", "jpg", "png"], 1, (256, 1440, 32),
                       negative_prompt=False, image_field="image_prompt"),
    # flux-kontext-pro / -max: one input_image, aspect_ratio (or match_input_image)
    "kontext": Family("kontext", [*FLUX_RATIOS, "match_input_image"], ["jpg", "png"], 1, size_ok=False,
                      negative_prompt=False, image_field="input_image"),
    # kwaivgi/kling-*: start_image, 5 or 10 s, fixed 24 fps, no seed input
    "kling": Family("kling", ["16:9", "9:16", "1:1"], None, 1, image_field="start_image",
                    durations=[5.0, 10.0], fps=[24], seed=False),
    "generic": Family("generic"),
}


def family_for(model: str) -> Family:
    name = model.split(":", 1)[0].rsplit("/", 1)[-1].lower()
    if "kontext" in name:
        return FAMILIES["kontext"]
    if name.startswith("flux-schnell"):
        return FAMILIES["flux"]
    if name.startswith("flux-dev"):
        return FAMILIES["flux-dev"]
    if name in ("flux-pro", "flux-1.1-pro"):
        return FAMILIES["flux-pro"]
    if name.startswith("kling"):
        return FAMILIES["kling"]
    return FAMILIES["generic"]


def _format(value: str) -> str:
    return "jpg" if value == "jpeg" else value  # Replicate models spell it jpg


def build_input(model: str, modality: str, inp: dict[str, Any]) -> dict[str, Any]:
    """Our normalized input -> the model's `input`; refuses (before anything is sent)
    what the model's family cannot honour. provider_params are merged last and win."""
    fam = family_for(model)
    out: dict[str, Any] = {}
    for key in ("prompt", "text"):
        if inp.get(key):
            out[key] = inp[key]
    if inp.get("negative_prompt"):
        if not fam.negative_prompt:
            raise unsupported("negative_prompt", inp["negative_prompt"], "not supported by this model", model)
        out["negative_prompt"] = inp["negative_prompt"]
    if inp.get("seed") is not None:
        if not fam.seed:
            raise unsupported("seed", inp["seed"], "not supported by this model", model)
        out["seed"] = inp["seed"]
    _map_aspect_and_size(model, fam, inp, out)
    if modality == "image":
        _map_image(model, fam, inp, out)
    elif modality == "video":
        _map_video(model, fam, inp, out)
    elif modality == "audio":
        _map_audio(inp, out)
    out.update(inp.get("provider_params") or {})
    return out


def _map_aspect_and_size(model: str, fam: Family, inp: dict[str, Any], out: dict[str, Any]) -> None:
    ratio = inp.get("aspect_ratio")
    if ratio:
        if fam.aspect_ratios is not None and ratio not in fam.aspect_ratios:
            raise unsupported("aspect_ratio", ratio, fam.aspect_ratios, model)
        out["aspect_ratio"] = ratio
    size = inp.get("size")
    if not size:
        return
    if not fam.size_ok:
        raise unsupported("size", size, f"no width/height; use aspect_ratio, one of {fam.aspect_ratios}", model)
    w, h = (int(x) for x in size.split("x"))
    if fam.sizes is not None:
        lo, hi, step = fam.sizes
        for side in (w, h):
            if not lo <= side <= hi or side % step:
                raise unsupported("size", size, f"width and height {lo}..{hi}, multiples of {step}", model)
        out["aspect_ratio"] = "custom"  # flux-pro reads width/height only with "custom"
    out["width"], out["height"] = w, h


def _map_image(model: str, fam: Family, inp: dict[str, Any], out: dict[str, Any]) -> None:
    n = int(inp.get("n") or 1)
    if fam.max_n is not None and n > fam.max_n:
        raise unsupported("n", n, f"1..{fam.max_n}", model)
    if n > 1:
        out["num_outputs"] = n
    fmt = inp.get("output_format")
    if fmt:
        if fam.output_formats is not None and _format(fmt) not in fam.output_formats:
            allowed = ["jpeg" if f == "jpg" else f for f in fam.output_formats]
            raise unsupported("output_format", fmt, allowed, model)
        out["output_format"] = _format(fmt)
    images = inp.get("input_images") or []
    if images:
        if fam.image_field is None:
            raise unsupported("input_images", f"{len(images)} image(s)", "none", model)
        if len(images) > 1:
            # one image field is all we know; a model's own list field goes in provider_params
            raise unsupported("input_images", f"{len(images)} images", "at most 1 (more via provider_params)", model)
        out[fam.image_field] = images[0]


def _map_video(model: str, fam: Family, inp: dict[str, Any], out: dict[str, Any]) -> None:
    duration = inp.get("duration_seconds")
    if duration is not None:
        if fam.durations is not None and float(duration) not in fam.durations:
            raise unsupported("duration_seconds", duration, fam.durations, model)
        out["duration"] = int(duration) if float(duration).is_integer() else float(duration)
    fps = inp.get("fps")
    if fps is not None:
        if fam.fps is not None and fps not in fam.fps:
            raise unsupported("fps", fps, fam.fps, model)
        if fam.fps is None:
            out["fps"] = fps
    # kling picks its resolution by model variant (standard 720p, pro/master 1080p)
    if inp.get("resolution") and fam.name == "generic":
        out["resolution"] = inp["resolution"]
    if inp.get("image"):
        out[fam.image_field or "image"] = inp["image"]


def _map_audio(inp: dict[str, Any], out: dict[str, Any]) -> None:
    if inp.get("voice"):
        out["voice"] = inp["voice"]
    if inp.get("format"):
        out["output_format"] = inp["format"]
    if inp.get("duration_seconds") is not None:
        out["duration"] = inp["duration_seconds"]


# -- reading predictions -------------------------------------------------------------
def parse_progress(logs: str | None) -> float | None:
    """The last tqdm line's percentage, as both official clients read it."""
    for line in reversed((logs or "").split("\n")):
        m = _TQDM.match(line.strip())
        if m:
            return max(0.0, min(1.0, int(m[1]) / 100))
    return None


def last_log_line(logs: str | None) -> str | None:
    for line in reversed((logs or "").replace("\r", "\n").split("\n")):
        if line.strip():
            return line.strip()[:200]
    return None


def output_urls(output: Any) -> list[str]:
    """Every URL in `output`, depth first, in order: str, list or (nested) dict."""
    if isinstance(output, str):
        return [output] if output.startswith(("https://", "http://", "data:")) else []
    if isinstance(output, list):
        return [u for item in output for u in output_urls(item)]
    if isinstance(output, dict):
        return [u for value in output.values() for u in output_urls(value)]
    return []


def _ref(url: str) -> OutputRef:
    if not url.startswith("data:"):
        return OutputRef(url=url)  # replicate.delivery needs no auth
    head, _, payload = url.partition(",")
    try:
        data = base64.b64decode(payload) if head.endswith(";base64") else payload.encode()
    except binascii.Error as exc:
        raise ProviderError(ProviderErrorKind.failed, f"{PROVIDER}: an output data URL is not base64") from exc
    return OutputRef(data=data, content_type=head[5:].split(";", 1)[0] or None)


def _failed(prediction: dict[str, Any]) -> Failed:
    error = str(prediction.get("error") or "the prediction failed without an error message")
    detail = {"prediction_id": prediction.get("id"), "error": error}
    if _MODERATION.search(error):
        # Replicate has no structured stage; the model's words say which side was flagged
        stage = "input" if _INPUT_STAGE.search(error) else "output"
        return Failed(ErrorCode.moderated, f"{PROVIDER}: {error}", {**detail, "stage": stage, "reasons": [error]})
    return Failed(ErrorCode.provider_error, f"{PROVIDER}: {error}", detail)


def to_result(prediction: dict[str, Any], handle: dict[str, Any], poll_after: float) -> PollResult:
    status = prediction.get("status")
    if status == "succeeded":
        urls = output_urls(prediction.get("output"))
        if not urls:
            why = ("its outputs were deleted upstream (data_removed)" if prediction.get("data_removed")
                   else "it returned no file outputs")
            return Failed(ErrorCode.provider_error, f"{PROVIDER}: prediction succeeded but {why}",
                          {"prediction_id": prediction.get("id"), "output": prediction.get("output")})
        usage = dict(prediction.get("metrics") or {})
        return Done(outputs=[_ref(u) for u in urls], handle=handle, usage=usage)
    if status == "failed":
        return _failed(prediction)
    if status == "canceled":
        return Failed(ErrorCode.canceled, f"{PROVIDER}: prediction was canceled")
    if status == "aborted":
        return Failed(ErrorCode.timeout, f"{PROVIDER}: deadline passed before the run started")
    logs = prediction.get("logs")
    return Pending(handle=handle, poll_after=poll_after, progress=parse_progress(logs),
                   message=last_log_line(logs) or str(status or "starting"))


# -- errors --------------------------------------------------------------------------
def _error(resp: httpx.Response) -> ProviderError:
    exc = error_from_response(resp, PROVIDER)
    if resp.status_code == 429 and exc.retry_after is None:
        body = body_json(resp)
        m = _THROTTLE_SECONDS.search(str(body.get("detail", ""))) if isinstance(body, dict) else None
        exc.retry_after = float(m[1]) if m else 1.0
    return exc


def _origin(url: str) -> tuple[str, str, int | None]:
    u = httpx.URL(url)
    return u.scheme, u.host, u.port


def _check(resp: httpx.Response) -> dict[str, Any]:
    if not resp.is_success:
        raise _error(resp)
    body = body_json(resp)
    if not isinstance(body, dict) or not body.get("id"):
        raise ProviderError(ProviderErrorKind.retryable, f"{PROVIDER}: answered {resp.status_code} without a prediction",
                            detail=resp.text[:300])
    return body


def _same_create(prediction: dict[str, Any], model: str, body: dict[str, Any], started: float) -> bool:
    """Whether a listed prediction could be the one a create with `body` made at `started`
    (created no earlier than a few seconds before, for clock skew; same version or model)."""
    created = _epoch(prediction.get("created_at"))
    if created is None or created < started - 5:
        return False
    if body.get("version"):
        return str(prediction.get("version")) == str(body["version"]).rpartition(":")[2]
    return str(prediction.get("model")) == model.partition(":")[0]


def _epoch(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _as_error(failed: Failed) -> ProviderError:
    """A create that ended at once (sync mode) fails by raising: submit has no Failed."""
    if failed.code == ErrorCode.moderated:
        d = failed.detail or {}
        return moderated(failed.message, d.get("stage", "output"), d.get("reasons"))
    return ProviderError(ProviderErrorKind.failed, failed.message, detail=failed.detail, code=failed.code)


# -- the adapter ---------------------------------------------------------------------
class ReplicateAdapter(Adapter):
    # a create with Prefer: wait holds the answer up to 60 s, then the output may follow
    default_timeouts: ClassVar[dict[str, float]] = {**Adapter.default_timeouts, "create": 120.0}
    name = "replicate"
    # 1 s while a prediction is young (most images), then slower: a 10-minute video is not
    # asked about every second. 30 s at 1 s, 2 s by 90 s, 5 s from about 170 s.
    backoff = Backoff(hold=30.0, start=1.0, double_every=60.0, cap=5.0)
    # common inputs of Replicate's image/video/audio models; an operator adds a model's own
    # with the deployment option `provider_params`
    provider_params = {
        "image": frozenset({"go_fast", "guidance", "guidance_scale", "num_inference_steps", "megapixels",
                            "output_quality", "prompt_strength", "seed", "lora_scale", "negative_prompt"}),
        "video": frozenset({"go_fast", "guidance_scale", "num_inference_steps", "sample_shift", "negative_prompt",
                            "seed", "prompt_optimizer"}),
        "audio": frozenset({"temperature", "top_k", "top_p", "classifier_free_guidance", "seed"}),
    }

    _webhook_secret: str | None = None  # the account secret, fetched once per instance

    def _headers(self) -> dict[str, str]:
        return {**self.headers(), "Authorization": f"Bearer {self.api_key or ''}"}

    def _create_url_and_body(self, model: str) -> tuple[str, dict[str, Any]]:
        base = self.base_url(DEFAULT_BASE_URL)
        ref, _, version = model.partition(":")
        if version:
            return f"{base}/v1/predictions", {"version": version}
        if _VERSION_ID.match(ref):
            return f"{base}/v1/predictions", {"version": ref}
        if ref.count("/") != 1:
            raise ProviderError(ProviderErrorKind.invalid, f"{PROVIDER}: deployment model {model!r} is not owner/name[:version]",
                                fault=Fault.operator, resend_safe=True)
        return f"{base}/v1/models/{ref}/predictions", {}

    def _webhook_events(self) -> list[str]:
        events = self.deployment.options.get("webhook_events_filter") or DEFAULT_WEBHOOK_EVENTS
        bad = [e for e in events if e not in WEBHOOK_EVENTS]
        if bad:
            raise ProviderError(ProviderErrorKind.invalid, f"{PROVIDER}: webhook_events_filter {bad} not in {list(WEBHOOK_EVENTS)}",
                                fault=Fault.operator, resend_safe=True)
        return list(events)

    async def submit(self, request: ProviderRequest) -> SubmitResult:
        model = request.provider_model
        url, body = self._create_url_and_body(model)
        body["input"] = build_input(model, request.modality, request.input)
        if request.callback_url:
            body["webhook"] = request.callback_url
            body["webhook_events_filter"] = self._webhook_events()
        headers = self._headers()
        timeout: float | None = None
        wait = self.deployment.options.get("sync_wait")
        if isinstance(wait, int | float) and not isinstance(wait, bool) and wait > 0:
            seconds = max(1, min(MAX_SYNC_WAIT, int(wait)))
            headers["Prefer"] = f"wait={seconds}"
            timeout = seconds + 15.0  # the request is held open up to N s by design
        kwargs: dict[str, Any] = {"json": body, "headers": headers}
        if timeout is not None:
            kwargs["timeout"] = timeout
        started = time.time()
        try:
            resp = await send(self.http, "POST", url, provider=PROVIDER, create=True, **kwargs)
            prediction = _check(resp)
        except ProviderError as exc:
            if not (exc.retryable and not exc.resend_safe):
                raise
            # the create may have started a prediction (a 502/504 or a timeout after sending)
            prediction = await self._interrupted(model, body, request.callback_url, started, exc)
        handle = self._handle(prediction, model)
        result = to_result(prediction, handle, self.poll_interval(POLL_SECONDS))
        if isinstance(result, Failed):
            raise _as_error(result)
        return result

    def _handle(self, prediction: dict[str, Any], model: str) -> dict[str, Any]:
        base = self.base_url(DEFAULT_BASE_URL)
        pid = str(prediction["id"])
        urls = prediction.get("urls") or {}

        def own(url: Any, fallback: str) -> str:
            # urls.get/cancel are used when they are on our base URL's origin; otherwise
            # (a proxy in front of Replicate) the official clients' path on our base, so
            # the bearer token never goes to a host the deployment did not name
            if isinstance(url, str) and _origin(url) == _origin(base):
                return url
            return fallback

        return {
            "id": pid,
            "model": model,
            "get": own(urls.get("get"), f"{base}/v1/predictions/{pid}"),
            "cancel": own(urls.get("cancel"), f"{base}/v1/predictions/{pid}/cancel"),
            "web": urls.get("web"),
        }

    async def _interrupted(self, model: str, body: dict[str, Any], reference: str | None, started: float,
                           exc: ProviderError) -> dict[str, Any]:
        """A create whose outcome is unknown. Replicate has no idempotency key, so look among
        the account's newest predictions (GET /v1/predictions) for the one it may have made:

        - found by its webhook (our callback URL names the job): that is this job's
          prediction, proven; it is adopted (returned) and nothing is sent again;
        - found only by the same model and input, exactly one, created since the create
          started: not proof enough to adopt, so it is canceled (it would run, and bill the
          operator, for nobody) and `exc` is raised;
        - nothing found (or the list fails): `exc` is raised; a prediction created after
          the lookup cannot be seen, so the create is still not resent.
        """
        url = f"{self.base_url(DEFAULT_BASE_URL)}/v1/predictions"
        try:
            resp = await send(self.http, "GET", url, provider=PROVIDER, headers=self._headers())
            listed = body_json(resp) if resp.is_success else None
        except ProviderError:
            listed = None
        results = listed.get("results") if isinstance(listed, dict) else None
        if not isinstance(results, list):
            raise exc
        same = [p for p in results if isinstance(p, dict) and p.get("id") and _same_create(p, model, body, started)]
        if reference is not None:
            mine = [p for p in same if p.get("webhook") == reference]
            if mine:
                return mine[0]
        matches = [p for p in same if p.get("input") == body.get("input") and p.get("status") not in _TERMINAL]
        if len(matches) == 1:
            handle = self._handle(matches[0], model)
            try:
                await self.cancel(handle)
            except ProviderError:
                raise exc from None
            exc.message = f"{exc.message}; prediction {handle['id']} it had started was canceled"
            exc.args = (exc.message,)
            exc.detail = {**(exc.detail if isinstance(exc.detail, dict) else {"error": exc.detail}),
                          "canceled_prediction": handle["id"]}
        raise exc

    async def poll(self, handle: dict[str, Any]) -> PollResult:
        resp = await send(self.http, "GET", handle["get"], provider=PROVIDER, headers=self._headers())
        if resp.status_code == 404:
            # an id we created that Replicate no longer knows: nothing left to wait for
            return Failed(ErrorCode.provider_error, f"{PROVIDER}: prediction {handle.get('id')} not found",
                          {"status": 404, "body": body_json(resp)})
        return to_result(_check(resp), handle, self.poll_interval(POLL_SECONDS))

    async def cancel(self, handle: dict[str, Any]) -> None:
        resp = await send(self.http, "POST", handle["cancel"], provider=PROVIDER, headers=self._headers())
        if not resp.is_success and resp.status_code != 404:
            raise _error(resp)

    # -- webhooks --------------------------------------------------------------------
    async def webhook_secret(self) -> str:
        configured = self.deployment.options.get("webhook_secret")
        if configured:
            return str(configured)
        if self._webhook_secret is None:
            url = f"{self.base_url(DEFAULT_BASE_URL)}/v1/webhooks/default/secret"
            resp = await send(self.http, "GET", url, provider=PROVIDER, headers=self._headers())
            if not resp.is_success:
                raise _error(resp)
            body = body_json(resp)
            key = body.get("key") if isinstance(body, dict) else None
            if not isinstance(key, str) or not key:
                raise ProviderError(ProviderErrorKind.retryable, f"{PROVIDER}: webhook secret response has no key")
            self._webhook_secret = key
        return self._webhook_secret

    async def verify_callback(
        self, headers: dict[str, str], body: bytes, handle: dict[str, Any], secret: str | None
    ) -> PollResult | None:
        """`secret` (a per-job secret) is unused: Replicate signs with the account secret."""
        verify_signature(await self.webhook_secret(), headers, body)
        try:
            prediction = json.loads(body)
        except ValueError:
            prediction = None
        if not isinstance(prediction, dict):
            raise ProviderError(ProviderErrorKind.auth, f"{PROVIDER}: webhook body is not a prediction")
        if handle.get("id") and prediction.get("id") != handle["id"]:
            raise ProviderError(ProviderErrorKind.auth, f"{PROVIDER}: webhook is for another prediction")
        if prediction.get("status") not in _TERMINAL and not parse_progress(prediction.get("logs")):
            return None  # a start event without progress changes nothing
        return to_result(prediction, handle, self.poll_interval(POLL_SECONDS))


def verify_signature(secret: str, headers: dict[str, str], body: bytes, *, now: float | None = None) -> None:
    """Standard Webhooks verification; ProviderError(auth) on any mismatch."""
    h = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, signatures = h.get("webhook-id"), h.get("webhook-timestamp"), h.get("webhook-signature")
    if not (msg_id and stamp and signatures):
        raise ProviderError(ProviderErrorKind.auth, f"{PROVIDER}: webhook signature headers missing")
    try:
        sent_at = int(stamp)
    except ValueError:
        raise ProviderError(ProviderErrorKind.auth, f"{PROVIDER}: bad webhook-timestamp") from None
    if abs((now if now is not None else time.time()) - sent_at) > WEBHOOK_TOLERANCE:
        raise ProviderError(ProviderErrorKind.auth, f"{PROVIDER}: webhook timestamp outside the 5 min window (replay?)")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_") + "==")
    except binascii.Error as exc:
        raise ProviderError(ProviderErrorKind.auth, f"{PROVIDER}: webhook secret is not base64") from exc
    # signed over the timestamp exactly as sent, and the raw body bytes
    expected = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    for entry in signatures.split():
        version, _, sig = entry.partition(",")
        try:
            given = base64.b64decode(sig, validate=True)
        except binascii.Error:
            continue
        if version == "v1" and hmac.compare_digest(expected, given):
            return
    raise ProviderError(ProviderErrorKind.auth, f"{PROVIDER}: webhook signature does not match")
