"""`Client`: the blocking client (httpx.Client). `AsyncClient` (aio.py) mirrors it."""

from __future__ import annotations

import builtins
import hashlib
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from core.schemas import EventPublic, JobList, JobPublic, UsageReport
from genroute.client import _core
from genroute.client._core import COMMIT_RETRY_SECONDS, COMMIT_WAIT_SECONDS, TERMINAL, Config, Follow, SSEParser, StreamError
from genroute.client.errors import (
    APIConnectionError,
    APIError,
    DownloadError,
    JobFailedError,
    NotFoundError,
    WaitTimeoutError,
    from_response,
    retry_after,
)

OnUpdate = Callable[[JobPublic | EventPublic], None]


class Client:
    """genroute's REST API, typed. `base_url` defaults to $GENROUTE_URL, `api_key` to $GENROUTE_API_KEY."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 max_retries: int = 6, http: httpx.Client | None = None) -> None:
        self.config = Config.make(base_url, api_key, timeout=timeout, max_retries=max_retries)
        self._own = http is None
        self._http = http or httpx.Client(timeout=httpx.Timeout(timeout, connect=5.0))

    def close(self) -> None:
        if self._own:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    # transport ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None, timeout: float | None = None) -> httpx.Response:
        """One API call, retried (connection errors; 429/502/503/504) when resending is safe."""
        safe = _core.retryable(method, path, headers)
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self._http.request(method, self.config.base_url + path, json=json, params=params,
                                          headers={**self.config.headers(), **(headers or {})},
                                          timeout=timeout or self.config.timeout)
            except httpx.TransportError as exc:
                if not safe or attempt > self.config.max_retries:
                    raise APIConnectionError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
                time.sleep(self.config.delay(attempt))
                continue
            if resp.status_code in _core.RETRY_STATUSES and safe and attempt <= self.config.max_retries:
                time.sleep(self.config.delay(attempt, retry_after(resp.headers)))
                continue
            if resp.status_code >= 400:
                raise from_response(resp)
            return resp

    # jobs --------------------------------------------------------------------------------
    def submit(self, model: str, input: dict[str, Any], *, idempotency_key: str | None = None,
               metadata: dict[str, Any] | None = None, webhook_url: str | None = None,
               webhook_events: list[str] | None = None, cache: bool | None = None, priority: str | None = None,
               start_within_seconds: int | None = None, cancel_after: str | float | None = None,
               wait: int | None = None) -> JobPublic:
        """Create a job. The Idempotency-Key (made here unless given) is the same on every retry,
        so however often the request is resent there is one job. `wait`: hold up to N s (Prefer: wait)."""
        key = idempotency_key or _core.new_idempotency_key()
        body = _core.job_body(model, input, metadata=metadata, webhook_url=webhook_url, webhook_events=webhook_events,
                              cache=cache, priority=priority, start_within_seconds=start_within_seconds)
        resp = self._request("POST", "/v1/jobs", json=body, headers=_core.submit_headers(key, cancel_after, wait),
                             timeout=self.config.timeout + (wait or 0))
        return JobPublic.model_validate(resp.json())

    def get(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(self._request("GET", f"/v1/jobs/{job_id}").json())

    def cancel(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(self._request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def list(self, *, limit: int = 20, cursor: str | None = None, status: str | None = None,
             model: str | None = None) -> JobList:
        """One page, newest first; pass `next_cursor` back as `cursor` for the next."""
        params = {k: v for k, v in {"limit": limit, "cursor": cursor, "status": status, "model": model}.items() if v is not None}
        return JobList.model_validate(self._request("GET", "/v1/jobs", params=params).json())

    def iter_jobs(self, *, page_size: int = 100, status: str | None = None, model: str | None = None) -> Iterator[JobPublic]:
        """Every job, newest first, page by page."""
        cursor: str | None = None
        while True:
            page = self.list(limit=page_size, cursor=cursor, status=status, model=model)
            yield from page.data
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def usage(self, *, start: datetime | str | None = None, end: datetime | str | None = None,
              group_by: str = "model") -> UsageReport:
        params: dict[str, Any] = {"group_by": group_by}
        if start is not None:
            params["from"] = start.isoformat() if isinstance(start, datetime) else start
        if end is not None:
            params["to"] = end.isoformat() if isinstance(end, datetime) else end
        return UsageReport.model_validate(self._request("GET", "/v1/usage", params=params).json())

    # following a job ---------------------------------------------------------------------
    def events(self, job_id: str, *, last_event_id: str | None = None) -> Iterator[EventPublic]:
        """The job's events from after `last_event_id` (default: from now) to its end, across
        dropped connections (each reconnect resumes after the last event seen)."""
        follow = Follow(last_event_id=last_event_id)
        for item in self._follow(job_id, follow, deadline=None, poll_fallback=False):
            if isinstance(item, EventPublic):
                yield item

    def wait(self, job_id: str, *, timeout: float | None = None, on_update: OnUpdate | None = None) -> JobPublic:
        """Block until the job ends and return it (outputs with fresh URLs). Follows the event
        stream; between reconnects it checks the job by GET; polls when no stream is offered.
        Raises WaitTimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        follow = Follow()
        for item in self._follow(job_id, follow, deadline=deadline, poll_fallback=True):
            if on_update is not None:
                on_update(item)
        if follow.job is None or not follow.terminal_seen:
            raise WaitTimeoutError(follow.job, timeout or 0)
        ends = time.monotonic() + COMMIT_WAIT_SECONDS
        job = self.get(job_id)  # the row is the truth, with fresh download URLs
        while job.status not in TERMINAL and time.monotonic() < ends:  # read before its commit
            time.sleep(COMMIT_RETRY_SECONDS)
            job = self.get(job_id)
        return job

    def run(self, model: str, input: dict[str, Any], *, timeout: float | None = None, **submit: Any) -> JobPublic:
        """submit + wait; raises JobFailedError unless the job succeeded."""
        job = self.submit(model, input, **submit)
        if job.status not in TERMINAL:
            job = self.wait(job.id, timeout=timeout)
        if job.status != "succeeded":
            raise JobFailedError(job)
        return job

    def _follow(self, job_id: str, follow: Follow, *, deadline: float | None,
                poll_fallback: bool) -> Iterator[JobPublic | EventPublic]:
        drops = 0
        streaming = True
        while not follow.terminal_seen:
            if deadline is not None and time.monotonic() >= deadline:
                return
            if streaming:
                try:
                    for item in self._stream_once(job_id, follow, deadline):
                        drops = 0
                        yield item
                    if follow.terminal_seen:
                        return
                except _NoStream:
                    streaming = False
                    if not poll_fallback:
                        raise APIConnectionError(f"the server offers no event stream for job {job_id}") from None
                except (httpx.TransportError, StreamError):
                    pass  # dropped: resume after follow.last_event_id
                drops += 1
            # between reconnects (and when polling) the job is read: it may have ended meanwhile,
            # and a GET retries through an API restart
            job = self.get(job_id)
            if follow.job is None or job.status != follow.job.status or job.progress != follow.job.progress:
                follow.job = job
                yield job
            if job.status in TERMINAL:
                follow.terminal_seen = True
                return
            time.sleep(self.config.poll_interval if not streaming else self.config.delay(min(drops, 6)))

    def _stream_once(self, job_id: str, follow: Follow, deadline: float | None) -> Iterator[JobPublic | EventPublic]:
        read = 30.0 if deadline is None else max(1.0, min(30.0, deadline - time.monotonic()))
        with self._http.stream("GET", f"{self.config.base_url}/v1/jobs/{job_id}/events",
                               headers={**self.config.headers(), **_core.sse_headers(follow.last_event_id)},
                               timeout=httpx.Timeout(read, connect=5.0)) as resp:
            if resp.status_code == 404:
                resp.read()
                self.get(job_id)  # raises NotFoundError when the job is not there
                raise _NoStream
            if resp.status_code >= 400 and resp.status_code not in _core.RETRY_STATUSES:
                resp.read()
                err = from_response(resp)
                if _core.stream_unavailable(resp) and not isinstance(err, NotFoundError):
                    raise _NoStream
                raise err
            if resp.status_code in _core.RETRY_STATUSES:
                raise httpx.RemoteProtocolError("stream not available now")
            if _core.stream_unavailable(resp):
                raise _NoStream
            parser = SSEParser()
            for line in resp.iter_lines():
                msg = parser.feed(line.rstrip("\r"))
                if msg is None:
                    continue
                item = follow.message(msg[0], msg[1])
                if item is not None:
                    yield item
                if follow.terminal_seen:
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    return

    # outputs -----------------------------------------------------------------------------
    def download(self, job: JobPublic | str, dest: str | Path, *, index: int | None = None) -> builtins.list[Path]:
        """Save the job's outputs (or output `index`) under `dest`, checking each file's sha256.
        Fresh URLs come from /v1/jobs/{id}/outputs/{i}, so this works however old `job` is."""
        j = self.get(job) if isinstance(job, str) else job
        if j.status != "succeeded":
            raise JobFailedError(j)
        out = []
        for asset, path in _core.output_targets(j, Path(dest), index):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".part")
            digest = hashlib.sha256()
            with self._http.stream("GET", f"{self.config.base_url}/v1/jobs/{j.id}/outputs/{asset.index}",
                                   headers=self.config.headers(), follow_redirects=True) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise from_response(resp)
                with tmp.open("wb") as f:
                    for chunk in resp.iter_bytes():
                        digest.update(chunk)
                        f.write(chunk)
            if digest.hexdigest() != asset.sha256:
                tmp.unlink(missing_ok=True)
                raise DownloadError(f"output {asset.index} of {j.id}: sha256 {digest.hexdigest()} != {asset.sha256}")
            tmp.replace(path)
            out.append(path)
        return out


class _NoStream(Exception):
    pass


__all__ = ["APIError", "Client"]
