"""Attack tests for the trust boundaries (../shared/DESIGN.md §12), each through HTTP and a
real worker process:

- a tenant cannot pick a dearer model (or any catalog-controlled field) through
  provider_params: 422 naming the parameter, for every adapter in the registry;
- input-image, mask and provider output URLs to every unsafe address form are refused
  without a byte sent to them, with the fetcher's reason in the job's error;
- an endless input or output stream is stopped at the byte cap, the worker's RSS bounded;
- no key or signature reaches a log line of a run that used `?token=`.

The stack admits only 127.0.0.2 (GENROUTE_OUTBOUND_ALLOWLIST): servers there play public
hosts, and a sentinel listening on 127.0.0.1 and ::1 counts every connection an unsafe URL
would have made. The provider fakes are the operator's base URLs (trusted, not guarded).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core import fetcher, netguard
from core.routing.catalog import ADAPTERS
from tests.fakes import openai
from tests.fakes.server import serve
from tests.stack import Stack, make_stack, running

OPENAI_KEY = "sk-attack-operator-key-0123456789"
EVIL_KEY = "bfl-attack-operator-key-0123456789"
WRONG_KEY = "sk-attack-stale-key-zzQXZW"  # its tail (the fake quotes 6 characters) is in no id, time or signature
ADMIN_KEY = "admin-attack-key-0123456789abcdef"
PUBLIC_HOST = "127.0.0.2"  # admitted by the stack's allowlist: plays a public server
INPUT_CAP = 50 * 2**20  # adapters/openai.py MAX_INPUT_IMAGE_BYTES
OUTPUT_CAP = 24 * 2**20  # the stack's GENROUTE_MAX_OUTPUT_BYTES


def png(w: int = 64, h: int = 64, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), (200, 30, 30, 255) if mode == "RGBA" else (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


# -- listeners ------------------------------------------------------------------------------


class Sentinel:
    """TCP listeners on 127.0.0.1:port and [::1]:port that only count: any connection is a
    request that should never have been made."""

    def __init__(self) -> None:
        self.connections = 0
        self._socks: list[socket.socket] = []
        for _ in range(50):
            v4 = socket.socket()
            v4.bind(("127.0.0.1", 0))
            self.port = v4.getsockname()[1]
            v6 = socket.socket(socket.AF_INET6)
            try:
                v6.bind(("::1", self.port))
            except OSError:
                v4.close()
                v6.close()
                continue
            self._socks = [v4, v6]
            break
        for s in self._socks:
            s.listen(64)
            s.settimeout(0.2)
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        self._stop = False

    def _accept(self, s: socket.socket) -> None:
        while not getattr(self, "_stop", False):
            try:
                conn, _ = s.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        for s in self._socks:
            s.close()


class Public(ThreadingHTTPServer):
    """A plain HTTP server on 127.0.0.2 (admitted): an image, redirects, an endless body."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__((PUBLIC_HOST, 0), _PublicHandler)
        self.image = png()
        self.mask = png(mode="RGBA")
        self.endless_sent = 0
        self.hits: list[str] = []

    @property
    def url(self) -> str:
        return f"http://{PUBLIC_HOST}:{self.server_address[1]}"


