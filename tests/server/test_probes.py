"""Readiness probes send their own method, headers, body and honour their timeout; all must pass."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from dstack.core.models.configurations import parse_run_configuration
from dstack.server.services import probes


class _Handler(BaseHTTPRequestHandler):
    seen: list[dict] = []

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length).decode() if length else None
        _Handler.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body})
        if self.path == "/slow":
            time.sleep(1.5)
        status = 200 if self.path != "/down" else 503
        if self.path == "/auth" and self.headers.get("X-Probe-Token") != "s3cret":
            status = 401
        data = json.dumps({"ok": status == 200}).encode()
        self.send_response(status)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def replica():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _probes(*specs):
    conf = parse_run_configuration({"type": "service", "commands": ["serve"], "port": 8000, "probes": list(specs)})
    return conf.probes


async def test_every_probe_with_its_method_headers_and_body(replica):
    ps = _probes(
        {"url": "/health"},
        {
            "url": "/auth",
            "method": "post",
            "headers": [{"name": "X-Probe-Token", "value": "s3cret"}],
            "body": '{"ping": 1}',
            "timeout": "5s",
            "ready_after": 3,
            "interval": "30s",
        },
        {"url": "/head", "method": "head", "interval": "5s"},
    )
    _Handler.seen.clear()
    async with httpx.AsyncClient() as client:
        assert await probes.check_all(client, replica, ps)
    seen = {s["path"]: s for s in _Handler.seen}
    assert seen["/health"]["method"] == "GET"
    assert seen["/auth"]["method"] == "POST" and seen["/auth"]["body"] == '{"ping": 1}'
    assert seen["/auth"]["headers"]["X-Probe-Token"] == "s3cret"
    assert seen["/head"]["method"] == "HEAD"
    assert probes.ready_after(ps) == 3 and probes.interval(ps) == 5


async def test_any_failing_probe_fails_the_round(replica):
    async with httpx.AsyncClient() as client:
        assert not await probes.check_all(client, replica, _probes({"url": "/health"}, {"url": "/down"}))
        assert not await probes.check_all(client, replica, _probes({"url": "/auth", "method": "post"}))
        started = time.monotonic()
        assert not await probes.check_all(client, replica, _probes({"url": "/slow", "timeout": 1}))
        assert time.monotonic() - started < 1.4  # the probe's own timeout, not the server's pace
        assert not await probes.check_all(client, "http://127.0.0.1:1", _probes({"url": "/"}))


def test_probe_body_needs_a_method_that_takes_one():
    with pytest.raises(Exception, match="needs a method"):
        _probes({"url": "/x", "body": "{}"})
