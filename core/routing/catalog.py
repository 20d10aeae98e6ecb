"""The model catalog: public model names -> modality, capabilities and deployments.

Loaded from one YAML file (core/routing/catalog.yaml by default, GENROUTE_CATALOG for another)
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
            weight: 1                  # share of traffic under `weighted` (0: only when others cannot)
            priority: 0                # lower is tried first (every strategy breaks ties by it)
            price: {per_image: 40000}  # micro-USD (core/billing/pricing.py); also per_request, per_second,
                                       # per_1k_characters, per_1k_input_tokens, per_1k_output_tokens,
                                       # per_credit, per_compute_second, hold; per_image by size and
                                       # quality {default: 42000, high: 167000, 1024x1536/high: 250000},
                                       # per_second by resolution {default: 400000, 1080p: 500000}
            limits: {max_concurrency: 3, rpm: 60, tpm: null}   # held in Redis across every process
            capabilities: null         # this deployment's own, replacing the model's (a fallback
                                       # that cannot honour 1080p is then skipped, not downgraded)
            timeouts: {create: 90, poll: 20, download: 1200}   # seconds; unset: the adapter's
        strategy: priority             # priority | weighted | least_busy | lowest_cost
        fallback_models: []            # model ids tried, in order, when every deployment fails
        aliases: [black-forest-labs/flux-schnell]   # other names it answers to (Replicate-style
                                       # owner/name strings work unchanged, api/replicate/)
        cache: false                   # the result cache is on by default for this model (core/cache.py)
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from core.billing.pricing import Price
from core.errors import InvalidInput
from core.schemas import INPUT_SCHEMAS

DEFAULT_CATALOG = Path(__file__).parent / "catalog.yaml"
ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
Modality = Literal["image", "video", "audio", "text"]
Strategy = Literal["priority", "weighted", "least_busy", "lowest_cost"]


class CatalogError(ValueError):
    pass


class Limits(BaseModel):
    """Per-deployment limits, held in Redis so they bind across every worker and API replica."""

    model_config = ConfigDict(extra="forbid")

    max_concurrency: int | None = Field(default=None, ge=1, description="provider tasks in flight at once")
    rpm: int | None = Field(default=None, ge=1, description="requests per sliding minute")
    tpm: int | None = Field(default=None, ge=1, description="tokens per sliding minute (text)")


# Where each adapter's code lives, by the name a deployment gives (`adapter: bfl`). The
# names live here so that loading a catalog refuses an unknown one in every process, with
# its file and line, as `genroute catalog check` does; adapters/registry.py imports the
# modules lazily from this table.
ADAPTERS: dict[str, str] = {
    "local": "adapters.local:LocalAdapter",
    "openai": "adapters.openai:OpenAIAdapter",
    "openai_compatible": "adapters.openai_compatible:OpenAICompatibleAdapter",
    "bfl": "adapters.bfl:BFLAdapter",
    "google_veo": "adapters.google_veo:GoogleVeoAdapter",
    "replicate": "adapters.replicate:ReplicateAdapter",
    "fal": "adapters.fal:FalAdapter",
    "siliconflow": "adapters.siliconflow:SiliconFlowAdapter",
    "grsai": "adapters.grsai:GrsAiAdapter",
    "openrouter": "adapters.openrouter:OpenRouterAdapter",
    "together": "adapters.together:TogetherAdapter",
    "fireworks": "adapters.fireworks:FireworksAdapter",
    "kling": "adapters.kling:KlingAdapter",
}


class Timeouts(BaseModel):
    """Seconds per call shape, for one deployment; unset: the adapter's default (a
    synchronous image create may take minutes, a poll should not). `create`: the submit
    call (for synchronous providers, the whole generation); `poll`: a status read or a
    cancel; `download`: the longest stall of an output download (seconds with no byte,
    waiting for the answer included), never its total length (storage/ingest.py)."""

    model_config = ConfigDict(extra="forbid")

    create: float | None = Field(default=None, gt=0, le=1800)
    poll: float | None = Field(default=None, gt=0, le=300)
    download: float | None = Field(default=None, gt=0, le=3600)


class Deployment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    adapter: str = Field(min_length=1)
    model: str = Field(min_length=1, description="the provider's model id")
    base_url: str | None = None
    api_key_env: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    weight: float = Field(default=1, ge=0, description="share of traffic under the weighted strategy")
    priority: int = Field(default=0, description="lower first; every strategy breaks ties by it")
    price: Price | None = None  # None: unknown (sorted last by lowest_cost)
    limits: Limits = Field(default_factory=lambda: Limits())
    capabilities: Capabilities | None = None  # replaces the model's for this deployment
    timeouts: Timeouts = Field(default_factory=lambda: Timeouts())

    @field_validator("adapter")
    @classmethod
    def _known_adapter(cls, name: str) -> str:
        if name not in ADAPTERS:
            raise ValueError(f"unknown adapter {name!r}; known: {', '.join(sorted(ADAPTERS))}")
        return name

    @model_validator(mode="after")
    def _adapter_options(self) -> Deployment:
        """The adapter checks the deployment's options here (its `check_options`: the common
        ones such as `poll_backoff`, and its own), so a catalog with a bad one is refused at
        load, with its path. The adapter's module is
        imported by name from ADAPTERS (as adapters/registry.py does), only when named."""
        module, _, attr = ADAPTERS[self.adapter].partition(":")
        check = getattr(getattr(importlib.import_module(module), attr), "check_options", None)
        if check is not None:
            check(self.options)  # ValueError: "options.<path>: what to fix"
        return self

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
    strategy: Strategy = "priority"
    fallback_models: list[str] = Field(default_factory=list, description="tried in order when every deployment fails")
    aliases: list[str] = Field(
        default_factory=list, max_length=20, description="other names it answers to, e.g. Replicate-style owner/name"
    )
    cache: bool = Field(default=False, description="serve identical seeded requests from the result cache by default")

    @property
    def replicate_name(self) -> str:
        """The owner/name Replicate's clients see: its first owner/name alias, else genroute/<id>."""
        return next((a for a in self.aliases if "/" in a), f"genroute/{self.id}")

    def capabilities_of(self, dep: Deployment) -> Capabilities:
        """What `dep` accepts: its own capabilities when it declares them, else the model's."""
        return dep.capabilities if dep.capabilities is not None else self.capabilities


