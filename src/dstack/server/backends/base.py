"""The backend interface: where instances come from, what they offer, how their agent is reached."""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from dstack.core.http_client import internal_client
from dstack.core.models.runs import InstanceResources


@dataclass
class AgentEndpoint:
    """How the server reaches the agent on an instance."""

    url: str
    token: str
    pid: int | None = None
    #: whether the agent can give each job its own network namespace (so jobs may share a port)
    network_isolation: bool = False
    #: whether the agent runs jobs with an `image` (it found a working podman/docker)
    containers: bool = False


@dataclass
class ProvisionedInstance:
    name: str
    backend: str
    region: str
    hostname: str
    resources: InstanceResources
    price: float
    agent: AgentEndpoint


class Backend(ABC):
    """One place compute comes from. The local backend offers this host; later ones add fleets and clouds."""

    name: str

    @abstractmethod
    async def ensure_instances(self, known: dict[str, AgentEndpoint]) -> list[ProvisionedInstance]:
        """Make sure the backend's instances are up and their agents reachable.

        `known` maps instance names to the agent endpoints stored before a restart, so
        agents that outlived the server are reused (their jobs keep running).
        """

    async def recover_instance(self, name: str, lost: AgentEndpoint) -> ProvisionedInstance | None:
        """The agent at `lost` stopped answering its healthcheck: re-attach to an agent that
        still runs there or start a new one, and return the instance; None when the agent is
        alive after all (only slow) or the backend cannot bring agents back."""
        return None

    async def shutdown(self) -> None:
        """Release what the backend holds in this process (agents keep running).

        A hook, not abstract: a backend that holds nothing (the local one) has nothing to release.
        """
        return None


async def agent_host(endpoint: AgentEndpoint, timeout: float = 15.0) -> dict[str, Any]:
    """The agent's `/api/host`: its CPUs, memory, disk, GPUs and what it can do (isolation,
    containers), which every backend reads when it attaches an agent."""
    async with internal_client(token=endpoint.token, timeout=timeout) as client:
        r = await client.get(f"{endpoint.url}/api/host")
        r.raise_for_status()
        host = r.json()
    if not isinstance(host, dict):
        raise ValueError(f"the agent's /api/host answered {type(host).__name__}, not an object")
    return host
