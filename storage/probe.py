"""What an output is: content type from magic bytes, and size/duration/thumbnail.

Everything here is synchronous CPU or disk work; async callers run it in a thread.
Image probing refuses decompression bombs: the pixel count is checked from the header
before anything is decoded.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageSequence

SNIFF_BYTES = 512  # how much of the head `sniff_content_type` wants
THUMBNAIL_SIZE = (256, 256)
# Decoding every frame of an animation costs CPU in proportion to frames * pixels; this
# bounds that work at a multiple of the single-image limit.
MAX_ANIMATION_PIXEL_FACTOR = 16

OCTET_STREAM = "application/octet-stream"

_EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/avif": "avif",
    "image/heic": "heic",
    "audio/wav": "wav",
    "audio/mpeg": "mp3",
    "audio/ogg": "ogg",
    "audio/flac": "flac",
    "audio/mp4": "m4a",
    "video/mp4": "mp4",
    "video/webm": "webm",
    "application/pdf": "pdf",
    "application/json": "json",
    "text/plain": "txt",
    "text/markdown": "md",
    OCTET_STREAM: "bin",
}
_CONTENT_TYPES = {ext: ct for ct, ext in _EXTENSIONS.items()} | {
    "jpeg": "image/jpeg",
    "mov": "video/mp4",
    "mkv": "video/webm",
}
# Types Pillow decodes here; anything else is never handed to Pillow.
_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "image/avif"})
_MP4_TYPES = frozenset({"video/mp4", "audio/mp4"})


class ProbeError(ValueError):
    """The file is not what it claims, is corrupt, or is a decompression bomb."""


@dataclass(frozen=True, slots=True)
class Probe:
    width: int | None = None
    height: int | None = None
    duration_seconds: float | None = None
    thumbnail: bytes | None = None  # WebP, within THUMBNAIL_SIZE


# -- content types ------------------------------------------------------------------


def sniff_content_type(head: bytes) -> str:
    """The content type the first bytes of a file announce, or `application/octet-stream`.

    Text is recognised last and loosely (JSON, then UTF-8 text); callers that have a
    better hint for a text type may prefer it.
    """
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "audio/wav"
    if head.startswith(b"ID3") or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "audio/mpeg"
    if head[4:8] == b"ftyp":
        return _ftyp_content_type(head[8:12])
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm"
    if head.startswith(b"OggS"):
        return "audio/ogg"
    if head.startswith(b"fLaC"):
        return "audio/flac"
    if head.startswith(b"%PDF-"):
        return "application/pdf"
    return _sniff_text(head)


def _ftyp_content_type(brand: bytes) -> str:
    # ISO BMFF carries images and audio as well as video; the major brand tells which.
    if brand in (b"avif", b"avis"):
        return "image/avif"
    if brand in (b"heic", b"heix", b"mif1", b"msf1"):
        return "image/heic"
    if brand in (b"M4A ", b"M4B "):
        return "audio/mp4"
    return "video/mp4"


def _sniff_text(head: bytes) -> str:
    if not head or b"\x00" in head:
        return OCTET_STREAM
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # The head may cut a multi-byte character in two; only its tail may fail.
        if exc.start < len(head) - 3:
            return OCTET_STREAM
        text = head[: exc.start].decode("utf-8")
    if any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
        return OCTET_STREAM
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped[:1] in ("{", "["):
        if len(head) < SNIFF_BYTES:  # the whole file: check it really is JSON
            try:
                json.loads(stripped)
            except ValueError:
                return "text/plain"
        return "application/json"
    return "text/plain"


def extension_for(content_type: str) -> str:
    """File extension (without dot) for a content type; `bin` when unknown."""
    return _EXTENSIONS.get(_bare(content_type), "bin")


def content_type_for_extension(ext: str) -> str:
    """The content type to serve a stored file with, from its key's extension."""
    return _CONTENT_TYPES.get(ext.lower().lstrip("."), OCTET_STREAM)