class Provider(BaseModel):
    """Connection settings shared by the deployments that name it (`provider: openai`)."""

    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(min_length=1)
    base_url: str | None = None
    api_key_env: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    providers: dict[str, Provider] = Field(default_factory=dict)
    models: list[Model]
    _by_id: dict[str, Model] = {}

    @model_validator(mode="before")
    @classmethod
    def _expand_providers(cls, data: Any) -> Any:
        """A deployment's `provider: NAME` fills adapter, base_url, api_key_env and options
        (headers included) from `providers.NAME`; the deployment's own fields win."""
        if not isinstance(data, dict) or not isinstance(data.get("providers"), dict):
            return data
        providers = data["providers"]
        for i, model in enumerate(data.get("models") or []):
            for j, dep in enumerate((model or {}).get("deployments") or [] if isinstance(model, dict) else []):
                if not isinstance(dep, dict) or "provider" not in dep:
                    continue
                name = dep.pop("provider")
                prov = providers.get(name)
                if not isinstance(prov, dict):
                    raise ValueError(
                        f"models.{i}.deployments.{j}.provider: unknown provider {name!r}; "
                        f"define it under `providers:` (known: {sorted(providers)})"
                    )
                for key in ("adapter", "base_url", "api_key_env"):
                    if key in prov:
                        dep.setdefault(key, prov[key])
                options = {**(prov.get("options") or {}), **(dep.get("options") or {})}
                headers = {**(prov.get("headers") or {}), **options.get("headers", {})}
                if headers:
                    options["headers"] = headers
                dep["options"] = options
        return data
    _version: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _unique(self) -> Catalog:
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            if m.id in seen:
                raise ValueError(f"models[{i}]: duplicate model id {m.id!r}")
            seen.add(m.id)
        by_name = {m.id: m for m in self.models}
        for i, m in enumerate(self.models):
            for k, alias in enumerate(m.aliases):
                if not ALIAS.fullmatch(alias):
                    raise ValueError(f"models[{i}].aliases[{k}]: {alias!r} is not a model name (letters, digits, ._-, one /)")
                other = by_name.get(alias)
                if other is not None and other is not m:
                    raise ValueError(f"models[{i}].aliases[{k}]: {alias!r} already names model {other.id!r}")
                by_name[alias] = m
        self._by_id = by_name
        return self

    @model_validator(mode="after")
    def _shared_deployment_names(self) -> Catalog:
        # Limits, cooldowns and health live in Redis under the deployment's name, so one
        # name must mean one deployment wherever it is listed.
        first: dict[str, tuple[str, Deployment]] = {}
        for i, m in enumerate(self.models):
            for j, d in enumerate(m.deployments):
                here = f"models[{i}].deployments[{j}]"
                if d.name not in first:
                    first[d.name] = (here, d)
                elif first[d.name][1] != d:
                    raise ValueError(
                        f"{here}: deployment name {d.name!r} is already used by {first[d.name][0]} with other settings; "
                        "rename one (limits and health are kept per deployment name) or make both entries identical"
                    )
        return self

    @model_validator(mode="after")
    def _fallbacks(self) -> Catalog:
        index = {m.id: i for i, m in enumerate(self.models)}
        for i, m in enumerate(self.models):
            for k, fid in enumerate(m.fallback_models):
                here = f"models[{i}].fallback_models[{k}]"
                if fid == m.id:
                    raise ValueError(f"{here}: model {m.id!r} names itself as its fallback; remove it")
                if fid not in index:
                    raise ValueError(
                        f"{here}: unknown model {fid!r}; use one of {sorted(index)} or remove it"
                    )
                other = self.models[index[fid]]
                if other.modality != m.modality:
                    raise ValueError(
                        f"{here}: {fid!r} is a {other.modality} model but {m.id!r} is {m.modality}; "
                        "a fallback must have the same modality"
                    )
        # a cycle would make "try the fallbacks" loop: refuse it, naming the whole path
        done: set[str] = set()

        def visit(mid: str, path: list[str]) -> None:
            if mid in path:
                cycle = path[path.index(mid):] + [mid]
                start = index[cycle[0]]
                raise ValueError(
                    f"models[{start}].fallback_models: fallback cycle {' -> '.join(cycle)}; "
                    "remove one of these fallbacks"
                )
            if mid in done:
                return
            for fid in self.models[index[mid]].fallback_models:
                visit(fid, [*path, mid])
            done.add(mid)

        for m in self.models:
            visit(m.id, [])
        return self

    @property
    def version(self) -> str:
        """A digest of the file this catalog was loaded from ("" when built in memory).
        Health marks (provider_auth) are kept per version: a new catalog clears them."""
        return self._version

    def deployment(self, name: str | None) -> Deployment | None:
        """A deployment by name, in any model (names are unique across the catalog)."""
        for m in self.models:
            for d in m.deployments:
                if d.name == name:
                    return d
        return None

    def get(self, model_id: str) -> Model | None:
        """A model by id or by one of its aliases."""
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
        # Only what the client set: a schema default (say, 4 s of video) must neither be
        # refused by a model that lacks it nor reach an adapter as if the client chose it.
        explicit = parsed.model_dump(mode="json", exclude_unset=True, exclude_none=True)
        problems = _capability_problems(model.capabilities, explicit)
        if problems:
            raise InvalidInput(f"model {model.id!r} cannot honour these parameters", details=problems)
        return explicit


