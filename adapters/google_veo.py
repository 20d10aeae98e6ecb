"""Google Veo through the Gemini API (generativelanguage.googleapis.com).

Wire format (x-goog-api-key on every request, including the download):

    POST {base}/v1beta/models/{model}:predictLongRunning
         {"instances": [{"prompt", "image": {"bytesBase64Encoded", "mimeType"}}],
          "parameters": {"aspectRatio", "durationSeconds": int, "resolution",
                         "negativePrompt", ...provider_params}}
      -> {"name": "models/{model}/operations/{id}"}            (a long-running operation)
    GET  {base}/v1beta/{name}
      -> done absent/false                                      -> Pending (no progress)
      -> done + error{code, message}                            -> Failed (google.rpc.Code)
      -> done + response.generateVideoResponse.generatedSamples[].video.uri   -> Done
      -> done + generateVideoResponse without samples, raiMediaFilteredCount/Reasons
                                                                -> Failed(moderated)
    GET  {video.uri} (…/files/{id}:download?alt=media) + key -> 302 to storage -> MP4

Errors are google.rpc.Status bodies {"error": {"code", "message", "status", "details"}};
a 429 RESOURCE_EXHAUSTED carries RetryInfo.retryDelay ("30s"). A wrong key comes back as
HTTP 400 with ErrorInfo reason API_KEY_INVALID, so it is checked before the status map.
The Gemini API has no cancel for Veo operations and sends no webhooks: polling only.

The official google-genai SDK refuses `fps`, `seed` and `generateAudio` for the Gemini
API (Vertex only), so `fps` other than Veo's fixed 24 and `seed` are refused here before
sending; `provider_params` still pass through untouched for callers who know better.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

import httpx

from adapters.base import Adapter
from adapters.http import body_json, error_from_response, moderated, send, unsupported
from core.errors import ErrorCode, ProviderError, ProviderErrorKind
from core.types import Done, Failed, OutputRef, Pending, PollResult, ProviderRequest, SubmitResult

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
PROVIDER = "google_veo"
POLL_SECONDS = 10.0  # the official samples poll every 10 s; Veo takes ~11 s to 6 min
VEO_FPS = 24
MAX_INPUT_IMAGE_BYTES = 20 * 2**20  # the Gemini API's inline request limit
# provider_params that belong to the instance (the inputs), not to `parameters`
INSTANCE_KEYS = frozenset({"image", "lastFrame", "referenceImages", "video"})


@dataclass(frozen=True, slots=True)
class Caps:
    durations: tuple[int, ...]
    aspect_ratios: tuple[str, ...] = ("16:9", "9:16")
    resolutions: tuple[str, ...] = ("720p", "1080p")
    hd_durations: tuple[int, ...] | None = None  # durations allowed at 1080p, if fewer
    hd_aspect_ratios: tuple[str, ...] | None = None  # aspect ratios allowed at 1080p
    seed: bool = False  # the Gemini API takes no seed for Veo (SDK: Vertex only)


_VEO_31 = Caps(durations=(4, 6, 8), hd_durations=(8,))
_VEO_30 = Caps(durations=(4, 6, 8), hd_aspect_ratios=("16:9",))
CAPABILITIES: dict[str, Caps] = {
    "veo-3.1-generate-preview": _VEO_31,
    "veo-3.1-fast-generate-preview": _VEO_31,
    "veo-3.0-generate-001": _VEO_30,
    "veo-3.0-fast-generate-001": _VEO_30,
    "veo-2.0-generate-001": Caps(durations=(5, 6, 7, 8), resolutions=("720p",)),
}

# google.rpc.Code of a finished operation's error -> our job error code
_RPC_CODES: dict[int, ErrorCode] = {
    3: ErrorCode.invalid_input,  # INVALID_ARGUMENT
    9: ErrorCode.invalid_input,  # FAILED_PRECONDITION
    11: ErrorCode.invalid_input,  # OUT_OF_RANGE
    7: ErrorCode.provider_auth,  # PERMISSION_DENIED
    16: ErrorCode.provider_auth,  # UNAUTHENTICATED
    8: ErrorCode.rate_limited,  # RESOURCE_EXHAUSTED
    4: ErrorCode.provider_unavailable,  # DEADLINE_EXCEEDED
    14: ErrorCode.provider_unavailable,  # UNAVAILABLE
    13: ErrorCode.provider_error,  # INTERNAL: the task ran and broke
}
_DATA_URI = re.compile(r"^data:(image/[\w.+-]+)(?:;[^,]*)?;base64,(.*)$", re.DOTALL)
# RAI reasons that talk about what we sent, not what Veo made
_INPUT_REASON = re.compile(r"\b(prompt|input|image you provided|uploaded)\b", re.IGNORECASE)
# a create refused with 400 for the prompt's content rather than its shape
_SAFETY_MESSAGE = re.compile(r"safety|responsible ai|sensitive|usage guidelines|content polic", re.IGNORECASE)


class GoogleVeoAdapter(Adapter):
    name = "google_veo"
    # durationSeconds, sampleCount and generateAudio change the price: set through the
    # request's own fields (or not at all); storageUri is a URL
    provider_params = {
        "video": frozenset({"aspectRatio", "negativePrompt", "personGeneration", "enhancePrompt", "seed",
                            "lastFrame", "referenceImages", "compressionQuality"}),
    }

    # -- submit ---------------------------------------------------------------------
    async def submit(self, request: ProviderRequest) -> SubmitResult:
        model = request.provider_model
        inp = request.input
        parameters = build_parameters(model, inp)  # refuses before anything is sent
        instance: dict[str, Any] = {"prompt": inp["prompt"]}
        if inp.get("image"):
            instance["image"] = await self._image(inp["image"])
        for key, value in (inp.get("provider_params") or {}).items():
            (instance if key in INSTANCE_KEYS else parameters)[key] = value
        resp = await send(
            self.http,
            "POST",
            f"{self._api()}/models/{model}:predictLongRunning",
            provider=PROVIDER,
            create=True,
            headers=self._headers(),
            json={"instances": [instance], "parameters": parameters},
        )
        if not resp.is_success:
            raise _error(resp)
        body = body_json(resp)
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise ProviderError(
                ProviderErrorKind.failed, f"{PROVIDER}: create answered without an operation name: {resp.text[:300]}"
            )
        handle = {
            "operation": name,
            "model": model,
            "duration_seconds": parameters.get("durationSeconds"),
            "polls": 0,
        }
        if isinstance(body, dict) and body.get("done"):
            result = _finished(body, handle, self._download_headers())
            if isinstance(result, Failed):  # refused at once (RAI filter, an error): a submit error
                kind = ProviderErrorKind.moderated if result.code == ErrorCode.moderated else ProviderErrorKind.failed
                raise ProviderError(kind, result.message, detail=result.detail, code=result.code)
            return result
        return Pending(handle=handle, poll_after=self.poll_interval(POLL_SECONDS), message="submitted to Veo")

    async def _image(self, ref: str) -> dict[str, str]:
        """Our `image` (a data: URI or a URL) as the inline bytes Veo wants."""
        m = _DATA_URI.match(ref)
        if m:
            try:
                data = base64.b64decode(m[2], validate=True)
            except (binascii.Error, ValueError):
                raise _bad_image("the data: URI is not valid base64") from None
        else:
            data = await self._fetch_image(ref)
        mime = _sniff_image(data)
        if mime is None:
            raise _bad_image("not a PNG, JPEG or WebP image")
        if len(data) > MAX_INPUT_IMAGE_BYTES:
            raise _bad_image(f"over {MAX_INPUT_IMAGE_BYTES} bytes")
        return {"bytesBase64Encoded": base64.b64encode(data).decode("ascii"), "mimeType": mime}

    async def _fetch_image(self, url: str) -> bytes:
        return await self.fetch_input(url, what="input image", max_bytes=MAX_INPUT_IMAGE_BYTES)

    # -- poll -----------------------------------------------------------------------
    async def poll(self, handle: dict[str, Any]) -> PollResult:
        resp = await send(
            self.http, "GET", f"{self._api()}/{handle['operation']}", provider=PROVIDER, headers=self._headers()
        )
        if resp.status_code == 404:  # operations are not kept for ever: nothing left to wait for
            return Failed(ErrorCode.provider_error, f"{PROVIDER}: operation {handle['operation']} not found (expired?)")
        if not resp.is_success:
            raise _error(resp)
        body = body_json(resp)
        if not isinstance(body, dict):
            raise ProviderError(ProviderErrorKind.retryable, f"{PROVIDER}: operation answer is not JSON: {resp.text[:200]}")
        handle = {**handle, "polls": int(handle.get("polls", 0)) + 1}
        if not body.get("done"):
            return Pending(
                handle=handle,
                poll_after=self.poll_interval(POLL_SECONDS),
                message=f"Veo is generating (poll {handle['polls']})",
            )
        return _finished(body, handle, self._download_headers())

    # cancel: the Gemini API documents no cancel for Veo operations; the base no-op stays

    # -- plumbing -------------------------------------------------------------------
    def _api(self) -> str:
        return f"{self.base_url(DEFAULT_BASE_URL)}/v1beta"

    def _headers(self) -> dict[str, str]:
        return {**self.headers(), **self._download_headers()}

    def _download_headers(self) -> dict[str, str]:
        return {"x-goog-api-key": self.api_key or ""}


def build_parameters(model: str, inp: dict[str, Any]) -> dict[str, Any]:
    """Our normalized video input as Veo `parameters`, refusing what the model cannot do."""
    fps = inp.get("fps")
    if fps is not None and fps != VEO_FPS:  # Veo renders at 24 fps and takes no fps
        raise unsupported("fps", fps, [VEO_FPS], model)
    caps = CAPABILITIES.get(model)
    raw_duration = float(inp.get("duration_seconds", 8))
    duration = int(raw_duration)
    aspect = inp.get("aspect_ratio", "16:9")
    resolution = inp.get("resolution", "720p")
    if caps is not None:
        if raw_duration != duration or duration not in caps.durations:
            raise unsupported("duration_seconds", inp.get("duration_seconds"), list(caps.durations), model)
        if aspect not in caps.aspect_ratios:
            raise unsupported("aspect_ratio", aspect, list(caps.aspect_ratios), model)
        if resolution not in caps.resolutions:
            raise unsupported("resolution", resolution, list(caps.resolutions), model)
        if resolution != "720p" and caps.hd_durations and duration not in caps.hd_durations:
            raise unsupported("duration_seconds", duration, [f"{d} (at {resolution})" for d in caps.hd_durations], model)
        if resolution != "720p" and caps.hd_aspect_ratios and aspect not in caps.hd_aspect_ratios:
            raise unsupported("aspect_ratio", aspect, [f"{a} (at {resolution})" for a in caps.hd_aspect_ratios], model)
        if inp.get("seed") is not None and not caps.seed:
            allowed = "none (the Gemini API takes no seed for Veo; provider_params.seed is sent as-is)"
            raise unsupported("seed", inp["seed"], allowed, model)
    elif raw_duration != duration:
        raise unsupported("duration_seconds", raw_duration, "whole seconds", model)
    params: dict[str, Any] = {"aspectRatio": aspect, "durationSeconds": duration, "resolution": resolution}
    if inp.get("negative_prompt"):
        params["negativePrompt"] = inp["negative_prompt"]
    if inp.get("seed") is not None:  # only for models we do not know: let Veo decide
        params["seed"] = inp["seed"]
    return params


def _finished(body: dict[str, Any], handle: dict[str, Any], headers: dict[str, str]) -> PollResult:
    """A done operation: an error, RAI-filtered samples, or videos."""
    error = body.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        message = str(error.get("message") or "the operation failed")
        mapped = _RPC_CODES.get(code, ErrorCode.provider_error) if isinstance(code, int) else ErrorCode.provider_error
        return Failed(mapped, f"{PROVIDER}: {message}", detail={"operation": handle["operation"], "error": error})
    response: dict[str, Any] = r if isinstance(r := body.get("response"), dict) else {}
    video_response = response.get("generateVideoResponse") or {}
    samples = video_response.get("generatedSamples") or []
    videos = [s.get("video") for s in samples if isinstance(s, dict)]
    uris = [str(v["uri"]) for v in videos if isinstance(v, dict) and v.get("uri")]
    if not uris:
        reasons = [str(r) for r in video_response.get("raiMediaFilteredReasons") or []]
        if video_response.get("raiMediaFilteredCount") or reasons:
            stage = "input" if reasons and all(_INPUT_REASON.search(r) for r in reasons) else "output"
            err = moderated(f"{PROVIDER}: Veo filtered the video: {'; '.join(reasons) or 'no reason given'}", stage, reasons)
            return Failed(ErrorCode.moderated, err.message, detail=err.detail)
        return Failed(
            ErrorCode.provider_error,
            f"{PROVIDER}: the operation finished without videos",
            detail={"operation": handle["operation"]},
        )
    outputs = [OutputRef(url=uri, headers=dict(headers), content_type="video/mp4") for uri in uris]
    usage: dict[str, Any] = {"videos": len(uris)}  # Veo reports no usage; it bills per second made
    if handle.get("duration_seconds"):
        usage["video_seconds"] = int(handle["duration_seconds"]) * len(uris)
    return Done(outputs=outputs, handle=handle, usage=usage)


def _error(resp: httpx.Response) -> ProviderError:
    """Google's error bodies, refined before the shared status map."""
    body = body_json(resp)
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        reasons = {str(d.get("reason")) for d in err.get("details") or [] if isinstance(d, dict)}
        if "API_KEY_INVALID" in reasons or err.get("status") == "UNAUTHENTICATED":
            # Google answers a wrong key with HTTP 400 INVALID_ARGUMENT: not the user's input
            return ProviderError(ProviderErrorKind.auth, f"{PROVIDER}: {err.get('message') or 'API key not valid'}",
                                 detail={"status": resp.status_code, "body": body})
        message = str(err.get("message") or "")
        if resp.status_code == 400 and _SAFETY_MESSAGE.search(message):
            return moderated(f"{PROVIDER}: the prompt was refused: {message}", "input", [message])
    return error_from_response(resp, PROVIDER)


def _bad_image(why: str) -> ProviderError:
    return ProviderError(ProviderErrorKind.invalid, f"{PROVIDER}: input image refused: {why}",
                         code=ErrorCode.invalid_input, detail={"loc": ["input", "image"]})


def _sniff_image(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None
