"""Tests for adapters.local_media: decode everything with Pillow / wave."""

from __future__ import annotations

import io
import sys
import wave
from array import array

import pytest
from PIL import Image, ImageChops, ImageStat

from adapters.local_media import (
    VIDEO_SIZES,
    make_audio_wav,
    make_image,
    make_video_webp,
)

PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


# --------------------------------------------------------------------------- image


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("size", [(64, 64), (320, 200), (200, 320)])
def test_image_size_and_format(fmt: str, size: tuple[int, int]) -> None:
    data = make_image("a lighthouse at dusk", seed=1, width=size[0], height=size[1], fmt=fmt)
    im = _open(data)
    assert im.format == PIL_FORMAT[fmt]
    assert im.size == size
    im.load()  # fully decodable


def test_image_jpg_alias() -> None:
    data = make_image("x", seed=0, width=64, height=64, fmt="jpg")
    assert _open(data).format == "JPEG"


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_image_deterministic(fmt: str) -> None:
    kwargs = dict(seed=42, width=256, height=192, fmt=fmt)
    assert make_image("a red fox", **kwargs) == make_image("a red fox", **kwargs)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_image_different_prompts_differ(fmt: str) -> None:
    a = make_image("a red fox in the snow", seed=1, width=256, height=256, fmt=fmt)
    b = make_image("cyberpunk city at night", seed=1, width=256, height=256, fmt=fmt)
    assert a != b
    mean_a = ImageStat.Stat(_open(a).convert("RGB")).mean
    mean_b = ImageStat.Stat(_open(b).convert("RGB")).mean
    assert sum(abs(x - y) for x, y in zip(mean_a, mean_b, strict=True)) > 15


def test_image_seed_changes_output() -> None:
    a = make_image("same prompt", seed=1, width=128, height=128, fmt="png")
    b = make_image("same prompt", seed=2, width=128, height=128, fmt="png")
    assert a != b


def test_image_large_and_odd_prompts() -> None:
    im = _open(make_image("x" * 500, seed=3, width=2048, height=2048, fmt="png"))
    assert im.size == (2048, 2048)
    for prompt in ("", "日本語のプロンプト 🚀", "   "):
        assert _open(make_image(prompt, seed=-7, width=64, height=64, fmt="webp")).size == (64, 64)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(width=64, height=64, fmt="gif"),
        dict(width=0, height=64, fmt="png"),
        dict(width=64, height=-1, fmt="png"),
    ],
)
def test_image_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_image("x", seed=0, **kwargs)


# --------------------------------------------------------------------------- audio


def _read_wav(data: bytes) -> tuple[wave._wave_params, array]:
    with wave.open(io.BytesIO(data), "rb") as w:
        params = w.getparams()
        frames = w.readframes(params.nframes)
    samples = array("h", frames)
    if sys.byteorder == "big":
        samples.byteswap()
    return params, samples


@pytest.mark.parametrize(
    ("duration", "rate"),
    [(3.0, 22050), (1.23456, 22050), (0.5, 44100), (2.0, 16000)],
)
def test_wav_format_and_length(duration: float, rate: int) -> None:
    data = make_audio_wav("a calm piano melody", seed=5, duration_seconds=duration, sample_rate=rate)
    params, samples = _read_wav(data)
    assert params.nchannels == 1
    assert params.sampwidth == 2
    assert params.framerate == rate
    assert params.nframes == round(duration * rate)
    assert len(samples) == params.nframes
    assert max(abs(s) for s in samples) > 3000  # not silent
    assert samples[0] == 0  # note starts with a fade-in


def test_wav_default_sample_rate() -> None:
    params, _ = _read_wav(make_audio_wav("x", seed=0, duration_seconds=1.0))
    assert params.framerate == 22050
    assert params.nframes == 22050


def test_wav_deterministic_and_prompt_dependent() -> None:
    a = make_audio_wav("birdsong", seed=1, duration_seconds=2.0)
    assert a == make_audio_wav("birdsong", seed=1, duration_seconds=2.0)
    assert a != make_audio_wav("thunder", seed=1, duration_seconds=2.0)