def capability_problems(caps: Capabilities, data: dict[str, Any]) -> list[dict[str, Any]]:
    """What in a normalized input `caps` cannot honour (empty: all of it). The router uses
    this per deployment, so a fallback never silently drops a parameter."""
    return _capability_problems(caps, data)


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


def _line_of(node: yaml.Node | None, loc: list[Any]) -> int | None:
    """The 1-based line in the YAML source of the deepest node `loc` reaches."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def load_catalog(path: Path | None = None) -> Catalog:
    path = path or DEFAULT_CATALOG
    try:
        text = path.read_text()
        raw = yaml.safe_load(text)
    except FileNotFoundError:
        raise CatalogError(f"{path}: catalog file not found (set GENROUTE_CATALOG to an existing file)") from None
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from None
    try:
        catalog = Catalog.model_validate(raw)
    except ValidationError as exc:
        root = yaml.compose(text)
        lines = []
        for e in exc.errors(include_url=False):
            line = _line_of(root, list(e["loc"]))
            where = f"{path}:{line}" if line else str(path)
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {'.'.join(str(p) for p in e['loc']) or '(top)'}: {msg}")
        raise CatalogError("invalid catalog:\n" + "\n".join(lines)) from None
    catalog._version = hashlib.sha256(text.encode()).hexdigest()[:16]
    return catalog