class _PublicHandler(BaseHTTPRequestHandler):
    server: Public

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - a webhook delivery: read the body, answer as GET does
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        parts = urlsplit(self.path)
        self.server.hits.append(parts.path)
        if parts.path in ("/image.png", "/mask.png"):
            body = self.server.image if parts.path == "/image.png" else self.server.mask
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif parts.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(parts.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif parts.path == "/trickle":  # a byte every 0.2 s, for ever: under any byte cap
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                return
        elif parts.path == "/endless":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")  # and no Content-Length: it never ends
            self.end_headers()
            chunk = b"\x89PNG\r\n\x1a\n" + b"\0" * (256 * 1024 - 8)
            try:
                while True:
                    self.wfile.write(chunk)
                    self.server.endless_sent += len(chunk)
            except OSError:
                return
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


@contextmanager
def public_server() -> Iterator[Public]:
    srv = Public()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def evil_bfl_app(seen: list[dict[str, Any]]) -> Starlette:
    """A BFL-shaped provider that answers whatever the prompt names: `OUT <url>` as the
    result's sample (an output URL), `POLL <url>` as the task's polling_url, `ANSWER
    <name>` as the create's answer, `TASKERROR <name>` as the poll's Error body (EVIL_ANSWERS)."""
    tasks: dict[str, tuple[str, str]] = {}

    async def submit(request: Request) -> Response:
        if request.headers.get("x-key") != EVIL_KEY:
            return JSONResponse({"detail": "Not authenticated"}, 403)
        body = await request.json()
        seen.append(body)
        verb, _, url = str(body.get("prompt", "")).partition(" ")
        if verb == "ANSWER":
            status, answer = EVIL_ANSWERS[url]
            return JSONResponse(answer, status)
        tid = f"t{len(tasks)}"
        tasks[tid] = (verb, url)
        own = f"{request.url.scheme}://{request.url.netloc}/v1/get_result?id={tid}"
        return JSONResponse({"id": tid, "polling_url": url if verb == "POLL" else own})

    async def result(request: Request) -> Response:
        tid = request.query_params.get("id", "")
        verb, url = tasks.get(tid, ("", ""))
        if verb == "TASKERROR":
            return JSONResponse({"id": tid, "status": "Error", **EVIL_ANSWERS[url][1]})
        return JSONResponse({"id": tid, "status": "Ready", "result": {"sample": url}})

    return Starlette(routes=[Route("/v1/get_result", result), Route("/v1/{model:path}", submit, methods=["POST"])])


# -- the stack ------------------------------------------------------------------------------

_MODALITY_INPUT = {
    "image": {"prompt": "a fox"},
    "video": {"prompt": "a fox", "duration_seconds": 4},
    "audio": {"text": "hello"},
}


def registry_cases() -> list[tuple[str, str]]:
    """(adapter, modality) for every adapter the catalog knows and every modality it
    declares settable parameters for (an adapter declaring none is tried on images)."""
    from adapters.registry import adapter_class

    out = []
    for name in sorted(ADAPTERS):
        modalities = sorted(m for m in adapter_class(name).provider_params if m in _MODALITY_INPUT) or ["image"]
        out.extend((name, m) for m in modalities)
    return out


def chat_cases() -> list[str]:
    """Adapters that chat: the body's fields beyond model, messages and stream are theirs."""
    from adapters.registry import adapter_class

    return sorted(n for n in ADAPTERS if "text" in adapter_class(n).provider_params)


# What the provider answers on `ANSWER <name>` / `TASKERROR <name>` (kept out of the prompt,
# which the tenant sees anyway): (status, body)
EVIL_ANSWERS: dict[str, tuple[int, dict[str, Any]]] = {
    "billing": (402, {"detail": "Insufficient credits: balance $0.31 on account acct_8812. Add credits at https://dashboard.bfl.ai"}),
    "topology": (503, {"error": "upstream connect error: 10.0.4.7:8443 (pool eu-west-2b) reset"}),
    "input": (422, {"detail": "prompt refused for key sk-live-abcdefgh12345678 see https://internal.bfl.ai/t/99"}),
    "task": (200, {"error": "worker gpu-node-17.internal failed: see https://ops.bfl.internal/runs/5 token=tok_abcdef123456"}),
}
LEAKS = [
    # (prompt or model, the job's code, what the provider said that the tenant must not see)
    ("badkey", "provider_auth", ["zzQXZW", "Incorrect API key", "platform.openai.com"]),
    ("ANSWER billing", "provider_error", ["Insufficient credits", "acct_8812", "$0.31", "dashboard.bfl.ai"]),
    ("ANSWER topology", "provider_unavailable", ["10.0.4.7", "eu-west-2b", "upstream connect"]),
    ("ANSWER input", "invalid_input", ["sk-live-abcdefgh12345678", "internal.bfl.ai"]),
    ("TASKERROR task", "provider_error", ["ops.bfl.internal", "tok_abcdef123456"]),
]


def _catalog(path: Path, openai_url: str, evil_url: str) -> Path:
    fast = {"poll_interval": 0.05}
    models: list[dict[str, Any]] = [
        {"id": "edit", "modality": "image", "deployments": [{
            "name": "openai-edit", "adapter": "openai", "model": "gpt-image-1", "base_url": openai_url,
            "api_key_env": "ATTACK_OPENAI_KEY", "options": fast}]},
        {"id": "badkey", "modality": "image", "deployments": [{
            "name": "openai-badkey", "adapter": "openai", "model": "gpt-image-1", "base_url": openai_url,
            "api_key_env": "ATTACK_WRONG_KEY", "options": fast}]},
        *({"id": f"leak{i}", "modality": "image", "deployments": [{  # one each: an operator's fault marks it out
            "name": f"leak{i}-bfl", "adapter": "bfl", "model": "flux-evil", "base_url": evil_url,
            "api_key_env": "ATTACK_EVIL_KEY", "options": fast}]} for i in range(len(LEAKS))),
        {"id": "evil", "modality": "image", "deployments": [{
            "name": "evil-bfl", "adapter": "bfl", "model": "flux-evil", "base_url": evil_url,
            "api_key_env": "ATTACK_EVIL_KEY", "options": fast}]},
    ]
    for adapter, modality in [*registry_cases(), *((a, "text") for a in chat_cases())]:
        models.append({"id": f"p-{adapter}-{modality}", "modality": modality, "deployments": [{
            "name": f"p-{adapter}-{modality}", "adapter": adapter, "model": "cheap-model",
            "base_url": "http://127.0.0.1:9/never-called", "options": fast}]})
    path.write_text(yaml.safe_dump({"models": models}))
    return path


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Any]]:
    with ExitStack() as es:
        sentinel = Sentinel()
        es.callback(sentinel.close)
        seen: list[dict[str, Any]] = []
        yield {
            "sentinel": sentinel,
            "public": es.enter_context(public_server()),
            "openai": es.enter_context(serve(openai.create_app(api_key=OPENAI_KEY))) + "/v1",
            "evil": es.enter_context(serve(evil_bfl_app(seen))),
            "evil_seen": seen,
        }


