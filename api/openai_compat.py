"""What every OpenAI-compatible route shares: OpenAI's error shape and a route class that
answers in it, so the official SDKs raise their own exception classes against us.

    {"error": {"message", "type", "param", "code"}}

Only the routes built with `openai_router()` (api/chat.py, api/openai_media.py) answer
this way; the rest of the API keeps `{"error": {"code", "message", "details"}}`.

    our error                         status  OpenAI type / code
    Unauthorized                      401     invalid_request_error / invalid_api_key
    NotFound (model)                  404     invalid_request_error / model_not_found
    InvalidRequest, InvalidInput,     400     invalid_request_error / invalid_value, param = the field
      request validation
    Conflict (idempotency)            409     invalid_request_error / idempotency_conflict
    ProviderError / failed job        by its code: invalid_input 400, moderated 400,
                                      rate_limited 429, provider_* 502/503, timeout 504
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.strict import StrictRoute
from core import disclosure
from core.errors import ErrorCode, GenrouteError, InvalidInput, ProviderError
from core.outages import unavailable
from core.routing.catalog import Model
from core.runtime import Runtime

log = logging.getLogger("genroute.api.openai")

# a failed job's or provider's error code -> (HTTP status, OpenAI error type)
CODE_STATUS: dict[str, tuple[int, str]] = {
    ErrorCode.invalid_input: (400, "invalid_request_error"),
    ErrorCode.moderated: (400, "invalid_request_error"),
    ErrorCode.rate_limited: (429, "rate_limit_error"),
    ErrorCode.budget_exceeded: (429, "insufficient_quota"),
    ErrorCode.provider_auth: (502, "server_error"),
    ErrorCode.provider_error: (502, "server_error"),
    ErrorCode.provider_unavailable: (503, "server_error"),
    ErrorCode.timeout: (504, "server_error"),
    ErrorCode.canceled: (409, "invalid_request_error"),
    ErrorCode.storage_error: (500, "server_error"),
    ErrorCode.internal: (500, "server_error"),
}


class OpenAIError(Exception):
    """An error to answer in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers or None)


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def from_code(code: str, message: str, *, retry_after: float | None = None, param: str | None = None) -> OpenAIError:
    """A job's or provider's error code in OpenAI's terms. Server-side failures carry
    `x-should-retry: false` where a retry would only run (and bill) the work again."""
    status, type_ = CODE_STATUS.get(code, (500, "server_error"))
    headers: dict[str, str] = {}
    if retry_after is not None and status == 429:
        headers["retry-after"] = str(max(1, round(retry_after)))
    if code == ErrorCode.moderated:
        code = "content_policy_violation"
    return OpenAIError(status, message, type=type_, code=code, param=param, headers=headers)


def from_provider(exc: ProviderError) -> OpenAIError:
    """The tenant's words for it (core/disclosure.py): never the provider's body."""
    return from_code(exc.code.value, disclosure.of_provider_error(exc).message, retry_after=exc.retry_after)


def param_of(loc: Any, fields: Mapping[str, str] | None = None) -> str | None:
    """The OpenAI parameter a validation error's location names. `fields` maps our job
    input's field names to the facade's (e.g. text -> input, duration_seconds -> seconds)."""
    parts = [str(p) for p in (loc or ()) if not isinstance(p, int)]
    if parts[:1] == ["body"]:
        parts = parts[1:]
    if parts[:1] == ["input"] and len(parts) > 1:  # a job input's field; a lone "input" is the parameter
        parts = parts[1:]
    if not parts:
        return None
    head = parts[0]
    return (fields or {}).get(head, head)


def from_invalid_input(exc: InvalidInput, fields: Mapping[str, str] | None = None) -> OpenAIError:
    details = exc.details if isinstance(exc.details, list) else []
    first = details[0] if details and isinstance(details[0], dict) else {}
    param = param_of(first.get("loc"), fields)
    message = f"{exc.message}: {first.get('msg')}" if first.get("msg") else exc.message
    if exc.code == "param_not_allowed":  # a parameter only the operator's catalog may set
        loc = first.get("loc") or [param]
        return OpenAIError(422, exc.message, param=str(loc[-1]), code=exc.code)
    return invalid(message, param)


def translate(exc: Exception) -> OpenAIError:
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            why = (first.get("ctx") or {}).get("error")
            return invalid("We could not parse the JSON body of your request" + (f": {why}." if why else "."), code="invalid_json")
        param = param_of(first.get("loc"))
        if first.get("type") == "missing" and param:
            return invalid(f"Missing required parameter: '{param}'.", param, code="missing_required_parameter")
        return invalid(f"Invalid '{param}': {first.get('msg', 'invalid value')}." if param else "Invalid request body.", param)
    if isinstance(exc, StarletteHTTPException):  # Starlette's own refusals (a form without a boundary)
        status = exc.status_code
        return OpenAIError(status, str(exc.detail), type="invalid_request_error" if status < 500 else "server_error",
                           headers=exc.headers)
    if isinstance(exc, InvalidInput):
        return from_invalid_input(exc)
    if isinstance(exc, ProviderError):
        return from_provider(exc)
    if isinstance(exc, GenrouteError):
        if exc.status_code == 401:
            return OpenAIError(401, exc.message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if exc.code == "model_not_found":
            return OpenAIError(404, exc.message, param="model", code="model_not_found")
        status = 400 if exc.status_code == 422 else exc.status_code
        kind = {402: "insufficient_quota", 429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
        return OpenAIError(status, exc.message, type=kind, code=exc.code, headers=exc.headers)
    if (which := unavailable(exc)) is not None:
        log.warning("%s unavailable in an OpenAI-compatible route: %s: %s", which, type(exc).__name__, str(exc)[:300])
        return OpenAIError(503, f"{which} is overloaded or unavailable; retry shortly", type="server_error",
                           code="unavailable", headers={"Retry-After": "1"})
    log.error("unhandled error in an OpenAI-compatible route", exc_info=exc)
    return OpenAIError(500, "internal error; it has been logged", type="server_error", code="internal")


class OpenAIRoute(StrictRoute):
    """Every error a route (or its dependencies: auth, body parsing) raises comes out in
    OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - translated, and logged when unexpected
                return translate(exc).response()

        return route


def openai_router(**kwargs: Any) -> APIRouter:
    return APIRouter(prefix="/v1", route_class=OpenAIRoute, **kwargs)


def model_for(rt: Runtime, model_id: Any, modality: str) -> Model:
    """The catalog model a request names, which must serve `modality`. With no model
    named, the catalog's first model of that modality (OpenAI's endpoints have defaults)."""
    if model_id is None or model_id == "":
        model = next((m for m in rt.catalog.models if m.modality == modality), None)
        if model is None:
            raise OpenAIError(404, f"the catalog has no {modality} model", param="model", code="model_not_found")
        return model
    if not isinstance(model_id, str):
        raise invalid("Invalid type for 'model': expected a string.", "model", code="invalid_type")
    model = rt.catalog.get(model_id)
    if model is None:
        raise OpenAIError(
            404, f"The model '{model_id}' does not exist; GET /v1/models lists the models you can use.",
            param="model", code="model_not_found",
        )
    if model.modality != modality:
        raise invalid(f"The model '{model_id}' is a {model.modality} model; this endpoint needs a {modality} model.", "model")
    return model
