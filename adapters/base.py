"""The adapter protocol (DESIGN.md §4).

    submit(request) -> Done | Pending
    poll(handle)    -> Pending | Done | Failed
    cancel(handle)  -> None          (best effort)

Adapters raise `core.errors.ProviderError` for every provider-side fault. They get an
httpx.AsyncClient from the process and borrow it: they never close it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, cast

import httpx

from core import fetcher, params
from core.errors import ErrorCode, ProviderError, ProviderErrorKind
from core.routing.catalog import Deployment
from core.types import PollNow, PollResult, ProviderRequest, SubmitResult

INPUT_FETCH_SECONDS = 60.0  # one input file, every redirect and byte included


@dataclass(frozen=True)
class Backoff:
    """How polls slow as a provider task ages: for the first `hold` seconds the adapter's
    own interval, then at least `start` seconds, doubling every `double_every` seconds, up
    to `cap` (a short image task is seen done at once; an hour-long video is not asked
    about every second). A longer interval asked by the adapter or the provider is kept;
    the poller keeps the result within the job's deadline and the slot lease."""

    hold: float
    start: float
    double_every: float
    cap: float

    def at(self, interval: float, age: float) -> float:
        if age <= self.hold:
            return interval
        floor = min(self.cap, self.start * float(2.0 ** ((age - self.hold) / self.double_every)))
        return max(interval, floor)

    @classmethod
    def from_option(cls, value: Any, default: Backoff | None) -> Backoff | None:
        """The deployment option `poll_backoff`: false (a steady cadence), or a mapping of
        hold / start / double_every / cap (seconds) over the adapter's (or 30 / 1 / 60 /
        10). ValueError names what to fix (the catalog refuses the file)."""
        if value is None or value is False:
            return default if value is None else None
        if not isinstance(value, dict) or not value or set(value) - {"hold", "start", "double_every", "cap"}:
            raise ValueError("options.poll_backoff: false, or a mapping of hold, start, double_every and cap (seconds)")
        base = default or cls(hold=30.0, start=1.0, double_every=60.0, cap=10.0)
        fields = {"hold": base.hold, "start": base.start, "double_every": base.double_every, "cap": base.cap}
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0 or (k != "hold" and v <= 0):
                raise ValueError(f"options.poll_backoff.{k}: a number of seconds{'' if k == 'hold' else ' above 0'}")
            fields[k] = float(v)
        if fields["start"] > fields["cap"]:
            raise ValueError("options.poll_backoff.start: at most its cap")
        return cls(**fields)


