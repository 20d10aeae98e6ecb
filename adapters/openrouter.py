"""OpenRouter: chat with in-house fallbacks and provider routing, images made by chat
models, and its own asynchronous video API (providers.md §6, §7g).

Wire format (base `https://openrouter.ai/api/v1`, `Authorization: Bearer <key>`):

    text   POST /chat/completions   OpenAI's body + `models` (fallbacks inside OpenRouter)
                                    + `provider` (routing); the answer's `model` names the
                                    model that answered; SSE may carry `: OPENROUTER
                                    PROCESSING` comment lines (skipped)
    image  POST /chat/completions   + `modalities: ["image","text"]` -> choices[0].message
                                    .images[].image_url.url = data:image/...;base64,...
    video  POST /videos             -> 202 {id, polling_url, status: pending}
           GET  {polling_url}       pending | in_progress | completed | failed | cancelled
                                    | expired, usage.cost (USD) once completed
           GET  /videos/{id}/content?index=N   MP4 bytes, needs the key

    errors {"error": {"code": <http status>, "message", "metadata"}}:
      403 with metadata.reasons / flagged_input -> moderated (input)
      402 -> quota; 429 -> rate_limited (Retry-After, else metadata.headers.X-RateLimit-Reset)
      "no allowed providers" / "no endpoints found" -> the deployment's routing cannot serve:
                                    the operator's, resend-safe, so the next deployment runs

The routing (`models`, `provider`) is the operator's: it is read from the deployment's
catalog options, checked when the catalog loads (`check_options`), and never taken from a
request (core/params.py refuses `models` and `provider` there with a 422). The adapter is
the OpenAI-compatible one with that routing added, OpenRouter's error envelope read, the
answering model and OpenRouter's reported cost (`usage.cost`, in USD: one OpenRouter
credit is one dollar) put in the usage, as `model` and `cost_credits`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from adapters.http import body_json, error_from_response, moderated, retry_after, send, unsupported
from adapters.openai import IMAGE_TYPES, open_stream, sse_chunks
from adapters.openai_compatible import OpenAICompatibleAdapter
from adapters.openrouter_routing import routing_of
from core import fetcher
from core.errors import ErrorCode, Fault, ProviderError, ProviderErrorKind
from core.types import Done, Failed, OutputRef, Pending, PollResult, ProviderRequest, SubmitResult

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
VIDEO_POLL_SECONDS = 30.0  # OpenRouter's guide polls about every 30 s; renders take 30 s to minutes
POLL_MAX_BYTES = 1 * 2**20  # a video status object is a few hundred bytes
POLL_TIMEOUT = 30.0
# OpenRouter's words when the deployment's `provider` routing leaves no endpoint to serve it
_NO_ROUTE = re.compile(r"no (?:allowed )?providers? (?:are |is )?available|no endpoints found|"
                       r"requested provider|provider .* (?:is )?not available", re.IGNORECASE)
_FLAGGED = re.compile(r"moderation|flagged|content policy|safety", re.IGNORECASE)
# What OpenRouter bills and where it routed: never shown to a tenant (api/chat.py strips them)
BILLING_FIELDS = ("cost", "cost_credits", "cost_details", "is_byok")


# -- the adapter --------------------------------------------------------------------


class OpenRouterAdapter(OpenAICompatibleAdapter):
    """OpenRouter. Deployment options beyond the OpenAI-compatible ones (`headers` for
    HTTP-Referer / X-Title, `poll_interval`):

        models:      [fallback/model, ...]   tried by OpenRouter after the deployment's model
        provider:    {order, allow_fallbacks, only, ignore, sort, max_price, data_collection,
                      zdr, require_parameters, quantizations, enforce_distillable_text}
        modalities:  [image, text] (default for image models) | [image] (image-only models)
    """

    name = "openrouter"
    default_base_url: str | None = DEFAULT_BASE_URL
    provider_params = {
        "text": OpenAICompatibleAdapter.provider_params["text"] | {"reasoning", "transforms"},
        "image": frozenset({"image_config", "temperature"}),
        "video": frozenset({"size", "generate_audio"}),
    }

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Called when a catalog loads (core/routing/catalog.py): a bad routing option
        refuses the catalog, with its path."""
        super().check_options(options)
        routing_of(options)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.routing = routing_of(self.deployment.options)

    def routed(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body with the deployment's model and routing: the catalog's word wins over
        anything the body says (a request never sets these; core/params.py refuses them)."""
        out = {**body, "model": self.deployment.model}
        out.pop("models", None)
        out.pop("provider", None)
        if self.routing.models:
            out["models"] = [self.deployment.model, *(m for m in self.routing.models if m != self.deployment.model)]
        if self.routing.provider is not None:
            out["provider"] = self.routing.provider.model_dump(exclude_none=True)
        out["usage"] = {"include": True}  # OpenRouter's cost of the call, in the answer's usage
        return out

    # -- plumbing ---------------------------------------------------------------------
    async def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        resp = await send(self.http, "POST", self.url(path), provider=self.name, create=True,
                          headers=self.auth_headers(), **kwargs)
        check(resp, self.name)
        return resp

    # -- protocol ---------------------------------------------------------------------
    async def submit(self, request: ProviderRequest) -> SubmitResult:
        if request.modality == "image":
            return await self._chat_image(request.input)
        if request.modality == "video":
            return await self._or_video(request.provider_model or self.deployment.model, request.input)
        if request.modality == "text":
            return await self._or_text(request.input)
        raise ProviderError(ProviderErrorKind.invalid, f"{self.name} has no {request.modality} endpoint",
                            code=ErrorCode.invalid_input)

    async def poll(self, handle: dict[str, Any]) -> PollResult:
        if handle.get("kind") != "video":
            return Failed(ErrorCode.internal, f"{self.name}: a {handle.get('kind')} handle has nothing to poll")
        status, video = await self._get_status(str(handle["polling_url"]))
        if status == 404:
            return Failed(ErrorCode.provider_error, f"{self.name}: video {handle['video_id']} is gone (unknown id)")
        return self._video_result(handle, video)

    async def cancel(self, handle: dict[str, Any]) -> None:
        """OpenRouter's video API documents no cancel (a `cancelled` status exists, set on
        OpenRouter's side); chat and images finish inside submit. The job is canceled on
        our side and polling stops."""
        return None

    # -- chat -------------------------------------------------------------------------
    async def _chat(self, body: dict[str, Any], *, stream: bool) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        payload = {**self.routed(body), "stream": stream}
        if not stream:
            answer = (await self._post("/chat/completions", json=payload)).json()
            return completion(answer, self.name)
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
        return _normalized_chunks(sse_chunks(resp, self.name))

    async def _or_text(self, inp: dict[str, Any]) -> Done:
        body = {k: v for k, v in inp.items() if k != "provider_params"} | dict(inp.get("provider_params") or {})
        answer = await self.chat(body, stream=False)
        usage = {**(answer.get("usage") or {}), "model": answer.get("model")}
        public = tenant_view(answer)
        return Done(
            outputs=[OutputRef(data=json.dumps(public).encode(), content_type="application/json")],
            handle={"kind": "text", "id": answer.get("id"), "answered_model": answer.get("model")},
            usage=usage,
        )

    # -- images (through chat) --------------------------------------------------------
    async def _chat_image(self, inp: dict[str, Any]) -> Done:
        model = self.deployment.model
        p = dict(inp.get("provider_params") or {})
        for key, why in (("negative_prompt", "a negative prompt"), ("seed", "a seed"), ("size", "a pixel size (use aspect_ratio)")):
            if inp.get(key) is not None:
                raise unsupported(key, inp[key], f"none (OpenRouter image models take no {why})", model)
        if int(inp.get("n", 1)) != 1:
            raise unsupported("n", inp["n"], "1 (one chat answer carries one image)", model)
        if inp.get("output_format", "png") != "png":
            raise unsupported("output_format", inp["output_format"], ["png"], model)
        given = p.pop("image_config", None) or {}
        if not isinstance(given, dict):
            raise unsupported("provider_params.image_config", given, "an object, e.g. {aspect_ratio: '16:9'}", model)
        config = dict(given)
        if inp.get("aspect_ratio"):
            config.setdefault("aspect_ratio", inp["aspect_ratio"])
        content: list[dict[str, Any]] | str = inp["prompt"]
        if inp.get("input_images"):
            # OpenRouter fetches image URLs itself (or reads data: URIs): nothing is fetched here
            content = [{"type": "text", "text": inp["prompt"]},
                       *({"type": "image_url", "image_url": {"url": str(ref)}} for ref in inp["input_images"])]
        body: dict[str, Any] = {"messages": [{"role": "user", "content": content}],
                                "modalities": self.routing.modalities or ["image", "text"], **p}
        if config:
            body["image_config"] = config
        # not `chat`: an image is a create like any other, so a 5xx after it may have run is
        # not resent (chat's own calls are, as they leave no task behind)
        answer = await self._chat(body, stream=False)
        assert isinstance(answer, dict)
        outputs = chat_images(answer, self.name)
        usage = {**(answer.get("usage") or {}), "model": answer.get("model")}
        return Done(outputs=outputs, handle={"kind": "image", "id": answer.get("id"), "answered_model": answer.get("model")},
                    usage=usage)

    # -- video ------------------------------------------------------------------------
    async def _or_video(self, model: str, inp: dict[str, Any]) -> Pending:
        fields = video_fields(model, inp)
        resp = await self._post("/videos", json=fields)
        answer = body_json(resp)
        if not isinstance(answer, dict) or not answer.get("id"):
            raise ProviderError(ProviderErrorKind.failed, f"{self.name} accepted the video without an id", detail=answer)
        video_id = str(answer["id"])
        polling = self._own_url(str(answer.get("polling_url") or f"/api/v1/videos/{video_id}"))
        handle = {"kind": "video", "video_id": video_id, "polling_url": polling, "model": model}
        result = self._video_result(handle, answer)
        if isinstance(result, Pending):
            return result
        message = result.message if isinstance(result, Failed) else f"{self.name}: a video finished inside its create"
        raise ProviderError(ProviderErrorKind.failed, message, detail=answer)

    def _own_url(self, url: str) -> str:
        """A provider-handed URL, absolute, only on the base URL's own scheme, host and port
        (a polling_url elsewhere would make us send the key there)."""
        base = self.url("/")
        absolute = urljoin(base, url)
        want, got = urlsplit(base), urlsplit(absolute)
        if (got.scheme, got.hostname, got.port) != (want.scheme, want.hostname, want.port):
            raise ProviderError(ProviderErrorKind.failed,
                                f"{self.name} handed a polling_url on another host ({got.hostname}); refused",
                                detail={"polling_url": url})
        return absolute

    async def _get_status(self, url: str) -> tuple[int, dict[str, Any]]:
        """GET a polling_url through the guarded fetcher (core/fetcher.py): the address is
        checked, the body capped, no redirect followed (the key must not travel)."""
        try:
            async with fetcher.fetch(self.http, self._own_url(url), headers=self.auth_headers(),
                                     max_bytes=POLL_MAX_BYTES, timeout=POLL_TIMEOUT, max_redirects=0) as got:
                data = await got.read()
                resp = httpx.Response(got.response.status_code, headers=got.response.headers, content=data,
                                      request=got.response.request)
        except fetcher.FetchError as exc:
            kind = ProviderErrorKind.retryable if exc.kind in (fetcher.FetchFailure.timeout, fetcher.FetchFailure.transport) \
                else ProviderErrorKind.failed
            raise ProviderError(kind, f"{self.name}: polling failed: {exc.reason}", resend_safe=True) from None
        if resp.status_code == 404:
            return 404, {}
        check(resp, self.name, create=False)
        body = body_json(resp)
        if not isinstance(body, dict):
            raise ProviderError(ProviderErrorKind.retryable, f"{self.name}: the video status is not JSON", resend_safe=True)
        return resp.status_code, body

    def _video_result(self, handle: dict[str, Any], video: dict[str, Any]) -> PollResult:
        status = video.get("status")
        if status in ("pending", "in_progress"):
            progress = video.get("progress")
            fraction = max(0.0, min(1.0, float(progress) / 100)) if isinstance(progress, int | float) else None
            return Pending(handle=handle, poll_after=self.poll_interval(VIDEO_POLL_SECONDS), progress=fraction, message=status)
        if status == "failed":
            return video_failure(video.get("error"), self.name)
        if status == "cancelled":
            return Failed(ErrorCode.canceled, f"{self.name}: the video was cancelled at OpenRouter", detail=video)
        if status == "expired":
            return Failed(ErrorCode.provider_error, f"{self.name}: video {handle['video_id']} expired before it was fetched")
        if status != "completed":
            return Failed(ErrorCode.provider_error, f"{self.name}: unknown video status {status!r}", detail=video)
        count = max(1, len(video.get("unsigned_urls") or []))
        content = self.url(f"/videos/{handle['video_id']}/content")
        auth = self.auth_headers()
        outputs = [OutputRef(url=f"{content}?index={i}", headers=auth, content_type="video/mp4") for i in range(count)]
        return Done(outputs=outputs, handle=handle, usage=video_usage(video, handle))


# -- mapping ------------------------------------------------------------------------


def video_fields(model: str, inp: dict[str, Any]) -> dict[str, Any]:
    """Our video input -> OpenRouter's create fields. Values allowed per model are listed
    by GET /videos/models; OpenRouter judges them (a 400 is the user's)."""
    p = dict(inp.get("provider_params") or {})
    for key, why in (("negative_prompt", "no negative prompt"), ("fps", "no frame rate")):
        if inp.get(key) is not None:
            raise unsupported(key, inp[key], f"none (OpenRouter's video API takes {why})", model)
    fields: dict[str, Any] = {"model": model, "prompt": inp["prompt"]}
    if inp.get("duration_seconds") is not None:
        duration = float(inp["duration_seconds"])
        if not duration.is_integer():
            raise unsupported("duration_seconds", duration, "whole seconds", model)
        fields["duration"] = int(duration)
    for ours, theirs in (("resolution", "resolution"), ("aspect_ratio", "aspect_ratio"), ("seed", "seed")):
        if inp.get(ours) is not None:
            fields[theirs] = inp[ours]
    if inp.get("image"):
        fields["frame_images"] = [{"type": "image_url", "image_url": {"url": str(inp["image"])}, "frame_type": "first_frame"}]
    return fields | p


def completion(answer: Any, provider: str) -> dict[str, Any]:
    """A chat answer: a 200 can carry an error (OpenRouter reports failures found after the
    status line was sent this way); usage gets `cost_credits` (USD) beside `cost`."""
    if not isinstance(answer, dict):
        raise ProviderError(ProviderErrorKind.failed, f"{provider}: the chat answer is not a JSON object")
    err = answer.get("error")
    if isinstance(err, dict):
        raise _envelope_error(err, provider, status=int(err["code"]) if isinstance(err.get("code"), int) else 502)
    return _with_cost(answer)


def _with_cost(chunk: dict[str, Any]) -> dict[str, Any]:
    usage = chunk.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("cost"), int | float) and not isinstance(usage.get("cost"), bool):
        chunk = {**chunk, "usage": {**usage, "cost_credits": usage["cost"]}}
    return chunk


async def _normalized_chunks(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    try:
        async for chunk in chunks:
            yield _with_cost(chunk)
    finally:
        if (aclose := getattr(chunks, "aclose", None)) is not None:  # a generator: end it with us
            await aclose()


def tenant_view(answer: dict[str, Any]) -> dict[str, Any]:
    """A chat answer as a tenant may see it: without OpenRouter's billing and routing."""
    out = {k: v for k, v in answer.items() if k != "provider"}
    if isinstance(out.get("usage"), dict):
        out["usage"] = {k: v for k, v in out["usage"].items() if k not in BILLING_FIELDS}
    return out


def chat_images(answer: dict[str, Any], provider: str) -> list[OutputRef]:
    """choices[0].message.images[] data URLs, decoded. No image: a refusal (moderated) or a
    model that answered only text."""
    choices = answer.get("choices") or []
    message = (choices[0].get("message") or {}) if choices and isinstance(choices[0], dict) else {}
    outputs: list[OutputRef] = []
    for item in message.get("images") or []:
        url = ((item or {}).get("image_url") or {}).get("url") if isinstance(item, dict) else None
        if not isinstance(url, str):
            continue
        if not url.startswith("data:"):
            raise ProviderError(ProviderErrorKind.failed, f"{provider}: an image came back as a link, not a data URL",
                                detail={"url": url[:200]})
        outputs.append(_decode(url, provider))
    if outputs:
        return outputs
    reason = choices[0].get("finish_reason") if choices and isinstance(choices[0], dict) else None
    text = str(message.get("content") or message.get("refusal") or "")
    if reason == "content_filter" or message.get("refusal"):
        raise moderated(f"{provider}: the model refused to draw this ({text[:200] or reason})", "output", [str(reason)])
    raise ProviderError(ProviderErrorKind.failed, f"{provider}: the model answered without an image: {text[:200]!r}",
                        detail={"finish_reason": reason})


def _decode(url: str, provider: str) -> OutputRef:
    header, _, payload = url.partition(",")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProviderError(ProviderErrorKind.failed, f"{provider}: an image data URL is not base64") from exc
    ct = header[5:].split(";")[0] or "image/png"
    return OutputRef(data=data, content_type=ct if ct in IMAGE_TYPES.values() else None)


def video_usage(video: dict[str, Any], handle: dict[str, Any]) -> dict[str, Any]:
    usage = dict(video.get("usage") or {})
    if isinstance(usage.get("cost"), int | float) and not isinstance(usage.get("cost"), bool):
        usage["cost_credits"] = usage["cost"]  # USD; the catalog prices a credit at 1000000 micro-USD
    usage["model"] = video.get("model") or handle.get("model")
    if video.get("generation_id"):
        usage["generation_id"] = video["generation_id"]
    return usage


def video_failure(error: Any, provider: str) -> Failed:
    message = str((error.get("message") if isinstance(error, dict) else error) or "the video failed")
    if _FLAGGED.search(message):
        return Failed(ErrorCode.moderated, f"{provider}: {message}", detail={"stage": "output", "reasons": [message[:200]]})
    return Failed(ErrorCode.provider_error, f"{provider}: {message}", detail={"error": error})


# -- errors -------------------------------------------------------------------------


def check(resp: httpx.Response, provider: str, *, create: bool | None = None) -> None:
    """OpenRouter's envelope first (moderation, routing that cannot serve, 429 timing),
    then the generic mapping."""
    if resp.is_success:
        return
    body = body_json(resp)
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        raise _envelope_error(err, provider, status=resp.status_code, resp=resp, create=create)
    raise error_from_response(resp, provider, create=create)


def _envelope_error(err: dict[str, Any], provider: str, *, status: int, resp: httpx.Response | None = None,
                    create: bool | None = None) -> ProviderError:
    message = str(err.get("message") or f"HTTP {status}")
    meta: dict[str, Any] = m if isinstance(m := err.get("metadata"), dict) else {}
    detail = {"status": status, "body": {"error": err}}
    if status == 403 and (meta.get("reasons") or meta.get("flagged_input")):
        return moderated(f"{provider}: {message}", "input", [str(r) for r in meta.get("reasons") or []] or ["flagged"])
    if status in (400, 404) and _NO_ROUTE.search(message):
        # the catalog's routing (order / only / allow_fallbacks) leaves nothing: this deployment
        # cannot serve it, whatever the request; nothing ran, so the next deployment may
        return ProviderError(ProviderErrorKind.invalid, f"{provider}: {message} (check the deployment's provider routing)",
                             detail=detail, fault=Fault.operator, resend_safe=True)
    if status == 429:
        return ProviderError(ProviderErrorKind.rate_limited, f"{provider}: {message}", detail=detail, resend_safe=True,
                             retry_after=_retry_after(resp, meta))
    if resp is None:  # an error inside a 200 answer: the model failed after the request was taken
        kind = ProviderErrorKind.retryable if status >= 500 else ProviderErrorKind.failed
        if _FLAGGED.search(message):
            return moderated(f"{provider}: {message}", "output")
        return ProviderError(kind, f"{provider}: {message}", detail=detail, resend_safe=True)
    return error_from_response(resp, provider, create=create)


def _retry_after(resp: httpx.Response | None, meta: dict[str, Any]) -> float | None:
    """Retry-After when sent; else OpenRouter's X-RateLimit-Reset (epoch ms), in the headers
    or copied into error.metadata.headers."""
    if resp is not None:
        seconds = retry_after(resp)
        if seconds is not None:
            return seconds
    headers = {str(k).lower(): v for k, v in (meta.get("headers") or {}).items()} if isinstance(meta.get("headers"), dict) else {}
    reset = headers.get("x-ratelimit-reset") or (resp.headers.get("x-ratelimit-reset") if resp is not None else None)
    try:
        at = float(reset) / 1000 if reset is not None else None
    except (TypeError, ValueError):
        at = None
    return max(1.0, at - time.time()) if at is not None else None

