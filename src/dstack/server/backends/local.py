"""The `local` backend: this host, at price 0, with its agent started as a detached process."""

import asyncio
import logging
import secrets
from pathlib import Path

import httpx
import psutil

from dstack.agent.launcher import read_agent_json, start_agent
from dstack.core.http_client import internal_client
from dstack.core.models.runs import InstanceResources
from dstack.server.backends.base import AgentEndpoint, Backend, ProvisionedInstance, agent_host

logger = logging.getLogger(__name__)

LOCAL_INSTANCE_NAME = "local"


class LocalBackend(Backend):
    name = "local"

    def __init__(self, agent_home: Path) -> None:
        self.agent_home = agent_home

    async def ensure_instances(self, known: dict[str, AgentEndpoint]) -> list[ProvisionedInstance]:
        endpoint = known.get(LOCAL_INSTANCE_NAME)
        if endpoint is None or not await _is_healthy(endpoint):
            endpoint = await asyncio.to_thread(self._start_agent)
        host = await agent_host(endpoint)
        endpoint.network_isolation = bool(host.get("network_isolation"))
        endpoint.containers = bool(host.get("containers"))
        resources = InstanceResources(
            cpus=host["cpus"], memory_mib=host["memory_mib"], disk_mib=host["disk_mib"], gpus=host.get("gpus", [])
        )
        return [
            ProvisionedInstance(
                name=LOCAL_INSTANCE_NAME,
                backend=self.name,
                region="local",
                hostname=host.get("hostname", "localhost"),
                resources=resources,
                price=0.0,
                agent=endpoint,
            )
        ]

    async def recover_instance(self, name: str, lost: AgentEndpoint) -> ProvisionedInstance | None:
        if name != LOCAL_INSTANCE_NAME or (lost.pid is not None and _is_agent_process(lost.pid)):
            return None  # still running: a busy host answers late, and two agents must never share a home
        # Another agent on this home (one a previous server started) is re-attached to; else a new one starts.
        info = read_agent_json(self.agent_home)
        known = {}
        if info is not None and info.pid != lost.pid and _is_agent_process(info.pid):
            known[LOCAL_INSTANCE_NAME] = AgentEndpoint(url=info.url, token=info.token, pid=info.pid)
        return (await self.ensure_instances(known))[0]

    def _start_agent(self) -> AgentEndpoint:
        self.agent_home.mkdir(parents=True, exist_ok=True)
        info = start_agent(self.agent_home, secrets.token_hex(24))
        logger.info("Started the local agent (pid %s) at %s", info.pid, info.url)
        return AgentEndpoint(url=info.url, token=info.token, pid=info.pid)


def _is_agent_process(pid: int) -> bool:
    """A live (not zombie) `python -m dstack.agent` with this pid; a reused pid is not one."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and "dstack.agent" in proc.cmdline()
    except psutil.Error:
        return False


async def _is_healthy(endpoint: AgentEndpoint) -> bool:
    try:
        async with internal_client(token=endpoint.token, timeout=3) as client:
            r = await client.get(f"{endpoint.url}/api/host")
            return r.status_code == 200
    except httpx.HTTPError:
        return False