def test_wav_long_duration() -> None:
    params, _ = _read_wav(make_audio_wav("long", seed=9, duration_seconds=30.0))
    assert params.nframes == 30 * 22050


@pytest.mark.parametrize("duration", [0, -1.0, float("nan"), float("inf")])
def test_wav_rejects_bad_duration(duration: float) -> None:
    with pytest.raises(ValueError):
        make_audio_wav("x", seed=0, duration_seconds=duration)


# --------------------------------------------------------------------------- video


def _frames(data: bytes) -> tuple[Image.Image, list[Image.Image], list[int]]:
    im = _open(data)
    frames: list[Image.Image] = []
    durations: list[int] = []
    for i in range(im.n_frames):
        im.seek(i)
        im.load()  # Pillow fills info["duration"] on load
        durations.append(im.info["duration"])
        frames.append(im.convert("RGB"))
    return im, frames, durations


@pytest.mark.parametrize(
    ("size", "duration", "fps"),
    [((320, 180), 2.0, 12), ((180, 320), 1.37, 7), ((96, 96), 0.5, 24)],
)
def test_video_frames_durations_and_motion(size: tuple[int, int], duration: float, fps: int) -> None:
    data = make_video_webp(
        "a bouncing ball", seed=3, width=size[0], height=size[1], duration_seconds=duration, fps=fps
    )
    im, frames, durations = _frames(data)
    n = round(duration * fps)
    assert im.format == "WEBP"
    assert im.size == size
    assert im.n_frames == n
    assert abs(sum(durations) - duration * 1000) <= n  # within 1 ms per frame
    assert sum(durations) == round(duration * 1000)  # exact by construction
    for prev, cur in zip(frames, frames[1:], strict=False):
        assert ImageChops.difference(prev, cur).getbbox() is not None


def test_video_brief_benchmark_size() -> None:
    w, h = VIDEO_SIZES["360p"]["16:9"]
    data = make_video_webp("a ball", seed=1, width=w, height=h, duration_seconds=2, fps=12)
    im = _open(data)
    assert (im.size, im.n_frames) == ((640, 360), 24)


def test_video_deterministic() -> None:
    kwargs = dict(seed=4, width=128, height=96, duration_seconds=1.0, fps=8)
    assert make_video_webp("waves", **kwargs) == make_video_webp("waves", **kwargs)


@pytest.mark.parametrize("size", [(1, 1), (8, 8), (30, 20)])
def test_tiny_video_keeps_frame_count(size: tuple[int, int]) -> None:
    data = make_video_webp("x", seed=0, width=size[0], height=size[1], duration_seconds=1.0, fps=10)
    assert _open(data).n_frames == 10


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(duration_seconds=0, fps=12),
        dict(duration_seconds=1.0, fps=0),
        dict(duration_seconds=0.01, fps=12),  # rounds to 0 frames
    ],
)
def test_video_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_video_webp("x", seed=0, width=64, height=64, **kwargs)


# --------------------------------------------------------------------------- sizes


def test_video_sizes_table() -> None:
    assert set(VIDEO_SIZES) == {"360p", "480p", "720p"}
    assert VIDEO_SIZES["360p"]["16:9"] == (640, 360)
    assert VIDEO_SIZES["360p"]["9:16"] == (360, 640)
    assert VIDEO_SIZES["360p"]["1:1"] == (360, 360)
    assert VIDEO_SIZES["480p"]["16:9"] == (848, 480)
    assert VIDEO_SIZES["720p"]["16:9"] == (1280, 720)
    for res, by_aspect in VIDEO_SIZES.items():
        short = int(res.removesuffix("p"))
        assert set(by_aspect) == {"16:9", "9:16", "1:1"}
        for aspect, (w, h) in by_aspect.items():
            assert w % 2 == 0 and h % 2 == 0
            assert min(w, h) == short
            if aspect == "16:9":
                assert w > h
            elif aspect == "9:16":
                assert h > w
            else:
                assert w == h
