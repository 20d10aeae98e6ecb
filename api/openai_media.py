"""OpenAI's media endpoints as facades over jobs: each call creates a normal job through
POST /v1/jobs' own code path (api.jobs.submit_job), so it is routed, limited, stored and
listed in /v1/jobs like any other, and any catalog model of the modality serves it.

    POST /v1/images/generations     job(image) ─► wait ─► {created, data: [{b64_json} | {url}]}
    POST /v1/images/edits           multipart image / image[] / mask ─► input_images as data: URIs
    POST /v1/audio/speech           job(audio) ─► wait ─► the audio bytes
    POST /v1/videos                 job(video) ─► the Sora video object (id = our job id), at once
    GET  /v1/videos/{id}            queued | in_progress | completed | failed, progress 0-100
    GET  /v1/videos/{id}/content    the stored file, streamed (?variant=thumbnail)

What is stored is what is served: the local video model makes animated WebP, and its
content comes back as image/webp.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from api.deps import PrincipalDep, RuntimeDep
from api.jobs import queue_reachable, submit_job, wait_for_terminal
from api.openai_compat import OpenAIError, from_code, from_invalid_input, invalid, model_for, openai_router, param_of
from core.errors import InvalidInput
from core.jobs.ledger import TERMINAL, JobStatus
from core.keys import Principal
from core.models import Asset, Job
from core.runtime import Runtime
from core.schemas import JobCreate
from storage import sniff_content_type

router = openai_router(tags=["openai"])

CHUNK = 256 * 1024
POLL_AFTER_MS = 500  # what GET /v1/videos/{id} tells the SDK's poll helper
# Sora sizes <-> our (aspect_ratio, resolution); other sizes map by their shape
SORA_SIZES = {
    "1280x720": ("16:9", "720p"), "720x1280": ("9:16", "720p"),
    "1792x1024": ("16:9", "1024p"), "1024x1792": ("9:16", "1024p"),
}
SIZE_RE = re.compile(r"^(\d{2,5})x(\d{2,5})$")
VIDEO_STATUS = {
    JobStatus.queued: "queued", JobStatus.running: "in_progress", JobStatus.succeeded: "completed",
    JobStatus.failed: "failed", JobStatus.canceled: "failed",
}
# our job input's fields -> the OpenAI parameter a client sent
IMAGE_PARAMS = {"input_images": "image"}
SPEECH_PARAMS = {"text": "input", "prompt": "input", "format": "response_format"}
VIDEO_PARAMS = {"duration_seconds": "seconds", "aspect_ratio": "size", "resolution": "size", "image": "input_reference"}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the SDK may send fields newer than this facade


class ImageRequest(_Request):
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int | None = Field(default=None, ge=1, le=10)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    # passed to the provider as provider_params (OpenAI deployments understand them)
    quality: str | None = None
    background: str | None = None
    style: str | None = None
    moderation: str | None = None
    output_compression: int | None = None


class SpeechRequest(_Request):
    input: str = Field(min_length=1, max_length=4096)
    model: str | None = None
    voice: str | None = None
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] | None = None
    speed: float | None = Field(default=None, ge=0.25, le=4.0)
    instructions: str | None = None


class VideoRequest(_Request):
    prompt: str = Field(min_length=1)
    model: str | None = None
    seconds: str | None = Field(default=None, pattern=r"^\d{1,3}(\.\d+)?$")
    size: str | None = Field(default=None, pattern=SIZE_RE.pattern)


# -- plumbing ---------------------------------------------------------------------------


def _parse(schema: type[_Request], data: Mapping[str, Any]) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        e = exc.errors(include_url=False)[0]
        param = param_of(e["loc"])
        if e["type"] == "missing":
            raise invalid(f"Missing required parameter: '{param}'.", param, code="missing_required_parameter") from None
        raise invalid(f"Invalid '{param}': {e['msg']}.", param) from None


async def _fields(request: Request) -> tuple[dict[str, Any], dict[str, list[UploadFile]]]:
    """A JSON body, or a multipart form's fields and files (the SDK sends videos and edits
    as multipart)."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        try:
            form = await request.form()
        except (KeyError, ValueError, MultiPartException) as exc:  # no boundary, a broken part
            raise invalid(f"We could not parse the form body of your request ({type(exc).__name__}).", code="invalid_form") from None
        fields: dict[str, Any] = {}
        files: dict[str, list[UploadFile]] = {}
        for k, v in form.multi_items():
            if isinstance(v, UploadFile):
                files.setdefault(k.removesuffix("[]"), []).append(v)
            elif "\x00" in v or "\x00" in k:  # as api/strict.py refuses in JSON: PostgreSQL cannot hold it
                raise invalid(f"Invalid '{k[:60]}': form fields may not contain NUL.", k[:60])
            else:
                fields[k] = v
        return fields, files
    try:
        body = await request.json()  # api/strict.py: NaN, NUL and deep nesting refused too
    except ValueError as exc:
        raise invalid(f"We could not parse the JSON body of your request: {exc}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    return body, {}


async def _data_uri(upload: UploadFile, param: str) -> str:
    data = await upload.read()
    if not data:
        raise invalid(f"Invalid '{param}': the file is empty.", param)
    ct = sniff_content_type(data[:64])
    if not ct.startswith("image/"):
        raise invalid(f"Invalid '{param}': expected a PNG, JPEG or WebP image, got {ct}.", param)
    return f"data:{ct};base64," + base64.b64encode(data).decode()


async def _create(
    rt: Runtime, principal: Principal, request: Request, model_id: str, inp: dict[str, Any], via: str, params: Mapping[str, str]
) -> Job:
    """A job through POST /v1/jobs' own code path; input errors name the OpenAI parameter.
    The synchronous routes (all but videos) answer with the result, never a 201: with the
    queue away they are refused before anything is created (503)."""
    body = JobCreate(model=model_id, input=inp, metadata={"via": f"openai.{via}"})
    if via != "videos":
        await queue_reachable(rt)
    try:
        job, _ = await submit_job(rt, principal, body, idempotency_key=request.headers.get("idempotency-key"))
    except InvalidInput as exc:
        raise from_invalid_input(exc, params) from None
    return job


async def _finished(rt: Runtime, job: Job) -> tuple[Job, list[Asset]]:
    """Wait (as `Prefer: wait` does) for a synchronous facade's job; its failure as OpenAI's."""
    job = await wait_for_terminal(rt, job, rt.settings.max_wait_seconds)
    if job.status not in TERMINAL:
        raise OpenAIError(
            504, f"job {job.id} is still {job.status} after {rt.settings.max_wait_seconds} s; "
            f"its result will be at GET /v1/jobs/{job.id}",
            type="server_error", code="timeout", headers={"x-should-retry": "false", "x-genroute-job-id": job.id},
        )
    if job.status != JobStatus.succeeded:
        err = from_code(job.error_code or "internal", job.error_message or f"job {job.id} {job.status}")
        err.headers.update({"x-should-retry": "false", "x-genroute-job-id": job.id})
        raise err
    return job, (await rt.ledger.assets([job.id]))[job.id]


async def _blob(rt: Runtime, key: str) -> AsyncIterator[bytes]:
    """A stored file in chunks: from disk for the local store, else from its presigned URL."""
    path_for = getattr(rt.store, "path_for", None)
    if path_for is not None:
        f = await asyncio.to_thread(open, path_for(key), "rb")
        try:
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                yield chunk
        finally:
            f.close()
        return
    url = await rt.store.url(key, expires_in=300)
    async with rt.http.stream("GET", url) as resp:
        if not resp.is_success:
            raise OpenAIError(502, f"blob store answered HTTP {resp.status_code} for a stored output", type="server_error")
        async for chunk in resp.aiter_bytes(CHUNK):
            yield chunk


async def _read(rt: Runtime, key: str) -> bytes:
    return b"".join([c async for c in _blob(rt, key)])


def _created(job: Job) -> int:
    return int(job.created_at.timestamp())


# -- images -----------------------------------------------------------------------------


def _image_input(req: ImageRequest) -> dict[str, Any]:
    inp: dict[str, Any] = {"prompt": req.prompt}
    if req.n is not None:
        inp["n"] = req.n
    if req.size and req.size != "auto":
        inp["size"] = req.size
    if req.output_format:
        inp["output_format"] = req.output_format
    extra = {k: getattr(req, k) for k in ("quality", "background", "style", "moderation", "output_compression")}
    if params := {k: v for k, v in extra.items() if v is not None}:
        inp["provider_params"] = params
    return inp


async def _image_answer(rt: Runtime, req: ImageRequest, job: Job) -> JSONResponse:
    job, assets = await _finished(rt, job)
    data: list[dict[str, Any]] = []
    for a in assets:
        if req.response_format == "url":
            data.append({"url": await rt.store.url(a.key, expires_in=rt.settings.url_ttl_seconds)})
        else:
            data.append({"b64_json": base64.b64encode(await _read(rt, a.key)).decode()})
    fmt = assets[0].content_type.removeprefix("image/") if assets else None
    body: dict[str, Any] = {"created": _created(job), "data": data, "output_format": fmt}
    if assets and assets[0].width and assets[0].height:
        body["size"] = f"{assets[0].width}x{assets[0].height}"
    return JSONResponse(body, headers={"x-genroute-job-id": job.id})


@router.post("/images/generations")
async def images_generations(request: Request, rt: RuntimeDep, principal: PrincipalDep) -> JSONResponse:
    fields, _ = await _fields(request)
    req: ImageRequest = _parse(ImageRequest, fields)
    model = model_for(rt, req.model, "image")
    job = await _create(rt, principal, request, model.id, _image_input(req), "images.generations", IMAGE_PARAMS)
    return await _image_answer(rt, req, job)


@router.post("/images/edits")
async def images_edits(request: Request, rt: RuntimeDep, principal: PrincipalDep) -> JSONResponse:
    fields, files = await _fields(request)
    req: ImageRequest = _parse(ImageRequest, fields)
    images = files.get("image") or []
    if not images:
        raise invalid("Missing required parameter: 'image'.", "image", code="missing_required_parameter")
    model = model_for(rt, req.model, "image")
    inp = _image_input(req)
    inp["input_images"] = [await _data_uri(f, "image") for f in images]
    if files.get("mask"):
        inp.setdefault("provider_params", {})["mask"] = await _data_uri(files["mask"][0], "mask")
    job = await _create(rt, principal, request, model.id, inp, "images.edits", IMAGE_PARAMS)
    return await _image_answer(rt, req, job)


# -- speech -----------------------------------------------------------------------------


@router.post("/audio/speech", response_model=None)
async def audio_speech(request: Request, rt: RuntimeDep, principal: PrincipalDep) -> StreamingResponse:
    fields, _ = await _fields(request)
    req: SpeechRequest = _parse(SpeechRequest, fields)
    model = model_for(rt, req.model, "audio")
    inp: dict[str, Any] = {"text": req.input}
    if req.voice:
        inp["voice"] = req.voice
    if req.response_format:
        inp["format"] = req.response_format
    if params := {k: v for k, v in (("speed", req.speed), ("instructions", req.instructions)) if v is not None}:
        inp["provider_params"] = params
    job = await _create(rt, principal, request, model.id, inp, "audio.speech", SPEECH_PARAMS)
    job, assets = await _finished(rt, job)
    audio = assets[0]
    return StreamingResponse(
        _blob(rt, audio.key), media_type=audio.content_type,
        headers={"content-length": str(audio.bytes), "x-genroute-job-id": job.id},
    )


# -- videos -----------------------------------------------------------------------------


def _size_to_shape(size: str) -> tuple[str, str]:
    if size in SORA_SIZES:
        return SORA_SIZES[size]
    m = SIZE_RE.match(size)
    assert m is not None  # the schema's pattern
    w, h = int(m[1]), int(m[2])
    g = math.gcd(w, h)
    return f"{w // g}:{h // g}", f"{min(w, h)}p"


def _shape_to_size(aspect_ratio: str, resolution: str) -> str:
    for size, shape in SORA_SIZES.items():
        if shape == (aspect_ratio, resolution):
            return size
    try:
        a, b = (int(x) for x in aspect_ratio.split(":"))
        short = int(resolution.removesuffix("p"))
    except ValueError:
        return f"{aspect_ratio}@{resolution}"
    long = round(short * max(a, b) / min(a, b))
    return f"{long}x{short}" if a >= b else f"{short}x{long}"


def video_object(job: Job) -> dict[str, Any]:
    """A job as OpenAI's video object (the SDK's `Video`)."""
    inp = job.input
    duration = float(inp.get("duration_seconds", 4))
    status = VIDEO_STATUS.get(JobStatus(job.status), "queued")
    error = None
    if status == "failed":
        error = {"code": job.error_code or "internal", "message": job.error_message or f"job {job.status}"}
    return {
        "id": job.id,
        "object": "video",
        "model": job.model,
        "status": status,
        "progress": 100 if status == "completed" else max(0, min(99, int(job.progress * 100))),
        "created_at": _created(job),
        "completed_at": int(job.finished_at.timestamp()) if job.finished_at and status == "completed" else None,
        "expires_at": None,  # stored outputs do not expire upstream
        "prompt": inp.get("prompt"),
        "seconds": str(int(duration)) if duration.is_integer() else str(duration),
        "size": _shape_to_size(str(inp.get("aspect_ratio", "16:9")), str(inp.get("resolution", "720p"))),
        "remixed_from_video_id": None,
        "error": error,
    }


@router.post("/videos")
async def videos_create(request: Request, rt: RuntimeDep, principal: PrincipalDep) -> JSONResponse:
    fields, files = await _fields(request)
    if isinstance(fields.get("seconds"), int | float) and not isinstance(fields.get("seconds"), bool):
        fields["seconds"] = str(fields["seconds"])
    req: VideoRequest = _parse(VideoRequest, fields)
    model = model_for(rt, req.model, "video")
    inp: dict[str, Any] = {"prompt": req.prompt}
    if req.seconds is not None:
        inp["duration_seconds"] = float(req.seconds)
    if req.size is not None:
        inp["aspect_ratio"], inp["resolution"] = _size_to_shape(req.size)
    if files.get("input_reference"):
        inp["image"] = await _data_uri(files["input_reference"][0], "input_reference")
    job = await _create(rt, principal, request, model.id, inp, "videos", VIDEO_PARAMS)
    return JSONResponse(video_object(job), headers={"openai-poll-after-ms": str(POLL_AFTER_MS)})


async def _video_job(rt: Runtime, principal: Principal, video_id: str) -> Job:
    job = await rt.ledger.get(video_id) if len(video_id) <= 40 else None
    if job is None or job.tenant != principal.tenant or job.modality != "video":
        raise OpenAIError(404, f"Video with id '{video_id}' not found.", param="video_id", code="not_found")
    return job


@router.get("/videos/{video_id}")
async def videos_retrieve(video_id: str, rt: RuntimeDep, principal: PrincipalDep) -> JSONResponse:
    job = await _video_job(rt, principal, video_id)
    return JSONResponse(video_object(job), headers={"openai-poll-after-ms": str(POLL_AFTER_MS)})


@router.get("/videos/{video_id}/content", response_model=None)
async def videos_content(
    video_id: str, rt: RuntimeDep, principal: PrincipalDep, variant: Literal["video", "thumbnail", "spritesheet"] = "video"
) -> StreamingResponse:
    job = await _video_job(rt, principal, video_id)
    if job.status != JobStatus.succeeded:
        raise OpenAIError(404, "Video is not ready yet, use GET /v1/videos/{video_id} to check status.", param="video_id", code="not_found")
    assets = (await rt.ledger.assets([job.id]))[job.id]
    size: int | None
    key, ctype, size = assets[0].key, assets[0].content_type, assets[0].bytes
    if variant != "video":
        # a provider-made preview is stored as another image asset; else our own thumbnail
        preview = next((a for a in assets[1:] if a.content_type.startswith("image/")), None)
        if variant == "thumbnail" and preview is not None:
            key, ctype, size = preview.key, preview.content_type, preview.bytes
        elif variant == "thumbnail" and assets[0].thumbnail_key:
            key, ctype, size = assets[0].thumbnail_key, "image/webp", None
        else:
            raise OpenAIError(404, f"This video has no {variant}.", param="variant", code="not_found")
    headers = {"x-genroute-job-id": job.id}
    if size is not None:
        headers["content-length"] = str(size)
    return StreamingResponse(_blob(rt, key), media_type=ctype, headers=headers)
