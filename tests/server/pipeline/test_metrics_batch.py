"""The metrics collector asks each agent once per round for all its jobs (`POST /api/metrics`),
and per job only an agent that predates that route."""

from __future__ import annotations

import json
import time

import httpx
from sqlalchemy import select

from dstack.core.models.runs import JobStatus
from dstack.server.agent_client import AgentClient
from dstack.server.backends.base import AgentEndpoint
from dstack.server.models import JobMetricsPointModel
from dstack.server.services.job_metrics import MetricsCollector
from tests.server.pipeline.factories import add_job, make_instance, make_run, owner


def _sample(ts: float) -> dict:
    return {"ts": ts, "cpu_percent": 5.0, "cpu_seconds": 1.0, "memory_bytes": 1024, "gpus": []}


class Agent:
    """An agent's metrics routes: `batch` says whether it has `POST /api/metrics`."""

    def __init__(self, batch: bool) -> None:
        self.batch = batch
        self.requests: list[str] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        now = time.time()
        if request.url.path == "/api/metrics":
            if not self.batch:
                return httpx.Response(404, json={"detail": "Not Found"})
            after = json.loads(request.content)["after"]
            return httpx.Response(200, json={"jobs": {j: [_sample(now)] for j in after if after[j] < now}})
        if request.url.path.endswith("/metrics"):
            return httpx.Response(200, json={"samples": [_sample(now)]})
        return httpx.Response(404)


class Directory:
    def __init__(self, agents: dict[str, Agent]) -> None:
        self.clients = {
            i: AgentClient(AgentEndpoint(url="http://agent.test", token="t"), transport=httpx.MockTransport(a.handle))
            for i, a in agents.items()
        }

    def client(self, instance_id: str) -> AgentClient:
        return self.clients[instance_id]


async def test_one_request_per_agent_and_per_job_for_old_agents(db):
    user, project = owner()
    new_host, old_host = make_instance("new"), make_instance("old")
    run = make_run(project_id=project.id, user_id=user.id)
    on_new = [add_job(run, JobStatus.RUNNING, replica_num=i, instance_id=new_host.id) for i in range(3)]
    on_old = [add_job(run, JobStatus.RUNNING, replica_num=3 + i, instance_id=old_host.id) for i in range(2)]
    async with db.session() as s:
        s.add(user)
        await s.flush()
        s.add_all([project, new_host, old_host])
        await s.flush()
        s.add(run)
        await s.commit()
    agents = {new_host.id: Agent(batch=True), old_host.id: Agent(batch=False)}
    directory = Directory(agents)
    collector = MetricsCollector(db, directory)
    assert await collector.collect_once() == 5
    assert agents[new_host.id].requests == ["POST /api/metrics"]
    assert agents[old_host.id].requests[0] == "POST /api/metrics"
    assert sorted(agents[old_host.id].requests[1:]) == sorted(f"GET /api/jobs/{j.id}/metrics" for j in on_old)
    async with db.session() as s:
        stored = (await s.execute(select(JobMetricsPointModel.job_id))).scalars().all()
    assert sorted(stored) == sorted(j.id for j in on_new + on_old)
    for c in directory.clients.values():
        await c.close()
