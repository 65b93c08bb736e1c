"""The internal HTTP client factory (dstack.core.http_client): our headers, timeouts and proxy policy."""

from __future__ import annotations

import asyncio

import httpx

from dstack.core.http_client import CONNECT_TIMEOUT, USER_AGENT, internal_client


def test_headers_token_and_base_url_reach_the_peer():
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    async def main() -> None:
        async with internal_client(
            base_url="http://agent.test", token="s3cret", transport=httpx.MockTransport(answer)
        ) as c:
            assert (await c.get("/api/host")).json() == {"ok": True}
        async with internal_client(transport=httpx.MockTransport(answer)) as c:
            await c.get("http://other.test/x")

    asyncio.run(main())
    assert str(seen[0].url) == "http://agent.test/api/host"
    assert seen[0].headers["authorization"] == "Bearer s3cret"
    assert seen[0].headers["user-agent"] == USER_AGENT
    assert "authorization" not in seen[1].headers  # no token: no Authorization header


def test_timeouts():
    c = internal_client(timeout=3)
    assert (c.timeout.connect, c.timeout.read) == (3, 3)  # a short budget caps the connect timeout too
    c = internal_client()
    assert c.timeout.connect == CONNECT_TIMEOUT and c.timeout.read == 10
    c = internal_client(timeout=None, connect_timeout=10)
    assert c.timeout.read is None and c.timeout.connect == 10  # a stream may take as long as it takes


def test_environment_proxies_are_not_used(monkeypatch):
    """An operator's HTTP(S)_PROXY is for the outside world, not for calls between our parts."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    assert httpx.AsyncClient()._mounts, "control: a default client picks the proxy up"
    assert not internal_client()._mounts
