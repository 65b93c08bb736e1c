"""An in-process agent behind `httpx.MockTransport`: enough of the agent HTTP API
(docs/contracts.md) for the pipeline to submit, start, pull, stop and forget jobs."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from dstack.agent.models import FINAL_STATES, AgentJobSubmission
from dstack.server.agent_client import AgentClient
from dstack.server.backends.base import AgentEndpoint


@dataclass
class FakeJob:
    submission: AgentJobSubmission
    state: str = "submitted"
    code: bytes | None = None
    exit_status: int | None = None
    message: str | None = None
    started_at: float | None = None
    logs: list[dict[str, Any]] = field(default_factory=list)


class FakeAgent:
    def __init__(self, start_state: str = "running", refuse_submissions: bool = False) -> None:
        self.jobs: dict[str, FakeJob] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.start_state = start_state
        self.refuse_submissions = refuse_submissions
        self.unreachable = False  # set: every request fails to connect, as to a host whose link is down
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def set_state(self, job_id: str, state: str, exit_status: int | None = None, message: str | None = None) -> None:
        job = self.jobs[job_id]
        job.state, job.exit_status, job.message = state, exit_status, message
        self._notify()

    def print(self, job_id: str, line: str) -> None:
        job = self.jobs[job_id]
        data = base64.b64encode(line.encode()).decode()
        job.logs.append({"seq": len(job.logs) + 1, "ts": time.time(), "stream": "stdout", "data": data})
        self._notify()

    def cut_off(self) -> None:
        """The host's link goes down: every request, a long poll in flight too, fails to connect."""
        self.unreachable = True
        self._notify()

    def forget(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self._notify()

    def _started(self, job: FakeJob) -> None:
        if job.state == "preparing":
            job.state = self.start_state
            job.started_at = time.time()
            self._notify()

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        if self.unreachable:
            raise httpx.ConnectError("connection refused", request=request)
        parts = path.strip("/").split("/")  # api, jobs, <id>, <action>
        if request.method == "POST" and path == "/api/jobs":
            if self.refuse_submissions:
                return httpx.Response(400, json={"detail": "no"})
            submission = AgentJobSubmission.model_validate(json.loads(request.content))
            self.jobs.setdefault(submission.job_id, FakeJob(submission))
            return httpx.Response(200, json={})
        job = self.jobs.get(parts[2]) if len(parts) >= 3 else None
        if job is None:
            return httpx.Response(404, json={"detail": "unknown job"})
        action = parts[3] if len(parts) > 3 else ""
        if request.method == "PUT" and action == "code":
            job.code = request.content
            return httpx.Response(200, json={})
        if request.method == "POST" and action == "start":
            # As the agent does: "preparing" at once, the process a moment later.
            job.state = "preparing"
            asyncio.get_running_loop().call_later(0.01, self._started, job)
            return httpx.Response(200, json={"state": job.state})
        if request.method == "GET" and action == "pull":
            return await self._pull(job, request)
        if request.method == "POST" and action == "stop":
            if job.state not in FINAL_STATES:
                job.state = "aborted" if json.loads(request.content).get("abort") else "terminated"
                job.exit_status = -15
                self._notify()
            return httpx.Response(200, json={})
        if request.method == "DELETE" and action == "":
            self.jobs.pop(job.submission.job_id, None)
            return httpx.Response(200, json={})
        return httpx.Response(405)

    async def _pull(self, job: FakeJob, request: httpx.Request) -> httpx.Response:
        params = request.url.params
        cursor = int(params.get("cursor", 0))
        known = params.get("known_state")
        deadline = time.monotonic() + float(params.get("wait", 0))
        while job.state == known and len(job.logs) <= cursor and time.monotonic() < deadline and not self.unreachable:
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
            if self.jobs.get(job.submission.job_id) is not job:
                return httpx.Response(404, json={"detail": "unknown job"})
        if self.unreachable:
            raise httpx.ReadError("connection reset", request=request)
        records = job.logs[cursor:]
        body = {
            "state": job.state,  # with records, a final state is stored only once they all are
            "exit_status": job.exit_status,
            "message": job.message,
            "started_at": job.started_at,
            "logs": records,
            "next_cursor": records[-1]["seq"] if records else cursor,
        }
        return httpx.Response(200, json=body)


class FakeAgents:
    """The pipeline's `AgentDirectory`: one fake agent per instance id."""

    def __init__(self) -> None:
        self.agents: dict[str, FakeAgent] = {}
        self._clients: dict[str, AgentClient] = {}
        self.down: set[str] = set()
        self.agent_listeners: list[Any] = []
        self.recovery_hold_seconds = 60.0

    def add(self, instance_id: str, agent: FakeAgent | None = None) -> FakeAgent:
        agent = agent or FakeAgent()
        self.agents[instance_id] = agent
        endpoint = AgentEndpoint(url="http://agent.test", token="t")
        self._clients[instance_id] = AgentClient(endpoint, transport=httpx.MockTransport(agent.handle))
        return agent

    def client(self, instance_id: str) -> AgentClient:
        return self._clients[instance_id]

    def is_down(self, instance_id: str) -> bool:
        return instance_id in self.down

    async def wait_recovered(self, instance_id: str, old: AgentClient, timeout: float) -> AgentClient | None:
        return None

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
