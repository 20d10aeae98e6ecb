"""Fireworks AI image workflows: FLUX.1 schnell/dev synchronous, FLUX.1 Kontext async.

Wire format (base `https://api.fireworks.ai/inference/v1`, `Authorization: Bearer <key>`):

    sync   POST {base}/workflows/accounts/fireworks/models/{flux-1-schnell-fp8|flux-1-dev-fp8}/text_to_image
                {prompt, aspect_ratio, guidance_scale, num_inference_steps, seed}
             Accept: image/jpeg | image/png -> the raw image; headers Finish-Reason, Seed
             Accept: application/json       -> {id, base64: ["data:image/png;base64,…"],
                                                finishReason, seed}
             finishReason SUCCESS | CONTENT_FILTERED (the safety check removed the output)
    async  POST {base}/workflows/accounts/fireworks/models/{flux-kontext-pro|-max}
                {prompt, input_image (URL or base64), aspect_ratio, seed, output_format,
                 safety_tolerance, prompt_upsampling}                  -> {request_id}
           POST {base}/workflows/accounts/fireworks/models/{model}/get_result  {"id": request_id}
             -> BFL's get_result answer (Pending | Ready {result.sample} | Request Moderated |
                Content Moderated | Error | Task not found), mapped by adapters.bfl.task_result
    errors OpenAI-like {"error": {"object": "error", "type", "code", "message"}};
           the Kontext routes answer 400 {"error_message": "…"}

`result.sample` is a signed link on another host: it is fetched without the Fireworks key
(only the API host gets it). Neither route has a cancel, so `cancel` asks nothing and the
job is canceled on our side. The Kontext webhook's signature is undocumented: polling only.
Sources: docs.fireworks.ai API reference (text_to_image, FLUX Kontext, get_result);
public clients (the Vercel AI SDK's Fireworks provider); providers.md §7f.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any, ClassVar

import httpx

from adapters.base import Adapter
from adapters.bfl import STANDARD_RATIOS, BFLAdapter, task_result
from adapters.http import body_json, error_from_response, moderated, send, unsupported
from core.errors import ErrorCode, ProviderError, ProviderErrorKind
from core.types import Done, Failed, OutputRef, Pending, PollResult, ProviderRequest, SubmitResult

PROVIDER = "fireworks"
DEFAULT_BASE_URL = "https://api.fireworks.ai/inference/v1"
MODEL_PREFIX = "accounts/fireworks/models/"
POLL_SECONDS = 0.5  # BFL's cadence; Fireworks' own clients poll Kontext every 0.5-1 s
DEFAULT_RATE_LIMIT_WAIT = 5.0  # a 429 without Retry-After
ASYNC_MODELS = frozenset({"flux-kontext-pro", "flux-kontext-max"})
SYNC_MODELS = frozenset({"flux-1-schnell-fp8", "flux-1-dev-fp8"})
IMAGE_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
RATIO_TOLERANCE = 0.05
KONTEXT_SAFETY_MAX, KONTEXT_EDIT_SAFETY_MAX = 6, 2  # "limit of 2 for image to image"
FILTERED = "CONTENT_FILTERED"


class FireworksAdapter(Adapter):
    """Fireworks' FLUX workflows. The deployment's model is the workflow's name
    (`flux-1-schnell-fp8`, `flux-kontext-pro`, or the full `accounts/fireworks/models/…`);
    option `workflow: sync | async` decides for a model this table does not know (else a
    name with "kontext" is async), `accept: json` asks the sync route for JSON."""
    # FLUX schnell/dev answer the image itself: the create is the whole generation
    default_timeouts: ClassVar[dict[str, float]] = {**Adapter.default_timeouts, "create": 180.0}

    name = "fireworks"
    # Kontext tasks are BFL's: the same slowing as the bfl adapter.
    backoff = BFLAdapter.backoff
    provider_params = {
        "image": frozenset({"guidance_scale", "num_inference_steps", "safety_check", "safety_tolerance",
                            "prompt_upsampling"}),
    }

    async def submit(self, request: ProviderRequest) -> SubmitResult:
        model = request.provider_model
        if request.modality != "image":
            raise unsupported("modality", request.modality, ["image"], model)
        path = workflow_path(model)
        if self._is_async(model):
            return await self._kontext(model, path, request.input)
        return await self._text_to_image(model, path, request.input)

    async def poll(self, handle: dict[str, Any]) -> PollResult:
        if handle.get("kind") != "kontext":
            return Failed(ErrorCode.internal, f"{PROVIDER}: a {handle.get('kind')} handle has nothing to poll")
        resp = await send(self.http, "POST", f"{self._workflows()}/{handle['path']}/get_result", provider=PROVIDER,
                          json={"id": handle["id"]}, headers={**self._auth(), "Accept": "application/json"})
        if not resp.is_success:
            raise _error(resp)
        answer = body_json(resp)
        if not isinstance(answer, dict):
            raise ProviderError(ProviderErrorKind.retryable, f"{PROVIDER} get_result answered non-JSON: {resp.text[:200]!r}")
        # BFL's statuses, one mapping for both hosts; result.sample gets no key (another host)
        return task_result(answer, handle, provider=PROVIDER, poll_after=self.poll_interval(POLL_SECONDS))

    async def cancel(self, handle: dict[str, Any]) -> None:
        """Fireworks has no cancel for either workflow (the sync one ends inside submit):
        nothing to ask. The job is canceled on our side; a Kontext task runs to its end."""
        return None

    # -- the synchronous route ----------------------------------------------------------
    async def _text_to_image(self, model: str, path: str, inp: dict[str, Any]) -> Done:
        body, fmt = text_to_image_body(model, inp)
        wants_json = str(self.deployment.options.get("accept") or "").lower() == "json"
        accept = "application/json" if wants_json else IMAGE_TYPES[fmt]
        resp = await send(self.http, "POST", f"{self._workflows()}/{path}/text_to_image", provider=PROVIDER, create=True,
                          json=body, headers={**self._auth(), "Accept": accept})
        if not resp.is_success:
            raise _error(resp)
        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype.startswith("image/"):
            reason = resp.headers.get("finish-reason") or "SUCCESS"
            seed = resp.headers.get("seed")
            data = resp.content
        else:
            answer = body_json(resp)
            if not isinstance(answer, dict):
                raise ProviderError(ProviderErrorKind.failed, f"{PROVIDER}: text_to_image answered neither an image nor JSON",
                                    detail={"content_type": ctype, "body": resp.text[:300]})
            reason = str(answer.get("finishReason") or "SUCCESS")
            seed = answer.get("seed")
            data = _first_image(answer) if reason != FILTERED else b""
        if reason == FILTERED:
            # the safety check removed the output after it was made
            raise moderated(f"{PROVIDER}: the image was filtered by the safety check (finishReason {FILTERED})",
                            "output", [FILTERED])
        if not data:
            raise ProviderError(ProviderErrorKind.failed, f"{PROVIDER}: text_to_image answered an empty image")
        handle = {"kind": "text_to_image", "model": model, "seed": seed}
        return Done(outputs=[OutputRef(data=data, content_type=ctype if ctype.startswith("image/") else None)],
                    handle=handle, usage={"images": 1, "seed": seed} if seed is not None else {"images": 1})

    # -- the asynchronous route (Kontext) -----------------------------------------------
    async def _kontext(self, model: str, path: str, inp: dict[str, Any]) -> Pending:
        body = kontext_body(model, inp)
        resp = await send(self.http, "POST", f"{self._workflows()}/{path}", provider=PROVIDER, create=True,
                          json=body, headers={**self._auth(), "Accept": "application/json"})
        if not resp.is_success:
            raise _error(resp)
        answer = body_json(resp)
        request_id = answer.get("request_id") if isinstance(answer, dict) else None
        if not isinstance(request_id, str) or not request_id:
            raise ProviderError(ProviderErrorKind.failed, f"{PROVIDER} accepted the task but answered without a request_id",
                                detail={"body": answer if answer is not None else resp.text[:500]})
        handle = {"kind": "kontext", "id": request_id, "path": path, "model": model,
                  "output_format": body.get("output_format", "png"), "usage": {"images": 1}}
        return Pending(handle=handle, poll_after=self.poll_interval(POLL_SECONDS), progress=0.0, message="submitted")

    # -- plumbing -----------------------------------------------------------------------
    def _is_async(self, model: str) -> bool:
        mode = str(self.deployment.options.get("workflow") or "").lower()
        if mode in ("sync", "async"):
            return mode == "async"
        short = model.removeprefix(MODEL_PREFIX)
        return short in ASYNC_MODELS or (short not in SYNC_MODELS and "kontext" in short)

    def _workflows(self) -> str:
        return f"{self.base_url(DEFAULT_BASE_URL)}/workflows"

    def _auth(self) -> dict[str, str]:
        if not self.api_key:
            raise ProviderError(
                ProviderErrorKind.auth,
                f"{PROVIDER}: no API key (set {self.deployment.api_key_env or 'api_key_env'} for deployment {self.deployment.name!r})",
            )
        return {**self.headers(), "Authorization": f"Bearer {self.api_key}"}


def workflow_path(model: str) -> str:
    """`flux-1-schnell-fp8` -> `accounts/fireworks/models/flux-1-schnell-fp8` (a full path is kept)."""
    return model if model.startswith("accounts/") else MODEL_PREFIX + model


# -- request mapping ---------------------------------------------------------------------
def text_to_image_body(model: str, inp: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Our image input -> the text_to_image body and the format to ask for (Accept)."""
    _common_refusals(model, inp)
    if inp.get("input_images"):
        raise unsupported("input_images", f"{len(inp['input_images'])} images", "none (text_to_image takes no image; use a Kontext model)", model)
    params = dict(inp.get("provider_params") or {})
    for key in ("safety_tolerance", "prompt_upsampling"):
        if key in params:
            raise unsupported(f"provider_params.{key}", params[key], "only on the Kontext models", model)
    fmt = str(inp.get("output_format") or "png")
    body: dict[str, Any] = {"prompt": inp["prompt"]}
    ratio = _ratio(model, inp)
    if ratio:
        body["aspect_ratio"] = ratio
    if inp.get("seed") is not None:
        body["seed"] = int(inp["seed"])
    steps = params.get("num_inference_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise unsupported("provider_params.num_inference_steps", steps, "a positive integer", model)
    return body | params, fmt


def kontext_body(model: str, inp: dict[str, Any]) -> dict[str, Any]:
    """Our image input -> the BFL-style Kontext body."""
    _common_refusals(model, inp)
    params = dict(inp.get("provider_params") or {})
    for key in ("guidance_scale", "num_inference_steps", "safety_check"):
        if key in params:
            raise unsupported(f"provider_params.{key}", params[key], "only on the text_to_image models", model)
    images = list(inp.get("input_images") or [])
    if len(images) > 1:
        raise unsupported("input_images", f"{len(images)} images", "at most 1 (input_image)", model)
    body: dict[str, Any] = {"prompt": inp["prompt"], "output_format": str(inp.get("output_format") or "png")}
    if images:
        body["input_image"] = images[0]  # a URL, or base64 (a data: URI as clients send it)
    ratio = _ratio(model, inp, any_ratio=True)
    if ratio:
        body["aspect_ratio"] = ratio
    if inp.get("seed") is not None:
        body["seed"] = int(inp["seed"])
    tol = params.get("safety_tolerance")
    limit = KONTEXT_EDIT_SAFETY_MAX if images else KONTEXT_SAFETY_MAX
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, int) or not 0 <= tol <= limit):
        raise unsupported("provider_params.safety_tolerance", tol,
                          f"an integer 0..{limit}" + (" (image to image)" if images else ""), model)
    return body | params