class Adapter:
    name: ClassVar[str]
    # How the adapter's polls slow as a task ages (None: a steady cadence). The deployment
    # option `poll_backoff` overrides it (false, or hold / start / double_every / cap); a
    # deployment that sets a steady `poll_interval` and no `poll_backoff` is not slowed.
    backoff: ClassVar[Backoff | None] = None
    # Which provider parameters a request may set, per modality (core/params.py). Every
    # adapter declares its own (tests/test_trust_params.py fails for one that does not);
    # the default lets a request set nothing. Catalog-controlled names (model, URLs, auth,
    # webhooks) are refused when the class is defined.
    provider_params: ClassVar[params.ParamNames] = {}
    # True when submitting the same job twice cannot create a second provider task (the
    # provider dedupes on our job id). Only then may an interrupted submit be resent.
    idempotent_submit: ClassVar[bool] = False
    # Seconds per call shape when the deployment's `timeouts` leave one unset (see
    # core.routing.catalog.Timeouts). Adapters of slow synchronous creates raise `create`.
    default_timeouts: ClassVar[dict[str, float]] = {"create": 60.0, "poll": 30.0, "download": 60.0}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        bad = sorted(n for names in cls.provider_params.values() for n in names if params.catalog_controlled(n))
        if bad:
            raise TypeError(f"{cls.__name__}.provider_params declares catalog-controlled names: {bad}")
        if "submit" in cls.__dict__:
            cls.submit = _checking_params(cls.__dict__["submit"])  # type: ignore[method-assign]  # wrapped on purpose, once per class

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Called when a catalog loads (core/routing/catalog.py): a bad option refuses the
        catalog, with its path. Adapters with options of their own extend this."""
        Backoff.from_option(options.get("poll_backoff"), cls.backoff)

    @classmethod
    def settable(cls, deployment: Deployment, modality: str) -> frozenset[str]:
        """The provider parameters a request may set on `deployment` for `modality`: the
        adapter's declaration and the operator's additions from the catalog."""
        return cls.provider_params.get(modality, frozenset()) | params.operator_additions(deployment.options, modality)

    def __init__(self, deployment: Deployment, http: httpx.AsyncClient) -> None:
        self.deployment = deployment
        self.http = http
        self.api_key = deployment.api_key()

    @classmethod
    def timeout_for(cls, deployment: Deployment, shape: str) -> float:
        """The deployment's timeout for `shape` (create, poll, download), else the adapter's."""
        value = getattr(deployment.timeouts, shape)
        return float(value) if value is not None else cls.default_timeouts[shape]

    def timeout(self, shape: str) -> float:
        return self.timeout_for(self.deployment, shape)

    async def submit(self, request: ProviderRequest) -> SubmitResult:
        raise NotImplementedError

    async def poll(self, handle: dict[str, Any]) -> PollResult:
        raise NotImplementedError

    async def cancel(self, handle: dict[str, Any]) -> None:
        """Ask the provider to stop (best effort). Providers without cancel do nothing."""
        return None

    async def verify_callback(
        self, headers: dict[str, str], body: bytes, handle: dict[str, Any], secret: str | None
    ) -> PollResult | PollNow | None:
        """Check a provider webhook's signature and turn its body into a poll result
        (None: an intermediate event that changes nothing; PollNow: an unsigned body that
        only makes the job's next poll due now). Raise ProviderError(auth) when
        the signature does not verify. `secret` is the per-job secret this job was given
        (for providers that sign with ours). Providers without webhooks keep the default."""
        raise ProviderError(ProviderErrorKind.auth, f"{self.name} sends no callbacks")

    def poll_interval(self, default: float) -> float:
        """The adapter's cadence, or the deployment's `poll_interval` option (tests use 0.05)."""
        value = self.deployment.options.get("poll_interval")
        return float(value) if isinstance(value, int | float) and value > 0 else default

    def paced(self, interval: float, age: float) -> float:
        """The next poll's delay for a task `age` seconds old that asked for `interval`
        (its adapter's cadence, or a provider's hint): slower as the task ages, by the
        adapter's backoff or the deployment's `poll_backoff`. A deployment's own steady
        `poll_interval` without a `poll_backoff` is kept as it is."""
        options = self.deployment.options
        default = None if "poll_interval" in options else self.backoff
        backoff = Backoff.from_option(options.get("poll_backoff"), default)
        return backoff.at(interval, age) if backoff is not None else interval

    def headers(self) -> dict[str, str]:
        """Extra headers from the deployment's `headers` option (gateways, org ids)."""
        extra = self.deployment.options.get("headers") or {}
        return {str(k): str(v) for k, v in extra.items()}

    def base_url(self, default: str) -> str:
        return (self.deployment.base_url or default).rstrip("/")

    async def fetch_input(self, url: str, *, what: str, max_bytes: int, timeout: float = INPUT_FETCH_SECONDS) -> bytes:
        """A tenant's input file (image, mask) by URL, through the guarded fetcher: the
        address checked on every hop, at most `max_bytes` streamed, `timeout` overall.
        Any refusal is the tenant's: invalid_input, with the fetcher's one reason."""
        try:
            async with fetcher.fetch(self.http, url, max_bytes=max_bytes, timeout=timeout) as got:
                status = got.response.status_code
                if not 200 <= status < 300:
                    raise ProviderError(
                        ProviderErrorKind.invalid, f"{what} URL answered HTTP {status}", code=ErrorCode.invalid_input
                    )
                return await got.read()
        except fetcher.FetchError as exc:
            raise ProviderError(
                ProviderErrorKind.invalid,
                f"{what} was not fetched: {exc.reason}",
                code=ErrorCode.invalid_input,
                detail={"fetch": exc.kind.value},
            ) from None


_Submit = TypeVar("_Submit", bound=Callable[..., Coroutine[Any, Any, SubmitResult]])


def _checking_params(submit: _Submit) -> _Submit:
    """Every adapter's submit refuses what the API refuses at submit time (a job queued
    before a catalog change still meets the rule): nothing is sent to the provider."""

    @functools.wraps(submit)
    async def checked(self: Adapter, request: ProviderRequest) -> SubmitResult:
        given = request.input.get("provider_params") or {}
        bad = params.refused(self.settable(self.deployment, request.modality), given) if given else []
        if bad:
            name, why = bad[0]
            raise ProviderError(
                ProviderErrorKind.invalid,
                f"provider_params.{name} is not allowed: {why}",
                code=ErrorCode.invalid_input,
                detail={"loc": ["input", "provider_params", *(int(p) if p.isdigit() else p for p in name.split("."))]},
            )
        result: SubmitResult = await submit(self, request)
        return result

    return cast(_Submit, checked)  # same signature: wraps() keeps the wrapped one's