@pytest.fixture(scope="module")
async def stack(servers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("attacks")
    st = await make_stack(
        root, redis_url=f"{redis_base}/0", catalog=_catalog(root / "catalog.yaml", servers["openai"], servers["evil"]),
        env={"ATTACK_OPENAI_KEY": OPENAI_KEY, "ATTACK_EVIL_KEY": EVIL_KEY, "ATTACK_WRONG_KEY": WRONG_KEY,
             "GENROUTE_ADMIN_KEY": ADMIN_KEY,
             "GENROUTE_OUTBOUND_ALLOWLIST": f'["{PUBLIC_HOST}/32"]'},
        max_output_bytes=str(OUTPUT_CAP), log_level="INFO",
    )
    async with running(st):
        yield st


async def _submit(stack: Stack, body: dict[str, Any], wait: int = 30) -> httpx.Response:
    async with stack.client() as c:
        return await c.post("/v1/jobs", json=body, headers={"Prefer": f"wait={wait}"})


async def _finished(stack: Stack, body: dict[str, Any]) -> dict[str, Any]:
    r = await _submit(stack, body)
    assert r.status_code in (200, 202), r.text
    job = r.json()
    if job["status"] not in ("succeeded", "failed", "canceled"):
        async with stack.client() as c:
            job = await stack.wait_job(c, job["id"])
    return job


# -- hole 1: provider parameters ------------------------------------------------------------

CATALOG_FIELDS = ["model", "version", "deployment", "base_url", "webhook_url", "api_key", "organization", "user",
                  "callback_url", "endpoint", "x-api-key", "webhook_secret"]


@pytest.mark.parametrize("adapter,modality", registry_cases(), ids=lambda v: str(v))
async def test_model_override_is_refused_for_every_adapter(stack: Stack, adapter: str, modality: str) -> None:
    model = f"p-{adapter}-{modality}"
    r = await _submit(stack, {"model": model, "input": {**_MODALITY_INPUT[modality],
                                                        "provider_params": {"model": "the-dearest-model"}}})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "param_not_allowed" and "provider_params.model" in err["message"], err
    assert err["details"][0]["loc"] == ["input", "provider_params", "model"]
    for name in CATALOG_FIELDS:
        r = await _submit(stack, {"model": model, "input": {**_MODALITY_INPUT[modality], "provider_params": {name: "x"}}})
        assert r.status_code == 422 and name in r.json()["error"]["message"], (name, r.text)


async def test_catalog_fields_nested_in_a_settable_parameter_are_refused(stack: Stack) -> None:
    """google_veo lets a request set lastFrame and referenceImages (images): a gcsUri inside
    one would have Google read the operator's bucket."""
    inp = {**_MODALITY_INPUT["video"], "provider_params": {"lastFrame": {"gcsUri": "gs://operator-bucket/x.png"}}}
    r = await _submit(stack, {"model": "p-google_veo-video", "input": inp})
    assert r.status_code == 422, r.text
    assert "provider_params.lastFrame.gcsUri" in r.json()["error"]["message"]
    inp["provider_params"] = {"referenceImages": [{"image": {"uri": "https://x/y.png"}, "referenceType": "asset"}]}
    r = await _submit(stack, {"model": "p-google_veo-video", "input": inp})
    assert r.status_code == 422 and "referenceImages.0.image.uri" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("adapter,modality", registry_cases(), ids=lambda v: str(v))
async def test_the_replicate_route_cannot_set_catalog_fields_either(stack: Stack, adapter: str, modality: str) -> None:
    """The Replicate-compatible create passes unknown input fields on as provider_params:
    the same allowlist refuses `model`, `version` and the rest there, in Replicate's shape."""
    async with stack.client() as c:
        for name in ("model", "version", "deployment", "base_url", "webhook_url", "api_key"):
            r = await c.post(f"/replicate/v1/models/genroute/p-{adapter}-{modality}/predictions",
                             json={"input": {**_MODALITY_INPUT[modality], name: "the-dearest-model"}})
            assert r.status_code == 422, (name, r.text)
            body = r.json()
            assert body["code"] == "param_not_allowed" and f"provider_params.{name}" in body["detail"], (name, body)


@pytest.mark.parametrize("adapter", chat_cases())
async def test_chat_body_cannot_pick_the_providers_model_or_routing(stack: Stack, adapter: str) -> None:
    async with stack.client() as c:
        for extra in ({"models": ["openai/gpt-5"]}, {"provider": {"order": ["x"]}}, {"user": "u"}, {"route": "fallback"},
                      {"base_url": "http://x"}, {"extra_headers": {"authorization": "x"}}):
            r = await c.post("/v1/chat/completions", json={
                "model": f"p-{adapter}-text", "messages": [{"role": "user", "content": "hi"}], **extra})
            assert r.status_code in (400, 422), (extra, r.text)
            assert next(iter(extra)) in r.text


# -- holes 2 and 3: unsafe URLs -------------------------------------------------------------


def _forms(port: int) -> list[tuple[str, str, str]]:
    """(id, URL, what the refusal says): at least 60 unsafe targets. Loopback forms use the
    sentinel's port, so a connection would be seen."""
    v4 = ipaddress.IPv4Address
    metadata = int(v4("169.254.169.254"))
    nat64_local = ipaddress.IPv6Address((0x0064FF9B0001 << 80) | ((metadata >> 16) << 64) | ((metadata & 0xFFFF) << 40))
    teredo_lo = ipaddress.IPv6Address((0x20010000 << 96) | (0x4136E378 << 64) | (0x8000 << 48) | (0x63BF << 32)
                                      | (~int(v4("127.0.0.1")) & 0xFFFFFFFF))
    lo = [
        "127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f000001", "0x7f.0.0.1", "0177.0.0.1", "0177.1",
        "017700000001", "127.255.255.254", "127.0.0.1.", "0X7F.1", "0x7f.0x0.0x0.0x1", "00000177.0.0.1",
        "127.000.000.001", "[::1]", "[0:0:0:0:0:0:0:1]", "[0000::1]",
    ]
    embedded_lo = [
        "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::7f00:1]", "[::127.0.0.1]", "[::ffff:0:7f00:1]",
        "[::ffff:0:127.0.0.1]", "[64:ff9b::7f00:1]", "[2002:7f00:1::]", f"[{teredo_lo}]",
    ]
    out: list[tuple[str, str, str]] = []
    out += [(f"loopback {h}", f"http://{h}:{port}/x.png", "loopback") for h in lo]
    out += [(f"embedded {h}", f"http://{h}:{port}/x.png", "loopback") for h in embedded_lo]
    table = {
        "unspecified": ["0.0.0.0", "0", "0x0", "[::]", "[::ffff:0.0.0.0]"],
        "private": ["10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.254", "192.168.1.1", "012.0.0.1",
                    "167772161", "0xc0a80001", "[fc00::1]", "[fd00::1]", "[::ffff:10.0.0.1]"],
        "link-local": ["169.254.169.254", "169.254.0.1", "2852039166", "0xa9fea9fe", "0251.0376.0251.0376",
                       "0xa9.0xfe.0xa9.0xfe", "[fe80::1]", "[fe80::1%25eth0]", "[::ffff:a9fe:a9fe]",
                       "[64:ff9b::a9fe:a9fe]", f"[{nat64_local}]", "[2002:a9fe:a9fe::1]"],
        "CGNAT": ["100.64.0.1", "100.127.255.254"],
        "multicast": ["224.0.0.1", "239.255.255.250", "[ff02::1]"],
        # reserved, documentation, benchmarking, protocol assignments, 6to4 relay, site-local, discard
        "address": ["240.0.0.1", "255.255.255.255", "192.0.0.1", "192.0.2.1", "198.51.100.1", "203.0.113.1",
                    "198.18.0.1", "192.88.99.1", "[fec0::1]", "[100::1]", "[2001:db8::1]"],
        # a public IPv4 behind a translator is reached by its own form, never through ours
        "IPv4-embedding": ["[64:ff9b::808:808]", "[2002:808:808::1]"],
    }
    out += [(f"{kind} {h}", f"http://{h}:{port}/x.png", kind) for kind, hosts in table.items() for h in hosts]
    out += [
        ("dns localhost", f"http://localhost:{port}/x.png", "loopback"),
        ("dns LOCALHOST", f"http://LOCALHOST:{port}/x.png", "loopback"),
        ("scheme file", "file:///etc/passwd", "http"),  # the schema or the guard: http(s) only
        ("credentials", f"http://user:pw@127.0.0.1:{port}/x.png", "credentials"),
    ]
    return out


def _redirects(public: str, port: int) -> list[tuple[str, str, str]]:
    """A public-looking server (admitted) that redirects into our network."""
    return [
        (f"redirect to {to}", f"{public}/redirect?to=http://{to}:{port}/x.png", "loopback")
        for to in ("127.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "localhost", "2130706433")
    ] + [("redirect to metadata", f"{public}/redirect?to=http://169.254.169.254/latest/meta-data/", "link-local")]


def _all_forms(servers: dict[str, Any]) -> list[tuple[str, str, str]]:
    port = servers["sentinel"].port
    return _forms(port) + _redirects(servers["public"].url, port)


def test_the_table_is_big_enough() -> None:
    assert len(_forms(1)) >= 60


def _refused_in(job_or_response: dict[str, Any], reason: str) -> str | None:
    """None when the body shows a refusal giving `reason`, else what it shows instead."""
    err = job_or_response.get("error") or {}
    message = str(err.get("message", ""))
    return None if reason.lower() in message.lower() else f"{job_or_response.get('status')}: {err}"


async def _check_all(stack: Stack, servers: dict[str, Any], body_for: Any, expect_code: str, prefix: str,
                     redirects: str | None = None) -> None:
    """Every form of the table through `body_for`; `redirects`: the message a redirecting
    form must end with instead, where the caller follows no redirect at all."""
    sentinel: Sentinel = servers["sentinel"]
    before = sentinel.connections
    forms = _all_forms(servers)

    async def one(name: str, url: str, reason: str) -> str | None:
        body = body_for(url)
        r = await _submit(stack, body)
        if r.status_code == 422:  # refused at submit: the URL alone said it (a literal address)
            err = r.json()["error"]
            ok = err["code"] == "invalid_input" and reason.lower() in json.dumps(err).lower()
            return None if ok else f"{name}: 422 {err}"
        if r.status_code not in (200, 202):
            return f"{name}: HTTP {r.status_code} {r.text[:300]}"
        job = r.json()
        if job["status"] not in ("failed", "succeeded", "canceled"):
            async with stack.client() as c:
                job = await stack.wait_job(c, job["id"])
        if job["status"] != "failed" or job["error"]["code"] != expect_code:
            return f"{name}: {job['status']} {job.get('error')}"
        if redirects is not None and name.startswith("redirect to"):
            return None if redirects in job["error"]["message"] else f"{name}: the redirect was not refused: {job['error']}"
        if prefix not in job["error"]["message"]:
            return f"{name}: the fetcher's reason is missing: {job['error']}"
        why = _refused_in(job, reason)
        return None if why is None else f"{name}: {why}"

    problems: list[str] = []
    for i in range(0, len(forms), 12):  # a dozen at a time: the machine is shared
        problems += [p for p in await asyncio.gather(*(one(*f) for f in forms[i:i + 12])) if p]
    assert not problems, "\n".join(problems)
    assert sentinel.connections == before, "a refused URL was connected to"


async def test_input_image_urls_to_unsafe_addresses_are_refused(stack: Stack, servers: dict[str, Any]) -> None:
    await _check_all(stack, servers, lambda url: {"model": "edit", "input": {"prompt": "edit", "input_images": [url]}},
                     "invalid_input", "input image was not fetched: ")


async def test_mask_urls_to_unsafe_addresses_are_refused(stack: Stack, servers: dict[str, Any]) -> None:
    image = f"{servers['public'].url}/image.png"
    await _check_all(stack, servers, lambda url: {"model": "edit", "input": {
        "prompt": "edit", "input_images": [image], "provider_params": {"mask": url}}},
        "invalid_input", "mask was not fetched: ")


async def test_provider_output_urls_to_unsafe_addresses_are_refused(stack: Stack, servers: dict[str, Any]) -> None:
    await _check_all(stack, servers, lambda url: {"model": "evil", "input": {"prompt": f"OUT {url}"}},
                     "provider_error", "output URL was not fetched: ")


async def test_provider_polling_urls_to_unsafe_addresses_are_refused(stack: Stack, servers: dict[str, Any]) -> None:
    """A provider whose create answers with a polling URL into our network (the whole table):
    the follow-up is refused before a byte is sent, and the deployment's key never leaves.
    Provider API calls follow no redirect: a polling URL that redirects ends as the
    provider's own 302, the sentinel untouched."""
    await _check_all(stack, servers, lambda url: {"model": "evil", "input": {"prompt": f"POLL {url}"}},
                     "provider_error", "not fetched: ", redirects="answered 302")


async def test_webhook_urls_to_unsafe_addresses_are_refused_at_submit(stack: Stack, servers: dict[str, Any]) -> None:
    """The same table against a job's webhook_url and a tenant endpoint's url: every form is
    refused with 422 naming the field and the reason, and nothing is connected to."""
    sentinel: Sentinel = servers["sentinel"]
    before = sentinel.connections
    problems: list[str] = []
    async with stack.client() as c:
        for name, url, reason in _forms(sentinel.port):
            r = await c.post("/v1/jobs", json={"model": "edit", "input": {"prompt": "hook"}, "webhook_url": url})
            e = await c.post("/v1/webhooks/endpoints", json={"url": url})
            for what, got, loc in (("job", r, "webhook_url"), ("endpoint", e, "url")):
                err = got.json().get("error") or {}
                if got.status_code != 422 or err.get("code") != "invalid_input" or err["details"][0]["loc"] != [loc] \
                        or reason.lower() not in json.dumps(err).lower():
                    problems.append(f"{what} {name}: {got.status_code} {got.text[:300]}")
        assert (await c.get("/v1/webhooks/endpoints")).json()["data"] == []
    assert not problems, "\n".join(problems)
    assert sentinel.connections == before, "a refused webhook URL was connected to"


async def test_a_webhook_receiver_that_redirects_into_our_network_is_not_followed(stack: Stack, servers: dict[str, Any]) -> None:
    """A public-looking receiver answering 302 to loopback or the metadata address: the
    delivery is POSTed to it and ends there (webhooks follow no redirect)."""
    public: Public = servers["public"]
    sentinel: Sentinel = servers["sentinel"]
    before = sentinel.connections
    hooks = [f"{public.url}/redirect?to=http://127.0.0.1:{sentinel.port}/hook",
             f"{public.url}/redirect?to=http://169.254.169.254/latest/meta-data/"]
    hits = public.hits.count("/redirect")
    async with stack.client() as c:
        for hook in hooks:
            r = await c.post("/v1/jobs", json={"model": "evil", "input": {"prompt": f"OUT {public.url}/image.png"},
                                               "webhook_url": hook, "webhook_events": ["job.succeeded"]})
            assert r.status_code == 201, r.text
        deadline = time.monotonic() + 30
        while public.hits.count("/redirect") < hits + len(hooks) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    assert public.hits.count("/redirect") >= hits + len(hooks), public.hits[-20:]
    await asyncio.sleep(1.0)
    assert sentinel.connections == before, "a webhook redirect was followed into our network"


async def test_the_safe_forms_do_work(stack: Stack, servers: dict[str, Any]) -> None:
    """The positive control: the same routes fetch an admitted server's image and mask, so
    the refusals above are the guard's and not a broken path."""
    public = servers["public"].url
    job = await _finished(stack, {"model": "edit", "input": {
        "prompt": "edit", "input_images": [f"{public}/image.png"], "provider_params": {"mask": f"{public}/mask.png"}}})
    assert job["status"] == "succeeded", job
    job = await _finished(stack, {"model": "evil", "input": {"prompt": f"OUT {public}/image.png"}})
    assert job["status"] == "succeeded" and job["outputs"][0]["content_type"] == "image/png", job


# -- the byte cap ---------------------------------------------------------------------------


def _rss(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v.split()[0]) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.+)$", status, re.M)}


@pytest.mark.parametrize("where", ["input", "output"])
async def test_an_endless_stream_stops_at_the_byte_cap(stack: Stack, servers: dict[str, Any], where: str) -> None:
    public: Public = servers["public"]
    worker = stack.procs["worker"].pid
    before = _rss(worker)["VmRSS"]
    public.endless_sent = 0
    url = f"{public.url}/endless"
    body = ({"model": "edit", "input": {"prompt": "edit", "input_images": [url]}} if where == "input"
            else {"model": "evil", "input": {"prompt": f"OUT {url}"}})
    t0 = time.monotonic()
    job = await _finished(stack, body)
    cap = INPUT_CAP if where == "input" else OUTPUT_CAP
    assert job["status"] == "failed" and f"over the limit of {cap} bytes" in job["error"]["message"], job["error"]
    assert time.monotonic() - t0 < 60
    await asyncio.sleep(0.5)
    sent = public.endless_sent
    assert cap <= sent < cap + 16 * 2**20, sent  # the socket buffers' worth past the cap, not more
    await asyncio.sleep(1.0)
    assert public.endless_sent - sent < 2**20, "the server is still being read"
    peak = _rss(worker)["VmHWM"]
    # the input is held in memory up to its cap (it is sent on as one upload); the output
    # streams to a temp file: either way nowhere near the bytes the server sent for ever
    assert peak - before < (2 * cap if where == "input" else cap // 2) + 64 * 2**20, (before, peak)


# -- provider error detail: tenants get the code and a cleaned message ----------------------



@pytest.mark.parametrize("i", range(len(LEAKS)), ids=["auth", "billing", "topology", "input", "task"])
async def test_provider_error_detail_reaches_admins_not_tenants(stack: Stack, i: int) -> None:
    what, code, secrets = LEAKS[i]
    body = ({"model": "badkey", "input": {"prompt": "a fox"}} if what == "badkey"
            else {"model": f"leak{i}", "input": {"prompt": what}})
    job = await _finished(stack, body)
    assert job["status"] == "failed" and job["error"]["code"] == code, job["error"]
    async with stack.client() as c:
        tenant_views = [json.dumps((await c.get(f"/v1/jobs/{job['id']}")).json()),
                        json.dumps((await c.get("/v1/jobs", params={"limit": 50})).json()),
                        (await c.get(f"/v1/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"})).text]
        denied = await c.get(f"/v1/admin/jobs/{job['id']}")
        assert denied.status_code in (401, 403)
    for view in tenant_views:
        for s in secrets:
            assert s not in view, (s, view[:2000])
    assert job["error"]["message"], job["error"]
    async with httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        full = (await admin.get(f"/v1/admin/jobs/{job['id']}")).json()
    provider = json.dumps(full["error"]["details"]["provider"])
    assert any(s in provider for s in secrets), provider  # the operator keeps the provider's own words
    assert any(s in (stack.root / "worker.log").read_text() for s in secrets)  # and the worker's log line


async def test_openai_routes_get_the_cleaned_message_too(stack: Stack) -> None:
    async with stack.client() as c:
        r = await c.post("/v1/images/generations", json={"model": "badkey", "prompt": "a fox"})
    assert r.status_code >= 400, r.text
    for s in ("zzQXZW", "Incorrect API key", "platform.openai.com"):
        assert s not in r.text, r.text


# -- hole 4: keys and signatures in logs ----------------------------------------------------


async def test_no_key_or_signature_in_any_log_line_of_a_token_run(tmp_path: Path, redis_url: str) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    stack = await make_stack(tmp_path, redis_url=redis_url, log_format="text", log_level="INFO")
    port = int(stack.api_url.rsplit(":", 1)[1])
    # INFO, without the access log: uvicorn still logs each websocket with its query string
    stack._spawn("api", "api", "--host", "127.0.0.1", "--port", str(port), "--log-level", "info", "--no-access-log")
    stack.start_worker()
    key = stack.keys["alice"]
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{stack.api_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, stack.log("api")
            time.sleep(0.1)
        async with stack.client() as c:
            r = await c.post("/v1/jobs", json={"model": "local-image", "input": {"prompt": "logs", "size": "256x256"}})
            job = await stack.wait_job(c, r.json()["id"])
            assert job["status"] == "succeeded", job
            signed = job["outputs"][0]["url"]
            assert "sig=" in signed
            assert (await c.get(signed)).status_code == 200  # a signed download, logged by its route
            assert (await c.get(signed.replace("sig=", "sig=0"))).status_code in (403, 404)
        ws_url = stack.api_url.replace("http", "ws") + f"/v1/jobs/{job['id']}/events?token={key}"
        for url in (ws_url, ws_url.replace(key, "gr_wrong0123456789")):
            with contextlib.suppress(ConnectionClosed):
                async with connect(url, open_timeout=20) as ws:
                    async for _ in ws:
                        pass
    finally:
        stack.stop()
    text = "\n".join((tmp_path / f"{n}.log").read_text() for n in ("api", "worker"))
    assert "WebSocket" in text or "websocket" in text.lower(), text[-3000:]  # the line that used to carry it
    assert key not in text
    assert "gr_wrong0123456789" not in text
    sig = parse_qs(urlsplit(signed).query)["sig"][0]
    assert sig not in text
    for line in text.splitlines():
        assert not re.search(r"[?&](token|sig|signature|x-amz-signature)=(?!\[redacted\])", line, re.I), line


def test_the_parameter_allowlists_are_documented_as_declared() -> None:
    """docs/adapters/provider-params.md lists, per adapter and modality, exactly the names
    the adapter declares settable (a new adapter or name fails here until documented)."""
    from adapters.registry import adapter_class

    doc = (Path(__file__).parents[1] / "docs" / "adapters" / "provider-params.md").read_text()
    for name in sorted(ADAPTERS):
        section = doc.split(f"## `{name}`", 1)
        assert len(section) == 2, f"docs/adapters/provider-params.md has no section for {name}"
        body = section[1].split("\n## ", 1)[0]
        rows = dict(re.findall(r"^\| (\w+) \| (.+) \|$", body, re.M))
        declared = adapter_class(name).provider_params
        for modality, names in declared.items():
            assert set(re.findall(r"`([^`]+)`", rows.get(modality, ""))) == set(names), (name, modality)
        assert set(rows) - {"modality"} <= set(declared) | ({"(any)"} if not declared else set()), (name, rows)


# -- the fetcher's own promises: one resolution, its own DNS pool, one deadline -------------


@contextmanager
def outbound_policy(allow: list[str], **kw: Any) -> Iterator[None]:
    previous = netguard.configure(allow, **kw)
    try:
        yield
    finally:
        netguard.set_policy(previous)


async def test_the_fetcher_connects_to_the_address_it_checked(servers: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebinding name: its first answer is an admitted address, every later one loopback.
    The fetcher resolves once and connects to the checked address (no second lookup), so
    the loopback listener on the same port is never reached."""
    sentinel: Sentinel = servers["sentinel"]
    srv = ThreadingHTTPServer((PUBLIC_HOST, sentinel.port), _PublicHandler)  # the admitted address, same port
    srv.image, srv.hits = png(), []  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        if host == "rebind.test":
            lookups.append(host)
            return real(PUBLIC_HOST if len(lookups) == 1 else "127.0.0.1", port, *args, **kw)
        return real(host, port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    before = sentinel.connections
    try:
        with outbound_policy([f"{PUBLIC_HOST}/32"]):
            async with httpx.AsyncClient() as http:
                async with fetcher.fetch(http, f"http://rebind.test:{sentinel.port}/image.png", max_bytes=2**20,
                                         timeout=10) as got:
                    body = await got.read()
    finally:
        srv.shutdown()
        srv.server_close()
    assert got.response.status_code == 200 and body == srv.image  # type: ignore[attr-defined]
    assert lookups == ["rebind.test"] and sentinel.connections == before


async def test_a_slow_resolver_holds_neither_the_event_loop_nor_the_default_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def slow(host: Any, *args: Any, **kw: Any) -> Any:
        if host == "slow.test":
            time.sleep(5)
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    loop = asyncio.get_running_loop()
    gaps: list[float] = []

    async def ticker() -> None:
        last = loop.time()
        while True:
            await asyncio.sleep(0.02)
            gaps.append(loop.time() - last)
            last = loop.time()

    tick = asyncio.create_task(ticker())
    try:
        with outbound_policy([], resolve_timeout=0.5):
            t0 = time.monotonic()
            refused = asyncio.create_task(netguard.resolve("http://slow.test/x.png"))
            await asyncio.sleep(0.1)
            assert await asyncio.wait_for(loop.run_in_executor(None, lambda: 42), 1) == 42  # the default pool is free
            with pytest.raises(netguard.UnsafeURL, match="did not resolve within 0.5 s"):
                await refused
            took = time.monotonic() - t0
    finally:
        tick.cancel()
    assert took < 2.5, took  # the resolver's 5 s are not waited for
    assert max(gaps) < 0.5, max(gaps)  # the loop kept running throughout


async def test_one_deadline_covers_a_body_that_trickles_under_the_byte_cap(servers: dict[str, Any]) -> None:
    public: Public = servers["public"]
    with outbound_policy([f"{PUBLIC_HOST}/32"]):
        async with httpx.AsyncClient() as http:
            t0 = time.monotonic()
            with pytest.raises(fetcher.FetchError) as e:
                async with fetcher.fetch(http, f"{public.url}/trickle", max_bytes=2**20, timeout=1.5) as got:
                    await got.read()
            took = time.monotonic() - t0
    assert e.value.kind == fetcher.FetchFailure.timeout and "longer than allowed" in e.value.reason, e.value
    assert 1.0 <= took < 5, took
