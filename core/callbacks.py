"""Provider callback addresses: unguessable per-job tokens, and per-job secrets.

A deployment with `callbacks: true` gives each job the URL
`{public_url}/v1/callbacks/{adapter}/{job_id}.{mac}`, where mac = HMAC(secret_key, job_id):
the route finds the job from the token without a lookup table, and nobody can aim a
callback at a job they did not create. Providers that sign with a secret we send (BFL)
get a per-job secret derived the same way, so nothing extra is stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from core.errors import ErrorCode
from core.types import Done, Failed, OutputRef, PollResult


def _mac(secret_key: str, purpose: str, job_id: str) -> str:
    return hmac.new(secret_key.encode(), f"{purpose}:{job_id}".encode(), hashlib.sha256).hexdigest()


def callback_token(secret_key: str, job_id: str) -> str:
    return f"{job_id}.{_mac(secret_key, 'callback', job_id)[:32]}"


def job_id_from_token(secret_key: str, token: str) -> str | None:
    job_id, _, mac = token.rpartition(".")
    if not job_id or len(job_id) > 40:
        return None
    expected = _mac(secret_key, "callback", job_id)[:32]
    return job_id if hmac.compare_digest(mac, expected) else None


def callback_secret(secret_key: str, job_id: str) -> str:
    return _mac(secret_key, "callback-secret", job_id)


def callback_url(public_url: str, secret_key: str, adapter: str, job_id: str) -> str:
    return f"{public_url.rstrip('/')}/v1/callbacks/{adapter}/{callback_token(secret_key, job_id)}"


# A verified callback's result is handed from the API to the worker through the job's poll
# entry (core/jobs/polls.py `kick`): its next poll, due at once, takes it instead of asking
# the provider, so outputs are stored in one place and the poll_seq compare-and-set still
# guarantees a job is finished once.


def dump_result(result: PollResult) -> str:
    if isinstance(result, Done):
        return json.dumps(
            {
                "done": [
                    {
                        "url": o.url,
                        "path": o.path,
                        "data": base64.b64encode(o.data).decode() if o.data is not None else None,
                        "headers": o.headers,
                        "content_type": o.content_type,
                        "role": o.role,
                    }
                    for o in result.outputs
                ],
                "handle": result.handle,
                "usage": result.usage,
            }
        )
    if isinstance(result, Failed):
        return json.dumps({"failed": {"code": result.code.value, "message": result.message, "detail": result.detail}})
    raise TypeError("only final results are handed over")


def load_result(raw: str | bytes) -> PollResult:
    obj = json.loads(raw)
    if "failed" in obj:
        f = obj["failed"]
        return Failed(code=ErrorCode(f["code"]), message=f["message"], detail=f.get("detail"))
    outputs = [
        OutputRef(
            url=o.get("url"),
            path=o.get("path"),
            data=base64.b64decode(o["data"]) if o.get("data") is not None else None,
            headers=o.get("headers") or {},
            content_type=o.get("content_type"),
            role=o.get("role") or "output",
        )
        for o in obj["done"]
    ]
    return Done(outputs=outputs, handle=obj.get("handle") or {}, usage=obj.get("usage") or {})