def _bare(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


# -- probing ------------------------------------------------------------------------


def probe_file(path: Path, content_type: str, *, max_image_pixels: int) -> Probe:
    """Size, duration and thumbnail of a stored output, as far as its type allows.

    Images that cannot be decoded, or are over `max_image_pixels`, raise ProbeError.
    For audio and video the duration is best effort: None when it cannot be read.
    """
    ct = _bare(content_type)
    if ct in _IMAGE_TYPES:
        return _probe_image(path, max_image_pixels)
    if ct == "audio/wav":
        return Probe(duration_seconds=wav_duration(path))
    if ct in _MP4_TYPES:
        with open(path, "rb") as f:
            return Probe(duration_seconds=mp4_duration(f))
    return Probe()


def _probe_image(path: Path, max_pixels: int) -> Probe:
    # Image.MAX_IMAGE_PIXELS is process-global and probes run in parallel threads, so it
    # is not changed here; the per-call limit is our own check below. Pillow's warning
    # for its global limit is still turned into an error.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                width, height = im.size
                if width * height > max_pixels:
                    raise ProbeError(
                        f"image is {width}x{height} pixels, over the limit of {max_pixels}"
                    )
                thumbnail = _thumbnail(im)
                duration = _animation_seconds(im, max_pixels) if _is_animated(im) else None
    except ProbeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ProbeError(f"image refused as a decompression bomb: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        # UnidentifiedImageError is an OSError; truncated data raises OSError/EOFError.
        raise ProbeError(f"image cannot be decoded: {exc}") from exc
    return Probe(width=width, height=height, duration_seconds=duration, thumbnail=thumbnail)


def _is_animated(im: Image.Image) -> bool:
    return bool(getattr(im, "is_animated", False))


def _thumbnail(im: Image.Image) -> bytes:
    im.seek(0)
    # JPEG can decode at 1/2..1/8 scale directly: much less memory for a big photo.
    im.draft("RGB", THUMBNAIL_SIZE)
    has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
    frame = im.convert("RGBA" if has_alpha else "RGB")
    frame.thumbnail(THUMBNAIL_SIZE)
    out = io.BytesIO()
    frame.save(out, "WEBP", quality=80, method=2)  # method 4 (default) costs ~2x for no visible gain here
    return out.getvalue()


def _animation_seconds(im: Image.Image, max_pixels: int) -> float:
    width, height = im.size
    budget = max_pixels * MAX_ANIMATION_PIXEL_FACTOR
    total_ms = 0
    for n, frame in enumerate(ImageSequence.Iterator(im), start=1):
        if n * width * height > budget:
            raise ProbeError(f"animation has too many frames ({n}+ at {width}x{height})")
        frame.load()  # WebP sets a frame's duration only when it is decoded
        total_ms += int(frame.info.get("duration", 0) or 0)
    return total_ms / 1000


def wav_duration(path: Path) -> float | None:
    try:
        with wave.open(str(path), "rb") as w:
            rate = w.getframerate()
            return w.getnframes() / rate if rate else None
    except (wave.Error, EOFError, OSError):
        pass
    # The wave module reads PCM only; float and extensible WAVs have the same layout,
    # so fall back to byte rate and data size from the RIFF chunks.
    with open(path, "rb") as f:
        return _riff_wav_duration(f)


def _riff_wav_duration(f: BinaryIO) -> float | None:
    if f.read(12)[8:12] != b"WAVE":
        return None
    byte_rate = 0
    while header := f.read(8):
        if len(header) < 8:
            return None
        chunk_id, size = struct.unpack("<4sI", header)
        if chunk_id == b"fmt " and size >= 16:
            fmt = f.read(16)
            byte_rate = int(struct.unpack("<I", fmt[8:12])[0])
            f.seek(size - 16 + (size & 1), io.SEEK_CUR)
        elif chunk_id == b"data":
            return int(size) / byte_rate if byte_rate else None
        else:
            f.seek(size + (size & 1), io.SEEK_CUR)
    return None


def mp4_duration(f: BinaryIO) -> float | None:
    """Duration from the `moov/mvhd` box of an MP4/MOV, reading box headers only.

    Top-level boxes are skipped by their sizes (the media data is never read), so this
    costs a few small reads however large the file. None when there is no usable mvhd.
    """
    f.seek(0, io.SEEK_END)
    end = f.tell()
    moov = _find_box(f, 0, end, b"moov")
    if moov is None:
        return None
    mvhd = _find_box(f, moov[0], moov[1], b"mvhd")
    if mvhd is None:
        return None
    f.seek(mvhd[0])
    body = f.read(min(mvhd[1] - mvhd[0], 32))
    try:
        if body[:1] == b"\x01":  # version 1: 64-bit times and duration
            timescale, duration = struct.unpack(">IQ", body[20:32])
            unknown = 0xFFFFFFFFFFFFFFFF
        else:
            timescale, duration = struct.unpack(">II", body[12:20])
            unknown = 0xFFFFFFFF
    except struct.error:
        return None
    if not timescale or not duration or duration == unknown:
        return None  # e.g. fragmented MP4, whose mvhd duration is 0
    return int(duration) / int(timescale)


def _find_box(f: BinaryIO, start: int, end: int, wanted: bytes) -> tuple[int, int] | None:
    """(body start, body end) of the first box of type `wanted` between start and end."""
    pos = start
    while pos + 8 <= end:
        f.seek(pos)
        header = f.read(8)
        if len(header) < 8:
            return None
        size, box_type = struct.unpack(">I4s", header)
        body = pos + 8
        if size == 1:  # 64-bit size follows the type
            large = f.read(8)
            if len(large) < 8:
                return None
            size = struct.unpack(">Q", large)[0]
            body = pos + 16
        elif size == 0:  # the box runs to the end
            size = end - pos
        if size < body - pos or pos + size > end:
            return None
        if box_type == wanted:
            return body, pos + size
        pos += size
    return None
