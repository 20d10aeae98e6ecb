"""A minimal, fast fake of OpenAI's `POST /v1/chat/completions` for benchmarks.

    python bench/fast_upstream.py --port 9100

Raw asyncio (uvloop when installed), HTTP/1.1 keep-alive, fixed small bodies, no
validation: the upstream must not be the bottleneck of a proxy benchmark. Answers:
- `"stream": true` in the body -> SSE: a role chunk, 5 content chunks, a finish chunk,
  a usage chunk if the body asks for `include_usage`, then `data: [DONE]`
  (sent with a Content-Length, in one write);
- otherwise a plain `chat.completion` JSON with usage.
Any other path answers 404. `GET /health` answers 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json

MODEL = "gpt-4o-mini"
WORDS = ["Hello", " from", " the", " fast", " upstream"]
TEXT = "".join(WORDS)
USAGE = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}


def _dump(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _response(body: bytes, content_type: bytes, status: bytes = b"200 OK") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type + b"\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: keep-alive\r\n\r\n" + body)


def _plain() -> bytes:
    return _response(_dump({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": MODEL,
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": TEXT, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": USAGE,
    }), b"application/json")


def _stream(usage: bool) -> bytes:
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": MODEL,
            "system_fingerprint": "fp_bench"}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}]
    chunks += [{**base, "choices": [{"index": 0, "delta": {"content": w}, "logprobs": None, "finish_reason": None}]} for w in WORDS]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
    if usage:
        chunks.append({**base, "choices": [], "usage": USAGE})
    body = b"".join(b"data: " + _dump(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    return _response(body, b"text/event-stream")


PLAIN, STREAM, STREAM_USAGE = _plain(), _stream(False), _stream(True)
NOT_FOUND = _response(b'{"error":{"message":"not found","type":"invalid_request_error"}}', b"application/json", b"404 Not Found")
HEALTH = _response(b"{}", b"application/json")


class Http(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            lower = head.lower()
            i = lower.find(b"content-length:")
            if i >= 0:
                j = lower.find(b"\r\n", i)
                length = int(lower[i + 15: j if j >= 0 else None])
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = self.buf[end + 4: total]
            self.buf = self.buf[total:]
            line = head[: head.find(b"\r\n")] if b"\r\n" in head else head
            if line.startswith(b"POST ") and b"/chat/completions" in line:
                compact = body.replace(b" ", b"")
                if b'"stream":true' in compact:
                    self.t.write(STREAM_USAGE if b'"include_usage":true' in compact else STREAM)  # type: ignore[attr-defined]
                else:
                    self.t.write(PLAIN)  # type: ignore[attr-defined]
            elif line.startswith(b"GET /health"):
                self.t.write(HEALTH)  # type: ignore[attr-defined]
            else:
                self.t.write(NOT_FOUND)  # type: ignore[attr-defined]


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Http, host, port, backlog=1024, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    args = p.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
