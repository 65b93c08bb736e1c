"""The HTTP/WebSocket data plane over real sockets: auth, passthrough, streaming, balancing, failures."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import websockets

from dstack.proxy import Replica, ServiceInfo
from tests.util import free_port, wait_until

from .conftest import DOMAIN, Upstream

AUTH = {"Authorization": "Bearer good"}


def register(h, run: str, replicas: list[Replica], **kw) -> None:
    h.call(h.registry.upsert_service, ServiceInfo(project="main", run_name=run, **kw))
    h.call(h.registry.set_replicas, "main", run, replicas)


def test_auth_matrix(harness, upstreams):
    register(harness, "authsvc", [Replica("a", upstreams["a"].url)])
    register(harness, "public", [Replica("a", upstreams["a"].url)], auth=False)
    base = f"{harness.url}/proxy/services/main"
    with httpx.Client() as c:
        r = c.get(f"{base}/authsvc/x")
        assert r.status_code == 401 and "Bearer" in r.json()["detail"]
        r = c.get(f"{base}/authsvc/x", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 403 and "main" in r.json()["detail"]
        r = c.get(f"{base}/authsvc/x", headers=AUTH)
        assert r.status_code == 200 and r.json()["id"] == "a"
        assert "authorization" not in r.json()["headers"]  # the dstack token stays at the proxy
        r = c.get(f"{base}/public/x", headers={"Authorization": "Bearer app-own"})
        assert r.status_code == 200 and r.json()["headers"]["authorization"] == "Bearer app-own"
        assert c.get(f"{base}/missing/x", headers=AUTH).status_code == 404
        # revocation: denied within the cache TTL (1 s in the harness, at most 5 s by design)
        harness.tokens.add("temp")
        assert c.get(f"{base}/authsvc/x", headers={"Authorization": "Bearer temp"}).status_code == 200
        harness.tokens.discard("temp")
        wait_until(
            lambda: c.get(f"{base}/authsvc/x", headers={"Authorization": "Bearer temp"}).status_code != 200,
            3,
            0.1,
            "the revoked token to be refused",
        )
        # cached: many requests, few authorizer calls
        before = harness.auth_calls
        for _ in range(20):
            c.get(f"{base}/authsvc/x", headers=AUTH)
        assert harness.auth_calls - before <= 2


def test_passthrough_method_path_query_headers_body(harness, upstreams):
    register(harness, "pass", [Replica("a", upstreams["a"].url)], auth=False)
    register(harness, "nostrip", [Replica("a", upstreams["a"].url)], auth=False, strip_prefix=False)
    with httpx.Client() as c:
        r = c.request(
            "PATCH",
            f"{harness.url}/proxy/services/main/pass/a/b%20c?x=1&y=%2F",
            content=b"hello",
            headers={"X-Custom": "v", "Connection": "keep-alive, X-Drop", "X-Drop": "1"},
        )
        body = r.json()
        assert r.status_code == 200
        assert body["method"] == "PATCH" and body["raw_path"] == "/a/b%20c" and body["query"] == "x=1&y=%2F"
        assert body["size"] == 5 and body["headers"]["x-custom"] == "v" and "x-drop" not in body["headers"]
        assert body["headers"]["x-forwarded-for"] == "127.0.0.1"
        assert body["headers"]["x-forwarded-proto"] == "http"
        assert body["headers"]["x-forwarded-prefix"] == "/proxy/services/main/pass"
        assert r.headers["x-replica"] == "a" and r.headers["set-cookie"] == "a=1"
        # upstream status codes pass through
        assert c.get(f"{harness.url}/proxy/services/main/pass/?status=418").status_code == 418
        r = c.head(f"{harness.url}/proxy/services/main/pass/h")
        assert r.status_code == 200 and r.content == b""
        # standalone paths (app not mounted) and strip_prefix: false
        assert c.get(f"{harness.url}/services/main/pass/q").json()["path"] == "/q"
        assert c.get(f"{harness.url}/proxy/services/main/nostrip/q").json()["path"] == "/proxy/services/main/nostrip/q"
        # Host-based routing: <run>.<domain>
        r = c.get(f"{harness.url}/some/path?z=2", headers={"Host": f"pass.{DOMAIN}"})
        assert r.json()["path"] == "/some/path" and r.json()["query"] == "z=2"


def test_large_upload_is_streamed(harness, upstreams):
    register(harness, "upload", [Replica("a", upstreams["a"].url)], auth=False)
    chunk = b"x" * (256 * 1024)
    n = 64  # 16 MiB
    sent_last = []

    def gen():
        for i in range(n):
            if i == n - 1:
                time.sleep(0.5)  # a slow sender's last chunk: what the test is about
                sent_last.append(time.time())
            yield chunk

    with httpx.Client(timeout=30) as c:
        r = c.post(f"{harness.url}/proxy/services/main/upload/up", content=gen())
    body = r.json()
    assert body["size"] == len(chunk) * n
    # the upstream saw the first bytes long before the client finished sending
    assert body["first_chunk_at"] < sent_last[0] - 0.3


def test_sse_first_chunk_before_upstream_finishes(harness, upstreams):
    register(harness, "sse", [Replica("a", upstreams["a"].url)], auth=False)
    with httpx.Client(timeout=10) as c:
        with c.stream("GET", f"{harness.url}/proxy/services/main/sse/sse?n=4&delay=0.3") as r:
            arrivals = []
            for line in r.iter_lines():
                if line.startswith("data:"):
                    arrivals.append((time.time(), json.loads(line[5:])))
    assert len(arrivals) == 5
    first_at, first = arrivals[0]
    end_at, end = arrivals[-1]
    assert end.get("end")
    assert first_at < end["t"] - 0.8  # the first event reached us ~1.2 s before the upstream finished
    assert first_at - first["t"] < 0.2  # and it was not held back


def test_websocket_echo(harness, upstreams):
    register(harness, "ws", [Replica("a", upstreams["a"].url)])

    async def go():
        url = f"ws://127.0.0.1:{harness.port}/proxy/services/main/ws/ws"
        async with websockets.connect(url, additional_headers=AUTH, subprotocols=["chat"]) as ws:
            assert ws.subprotocol == "chat"
            assert await ws.recv() == "hello from a"
            await ws.send("ping")
            assert await ws.recv() == "echo:ping"
            await ws.send(b"\x01\x02\x03")
            assert await ws.recv() == b"\x03\x02\x01"
        with pytest.raises(websockets.exceptions.InvalidStatus) as e:
            async with websockets.connect(url):
                pass
        assert e.value.response.status_code == 401

    asyncio.run(go())


def test_least_in_flight_balancing(harness, upstreams):
    register(harness, "bal", [Replica("a", upstreams["a"].url), Replica("b", upstreams["b"].url)], auth=False)
    register(harness, "bal2", [Replica("a", upstreams["a"].url), Replica("slow", upstreams["slow"].url)], auth=False)

    async def go(run: str, n: int, conc: int) -> dict[str, int]:
        counts: dict[str, int] = {}
        sem = asyncio.Semaphore(conc)
        async with httpx.AsyncClient(timeout=10) as c:

            async def one():
                async with sem:
                    r = await c.get(f"{harness.url}/proxy/services/main/{run}/w")
                    counts[r.json()["id"]] = counts.get(r.json()["id"], 0) + 1

            await asyncio.gather(*[one() for _ in range(n)])
        return counts

    even = asyncio.run(go("bal", 40, 4))
    assert even.get("a", 0) >= 8 and even.get("b", 0) >= 8, even
    skew = asyncio.run(go("bal2", 60, 4))
    assert skew.get("slow", 0) >= 1 and skew.get("a", 0) > 2 * skew.get("slow", 0), skew
    stats = harness.call(harness.registry.stats, "main", "bal2")
    assert stats.requests >= 60 and stats.rps > 0 and stats.in_flight == 0
    assert set(stats.replica_in_flight) == {"a", "slow"}


def test_retry_on_dead_replica(harness, upstreams):
    dead = f"http://127.0.0.1:{free_port()}"
    register(harness, "retry", [Replica("dead", dead), Replica("a", upstreams["a"].url)], auth=False)
    with httpx.Client() as c:
        for _ in range(10):
            r = c.get(f"{harness.url}/proxy/services/main/retry/x")
            assert r.status_code == 200 and r.json()["id"] == "a"
    register(harness, "alldead", [Replica("dead", dead)], auth=False)
    r = httpx.get(f"{harness.url}/proxy/services/main/alldead/x")
    assert r.status_code == 502 and "unreachable" in r.json()["detail"]


class Closer:
    """A listener that accepts and closes at once, unanswered: what the local end of an SSH forward
    does when the app behind it does not listen (the channel open fails)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()


