"""Which provider parameters a request may set (DESIGN.md §12).

A request's `provider_params` (and, on the chat route, the body's fields beyond
`model`, `messages` and `stream`) reach the provider as they are. So each adapter declares,
per modality, the names a request may set (`Adapter.provider_params`), and the operator
may add names for one deployment (catalog option `provider_params: {image: [name, ...]}`).
Whatever the catalog decides can never be set from a request, whoever declares it:

    the model and its version or deployment   model, models, version, deployment, route, provider
    any URL                                    *url*, *uri*, *endpoint*, *host*
    auth and account fields                    *key*, *token*, *secret*, *auth*, organization,
                                               project, account, user, store, service_tier, metadata
    webhook and callback fields                *webhook*, *callback*

The rule holds inside a settable parameter's value too (a `gcsUri` inside Veo's
`lastFrame` would have the provider read the operator's bucket): every key nested in a
value is checked, except in the chat fields that carry a schema for the model's own
output (`tools`, `response_format`, ...), whose property names are the tenant's business.

Counts and lengths the price is computed from (`n`, `num_outputs`, durations) are set
through the request's own fields, so no adapter declares them either.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

ParamNames = Mapping[str, frozenset[str]]  # modality -> names a request may set

_EXACT = frozenset({
    "model", "models", "version", "deployment", "deploymentid", "route", "provider", "providers",
    "organization", "org", "project", "account", "user", "store", "servicetier", "metadata",
    "key", "apikey", "n", "numoutputs", "numimages", "samplecount", "numberofvideos",
})
_PART = re.compile(r"url|uri|endpoint|host|webhook|callback|token(?!s)|secret|auth|apikey|password|credential|account")


def catalog_controlled(name: str) -> bool:
    """True for a name only the catalog (the operator) may set."""
    flat = re.sub(r"[^a-z0-9]", "", name.lower())
    return flat in _EXACT or bool(_PART.search(flat)) or flat.endswith("key")


def names(*groups: Iterable[str]) -> frozenset[str]:
    return frozenset(n for g in groups for n in g)


def operator_additions(options: Mapping[str, Any], modality: str) -> frozenset[str]:
    """Names a deployment's catalog options add for `modality` (a list for every modality,
    or a {modality: [names]} mapping); catalog-controlled names are never added."""
    extra = options.get("provider_params")
    if isinstance(extra, Mapping):
        extra = extra.get(modality)
    if not isinstance(extra, list | tuple):
        return frozenset()
    return frozenset(str(n) for n in extra if not catalog_controlled(str(n)))


# Values that describe the model's output or tools (JSON schemas, token ids): their keys
# are the tenant's own names, never the provider's control fields.
_OPAQUE = frozenset({"tools", "tool_choice", "response_format", "logit_bias", "stop"})
_CONTROLLED = "set by the operator's catalog, never by a request"


def refused(settable: frozenset[str], params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(name, why) for every parameter of `params` a request may not set, sorted; a
    catalog-controlled key nested in a settable value is named by its dotted path
    (`lastFrame.gcsUri`, `referenceImages.0.image.uri`)."""
    out: list[tuple[str, str]] = []
    for name in sorted(params):
        if catalog_controlled(name):
            out.append((name, _CONTROLLED))
        elif name not in settable:
            out.append((name, f"not a parameter this provider lets a request set; settable: {sorted(settable) or 'none'}"))
        elif name not in _OPAQUE:
            out.extend((path, _CONTROLLED) for path in _nested_controlled(params[name], name))
    return out


def _nested_controlled(value: Any, path: str, depth: int = 0) -> list[str]:
    if depth > 32:  # deeper than any provider's input: refused as a whole
        return [path]
    if isinstance(value, Mapping):
        out = []
        for key in value:
            sub = f"{path}.{key}"
            out.extend([sub] if catalog_controlled(str(key)) else _nested_controlled(value[key], sub, depth + 1))
        return out
    if isinstance(value, list | tuple):
        return [p for i, item in enumerate(value) for p in _nested_controlled(item, f"{path}.{i}", depth + 1)]
    return []


# The OpenAI chat-completions fields a request may set beyond model, messages and stream.
CHAT = frozenset({
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "presence_penalty",
    "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "reasoning_effort", "stream_options",
})
