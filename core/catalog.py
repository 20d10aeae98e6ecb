"""The model catalog: public model names -> modality, capabilities and deployments.

Loaded from one YAML file (core/catalog.yaml by default, GENROUTE_CATALOG for another)
and validated at load; errors name the file, the path inside it and what to fix.

    models:
      - id: local-image
        modality: image
        capabilities: {sizes: [...], output_formats: [png, jpeg, webp], max_n: 4}
        deployments:
          - name: local-image
            adapter: local
            model: image               # the provider's model id
            base_url: null
            api_key_env: null          # name of the env var holding the provider key
            options: {}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import InvalidInput
from core.schemas import INPUT_SCHEMAS

DEFAULT_CATALOG = Path(__file__).parent / "catalog.yaml"
Modality = Literal["image", "video", "audio", "text"]


class CatalogError(ValueError):
    pass


class Deployment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    adapter: str = Field(min_length=1)
    model: str = Field(min_length=1, description="the provider's model id")
    base_url: str | None = None
    api_key_env: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class Capabilities(BaseModel):
    """What a model accepts beyond its modality's schema. Absent = anything the schema allows."""

    model_config = ConfigDict(extra="forbid")

    sizes: list[str] | None = None
    aspect_ratios: list[str] | None = None
    output_formats: list[str] | None = None
    max_n: int | None = Field(default=None, ge=1)
    durations: list[float] | None = None
    max_duration_seconds: float | None = Field(default=None, gt=0)
    resolutions: list[str] | None = None
    fps: list[int] | None = None
    formats: list[str] | None = None
    voices: list[str] | None = None
    input_images: bool = True


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    modality: Modality
    description: str | None = None
    capabilities: Capabilities = Field(default_factory=Capabilities)
    deployments: list[Deployment] = Field(min_length=1)


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[Model]
    _by_id: dict[str, Model] = {}

    @model_validator(mode="after")
    def _unique(self) -> Catalog:
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            if m.id in seen:
                raise ValueError(f"models[{i}]: duplicate model id {m.id!r}")
            seen.add(m.id)
        self._by_id = {m.id: m for m in self.models}
        return self

    def get(self, model_id: str) -> Model | None:
        return self._by_id.get(model_id)

    def validate_input(self, model: Model, raw: dict[str, Any]) -> dict[str, Any]:
        """Validate a job's input against the modality schema and the model's capabilities.
        Returns the normalized input; raises InvalidInput with field paths."""
        schema = INPUT_SCHEMAS.get(model.modality)
        if schema is None:
            raise InvalidInput(f"model {model.id!r} ({model.modality}) does not take jobs yet")
        try:
            parsed = schema.model_validate(raw)
        except ValidationError as exc:
            raise InvalidInput(
                "input does not match the model's schema",
                details=[
                    {"loc": ["input", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                    for e in exc.errors(include_url=False, include_context=False, include_input=False)
                ],
            ) from None
        problems = _capability_problems(model.capabilities, parsed.model_dump())
        if problems:
            raise InvalidInput(f"model {model.id!r} cannot honour these parameters", details=problems)
        return parsed.model_dump(mode="json", exclude_none=True)


def _capability_problems(caps: Capabilities, data: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def bad(field: str, allowed: Any) -> None:
        out.append(
            {
                "loc": ["input", field],
                "msg": f"{data[field]!r} is not supported by this model; allowed: {allowed}",
                "type": "unsupported_value",
            }
        )

    for field, allowed in (
        ("size", caps.sizes),
        ("aspect_ratio", caps.aspect_ratios),
        ("output_format", caps.output_formats),
        ("resolution", caps.resolutions),
        ("fps", caps.fps),
        ("format", caps.formats),
        ("voice", caps.voices),
    ):
        if allowed is not None and data.get(field) is not None and data[field] not in allowed:
            bad(field, allowed)
    if caps.durations is not None and data.get("duration_seconds") is not None:
        if float(data["duration_seconds"]) not in caps.durations:
            bad("duration_seconds", caps.durations)
    if caps.max_duration_seconds is not None and (data.get("duration_seconds") or 0) > caps.max_duration_seconds:
        bad("duration_seconds", f"at most {caps.max_duration_seconds}")
    if caps.max_n is not None and (data.get("n") or 1) > caps.max_n:
        bad("n", f"1..{caps.max_n}")
    if not caps.input_images and (data.get("input_images") or data.get("image")):
        field = "input_images" if data.get("input_images") else "image"
        out.append({"loc": ["input", field], "msg": "this model takes no input images", "type": "unsupported_value"})
    return out


def load_catalog(path: Path | None = None) -> Catalog:
    path = path or DEFAULT_CATALOG
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CatalogError(f"{path}: catalog file not found (set GENROUTE_CATALOG to an existing file)") from None
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from None
    try:
        return Catalog.model_validate(raw)
    except ValidationError as exc:
        lines = [
            f"{path}: {'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        ]
        raise CatalogError("invalid catalog:\n" + "\n".join(lines)) from None
