"""Fixtures: real upstream processes and the proxy under uvicorn (in a thread, real HTTP)."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from dstack.proxy import HostRouter, ServiceRegistry, build_proxy_app, render_prometheus
from tests.util import free_port, wait_port

HERE = Path(__file__).parent
SRC = str(HERE.parent.parent / "src")
DOMAIN = "example.test"


class Upstream:
    def __init__(self, replica_id: str, delay: float = 0.0, port: int | None = None) -> None:
        self.id = replica_id
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": SRC}
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "upstream_app.py"), str(self.port), replica_id, str(delay)], env=env
        )

    def wait(self) -> Upstream:
        wait_port(self.port)
        return self

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def upstreams():
    ups = {"a": Upstream("a"), "b": Upstream("b"), "slow": Upstream("slow", delay=0.25)}
    try:
        for u in ups.values():
            u.wait()
        yield ups
    finally:
        for u in ups.values():
            u.stop()


class ProxyHarness:
    """The proxy app mounted at /proxy (and at /) of a Starlette app, behind HostRouter."""

    def __init__(self) -> None:
        self.registry = ServiceRegistry()
        self.tokens = {"good"}
        self.auth_calls = 0
        self.proxy_app = build_proxy_app(
            self.registry, self._authorize, read_timeout=2.0, connect_timeout=2.0, auth_ttl=1.0
        )

        async def metrics(request):
            return PlainTextResponse(render_prometheus(self.registry))

        inner = Starlette(
            routes=[Route("/metrics", metrics), Mount("/proxy", app=self.proxy_app), Mount("/", app=self.proxy_app)]
        )
        self.app = HostRouter(inner, self.proxy_app, DOMAIN, project="main")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = uvloop.new_event_loop()
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            http="httptools",
            ws="websockets-sansio",
            log_level="warning",
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.server.serve(),), daemon=True)
        self.thread.start()
        wait_port(self.port)

    async def _authorize(self, project: str, token: str | None) -> bool:
        self.auth_calls += 1
        return project in ("main", "p") and token in self.tokens

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the proxy's loop (the registry is loop-bound)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return fut.result(10)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def harness():
    h = ProxyHarness()
    yield h
    h.stop()