def test_unanswered_idempotent_request_goes_to_another_replica(harness, upstreams):
    closer = Closer()
    try:
        register(harness, "closes", [Replica("gone", closer.url), Replica("a", upstreams["a"].url)], auth=False)
        url = f"{harness.url}/proxy/services/main/closes/x"
        with httpx.Client() as c:
            for _ in range(6):
                r = c.get(url)
                assert r.status_code == 200 and r.json()["id"] == "a", r.text
            assert closer.accepted >= 1  # the closing replica was tried and the request moved on
            register(harness, "closes-only", [Replica("gone", closer.url)], auth=False)
            only = f"{harness.url}/proxy/services/main/closes-only/x"
            r = c.get(only)
            assert r.status_code == 502 and "closed the connection" in r.json()["detail"], r.text
            tried = closer.accepted
            r = c.post(only, content=b"not repeatable")  # a POST is never sent twice
            assert r.status_code == 502 and closer.accepted == tried + 1, (r.text, closer.accepted, tried)
    finally:
        closer.sock.close()


def test_no_ready_replica_503_and_timeout_504(harness, upstreams):
    register(harness, "notready", [Replica("a", upstreams["a"].url, ready=False)], auth=False)
    r = httpx.get(f"{harness.url}/proxy/services/main/notready/x")
    assert r.status_code == 503 and "no ready replica" in r.json()["detail"]
    register(harness, "timeout", [Replica("a", upstreams["a"].url)], auth=False)
    t0 = time.monotonic()
    r = httpx.get(f"{harness.url}/proxy/services/main/timeout/sleep?s=5", timeout=10)
    assert r.status_code == 504 and "timeout" in r.json()["detail"]
    assert time.monotonic() - t0 < 4  # the harness read timeout is 2 s


