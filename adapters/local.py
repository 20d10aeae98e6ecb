"""The built-in `local` provider: real media made offline, no key, no network.

It behaves like a long-running remote provider so the whole pipeline is exercised:
`provider_params.latency_seconds` makes submit answer Pending, and each poll reports
progress in `progress_steps` steps until the latency has passed; `provider_params.fail`
(an error code) ends the task with that error instead.

The task lives entirely in its handle (start time, parameters), not in this process, so
a worker killed mid-poll loses nothing: the next worker's poll picks up where time says
the task is. Outputs are deterministic for the same input and seed.

Text: `chat` is a tiny deterministic model (the last user message's words echoed in
reverse), streamed a word per chunk with usage, so chat works in `genroute dev` offline.

Deployment options: `submit_log` (a file path): every submit appends the job id, which
is how tests prove no job is submitted twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from adapters import local_media
from adapters.base import Adapter
from core import params
from core.errors import ErrorCode, ProviderError, ProviderErrorKind
from core.types import Done, Failed, OutputRef, Pending, PollResult, ProviderRequest, SubmitResult, text_of

IMAGE_LONG_SIDE = 1024
DEFAULT_FPS = 12
MAX_LATENCY = 3600.0


class LocalAdapter(Adapter):
    name = "local"
    idempotent_submit = True  # a task is its handle: resubmitting creates nothing upstream
    # the simulator's knobs, and what the OpenAI-compatible facades pass on (ignored here)
    provider_params = {
        "image": frozenset({"latency_seconds", "progress_steps", "fail", "quality", "background", "style", "moderation",
                            "output_compression", "input_fidelity", "mask"}),
        "video": frozenset({"latency_seconds", "progress_steps", "fail", "size"}),
        "audio": frozenset({"latency_seconds", "progress_steps", "fail", "speed", "instructions"}),
        "text": params.CHAT | {"latency_seconds", "progress_steps", "fail"},
    }

    async def submit(self, request: ProviderRequest) -> SubmitResult:
        params = request.input.get("provider_params") or {}
        latency = _number(params, "latency_seconds", 0.0, 0.0, MAX_LATENCY)
        steps = int(_number(params, "progress_steps", 4.0 if latency else 1.0, 1.0, 1000.0))
        fail = params.get("fail")
        if fail is not None and fail not in ErrorCode.__members__:
            raise ProviderError(
                ProviderErrorKind.invalid,
                f"provider_params.fail must be one of {sorted(ErrorCode.__members__)}",
                code=ErrorCode.invalid_input,
            )
        if request.modality == "text":  # a chat completion as a job: answered at once
            self._log_submit(request.job_id)
            completion = await self.chat(dict(request.input), stream=False)
            if not isinstance(completion, dict):  # stream=False answers one completion
                raise TypeError("local chat(stream=False) did not answer a completion")
            return Done(
                outputs=[OutputRef(data=json.dumps(completion).encode(), content_type="application/json")],
                handle={"kind": "text", "id": completion["id"]},
                usage=dict(completion["usage"]),
            )
        if request.modality not in ("image", "video", "audio"):
            raise ProviderError(ProviderErrorKind.invalid, f"local provider has no {request.modality} model")
        self._log_submit(request.job_id)
        handle = {
            "task_id": "local_" + hashlib.sha256(request.job_id.encode()).hexdigest()[:16],
            "job_id": request.job_id,
            "modality": request.modality,
            "input": {k: v for k, v in request.input.items() if k != "provider_params"},
            "started_at": time.time(),
            "latency": latency,
            "steps": steps,
            "fail": fail,
        }
        if latency == 0 and fail is None:
            return Done(outputs=await _render(handle), handle=handle)
        return Pending(handle=handle, poll_after=latency / steps, progress=0.0, message=f"step 0/{steps}")

    async def poll(self, handle: dict[str, Any]) -> PollResult:
        elapsed = time.time() - float(handle["started_at"])
        latency, steps = float(handle["latency"]), int(handle["steps"])
        if elapsed < latency:
            done_steps = min(steps - 1, int(elapsed / latency * steps))
            next_step_at = (done_steps + 1) * latency / steps
            return Pending(
                handle=handle,
                poll_after=max(0.01, next_step_at - elapsed),
                progress=done_steps / steps,
                message=f"step {done_steps}/{steps}",
            )
        if handle.get("fail"):
            code = ErrorCode(handle["fail"])
            return Failed(code=code, message=f"local provider ended with {code.value} as asked (provider_params.fail)")
        return Done(outputs=await _render(handle), handle=handle)

    # -- text ---------------------------------------------------------------------------
    async def chat(self, body: dict[str, Any], *, stream: bool) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        """A small deterministic text model, with OpenAIAdapter.chat's contract: a
        chat.completion dict, or an iterator of chat.completion.chunk dicts (one per token,
        then the finish chunk, then the usage chunk). A token is a whitespace-separated
        word; the answer is a fixed function of the last user message, cut at max_tokens."""
        messages = body.get("messages") or []
        prompt = [w for m in messages if isinstance(m, dict) for w in text_of(m.get("content")).split()]
        last = next((text_of(m.get("content")) for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), "")
        words = local_reply(last).split()
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "stop"
        if isinstance(limit, int) and 0 < limit < len(words):
            words, finish = words[:limit], "length"
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(words), "total_tokens": len(prompt) + len(words)}
        cid = "chatcmpl-local" + hashlib.sha256(json.dumps(messages, sort_keys=True, default=str).encode()).hexdigest()[:20]
        created, model = int(time.time()), self.deployment.model
        if not stream:
            return {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words), "refusal": None},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage,
            }

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices, **extra}

        async def tokens() -> AsyncIterator[dict[str, Any]]:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            for i, word in enumerate(words):
                yield chunk([{"index": 0, "delta": {"content": word if i == 0 else " " + word}, "logprobs": None, "finish_reason": None}])
                if i % 64 == 63:
                    await asyncio.sleep(0)  # a long answer must not hold the event loop (a real provider waits on I/O)
            yield chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}])
            yield chunk([], usage=usage)

        return tokens()

    def _log_submit(self, job_id: str) -> None:
        path = self.deployment.options.get("submit_log")
        if path:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{job_id}\n".encode())
            finally:
                os.close(fd)


def local_reply(text: str) -> str:
    """The local text model's answer to `text`: its words echoed back in reverse order."""
    words = text.split()
    return "local-text heard: " + (" ".join(reversed(words)) if words else "(nothing)")


