"""The supervisor skips the healthcheck of an agent that keeps answering other requests, but not
for long: a real healthcheck (which proves the pid) still comes every few checks, and an agent
that stops answering is checked at once."""

from __future__ import annotations

import time

import httpx

from dstack.server.agent_client import AgentClient
from dstack.server.backends.base import AgentEndpoint
from dstack.server.services.instances import HEALTHCHECK_EVERY_CHECKS, InstanceManager


async def test_busy_agents_are_checked_less_often_and_silent_ones_at_once():
    checks: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/healthcheck":
            checks.append("health")
            return httpx.Response(200, json={"pid": 42})
        return httpx.Response(200, json={"jobs": {}})

    client = AgentClient(
        AgentEndpoint(url="http://agent.test", token="t", pid=42), transport=httpx.MockTransport(handle)
    )
    manager = InstanceManager(db=None, backends=[], check_seconds=0.5)  # type: ignore[arg-type]
    manager._clients["i"] = client
    try:
        assert await manager.check("i") is False and checks == ["health"]  # never checked: asked
        await client.metrics_many({})  # the agent answers something else
        assert await manager.check("i") is False and checks == ["health"]  # skipped
        client.last_answer = time.monotonic() - 1.0  # silent for longer than a check interval
        assert await manager.check("i") is False and checks == ["health", "health"]
        await client.metrics_many({})
        client.last_healthy = time.monotonic() - 0.5 * HEALTHCHECK_EVERY_CHECKS  # a real one is due
        assert await manager.check("i") is False and checks == ["health"] * 3
    finally:
        await client.close()


class _Backend:
    def __init__(self) -> None:
        self.recoveries = 0

    async def recover_instance(self, name: str, lost: AgentEndpoint) -> None:
        self.recoveries += 1
        return None


async def test_a_late_healthcheck_of_an_agent_that_answers_is_not_a_lost_agent():
    mode = {"health": "timeout"}

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/healthcheck":
            if mode["health"] == "timeout":
                raise httpx.ReadTimeout("slow", request=request)
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"jobs": {}})

    client = AgentClient(
        AgentEndpoint(url="http://agent.test", token="t", pid=42), transport=httpx.MockTransport(handle)
    )
    backend = _Backend()
    manager = InstanceManager(db=None, backends=[], check_seconds=0.5)  # type: ignore[arg-type]
    manager._clients["i"] = client
    manager._backend_of["i"] = (backend, "host-1")  # type: ignore[assignment]
    try:
        await client.metrics_many({})  # it answered just now; its last real healthcheck is long ago
        assert await manager.check("i") is False and backend.recoveries == 0 and not manager.is_down("i")
        client.last_answer = time.monotonic() - 0.5 * HEALTHCHECK_EVERY_CHECKS  # silent for a while too ...
        await manager.check("i")
        assert backend.recoveries == 0  # ... but its healthchecks have run late only briefly
        client.timing_out_since = time.monotonic() - 0.5 * HEALTHCHECK_EVERY_CHECKS  # late for long
        await manager.check("i")
        assert backend.recoveries == 1
        mode["health"] = "refused"  # refused: gone, however recently it answered
        await client.metrics_many({})
        await manager.check("i")
        assert backend.recoveries == 2
    finally:
        await client.close()
