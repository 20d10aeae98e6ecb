"""Logging set-up: one place for the format, the context every line carries, and the
redaction of secrets.

    GENROUTE_LOG_FORMAT=json   one JSON object a line: time, level, logger, message, and
                               request_id / job_id / tenant / deployment where they apply
    GENROUTE_LOG_FORMAT=text   the same, readable: `time LEVEL logger: message [k=v ...]`

The context is bound once per request (api/observe.py) or task (`bind(...)` at a task's
top), in a contextvar, so nobody passes ids by hand and a line logged anywhere below
(adapters, storage, the ledger) carries them:

    with bind(job_id=job.id, tenant=job.tenant):
        ...   # every log line in here, and in tasks started from here, has both

`Redact` (a filter on the handler) scrubs what must never reach a log line: API keys,
bearer tokens, webhook secrets and signatures, signed URL query strings.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, Literal

FIELDS = ("request_id", "job_id", "tenant", "deployment")
_NONE: Mapping[str, str] = MappingProxyType({})  # read-only: every bind() sets a new mapping
_context: ContextVar[Mapping[str, str]] = ContextVar("genroute_log_context", default=_NONE)


@contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add `fields` (None values are skipped) to every log line inside the block."""
    token = _context.set({**_context.get(), **{k: str(v) for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def bind_here(**fields: Any) -> None:
    """Add `fields` for the rest of the current context: a request handler that learns its
    job id or tenant midway (the request's context ends with the request)."""
    _context.set({**_context.get(), **{k: str(v) for k, v in fields.items() if v is not None}})


def context() -> Mapping[str, str]:
    return _context.get()


def request_id() -> str | None:
    """The request id bound here, to send on (providers, webhook receivers)."""
    return _context.get().get("request_id")


# --- redaction -------------------------------------------------------------------------------

_SECRET_PATTERNS = [
    # Authorization headers and bearer tokens of any kind
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 [redacted]"),
    # genroute API keys, provider keys (OpenAI sk-, Replicate r8_, fal key ids), webhook secrets
    (re.compile(r"\b(gr|sk|r8|whsec)([_-])[A-Za-z0-9._-]{8,}"), r"\1\2[redacted]"),
    # Standard Webhooks signatures: "v1,<base64>"
    (re.compile(r"\bv1,[A-Za-z0-9+/=]{16,}"), "v1,[redacted]"),
    # signed URLs and keys in query strings: S3 presigning, our signed file links, Google's ?key=
    (re.compile(r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|key|"
                r"api_key|apikey|access_token|x-goog-signature|x-goog-credential)=)[^&\s\"'<>]+"), r"\1[redacted]"),
    # "secret": "...", "api_key": "...", password=... in JSON or key=value text
    (re.compile(r"(?i)([\"']?(?:secret|secret_key|api_key|apikey|password|authorization|x-api-key|x-key)[\"']?\s*[:=]\s*[\"']?)"
                r"[^\"'\s,}&]{4,}"), r"\1[redacted]"),
]


def redact(text: str) -> str:
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


class Redact(logging.Filter):
    """Scrub secrets from the message and the exception text of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


# --- formats ---------------------------------------------------------------------------------

# color_message: uvicorn's copy of its message with terminal colour codes, not for a log file
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName", "color_message"}


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    """Context fields, then anything passed with `extra=` (plain values only)."""
    out: dict[str, Any] = dict(getattr(record, "genroute_context", {}))
    for k, v in record.__dict__.items():
        if k not in _RESERVED and k != "genroute_context" and not k.startswith("_"):
            out[k] = v if isinstance(v, str | int | float | bool) or v is None else str(v)
    return out


class _Context(logging.Filter):
    """Copy the bound context onto the record when it is made (the handler may format it
    later, elsewhere)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "genroute_context"):
            record.genroute_context = dict(_context.get())
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = record.created
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_extra(record))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _extra(record)
        if extra:
            tail = " ".join(f"{k}={v}" for k, v in extra.items())
            head, nl, rest = line.partition("\n")  # after the message, before any traceback
            line = f"{head} [{tail}]{nl}{rest}"
        return line


_MARK = "_genroute_handler"
# arq.worker: two lines for every task, the once-a-second cron tasks included (four lines a
# second in a quiet `genroute dev`); a job's end has a line of its own (core/jobs/ledger.py)
QUIET = ("httpx", "httpcore", "alembic.runtime.plugins", "botocore", "boto3", "urllib3", "aiosqlite", "asyncio", "websockets",
         "arq.worker")


def setup(fmt: Literal["json", "text"] | str | None = None, level: str | int | None = None, *, stream: Any = None) -> None:
    """Install genroute's one handler on the root logger (replacing an earlier one).
    `fmt` and `level` default to GENROUTE_LOG_FORMAT (json) and GENROUTE_LOG_LEVEL (INFO).
    Chatty libraries (httpx logs every request with its full URL) are kept at WARNING
    unless the level is DEBUG."""
    fmt = (fmt or os.environ.get("GENROUTE_LOG_FORMAT") or "json").lower()
    lvl: Any = level if level is not None else os.environ.get("GENROUTE_LOG_LEVEL", "INFO")
    lvl = lvl.upper() if isinstance(lvl, str) else lvl
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _MARK, False):  # set up again: replace ours
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, _MARK, True)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_Context())
    handler.addFilter(Redact())
    root.addHandler(handler)
    root.setLevel(lvl)
    quiet = logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING
    for name in QUIET:
        logging.getLogger(name).setLevel(quiet)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "arq"):
        lg = logging.getLogger(name)  # through our handler, not their own
        lg.handlers.clear()
        lg.propagate = True


def configured() -> bool:
    return any(getattr(h, _MARK, False) for h in logging.getLogger().handlers)