def _common_refusals(model: str, inp: dict[str, Any]) -> None:
    if int(inp.get("n") or 1) != 1:
        raise unsupported("n", inp["n"], [1], model)  # one image per call: n calls would bill n times
    if inp.get("negative_prompt"):
        raise unsupported("negative_prompt", inp["negative_prompt"], "not supported by FLUX (omit it)", model)
    fmt = inp.get("output_format") or "png"
    if fmt not in IMAGE_TYPES:
        raise unsupported("output_format", fmt, list(IMAGE_TYPES), model)


def _ratio(model: str, inp: dict[str, Any], *, any_ratio: bool = False) -> str | None:
    """aspect_ratio from our size or aspect_ratio. text_to_image takes one of eleven ratios
    (BFL's list); Kontext any ratio between 21:9 and 9:21. A size maps to the nearest
    listed ratio within 5%, else it is refused (neither route takes pixels)."""
    if inp.get("size"):
        w, h = (int(x) for x in str(inp["size"]).split("x"))
        best = min(STANDARD_RATIOS, key=lambda r: abs(math.log((w / h) / _value(r))))
        if abs(math.log((w / h) / _value(best))) > math.log1p(RATIO_TOLERANCE):
            raise unsupported("size", inp["size"], f"a size near one of {list(STANDARD_RATIOS)} (this route takes aspect_ratio, not pixels)", model)
        return best
    ratio = inp.get("aspect_ratio")
    if not ratio:
        return None
    if any_ratio:
        if not 9 / 21 <= _value(str(ratio)) <= 21 / 9:
            raise unsupported("aspect_ratio", ratio, "between 21:9 and 9:21", model)
    elif ratio not in STANDARD_RATIOS:
        raise unsupported("aspect_ratio", ratio, list(STANDARD_RATIOS), model)
    return str(ratio)


def _value(ratio: str) -> float:
    a, b = (int(x) for x in ratio.split(":"))
    return a / b


# -- response mapping --------------------------------------------------------------------
def _first_image(answer: dict[str, Any]) -> bytes:
    images = answer.get("base64")
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not images or not isinstance(images[0], str):
        raise ProviderError(ProviderErrorKind.failed, f"{PROVIDER}: the JSON answer holds no base64 image", detail=answer)
    payload = images[0].partition(",")[2] if images[0].startswith("data:") else images[0]
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProviderError(ProviderErrorKind.failed, f"{PROVIDER} answered an image that is not base64") from exc


def _error(resp: httpx.Response) -> ProviderError:
    """The shared status mapping, with the Kontext routes' `error_message` as the words and
    a default wait on a 429 that says nothing."""
    exc = error_from_response(resp, PROVIDER)
    body = body_json(resp)
    if isinstance(body, dict) and isinstance(body.get("error_message"), str):
        exc.message = f"{PROVIDER} answered {resp.status_code}: {body['error_message']}"
        exc.args = (exc.message,)
    if exc.kind is ProviderErrorKind.rate_limited and exc.retry_after is None:
        exc.retry_after = DEFAULT_RATE_LIMIT_WAIT
    return exc