def test_hold_until_ready_from_zero(harness, upstreams):
    started: list[Upstream] = []
    h = harness

    async def wake(project: str, run: str) -> None:
        up = Upstream("woken")
        started.append(up)
        await asyncio.sleep(1.0)  # the "replica" takes a while to start
        await asyncio.get_running_loop().run_in_executor(None, up.wait)
        h.registry.set_replicas(project, run, [Replica("woken", up.url)])

    h.call(setattr, h.registry, "on_wake", wake)
    try:
        register(h, "zero", [], auth=False, min_replicas=0, hold_timeout=30)
        t0 = time.monotonic()
        with httpx.Client(timeout=40) as c:
            r = c.get(f"{h.url}/proxy/services/main/zero/x")
        assert r.status_code == 200 and r.json()["id"] == "woken"
        assert time.monotonic() - t0 >= 1.0
        assert len(started) == 1
        # a short hold that expires answers 503 with a clear message
        register(h, "zero2", [], auth=False, min_replicas=0, hold_timeout=0.5)
        h.call(setattr, h.registry, "on_wake", _noop_wake)
        r = httpx.get(f"{h.url}/proxy/services/main/zero2/x")
        assert r.status_code == 503 and "became ready within 0.5 s" in r.json()["detail"]
    finally:
        h.call(setattr, h.registry, "on_wake", None)
        for up in started:
            up.stop()


async def _noop_wake(project: str, run: str) -> None:
    return None


def test_prometheus_metrics(harness, upstreams):
    register(harness, "metered", [Replica("a", upstreams["a"].url)], auth=False)
    with httpx.Client() as c:
        for _ in range(5):
            c.get(f"{harness.url}/proxy/services/main/metered/x")
        c.get(f"{harness.url}/proxy/services/main/metered/x?status=500")
        text = c.get(f"{harness.url}/metrics").text
    assert 'dstack_proxy_requests_total{project="main",run="metered"} 6' in text
    assert 'dstack_proxy_errors_total{project="main",run="metered"} 1' in text
    assert 'dstack_proxy_latency_seconds{project="main",run="metered",quantile="0.99"}' in text
    assert "# TYPE dstack_proxy_requests_total counter" in text
