"""End to end through real processes: uvicorn API + ARQ worker, real Redis, and both
storage backends (S3 on SeaweedFS, local directory) on both databases (SQLite, PostgreSQL)."""

from __future__ import annotations

import hashlib
import io
import wave
from collections.abc import AsyncIterator

import httpx
import pytest
from PIL import Image

from tests.services import fresh_postgres
from tests.stack import Stack, make_stack, running

CONFIGS = ["s3+sqlite", "local+postgres"]


@pytest.fixture(scope="module", params=CONFIGS)
async def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[Stack]:
    storage, db = request.param.split("+")
    root = tmp_path_factory.mktemp(request.param.replace("+", "-"))
    s3 = request.getfixturevalue("seaweed") if storage == "s3" else None
    if db == "postgres":
        async with fresh_postgres() as url:
            st = await make_stack(root, redis_url=f"{redis_base}/0", database_url=url, storage=storage, s3=s3)
            async with running(st):
                yield st
    else:
        st = await make_stack(root, redis_url=f"{redis_base}/0", storage=storage, s3=s3)
        async with running(st):
            yield st


async def _run(stack: Stack, body: dict) -> dict:
    async with stack.client() as c:
        r = await c.post("/v1/jobs", json=body, headers={"Prefer": "wait=30"})
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["status"] == "succeeded", job
        return job


async def _download(url: str) -> bytes:
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.get(url)
        assert r.status_code == 200, (url, r.status_code, r.text[:200])
        return r.content


async def test_image_job_downloads_a_png_of_the_requested_size(stack: Stack) -> None:
    job = await _run(stack, {"model": "local-image", "input": {"prompt": "a lighthouse at dusk", "size": "768x768", "n": 2, "seed": 7}})
    assert len(job["outputs"]) == 2
    for out in job["outputs"]:
        data = await _download(out["url"])
        assert hashlib.sha256(data).hexdigest() == out["sha256"] and len(data) == out["bytes"]
        img = Image.open(io.BytesIO(data))
        assert (img.format, img.size) == ("PNG", (768, 768))
        assert (out["content_type"], out["width"], out["height"]) == ("image/png", 768, 768)
        thumb = Image.open(io.BytesIO(await _download(out["thumbnail_url"])))
        assert thumb.format == "WEBP" and max(thumb.size) <= 256
    # two outputs of different seeds differ
    assert job["outputs"][0]["sha256"] != job["outputs"][1]["sha256"]


async def test_video_job_has_requested_duration_and_frame_rate(stack: Stack) -> None:
    job = await _run(stack, {"model": "local-video", "input": {"prompt": "a sailing boat", "duration_seconds": 2, "fps": 8,
                                                               "resolution": "360p", "aspect_ratio": "16:9"}})
    (out,) = job["outputs"]
    data = await _download(out["url"])
    img = Image.open(io.BytesIO(data))
    assert img.format == "WEBP" and img.size == (640, 360) and img.n_frames == 16
    total = 0
    for i in range(img.n_frames):
        img.seek(i)
        img.load()
        total += img.info["duration"]
    assert total == 2000
    assert out["duration_seconds"] == pytest.approx(2.0)


async def test_audio_job_is_a_wav_of_the_requested_duration(stack: Stack) -> None:
    job = await _run(stack, {"model": "local-audio", "input": {"text": "hello from genroute", "duration_seconds": 1.5}})
    (out,) = job["outputs"]
    with wave.open(io.BytesIO(await _download(out["url"]))) as w:
        assert w.getnframes() / w.getframerate() == pytest.approx(1.5, abs=0.01)
    assert out["content_type"] == "audio/wav" and out["duration_seconds"] == pytest.approx(1.5, abs=0.01)


async def test_failure_requested_from_the_provider_ends_with_its_code(stack: Stack) -> None:
    async with stack.client() as c:
        r = await c.post("/v1/jobs", headers={"Prefer": "wait=30"},
                         json={"model": "local-image", "input": {"prompt": "x", "provider_params": {"fail": "moderated", "latency_seconds": 0.3}}})
        job = r.json()
    assert r.status_code == 200 and job["status"] == "failed", job
    assert job["error"]["code"] == "moderated" and job["outputs"] == []


def test_stack_logs_have_no_tracebacks(stack: Stack) -> None:
    for name in ("api", "worker"):
        assert "Traceback" not in stack.log(name, tail=None), stack.log(name)


