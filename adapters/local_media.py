"""Deterministic, offline media generators for genroute's built-in ``local`` provider.

The ``local`` provider lets genroute run end to end (API -> queue -> worker ->
storage) with no network access and no model weights.  Instead of calling a
real generation backend it synthesises *real*, decodable media files whose
content is derived from the request:

* :func:`make_image` - a PNG / JPEG / WebP picture: a two-colour diagonal
  gradient with a radial glow, a seeded set of translucent ellipses,
  rectangles and polygons, and the (truncated) prompt in a caption box.
* :func:`make_audio_wav` - a mono 16-bit PCM WAV containing a short sine-tone
  melody (pentatonic, pitches/rhythm taken from the prompt hash) with short
  fades on every note so there are no clicks.
* :func:`make_video_webp` - an animated WebP: the same kind of background as
  :func:`make_image` with a ball bouncing across it and a frame counter.

Everything is a pure, synchronous function of its arguments: all randomness
comes from ``sha256(prompt + seed)`` fed into :class:`random.Random`, and all
encoders are called with fixed parameters (no timestamps, fixed quality), so
identical inputs always yield byte-identical output while different prompts
yield visibly different palettes/compositions.  Only Pillow and the standard
library are used (no numpy); callers that live in an event loop should run
these functions in a thread (e.g. ``asyncio.to_thread``).

:data:`VIDEO_SIZES` maps a resolution name ("360p", "480p", "720p") and an
aspect ratio ("16:9", "9:16", "1:1") to a ``(width, height)`` pair with both
dimensions even (as most video encoders require).
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import math
import random
import sys
import wave
from array import array

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "IMAGE_FORMATS",
    "MAX_DIMENSION",
    "VIDEO_SIZES",
    "make_audio_wav",
    "make_image",
    "make_video_webp",
]

#: Supported still-image formats (``"jpg"`` is accepted as an alias of ``"jpeg"``).
IMAGE_FORMATS: frozenset[str] = frozenset({"png", "jpeg", "webp"})

#: Largest accepted width/height, in pixels, for images and videos.
MAX_DIMENSION = 4096

#: resolution -> aspect ratio -> (width, height); all dimensions are even.
VIDEO_SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "360p": {"16:9": (640, 360), "9:16": (360, 640), "1:1": (360, 360)},
    "480p": {"16:9": (848, 480), "9:16": (480, 848), "1:1": (480, 480)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (720, 720)},
}

# Fixed encoder parameters -> byte-identical output for identical inputs.
_PNG_PARAMS: dict[str, object] = {"optimize": False, "compress_level": 1}  # speed over size: synthetic output
_JPEG_PARAMS: dict[str, object] = {
    "quality": 88,
    "optimize": False,
    "progressive": False,
    "subsampling": 2,  # 4:2:0
}
_WEBP_PARAMS: dict[str, object] = {"quality": 85, "method": 4, "lossless": False}
_VIDEO_WEBP_QUALITY = 75
_VIDEO_WEBP_METHOD = 0  # fastest
# Only the first frame is a keyframe; later frames are encoded as changed
# sub-rectangles.  ~30% faster and ~35% smaller for our mostly-static scenes;
# playback is sequential anyway (Pillow also decodes from the start on seek).
_VIDEO_WEBP_KMIN = 0
_VIDEO_WEBP_KMAX = 0

_CAPTION_MAX_CHARS = 60
_AUDIO_AMPLITUDE = 0.30  # fraction of full scale; leaves headroom for the harmonic
_AUDIO_FADE_SECONDS = 0.012
# Major pentatonic scale, in semitones above the root.
_PENTATONIC = (0, 2, 4, 7, 9)


# --------------------------------------------------------------------------- helpers


def _digest(prompt: str, seed: int) -> bytes:
    """sha256 of the prompt and seed (separated so ("a", 12) != ("a1", 2))."""
    return hashlib.sha256(f"{prompt}\x00{int(seed)}".encode()).digest()


def _rng(digest: bytes) -> random.Random:
    return random.Random(int.from_bytes(digest, "big"))


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def _palette(digest: bytes) -> list[tuple[int, int, int]]:
    """Five colours: two gradient stops, a glow colour and two accents.

    The base hue comes straight from the hash, so different prompts land on
    clearly different parts of the colour wheel.
    """
    base = int.from_bytes(digest[0:2], "big") / 65536.0
    spread = 0.08 + (digest[2] / 255.0) * 0.30  # analogous-ish second stop
    return [
        _hsv(base, 0.55 + digest[3] / 255.0 * 0.35, 0.70 + digest[4] / 255.0 * 0.25),
        _hsv(base + spread, 0.60 + digest[5] / 255.0 * 0.35, 0.30 + digest[6] / 255.0 * 0.30),
        _hsv(base + 0.5, 0.35 + digest[7] / 255.0 * 0.30, 0.90),
        _hsv(base + 0.33, 0.75, 0.95),
        _hsv(base + 0.66, 0.80, 0.85),
    ]


def _check_dims(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not 1 <= value <= MAX_DIMENSION:
            raise ValueError(f"{name} must be between 1 and {MAX_DIMENSION}, got {value}")


def _check_duration(duration_seconds: float) -> float:
    d = float(duration_seconds)
    if not math.isfinite(d) or d <= 0:
        raise ValueError(f"duration_seconds must be a positive finite number, got {duration_seconds!r}")
    return d


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in default font, scaled when FreeType is available."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError, AttributeError):  # old Pillow / no FreeType
        return ImageFont.load_default()


def _ascii(text: str) -> str:
    """The default font has no glyphs for most non-Latin text; keep it stable."""
    cleaned = " ".join(text.split())
    return cleaned.encode("ascii", "replace").decode("ascii")


def _gradient_background(
    width: int, height: int, palette: list[tuple[int, int, int]], rng: random.Random
) -> Image.Image:
    """Diagonal two-colour gradient plus an off-centre radial glow (C-speed ops only)."""
    horizontal = Image.linear_gradient("L").rotate(90).resize((width, height), Image.Resampling.BILINEAR)
    vertical = Image.linear_gradient("L").resize((width, height), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:  # flip the diagonal direction
        horizontal = horizontal.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    mask = Image.blend(horizontal, vertical, 0.5)
    bg = Image.composite(
        Image.new("RGB", (width, height), palette[1]),
        Image.new("RGB", (width, height), palette[0]),
        mask,
    )

    # Radial glow: radial_gradient is 0 at the centre, 255 at the rim.
    side = max(2, int(max(width, height) * rng.uniform(0.7, 1.3)))
    glow_mask = Image.radial_gradient("L").resize((side, side), Image.Resampling.BILINEAR)
    strength = rng.uniform(0.45, 0.75)
    glow_mask = glow_mask.point(lambda v: int(max(0, 255 - v * 1.6) * strength))
    cx = int(width * rng.uniform(0.15, 0.85)) - side // 2
    cy = int(height * rng.uniform(0.15, 0.85)) - side // 2
    bg.paste(Image.new("RGB", (side, side), palette[2]), (cx, cy), glow_mask)
    return bg


def _draw_shapes(
    img: Image.Image, palette: list[tuple[int, int, int]], rng: random.Random
) -> None:
    width, height = img.size
    scale = min(width, height)
    draw = ImageDraw.Draw(img, "RGBA")
    for _ in range(rng.randint(5, 14)):
        kind = rng.choice(("ellipse", "rectangle", "polygon"))
        colour = rng.choice(palette[2:] + [(255, 255, 255), (20, 20, 30)])
        alpha = rng.randint(70, 190)
        fill = (*colour, alpha)
        outline = (*colour, min(255, alpha + 60))
        cx = rng.uniform(-0.1, 1.1) * width
        cy = rng.uniform(-0.1, 1.1) * height
        r = rng.uniform(0.05, 0.28) * scale
        if kind == "ellipse":
            rx, ry = r, r * rng.uniform(0.5, 1.5)
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill, outline=outline,
                         width=max(1, scale // 200))
        elif kind == "rectangle":
            rx, ry = r * rng.uniform(0.6, 1.4), r * rng.uniform(0.6, 1.4)
            draw.rectangle((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)
        else:
            sides = rng.randint(3, 7)
            phase = rng.uniform(0, 2 * math.pi)
            points = [
                (
                    cx + r * rng.uniform(0.7, 1.0) * math.cos(phase + 2 * math.pi * k / sides),
                    cy + r * rng.uniform(0.7, 1.0) * math.sin(phase + 2 * math.pi * k / sides),
                )
                for k in range(sides)
            ]
            draw.polygon(points, fill=fill)


def _draw_label(img: Image.Image, text: str, *, corner: str = "bottom-left") -> None:
    """Draw ``text`` in a small translucent box, shortened to fit the image width."""
    width, height = img.size
    if width < 16 or height < 12 or not text:
        return
    font = _font(max(10, min(width, height) // 36))
    draw = ImageDraw.Draw(img, "RGBA")
    pad = max(2, min(width, height) // 100)
    max_w = width - 4 * pad
    base = label = text
    bbox = draw.textbbox((0, 0), label, font=font)
    while bbox[2] - bbox[0] > max_w:
        base = base[: len(base) - max(1, len(base) // 8)].rstrip(" .")
        if not base:
            return
        label = base + "..."
        bbox = draw.textbbox((0, 0), label, font=font)
    tw, th = bbox[2] - bbox[0], bbox[3] - bbox[1]
    box_w, box_h = tw + 2 * pad, th + 2 * pad
    x0: float = pad
    y0 = pad if corner.startswith("top") else height - box_h - pad
    if corner.endswith("right"):
        x0 = width - box_w - pad
    draw.rectangle((x0, y0, x0 + box_w, y0 + box_h), fill=(0, 0, 0, 150))
    draw.text((x0 + pad - bbox[0], y0 + pad - bbox[1]), label, font=font, fill=(255, 255, 255, 255))


def _caption(prompt: str) -> str:
    text = _ascii(prompt)
    if len(text) > _CAPTION_MAX_CHARS:
        text = text[: _CAPTION_MAX_CHARS - 3].rstrip() + "..."
    return text


def _scene(prompt: str, seed: int, width: int, height: int) -> tuple[Image.Image, random.Random, list[tuple[int, int, int]]]:
    """Background + shapes (no text) and the RNG/palette for further drawing."""
    digest = _digest(prompt, seed)
    rng = _rng(digest)
    palette = _palette(digest)
    img = _gradient_background(width, height, palette, rng)
    _draw_shapes(img, palette, rng)
    return img, rng, palette


# --------------------------------------------------------------------------- image


def make_image(prompt: str, *, seed: int, width: int, height: int, fmt: str) -> bytes:
    """Render a deterministic picture for ``prompt`` and encode it as ``fmt``.

    ``fmt`` is one of ``"png"``, ``"jpeg"`` (alias ``"jpg"``) or ``"webp"``.
    Same arguments -> byte-identical bytes; the palette and composition are
    derived from ``sha256(prompt, seed)``.
    """
    fmt_norm = fmt.lower().strip()
    if fmt_norm == "jpg":
        fmt_norm = "jpeg"
    if fmt_norm not in IMAGE_FORMATS:
        raise ValueError(f"unsupported image format {fmt!r}; expected one of {sorted(IMAGE_FORMATS)}")
    _check_dims(width, height)

    img, _, _ = _scene(prompt, seed, width, height)
    _draw_label(img, _caption(prompt))

    buf = io.BytesIO()
    if fmt_norm == "png":
        img.save(buf, format="PNG", **_PNG_PARAMS)
    elif fmt_norm == "jpeg":
        img.save(buf, format="JPEG", **_JPEG_PARAMS)
    else:
        img.save(buf, format="WEBP", **_WEBP_PARAMS)
    return buf.getvalue()


# --------------------------------------------------------------------------- audio


def _melody(digest: bytes) -> tuple[list[tuple[float, int]], float]:
    """Return ([(frequency_hz, beats), ...], seconds_per_beat) from the hash."""
    rng = _rng(digest[::-1])
    root_midi = 57 + digest[8] % 12  # A3 .. G#4
    beat = 60.0 / (90 + digest[9] % 60)  # 90..149 bpm
    n_notes = 5 + digest[10] % 6  # 5..10 notes, then the phrase repeats
    notes: list[tuple[float, int]] = []
    for i in range(n_notes):
        byte = digest[11 + i]
        degree = _PENTATONIC[byte % len(_PENTATONIC)]
        octave = 12 * ((byte >> 3) % 2)
        midi = root_midi + degree + octave
        freq = 440.0 * 2.0 ** ((midi - 69) / 12.0)
        beats = 2 if rng.random() < 0.25 else 1
        notes.append((freq, beats))
    return notes, beat


def _period_table(freq: float, sample_rate: int) -> array[int]:
    """One period of a soft tone (fundamental + quiet 2nd harmonic), int16.

    The period length is rounded to whole samples, so the note is tuned to
    ``sample_rate / len(table)`` - within a few cents at audio frequencies.
    """
    period = max(2, round(sample_rate / freq))
    amp = _AUDIO_AMPLITUDE * 32767
    two_pi = 2.0 * math.pi
    return array(
        "h",
        (
            int(amp * (math.sin(two_pi * k / period) + 0.25 * math.sin(2 * two_pi * k / period)))
            for k in range(period)
        ),
    )


def make_audio_wav(
    prompt: str, *, seed: int, duration_seconds: float, sample_rate: int = 22050
) -> bytes:
    """Synthesize a mono 16-bit PCM WAV melody of exactly
    ``round(duration_seconds * sample_rate)`` frames."""
    duration = _check_duration(duration_seconds)
    if not isinstance(sample_rate, int) or isinstance(sample_rate, bool) or not 8000 <= sample_rate <= 192000:
        raise ValueError(f"sample_rate must be an int between 8000 and 192000, got {sample_rate!r}")
    total = round(duration * sample_rate)

    notes, beat = _melody(_digest(prompt, seed))
    fade = max(1, int(_AUDIO_FADE_SECONDS * sample_rate))
    tables: dict[float, array[int]] = {}
    samples = array("h")
    i = 0
    while len(samples) < total:
        freq, beats = notes[i % len(notes)]
        i += 1
        n = min(round(beat * beats * sample_rate), total - len(samples))
        table = tables.get(freq)
        if table is None:
            table = tables[freq] = _period_table(freq, sample_rate)
        reps = n // len(table) + 1
        seg = (table * reps)[:n]
        # Linear fade in/out over a few ms; only these samples are touched in Python.
        f = min(fade, n // 2)
        for k in range(f):
            g = k / f
            seg[k] = int(seg[k] * g)
            seg[n - 1 - k] = int(seg[n - 1 - k] * g)
        samples.extend(seg)

    if sys.byteorder == "big":  # WAV PCM is little-endian
        samples.byteswap()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


# --------------------------------------------------------------------------- video


def _frame_durations(n_frames: int, total_ms: int) -> list[int]:
    """Split ``total_ms`` into ``n_frames`` integer durations that sum exactly."""
    return [((k + 1) * total_ms) // n_frames - (k * total_ms) // n_frames for k in range(n_frames)]


def make_video_webp(
    prompt: str,
    *,
    seed: int,
    width: int,
    height: int,
    duration_seconds: float,
    fps: int,
) -> bytes:
    """Render an animated WebP: a seeded background with a bouncing ball and a
    frame counter.

    It has ``round(duration_seconds * fps)`` frames whose durations (ms) sum to
    exactly ``round(duration_seconds * 1000)``. It loops forever.
    """
    duration = _check_duration(duration_seconds)
    _check_dims(width, height)
    if not isinstance(fps, int) or isinstance(fps, bool) or not 1 <= fps <= 120:
        raise ValueError(f"fps must be an int between 1 and 120, got {fps!r}")
    n_frames = round(duration * fps)
    total_ms = round(duration * 1000)
    if n_frames < 1:
        raise ValueError(f"duration_seconds * fps rounds to {n_frames} frames; need at least 1")
    if total_ms < n_frames:
        raise ValueError("duration too short: every frame needs at least 1 ms")

    # Static part rendered once: background, shapes, caption.
    background, rng, palette = _scene(prompt, seed, width, height)
    _draw_label(background, _caption(prompt), corner="bottom-left")

    scale = min(width, height)
    radius = max(2, int(scale * rng.uniform(0.06, 0.10)))
    ball_colour = palette[3]
    start_y = rng.uniform(0.3, 0.7)
    bounces = rng.randint(1, 3)
    reverse = rng.random() < 0.5
    counter_font = _font(max(10, scale // 30))
    show_counter = width >= 32 and height >= 24

    # Pre-render the ball sprite (with a soft shadow ring) once.
    sprite_size = 2 * radius + 2
    sprite = Image.new("RGBA", (sprite_size, sprite_size), (0, 0, 0, 0))
    sdraw = ImageDraw.Draw(sprite)
    sdraw.ellipse((0, 0, sprite_size - 1, sprite_size - 1), fill=(0, 0, 0, 110))
    sdraw.ellipse((1, 1, sprite_size - 2, sprite_size - 2), fill=(*ball_colour, 255))
    hl = max(1, radius // 2)
    sdraw.ellipse((radius - hl, radius - hl - radius // 3, radius, radius - radius // 3),
                  fill=(255, 255, 255, 170))

    frames: list[Image.Image] = []
    travel_x = max(0, width - sprite_size)
    travel_y = max(0, height - sprite_size)
    for k in range(n_frames):
        t = k / n_frames if n_frames > 1 else 0.0
        if reverse:
            t = 1.0 - t
        x = int(travel_x * t)
        bounce = abs(math.sin(math.pi * bounces * t))
        y = int(travel_y * (start_y * (1.0 - bounce) + 0.05 * bounce))
        frame = background.copy()
        frame.paste(sprite, (x, y), sprite)
        if show_counter:
            draw = ImageDraw.Draw(frame, "RGBA")
            text = f"{k + 1}/{n_frames}"
            bbox = draw.textbbox((0, 0), text, font=counter_font)
            pad = max(2, scale // 100)
            x0 = width - (bbox[2] - bbox[0]) - 3 * pad
            draw.rectangle((x0, pad, width - pad, pad + (bbox[3] - bbox[1]) + 2 * pad), fill=(0, 0, 0, 150))
            draw.text((x0 + pad - bbox[0], 2 * pad - bbox[1]), text, font=counter_font, fill=(255, 255, 255, 255))
        else:
            # Too small for a counter: flip a corner block between black and
            # white so no two consecutive frames are equal (libwebp merges
            # identical frames, which would change the frame count).
            tick = max(1, scale // 16)
            frame.paste((255, 255, 255) if k % 2 else (0, 0, 0), (0, 0, tick, tick))
        frames.append(frame)

    buf = io.BytesIO()
    frames[0].save(
        buf,
        format="WEBP",
        save_all=True,
        append_images=frames[1:],
        duration=_frame_durations(n_frames, total_ms),
        loop=0,
        lossless=False,
        quality=_VIDEO_WEBP_QUALITY,
        method=_VIDEO_WEBP_METHOD,
        kmin=_VIDEO_WEBP_KMIN,
        kmax=_VIDEO_WEBP_KMAX,
    )
    return buf.getvalue()
