"""Instances the backends provide, and one agent client for each."""

import json
import logging

from sqlalchemy import select

from dstack.server.agent_client import AgentClient
from dstack.server.backends.base import AgentEndpoint, Backend
from dstack.server.db import Database
from dstack.server.models import InstanceModel

logger = logging.getLogger(__name__)


class InstanceManager:
    def __init__(self, db: Database, backends: list[Backend]) -> None:
        self.db = db
        self.backends = backends
        self._clients: dict[str, AgentClient] = {}

    async def start(self) -> None:
        """Bring every backend's instances up, reusing agents that outlived a previous server."""
        async with self.db.session() as session:
            rows = {i.name: i for i in (await session.execute(select(InstanceModel))).scalars()}
            known = {}
            for name, row in rows.items():
                agent = json.loads(row.agent or "{}")
                if agent.get("url"):
                    known[name] = AgentEndpoint(url=agent["url"], token=agent["token"], pid=agent.get("pid"))
            for backend in self.backends:
                for inst in await backend.ensure_instances(known):
                    row = rows.get(inst.name)
                    if row is None:
                        row = InstanceModel(name=inst.name, backend=inst.backend)
                        session.add(row)
                    row.region = inst.region
                    row.hostname = inst.hostname
                    row.resources = inst.resources.model_dump_json()
                    row.price = inst.price
                    row.status = "idle"
                    row.agent = json.dumps({"url": inst.agent.url, "token": inst.agent.token, "pid": inst.agent.pid,
                                            "network_isolation": inst.agent.network_isolation,
                                            "containers": inst.agent.containers})
                    await session.flush()
                    self._clients[row.id] = AgentClient(inst.agent)
            await session.commit()

    def client(self, instance_id: str) -> AgentClient:
        return self._clients[instance_id]

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
        for b in self.backends:
            await b.shutdown()
