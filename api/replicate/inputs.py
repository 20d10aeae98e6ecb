"""Replicate-style model input -> a genroute job input.

Replicate's inputs are per model (`prompt`, `num_outputs`, `aspect_ratio`, `output_format`,
`width`/`height`, `go_fast`, ...). Our inputs are per modality (core/schemas.py). Fields
with the same meaning are renamed; fields our schema already has pass as they are; every
other field goes to `provider_params`, which reaches the provider unchanged (a Replicate
deployment sends it on as the model's own input; the local provider reads
`latency_seconds`, `progress_steps` and `fail` from it). The result is then validated like
any job's input, so a bad value is a 422 naming the field.
"""

from __future__ import annotations

from typing import Any

from core.schemas import INPUT_SCHEMAS

# Replicate's name -> ours, per modality
RENAMES: dict[str, dict[str, str]] = {
    "image": {"num_outputs": "n", "negative_prompt": "negative_prompt"},
    "video": {"duration": "duration_seconds", "frames_per_second": "fps", "start_image": "image", "first_frame_image": "image"},
    "audio": {"duration": "duration_seconds", "speaker": "voice", "output_format": "format"},
    "text": {"max_new_tokens": "max_tokens"},
}
IMAGE_INPUTS = ("image", "input_image", "image_prompt", "input_images")
FORMATS = {"jpg": "jpeg"}


def to_job_input(modality: str, raw: dict[str, Any]) -> dict[str, Any]:
    schema = INPUT_SCHEMAS.get(modality)
    ours = set(schema.model_fields) if schema is not None else set()
    renames = RENAMES.get(modality, {})
    out: dict[str, Any] = {}
    extra: dict[str, Any] = dict(raw.get("provider_params") or {}) if isinstance(raw.get("provider_params"), dict) else {}
    width, height = raw.get("width"), raw.get("height")
    for key, value in raw.items():
        if key == "provider_params":
            continue
        if modality == "image" and key in IMAGE_INPUTS:
            images = value if isinstance(value, list) else [value]
            out.setdefault("input_images", []).extend(images)
        elif modality == "image" and key in ("width", "height") and width is not None and height is not None:
            continue  # joined into size below
        elif modality == "text" and key == "prompt":
            out.setdefault("messages", []).append({"role": "user", "content": value})
        elif modality == "text" and key == "system_prompt":
            out.setdefault("messages", []).insert(0, {"role": "system", "content": value})
        elif key in renames:
            out[renames[key]] = value
        elif key in ours:
            out[key] = value
        else:
            extra[key] = value
    if modality == "image":
        if width is not None and height is not None:
            out["size"] = f"{width}x{height}"
        fmt = out.get("output_format")
        if isinstance(fmt, str):
            out["output_format"] = FORMATS.get(fmt, fmt)
    if extra:
        out["provider_params"] = extra
    return out