def _number(params: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ProviderError(
            ProviderErrorKind.invalid,
            f"provider_params.{name} must be a number from {lo:g} to {hi:g}",
            code=ErrorCode.invalid_input,
        )
    return float(value)


def _seed(inp: dict[str, Any]) -> int:
    return int(inp.get("seed", 0))


def image_size(inp: dict[str, Any]) -> tuple[int, int]:
    if inp.get("size"):
        w, h = inp["size"].split("x")
        return int(w), int(h)
    if inp.get("aspect_ratio"):
        a, b = (int(x) for x in inp["aspect_ratio"].split(":"))
        if a >= b:
            return IMAGE_LONG_SIDE, max(16, round(IMAGE_LONG_SIDE * b / a / 16) * 16)
        return max(16, round(IMAGE_LONG_SIDE * a / b / 16) * 16), IMAGE_LONG_SIDE
    return IMAGE_LONG_SIDE, IMAGE_LONG_SIDE


async def _render(handle: dict[str, Any]) -> list[OutputRef]:
    """Pillow and WAV synthesis are CPU work: off the event loop."""
    return await asyncio.to_thread(_render_sync, handle["modality"], handle["input"])


def _render_sync(modality: str, inp: dict[str, Any]) -> list[OutputRef]:
    seed = _seed(inp)
    if modality == "image":
        w, h = image_size(inp)
        fmt = inp.get("output_format", "png")
        return [
            OutputRef(
                data=local_media.make_image(inp["prompt"], seed=seed + i, width=w, height=h, fmt=fmt),
                content_type=f"image/{fmt}",
            )
            for i in range(int(inp.get("n", 1)))
        ]
    if modality == "video":
        w, h = local_media.VIDEO_SIZES[inp.get("resolution", "720p")][inp.get("aspect_ratio", "16:9")]
        data = local_media.make_video_webp(
            inp["prompt"],
            seed=seed,
            width=w,
            height=h,
            duration_seconds=float(inp.get("duration_seconds", 4)),
            fps=int(inp.get("fps") or DEFAULT_FPS),
        )
        return [OutputRef(data=data, content_type="image/webp")]
    text = inp.get("text") or inp.get("prompt") or ""
    duration = float(inp.get("duration_seconds") or max(1.0, min(30.0, len(text.split()) * 0.4)))
    return [OutputRef(data=local_media.make_audio_wav(text, seed=seed, duration_seconds=duration), content_type="audio/wav")]
