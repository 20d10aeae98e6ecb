"""OpenAI: GPT Image / DALL·E, Sora 2 videos, speech and chat over httpx.

Wire format (base `https://api.openai.com/v1`, `Authorization: Bearer <key>`):

    image  POST /images/generations  JSON  -> {created, data:[{b64_json|url}], usage?}
           POST /images/edits        multipart: image | image[] (+ mask), same answer
    video  POST /videos              JSON, or multipart when an input_reference is sent
             -> {id, status:"queued", progress:0, ...}
           GET  /videos/{id}         queued -> in_progress (progress 0-100) -> completed | failed
           GET  /videos/{id}/content[?variant=thumbnail]   binary, needs the key
    audio  POST /audio/speech        JSON -> raw audio bytes (chunked)
    text   POST /chat/completions    JSON, or SSE `data: {...}` lines until `data: [DONE]`

    errors {"error": {"message", "type", "param", "code"}}:
      400 code moderation_blocked (moderation_details.moderation_stage) -> moderated
      429 code insufficient_quota -> quota (never retried); other 429 -> rate_limited
      5xx -> retryable unless `x-should-retry: false`; 401/403 -> auth

Images, speech and chat answer synchronously, so submit returns Done. Videos return
Pending with the video id as the handle. OpenAI takes no per-request webhook URL (video
webhooks are configured per project), so `callback_url` is ignored; a project webhook
(`video.completed` / `video.failed`, Standard Webhooks signature) is verified by
`verify_callback` with the project's secret.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, overload

import httpx

from adapters.base import Adapter
from adapters.http import body_json, error_from_response, moderated, send, send_stream, unsupported
from core import params
from core.errors import ErrorCode, Fault, ProviderError, ProviderErrorKind
from core.types import Done, Failed, OutputRef, Pending, PollResult, ProviderRequest, SubmitResult

DEFAULT_BASE_URL = "https://api.openai.com/v1"
VIDEO_POLL_SECONDS = 10.0  # OpenAI's guide polls every 10-20 s; renders take minutes
MAX_INPUT_IMAGE_BYTES = 50 * 2**20  # the edits endpoint's own per-image limit
SPEECH_CHUNK_BYTES = 256 * 1024
WEBHOOK_TOLERANCE_SECONDS = 300
DEFAULT_RATE_LIMIT_WAIT = 5.0  # a 429 that names no wait (option rate_limit_wait overrides)
MAX_CONTENT_JSON_BYTES = 2**20  # a relay's JSON /content answer (a link, not the video)
VIDEO_SIZE_MODES = ("pixels", "ratio", "none")  # deployment option video_size (see video_fields)


# -- capabilities -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageModel:
    sizes: tuple[str, ...]
    max_n: int
    gpt_image: bool  # always b64, takes output_format/background, reports usage
    qualities: tuple[str, ...]
    max_input_images: int  # 0: no edits endpoint for this model


_GPT_IMAGE = ImageModel(("1024x1024", "1536x1024", "1024x1536"), 10, True, ("low", "medium", "high", "auto"), 16)
IMAGE_MODELS: dict[str, ImageModel] = {
    "gpt-image-1": _GPT_IMAGE,
    "gpt-image-1-mini": _GPT_IMAGE,
    "dall-e-3": ImageModel(("1024x1024", "1792x1024", "1024x1792"), 1, False, ("standard", "hd"), 0),
    "dall-e-2": ImageModel(("256x256", "512x512", "1024x1024"), 10, False, ("standard",), 1),
}
BACKGROUNDS = ("transparent", "opaque", "auto")

# (resolution, aspect_ratio) -> Sora size; 1792x1024 is sora-2-pro's high tier ("1024p")
_SORA_720 = {("720p", "16:9"): "1280x720", ("720p", "9:16"): "720x1280"}
_SORA_PRO = _SORA_720 | {("1024p", "16:9"): "1792x1024", ("1024p", "9:16"): "1024x1792"}
VIDEO_MODELS: dict[str, dict[tuple[str, str], str]] = {"sora-2": _SORA_720, "sora-2-pro": _SORA_PRO}
VIDEO_SECONDS = ("4", "8", "12")

_TTS1_VOICES = ("alloy", "ash", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer")
_MINI_TTS_VOICES = (*_TTS1_VOICES, "ballad", "verse", "marin", "cedar")
SPEECH_VOICES: dict[str, tuple[str, ...]] = {
    "tts-1": _TTS1_VOICES,
    "tts-1-hd": _TTS1_VOICES,
    "gpt-4o-mini-tts": _MINI_TTS_VOICES,
}
SPEECH_INSTRUCTIONS = frozenset({"gpt-4o-mini-tts"})  # tts-1(-hd) refuse `instructions`
AUDIO_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",  # Opus in an Ogg container
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",  # raw 24 kHz 16-bit little-endian mono
}
IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_MODERATION_CODES = frozenset({"moderation_blocked", "content_policy_violation"})
# A refusal without a moderation code: OpenAI's chat refuses a flagged prompt as 400
# "invalid_prompt" ("Invalid prompt: your prompt was flagged as potentially violating our
# usage policy"); OpenAI-compatible hosts (SiliconFlow and others) answer a 400 whose
# message says the content holds sensitive words.
_FLAGGED = re.compile(r"flagged as potentially violating|usage polic|safety system|sensitive (?:words|content)"
                      r"|content (?:policy|moderation)", re.IGNORECASE)


def is_gpt_image(model: str) -> bool:
    return model.startswith(("gpt-image", "chatgpt-image"))


# -- the adapter --------------------------------------------------------------------


class OpenAIAdapter(Adapter):
    """OpenAI's own API. Deployment options: `auth_header` / `auth_scheme` (defaults
    `Authorization` / `Bearer`), `organization`, `project`, `headers`, `poll_interval`,
    `webhook_secret_env` (env var with the project's `whsec_` webhook secret). For
    OpenAI-style `/videos` relays (CometAPI, DMXAPI, poloapi; docs/adapters/openai.md):
    `video_size` (pixels | ratio | none), `video_multipart`, `video_statuses` (extra status
    names), `video_content: json` (/content answers a link), `video_thumbnail: false`."""
    # GPT Image at high quality takes over a minute to answer its (synchronous) create
    default_timeouts: ClassVar[dict[str, float]] = {**Adapter.default_timeouts, "create": 300.0}

    name = "openai"
    default_base_url: str | None = DEFAULT_BASE_URL
    provider_params = {
        "image": frozenset({"quality", "background", "moderation", "output_compression", "input_fidelity", "mask",
                            "size", "style", "response_format"}),
        "video": frozenset({"size"}),
        "audio": frozenset({"speed", "instructions"}),
        "text": params.CHAT,
    }

    # -- plumbing ---------------------------------------------------------------------
    def url(self, path: str) -> str:
        if self.default_base_url is None and not self.deployment.base_url:
            raise ProviderError(ProviderErrorKind.invalid, f"deployment {self.deployment.name!r} needs a base_url",
                                fault=Fault.operator, resend_safe=True)
        return self.base_url(self.default_base_url or "") + path

    def auth_headers(self) -> dict[str, str]:
        """The key in the deployment's header and scheme (aggregators differ), plus any
        extra headers; also sent with authenticated output downloads."""
        opts = self.deployment.options
        header = str(opts.get("auth_header") or "Authorization")
        scheme = str(opts.get("auth_scheme", "Bearer") or "")
        out = self.headers()
        if self.api_key:
            out[header] = f"{scheme} {self.api_key}" if scheme else self.api_key
        if opts.get("organization"):
            out["OpenAI-Organization"] = str(opts["organization"])
        if opts.get("project"):
            out["OpenAI-Project"] = str(opts["project"])
        return out

    async def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        resp = await send(self.http, "POST", self.url(path), provider=self.name, create=True, headers=self.auth_headers(), **kwargs)
        try:
            check(resp, self.name)
        except ProviderError as exc:
            if exc.kind is ProviderErrorKind.rate_limited and exc.retry_after is None:
                # OpenAI always says when; relays (new-api based: CometAPI, DMXAPI) send no Retry-After
                wait = self.deployment.options.get("rate_limit_wait")
                exc.retry_after = float(wait) if isinstance(wait, int | float) and wait > 0 else DEFAULT_RATE_LIMIT_WAIT
            raise
        return resp

    # -- protocol ---------------------------------------------------------------------
    async def submit(self, request: ProviderRequest) -> SubmitResult:
        model = request.provider_model or self.deployment.model
        if request.modality == "image":
            return await self._image(model, request.input)
        if request.modality == "video":
            return await self._video(model, request.input)
        if request.modality == "audio":
            return await self._speech(model, request.input)
        if request.modality == "text":
            return await self._text(request.input)
        raise ProviderError(ProviderErrorKind.invalid, f"{self.name} has no {request.modality} endpoint", code=ErrorCode.invalid_input)

    async def poll(self, handle: dict[str, Any]) -> PollResult:
        if handle.get("kind") != "video":  # images, speech and chat finish inside submit
            return Failed(ErrorCode.internal, f"{self.name}: a {handle.get('kind')} handle has nothing to poll")
        resp = await send(self.http, "GET", self.url(f"/videos/{handle['video_id']}"), provider=self.name, headers=self.auth_headers())
        if resp.status_code == 404:
            return Failed(ErrorCode.provider_error, f"{self.name}: video {handle['video_id']} is gone (deleted or expired)")
        check(resp, self.name)
        video = resp.json()
        if (self._video_status(video) == "completed" and not _link(video.get("video_url"))
                and self.deployment.options.get("video_content") == "json"):
            # a relay whose /content answers JSON with the link (poloapi), not the bytes
            video = {**video, "video_url": await self._content_link(handle)}
        return self._video_result(handle, video)

    async def cancel(self, handle: dict[str, Any]) -> None:
        """OpenAI cannot stop a render: `DELETE /videos/{id}` deletes a finished video's
        assets, it does not cancel one in flight, and images/speech/chat finish inside
        submit. So there is nothing to ask; the job is canceled on our side only."""
        return None

    async def verify_callback(
        self, headers: dict[str, str], body: bytes, handle: dict[str, Any], secret: str | None
    ) -> PollResult | None:
        """A project webhook (`video.completed` / `video.failed`), signed per Standard
        Webhooks with the project's secret. The event carries only the id, so the
        video is then read once, as a poll would."""
        key = secret or os.environ.get(str(self.deployment.options.get("webhook_secret_env") or ""), "")
        if not key:
            raise ProviderError(ProviderErrorKind.auth, f"{self.name}: no webhook secret configured")
        verify_standard_webhook(headers, body, key)
        try:
            event = json.loads(body)
        except ValueError as exc:
            raise ProviderError(ProviderErrorKind.invalid, f"{self.name}: webhook body is not JSON") from exc
        video_id = (event.get("data") or {}).get("id")
        if not str(event.get("type", "")).startswith("video.") or video_id != handle.get("video_id"):
            return None  # another event or another video: nothing changes for this job
        return await self.poll(handle)

    # -- images -----------------------------------------------------------------------
    async def _image(self, model: str, inp: dict[str, Any]) -> Done:
        fields = image_fields(model, inp)
        images = inp.get("input_images") or []
        params = dict(inp.get("provider_params") or {})
        mask = params.pop("mask", None)
        if images:
            files = [await self._read_image(ref) for ref in images]
            part = "image" if len(files) == 1 else "image[]"  # as the official SDK names them
            multipart = [(part, (f"image{i}.{ext_of(ct)}", data, ct)) for i, (data, ct) in enumerate(files)]
            if mask is not None:
                data, ct = await self._read_image(str(mask), "mask")
                multipart.append(("mask", (f"mask.{ext_of(ct)}", data, ct)))
            resp = await self._post("/images/edits", data=form_values(fields), files=multipart)
        else:
            resp = await self._post("/images/generations", json=fields)
        body = resp.json()
        fmt = str(body.get("output_format") or fields.get("output_format") or "png")
        outputs = [image_output(item, fmt) for item in body.get("data") or []]
        if not outputs:
            raise ProviderError(ProviderErrorKind.failed, f"{self.name}: the image answer holds no images", detail=body)
        usage = dict(body.get("usage") or {})
        return Done(outputs=outputs, handle={"kind": "image", "model": model, "created": body.get("created")}, usage=usage)

    async def _read_image(self, ref: str, what: str = "input image") -> tuple[bytes, str]:
        """An input image as bytes: data: URIs decoded, URLs downloaded (OpenAI's edits
        endpoint takes uploads, not links)."""
        if ref.startswith("data:"):
            return decode_data_uri(ref)
        data = await self.fetch_input(ref, what=what, max_bytes=MAX_INPUT_IMAGE_BYTES)
        return data, sniff_image(data)  # the bytes, not the tenant server's content-type

    # -- videos -----------------------------------------------------------------------
    async def _video(self, model: str, inp: dict[str, Any]) -> Pending:
        opts = self.deployment.options
        size_mode = str(opts.get("video_size") or "pixels")
        if size_mode not in VIDEO_SIZE_MODES:
            raise ProviderError(ProviderErrorKind.invalid, f"deployment {self.deployment.name!r}: option video_size must be one "
                                f"of {list(VIDEO_SIZE_MODES)}, not {size_mode!r}", fault=Fault.operator, resend_safe=True)
        fields = video_fields(model, inp, size_mode)
        if inp.get("image") or opts.get("video_multipart"):
            files: list[tuple[str, tuple[str | None, Any, str] | tuple[None, str]]] = []
            if inp.get("image"):
                data, ct = await self._read_image(inp["image"])
                files.append(("input_reference", (f"reference.{ext_of(ct)}", data, ct)))
            # plain form parts too, so the body is multipart even without a file
            files += [(k, (None, v)) for k, v in form_values(fields).items()]
            resp = await self._post("/videos", files=files)
        else:
            resp = await self._post("/videos", json=fields)
        video = resp.json()
        handle = {"kind": "video", "video_id": video["id"], "model": model}
        result = self._video_result(handle, video)
        if isinstance(result, Pending):
            return result
        # a create that answers a finished video at once: only a refusal makes sense there
        kind = ProviderErrorKind.moderated if isinstance(result, Failed) and result.code == ErrorCode.moderated else ProviderErrorKind.failed
        message = result.message if isinstance(result, Failed) else f"{self.name}: unexpected video status {video.get('status')!r}"
        raise ProviderError(kind, message, detail=result.detail if isinstance(result, Failed) else video)

    def _video_status(self, video: dict[str, Any]) -> Any:
        """The video's status in OpenAI's names; a relay's own (poloapi's `processing`) are
        mapped by the deployment option `video_statuses: {processing: in_progress}`."""
        names = self.deployment.options.get("video_statuses") or {}
        status = video.get("status")
        return names.get(status, status) if isinstance(names, dict) and isinstance(status, str) else status

    async def _content_link(self, handle: dict[str, Any]) -> str | None:
        """The link a relay's JSON `/content` answers (`video_url` or `url`); None when it
        answers the bytes after all (then they are downloaded from /content as usual).
        Streamed, so bytes are never read here."""
        request = self.http.build_request("GET", self.url(f"/videos/{handle['video_id']}/content"), headers=self.auth_headers())
        resp = await send_stream(self.http, request, provider=self.name, create=False)
        try:
            if not resp.is_success:
                await resp.aread()
                check(resp, self.name)
            if "json" not in resp.headers.get("content-type", ""):
                return None
            raw = b""
            async for chunk in resp.aiter_bytes():
                raw += chunk
                if len(raw) > MAX_CONTENT_JSON_BYTES:
                    raise ProviderError(ProviderErrorKind.failed, f"{self.name}: the JSON /content answer is too large")
        except httpx.TransportError as exc:
            raise ProviderError(ProviderErrorKind.retryable, f"{self.name}: /content broke ({type(exc).__name__})") from exc
        finally:
            await resp.aclose()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        link = next((body[k] for k in ("video_url", "url") if isinstance(body, dict) and _link(body.get(k))), None)
        if link is None:
            raise ProviderError(ProviderErrorKind.failed, f"{self.name}: /content answered JSON without a video_url",
                                detail={"body": body if body is not None else raw[:500].decode(errors="replace")})
        return str(link)

    def _video_result(self, handle: dict[str, Any], video: dict[str, Any]) -> PollResult:
        status = self._video_status(video)
        progress = video.get("progress")
        fraction = max(0.0, min(1.0, float(progress) / 100)) if isinstance(progress, int | float) else None
        if status in ("queued", "in_progress"):
            return Pending(handle=handle, poll_after=self.poll_interval(VIDEO_POLL_SECONDS), progress=fraction, message=status)
        if status == "failed":
            return video_failure(video.get("error") or {})
        if status != "completed":
            return Failed(ErrorCode.provider_error, f"{self.name}: unknown video status {status!r}", detail=video)
        expires = video.get("expires_at")
        if isinstance(expires, int | float) and expires <= time.time():
            return Failed(ErrorCode.provider_error, f"{self.name}: video {video['id']} expired before it was fetched")
        # the reply's `model` may name the relay's backend (CometAPI: veo3-fast -> veo_3_1-fast): kept in usage
        usage = {k: video[k] for k in ("model", "seconds", "size") if video.get(k) is not None}
        if _link(video.get("video_url")):
            # a relay's CDN link (CometAPI, poloapi): no key goes with it; storage fetches it now
            return Done(outputs=[OutputRef(url=str(video["video_url"]), content_type="video/mp4")], handle=handle, usage=usage)
        content = self.url(f"/videos/{handle['video_id']}/content")
        auth = self.auth_headers()
        outputs = [OutputRef(url=content, headers=auth, content_type="video/mp4")]
        if self.deployment.options.get("video_thumbnail", True) is not False:
            outputs.append(OutputRef(url=content + "?variant=thumbnail", headers=auth, content_type="image/webp", role="thumbnail"))
        return Done(outputs=outputs, handle=handle, usage=usage)

    # -- speech -----------------------------------------------------------------------
    async def _speech(self, model: str, inp: dict[str, Any]) -> Done:
        fields = speech_fields(model, inp)
        fmt = str(fields.get("response_format", "mp3"))
        request = self.http.build_request("POST", self.url("/audio/speech"), json=fields, headers=self.auth_headers())
        resp = await open_stream(self.http, request, self.name)
        try:
            if not resp.is_success:
                await resp.aread()
                check(resp, self.name)
            path = await stream_to_tempfile(resp, self.name)
        finally:
            await resp.aclose()
        ct = resp.headers.get("content-type", "").split(";")[0].strip() or AUDIO_TYPES.get(fmt, "application/octet-stream")
        usage = {"model": model, "input_characters": len(fields["input"])}  # billed per character; no usage in the answer
        return Done(outputs=[OutputRef(path=path, content_type=ct)], handle={"kind": "audio", "model": model}, usage=usage)

    # -- chat -------------------------------------------------------------------------
    async def _text(self, inp: dict[str, Any]) -> Done:
        body = {k: v for k, v in inp.items() if k != "provider_params"} | dict(inp.get("provider_params") or {})
        completion = await self.chat(body, stream=False)
        data = json.dumps(completion).encode()
        return Done(
            outputs=[OutputRef(data=data, content_type="application/json")],
            handle={"kind": "text", "id": completion.get("id")},
            usage=dict(completion.get("usage") or {}),
        )

    @overload
    async def chat(self, body: dict[str, Any], *, stream: Literal[False]) -> dict[str, Any]: ...
    @overload
    async def chat(self, body: dict[str, Any], *, stream: Literal[True]) -> AsyncIterator[dict[str, Any]]: ...
    @overload
    async def chat(self, body: dict[str, Any], *, stream: bool) -> dict[str, Any] | AsyncIterator[dict[str, Any]]: ...

    async def chat(self, body: dict[str, Any], *, stream: bool) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        """A chat completion. The deployment's model id replaces the body's (which names
        our public alias). With stream=True the HTTP status is checked before this
        returns, so errors raise here, and the iterator yields parsed chunks (the usage
        chunk included: `stream_options.include_usage` is on unless the body says not)."""
        try:
            return await self._chat(body, stream=stream)
        except ProviderError as exc:
            # a chat call leaves no task behind to run on: a 5xx answer may go elsewhere
            if exc.retryable and isinstance(exc.detail, dict) and "status" in exc.detail:
                exc.resend_safe = True
            raise

    async def _chat(self, body: dict[str, Any], *, stream: bool) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        payload = {**body, "model": self.deployment.model, "stream": stream}
        if not stream:
            return dict((await self._post("/chat/completions", json=payload)).json())
        if self.deployment.options.get("stream_usage", True):
            payload.setdefault("stream_options", {"include_usage": True})
        request = self.http.build_request("POST", self.url("/chat/completions"), json=payload, headers=self.auth_headers())
        resp = await open_stream(self.http, request, self.name)
        if not resp.is_success:
            try:
                await resp.aread()
            finally:
                await resp.aclose()
            check(resp, self.name)
        return sse_chunks(resp, self.name)


# -- parameter mapping --------------------------------------------------------------


def image_fields(model: str, inp: dict[str, Any]) -> dict[str, Any]:
    """Our image input -> the generations/edits fields; refuses what the model cannot do."""
    caps = IMAGE_MODELS.get(model)
    # mask is a file part (see _image); streaming partial images is for UIs, we store the final one
    params = {k: v for k, v in (inp.get("provider_params") or {}).items() if k not in ("mask", "stream", "partial_images")}
    fields: dict[str, Any] = {"model": model, "prompt": inp["prompt"]}
    n = int(inp.get("n", 1))
    fmt = inp.get("output_format", "png")
    gpt = is_gpt_image(model)
    if caps is not None:
        if inp.get("negative_prompt"):
            raise unsupported("negative_prompt", inp["negative_prompt"], "none (OpenAI images take no negative prompt)", model)
        if inp.get("seed") is not None:
            raise unsupported("seed", inp["seed"], "none (OpenAI images take no seed)", model)
        if n > caps.max_n:
            raise unsupported("n", n, f"1..{caps.max_n}", model)
        if inp.get("input_images") and caps.max_input_images == 0:
            raise unsupported("input_images", f"{len(inp['input_images'])} images", "none (no edits endpoint)", model)
        if len(inp.get("input_images") or []) > max(caps.max_input_images, 1):
            raise unsupported("input_images", f"{len(inp['input_images'])} images", f"at most {caps.max_input_images}", model)
        if not caps.gpt_image and fmt != "png":
            raise unsupported("output_format", fmt, ["png"], model)
        size = inp.get("size") or (nearest_size(inp["aspect_ratio"], caps.sizes) if inp.get("aspect_ratio") else None)
        allowed_sizes = [*caps.sizes, "auto"] if caps.gpt_image else list(caps.sizes)
        size = params.pop("size", size)
        if size is not None and size not in allowed_sizes:
            raise unsupported("size", size, allowed_sizes, model)
        if params.get("quality") is not None and params["quality"] not in caps.qualities:
            raise unsupported("quality", params["quality"], list(caps.qualities), model)
        if gpt and params.get("background") is not None:
            if params["background"] not in BACKGROUNDS:
                raise unsupported("background", params["background"], list(BACKGROUNDS), model)
            if params["background"] == "transparent" and fmt == "jpeg":
                raise unsupported("output_format", fmt, ["png", "webp"], model)
        if not gpt and params.get("background") is not None:
            raise unsupported("background", params["background"], "none (gpt-image models only)", model)
    else:  # unknown model (aggregators): map what we can, let the provider decide the rest
        size = params.pop("size", inp.get("size"))
        if size is None and inp.get("aspect_ratio"):
            fields["aspect_ratio"] = inp["aspect_ratio"]
        for key in ("negative_prompt", "seed"):
            if inp.get(key) is not None:
                fields[key] = inp[key]
    if gpt and "response_format" in params:
        # gpt-image always answers b64_json; the real API 400s on the field
        raise unsupported("response_format", params["response_format"], "none (gpt-image always returns b64_json)", model)
    if size is not None:
        fields["size"] = size
    if n != 1:
        fields["n"] = n
    if gpt or (caps is None and fmt != "png"):
        fields["output_format"] = fmt
    if caps is not None and not gpt:
        # b64 by default: the bytes arrive with the answer and cannot expire
        fields["response_format"] = "b64_json"
    return fields | params


def nearest_size(ratio: str, sizes: tuple[str, ...]) -> str:
    """The allowed size whose shape is closest to W:H (log distance); ties: the larger."""
    a, b = (int(x) for x in ratio.split(":"))
    want = math.log(a / b)

    def score(size: str) -> tuple[float, int]:
        w, h = (int(x) for x in size.split("x"))
        return abs(math.log(w / h) - want), -w * h

    return min(sizes, key=score)


def video_fields(model: str, inp: dict[str, Any], size_mode: str = "pixels") -> dict[str, Any]:
    """Our video input -> Sora's create fields (`seconds` as a string, `size` from
    aspect_ratio + resolution). `size_mode` (deployment option `video_size`): `pixels`,
    Sora's WxH; `ratio`, the aspect ratio as a relay's orientation hint (16:9 -> `16x9`,
    CometAPI's Veo); `none`, no size unless provider_params.size. Outside `pixels` a
    provider_params.size is sent untouched, never checked against Sora's sizes."""
    table = VIDEO_MODELS.get(model)
    params = dict(inp.get("provider_params") or {})
    for key, why in (("negative_prompt", "no negative prompt"), ("seed", "no seed"), ("fps", "a fixed frame rate")):
        if table is not None and inp.get(key) is not None:
            raise unsupported(key, inp[key], f"none (Sora takes {why})", model)
    duration = float(inp.get("duration_seconds", 4))
    seconds = str(int(duration)) if duration.is_integer() else str(duration)
    if table is not None and seconds not in VIDEO_SECONDS:
        raise unsupported("duration_seconds", duration, [float(s) for s in VIDEO_SECONDS], model)
    shape = (str(inp.get("resolution", "720p")), str(inp.get("aspect_ratio", "16:9")))
    explicit = params.pop("size", None)  # provider_params.size wins over the mapping
    if size_mode != "pixels":
        size = explicit if explicit is not None else (shape[1].replace(":", "x") if size_mode == "ratio" else None)
    elif table is None:
        size = explicit or _SORA_PRO.get(shape)
    elif explicit is not None:
        if explicit not in table.values():
            raise unsupported("size", explicit, sorted(table.values()), model)
        size = explicit
    else:
        size = table.get(shape)
        if size is None:
            ratios = sorted({r for _, r in table})
            if shape[1] not in ratios:
                raise unsupported("aspect_ratio", shape[1], ratios, model)
            raise unsupported("resolution", shape[0], sorted({res for res, _ in table}), model)
    fields: dict[str, Any] = {"model": model, "prompt": inp["prompt"]}
    if table is not None or inp.get("duration_seconds") is not None:  # another model's default is its own
        fields["seconds"] = seconds
    if size is not None:
        fields["size"] = size
    return fields | params


def speech_fields(model: str, inp: dict[str, Any]) -> dict[str, Any]:
    voices = SPEECH_VOICES.get(model)
    params = dict(inp.get("provider_params") or {})
    text = inp.get("text") or inp.get("prompt") or ""
    voice = inp.get("voice") or "alloy"
    fmt = inp.get("format", "mp3")
    if voices is not None:
        if voice not in voices:
            raise unsupported("voice", voice, list(voices), model)
        if inp.get("duration_seconds") is not None:
            raise unsupported("duration_seconds", inp["duration_seconds"], "none (speech length follows the text)", model)
        if inp.get("seed") is not None:
            raise unsupported("seed", inp["seed"], "none (OpenAI speech takes no seed)", model)
        if params.get("instructions") and model not in SPEECH_INSTRUCTIONS:
            raise unsupported("instructions", params["instructions"], f"only on {sorted(SPEECH_INSTRUCTIONS)}", model)
        speed = params.get("speed")
        if speed is not None and not (isinstance(speed, int | float) and 0.25 <= speed <= 4.0):
            raise unsupported("speed", speed, "0.25..4.0", model)
    if fmt not in AUDIO_TYPES:
        raise unsupported("format", fmt, list(AUDIO_TYPES), model)
    # `stream_format: sse` would turn the body into events; we store raw audio
    params.pop("stream_format", None)
    return {"model": model, "input": text, "voice": voice, "response_format": fmt} | params


def form_values(fields: dict[str, Any]) -> dict[str, str]:
    """Multipart form fields are strings; JSON spelling for booleans and numbers."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items() if v is not None}


# -- results and errors -------------------------------------------------------------


def image_output(item: dict[str, Any], fmt: str) -> OutputRef:
    ct = IMAGE_TYPES.get(fmt, "image/png")
    if item.get("b64_json"):
        try:
            return OutputRef(data=base64.b64decode(item["b64_json"], validate=True), content_type=ct)
        except (binascii.Error, ValueError) as exc:
            raise ProviderError(ProviderErrorKind.failed, "OpenAI answered an image that is not base64") from exc
    if item.get("url"):
        # dall-e URLs expire after about an hour: storage fetches this at once
        return OutputRef(url=str(item["url"]), content_type=ct)
    raise ProviderError(ProviderErrorKind.failed, "OpenAI answered an image with neither b64_json nor url", detail=item)


def _link(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("https://", "http://"))


def video_failure(error: dict[str, Any]) -> Failed:
    code = str(error.get("code") or "")
    message = str(error.get("message") or "the video failed")
    if code in _MODERATION_CODES or "moderation" in code:
        return Failed(ErrorCode.moderated, f"OpenAI: {message}", detail={"stage": "output", "reasons": [code], "error": error})
    return Failed(ErrorCode.provider_error, f"OpenAI: {message}", detail=error)


def check(resp: httpx.Response, provider: str) -> None:
    """OpenAI's own error bodies first (moderation, quota), then the generic mapping."""
    if resp.is_success:
        return
    from adapters.siliconflow import flat_error  # SiliconFlow's flat {code, message} / bare-string bodies

    if (flat := flat_error(resp, provider)) is not None:
        raise flat
    err = body_json(resp)
    err = err.get("error") if isinstance(err, dict) else None
    if isinstance(err, dict):
        code = str(err.get("code") or "")
        message = f"{provider}: {err.get('message') or code}"
        flagged = resp.status_code == 400 and bool(_FLAGGED.search(str(err.get("message") or "")))
        if code in _MODERATION_CODES or (flagged and code not in ("insufficient_quota", "invalid_api_key")):
            details = err.get("moderation_details") or {}
            stage = "output" if details.get("moderation_stage") == "output" else "input"
            raise moderated(message, stage, [str(c) for c in details.get("categories") or []] or [code])
        if code == "insufficient_quota":
            # a billing failure dressed as 429: retrying cannot help, on this deployment
            raise ProviderError(ProviderErrorKind.quota, message, detail={"status": resp.status_code, "body": err}, resend_safe=True)
    raise error_from_response(resp, provider)


def decode_data_uri(ref: str) -> tuple[bytes, str]:
    header, sep, payload = ref.partition(",")
    if not sep or ";base64" not in header:
        raise ProviderError(ProviderErrorKind.invalid, "input image data: URI must be base64", code=ErrorCode.invalid_input)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProviderError(ProviderErrorKind.invalid, "input image data: URI is not valid base64", code=ErrorCode.invalid_input) from exc
    return data, header[5:].split(";")[0] or sniff_image(data)


def sniff_image(data: bytes) -> str:
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "image/webp"
    return "image/png"


def ext_of(content_type: str) -> str:
    return {"image/jpeg": "jpg", "image/webp": "webp"}.get(content_type, "png")


# -- streaming transport ------------------------------------------------------------


async def open_stream(http: httpx.AsyncClient, request: httpx.Request, provider: str) -> httpx.Response:
    """A streamed create (speech, chat): only a request that never left is safe to resend."""
    return await send_stream(http, request, provider=provider, create=True)


async def stream_to_tempfile(resp: httpx.Response, provider: str) -> str:
    """The body, chunk by chunk, into a temp file (storage takes it over); removed on failure."""
    fd, path = tempfile.mkstemp(prefix="genroute-openai-", suffix=".audio")
    f = os.fdopen(fd, "wb")
    size = 0
    try:
        try:
            async for chunk in resp.aiter_bytes(SPEECH_CHUNK_BYTES):
                await asyncio.to_thread(f.write, chunk)  # the disk never blocks the event loop
                size += len(chunk)
        finally:
            f.close()
        if size == 0:
            raise ProviderError(ProviderErrorKind.failed, f"{provider}: the speech answer was empty")
    except httpx.TransportError as exc:
        os.unlink(path)
        raise ProviderError(ProviderErrorKind.retryable, f"{provider}: the audio stream broke ({type(exc).__name__})") from exc
    except BaseException:
        os.unlink(path)
        raise
    return path


async def sse_chunks(resp: httpx.Response, provider: str) -> AsyncIterator[dict[str, Any]]:
    """`data: {...}` lines until `data: [DONE]`; comment lines (`: keep-alive`, as
    OpenRouter sends) are skipped; an `error` event mid-stream raises."""
    try:
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                chunk = json.loads(data)
            except ValueError as exc:
                raise ProviderError(ProviderErrorKind.failed, f"{provider}: a stream chunk is not JSON: {data[:100]}") from exc
            if isinstance(chunk, dict) and isinstance(chunk.get("error"), dict):
                raise ProviderError(ProviderErrorKind.failed, f"{provider}: {chunk['error'].get('message', 'stream error')}", detail=chunk["error"])
            yield chunk
    except httpx.TransportError as exc:
        raise ProviderError(ProviderErrorKind.retryable, f"{provider}: the chat stream broke ({type(exc).__name__})") from exc
    finally:
        await resp.aclose()


# -- webhooks -----------------------------------------------------------------------


def verify_standard_webhook(headers: dict[str, str], body: bytes, secret: str) -> None:
    """Standard Webhooks as OpenAI signs them: HMAC-SHA256 over `{id}.{ts}.{body}` with
    the secret (base64 after `whsec_`, else its raw bytes); any `v1,` entry may match;
    timestamps more than 5 minutes off are replays."""
    h = {k.lower(): v for k, v in headers.items()}
    msg_id, ts, sigs = h.get("webhook-id"), h.get("webhook-timestamp"), h.get("webhook-signature")
    if not (msg_id and ts and sigs):
        raise ProviderError(ProviderErrorKind.auth, "openai webhook: missing webhook-id/timestamp/signature headers")
    try:
        stamp = int(ts)
    except ValueError:
        raise ProviderError(ProviderErrorKind.auth, "openai webhook: bad timestamp") from None
    if abs(time.time() - stamp) > WEBHOOK_TOLERANCE_SECONDS:
        raise ProviderError(ProviderErrorKind.auth, "openai webhook: timestamp outside the 5 minute tolerance")
    key = base64.b64decode(secret[6:]) if secret.startswith("whsec_") else secret.encode()
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()).decode()
    for entry in sigs.split():
        version, _, sig = entry.partition(",")
        if version == "v1" and hmac.compare_digest(sig, expected):
            return
    raise ProviderError(ProviderErrorKind.auth, "openai webhook: signature does not match")
