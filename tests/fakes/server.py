"""Serve an ASGI app over real HTTP on a free loopback port, in a background thread.

    with serve(app) as url:            # "http://127.0.0.1:54321"
        ...

Also `run_main(factory)` for a fake module's `python -m` entry point.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Running:
    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        # run in a thread: uvicorn leaves signal handlers alone off the main thread
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> Running:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"fake server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextmanager
def serve(app: Any, port: int | None = None) -> Iterator[str]:
    running = Running(app, port).start()
    try:
        yield running.url
    finally:
        running.stop()


def run_main(factory: Callable[..., Any], description: str) -> None:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args()
    uvicorn.run(factory(), host=args.host, port=args.port)
