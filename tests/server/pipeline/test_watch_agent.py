"""The pipeline watching a real agent process over real HTTP: one `/api/watch` for all its jobs,
every line stored once, and a pipeline started again over the same database (a server restart)
reconciled from what the agent holds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from dstack.agent.launcher import AgentInfo, start_agent
from dstack.core.models.runs import JobStatus
from dstack.server.agent_client import AgentClient
from dstack.server.backends.base import AgentEndpoint
from dstack.server.background.pipeline import Pipeline
from dstack.server.db import Database
from dstack.server.models import JobLogModel, JobModel, RunModel
from dstack.server.services.logs import LogNotifier
from tests.agent.test_agent import TOKEN, _stop_agent
from tests.server.pipeline.factories import add_job, make_instance, make_run, owner


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentInfo]:
    info = start_agent(tmp_path_factory.mktemp("watch-agent"), TOKEN)
    yield info
    _stop_agent(info)


class RealAgents:
    """The pipeline's `AgentDirectory` over one real agent; records the paths it was asked."""

    def __init__(self, info: AgentInfo) -> None:
        self.info = info
        self._clients: dict[str, AgentClient] = {}
        self.paths: list[str] = []
        self.agent_listeners: list[Any] = []
        self.recovery_hold_seconds = 60.0

    def attach(self, instance_id: str) -> None:
        client = AgentClient(AgentEndpoint(url=self.info.url, token=TOKEN))

        async def record(request: httpx.Request) -> None:
            self.paths.append(request.url.path)

        client._http.event_hooks["request"].append(record)
        self._clients[instance_id] = client

    def client(self, instance_id: str) -> AgentClient:
        return self._clients[instance_id]

    def is_down(self, instance_id: str) -> bool:
        return False

    async def wait_recovered(self, instance_id: str, old: AgentClient, timeout: float) -> AgentClient | None:
        return None

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()


async def _until(pipeline: Pipeline, what: str, check: Callable[[], Awaitable[bool]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pipeline.process()
        await asyncio.sleep(0.05)


async def _setup(db: Database, commands: list[str], runs: int) -> tuple[str, list[str]]:
    user, project = owner()
    inst = make_instance(cpus=64, memory_mib=64 * 1024)
    job_ids = []
    async with db.session() as s:
        s.add(user)
        await s.flush()
        s.add(project)
        s.add(inst)
        for _ in range(runs):
            run = make_run({"commands": commands}, project_id=project.id, user_id=user.id)
            job_ids.append(add_job(run, spec={"commands": commands}).id)
            s.add(run)
        await s.commit()
    return inst.id, job_ids


async def _jobs(db: Database, job_ids: list[str]) -> list[JobModel]:
    async with db.session() as s:
        return list((await s.execute(select(JobModel).where(JobModel.id.in_(job_ids)))).scalars())


def _all_in(db: Database, job_ids: list[str], status: JobStatus) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return all(j.status == status for j in await _jobs(db, job_ids))

    return check


@asynccontextmanager
async def _pipeline(db: Database, agent: AgentInfo, instance_id: str) -> AsyncIterator[tuple[Pipeline, RealAgents]]:
    """A pipeline over the database whose instance's agent is the real `agent`; stopped on exit
    (as a server going away: the agent and its jobs go on)."""
    agents = RealAgents(agent)
    agents.attach(instance_id)
    pipeline = Pipeline(db, agents, LogNotifier())
    try:
        yield pipeline, agents
    finally:
        await pipeline.stop()
        await agents.close()


async def _lines(db: Database, job_id: str) -> list[str]:
    async with db.session() as s:
        rows = (
            await s.execute(select(JobLogModel).where(JobLogModel.job_id == job_id).order_by(JobLogModel.id))
        ).scalars()
        return b"".join(r.data for r in rows).decode().splitlines()


async def test_one_watch_follows_every_job_of_an_agent(db: Database, agent: AgentInfo) -> None:
    instance_id, job_ids = await _setup(db, ["echo one", "sleep 0.5", "echo two"], runs=6)
    async with _pipeline(db, agent, instance_id) as (pipeline, agents):
        await _until(pipeline, "every job done", _all_in(db, job_ids, JobStatus.DONE))
        for job_id in job_ids:
            assert await _lines(db, job_id) == ["one", "two"]
        assert "/api/watch" in agents.paths
        assert not [p for p in agents.paths if p.endswith("/pull")]  # no per-job long poll


async def test_a_restarted_pipeline_stores_nothing_twice(db: Database, agent: AgentInfo) -> None:
    count = 150
    cmd = f"python3 -c \"import time\nfor i in range({count}):\n    print(f'n {{i}}', flush=True); time.sleep(0.01)\""
    instance_id, job_ids = await _setup(db, [cmd], runs=3)

    async def some_lines() -> bool:
        return all([len(await _lines(db, j)) >= 10 for j in job_ids])

    async with _pipeline(db, agent, instance_id) as (pipeline, _):
        await _until(pipeline, "the first lines stored", some_lines)
    # the server went away mid-run; the jobs go on printing
    await asyncio.sleep(0.5)
    async with _pipeline(db, agent, instance_id) as (pipeline, _):
        await _until(pipeline, "every job done", _all_in(db, job_ids, JobStatus.DONE))
        for job_id in job_ids:
            assert await _lines(db, job_id) == [f"n {i}" for i in range(count)]


async def test_an_agent_without_the_watch_route_is_pulled_per_job(db: Database) -> None:
    from tests.server.pipeline.test_loop import World

    world = World(db)
    await world.setup()
    try:
        _, fake = await world.add_instance()
        run_id = await world.add_run(jobs=2)
        await world.until("jobs running", lambda: world.job_status(run_id, JobStatus.RUNNING))
        jobs = await world.jobs(run_id)
        for job in jobs:
            fake.print(job.id, "bye\n")
            fake.set_state(job.id, "done", exit_status=0)
        await world.until("jobs done", lambda: world.job_status(run_id, JobStatus.DONE))
        assert ("POST", "/api/watch") in fake.requests  # asked once, answered 404
        for job in jobs:
            assert ("GET", f"/api/jobs/{job.id}/pull") in fake.requests
            assert await _lines(db, job.id) == ["bye"]
    finally:
        await world.close()


async def test_an_agent_with_more_jobs_than_one_watch_lists_is_watched_in_slices(
    db: Database, agent: AgentInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dstack.server.background.pipeline import agent_watch

    monkeypatch.setattr(agent_watch, "MAX_JOBS_PER_WATCH", 2)
    # Two long jobs are watched first (the first slice); the quick ones' ends must come in turn.
    instance_id, long_ids = await _setup(db, ["sleep 60"], runs=2)
    async with _pipeline(db, agent, instance_id) as (pipeline, agents):
        try:
            await _until(pipeline, "the long jobs running", _all_in(db, long_ids, JobStatus.RUNNING))
            quick_ids = await _add_runs(db, ["echo sliced"], runs=3)
            await _until(pipeline, "the quick jobs done", _all_in(db, quick_ids, JobStatus.DONE), timeout=20)
            for job_id in quick_ids:
                assert await _lines(db, job_id) == ["sliced"]
            assert await _all_in(db, long_ids, JobStatus.RUNNING)()
        finally:
            for job_id in long_ids:
                await agents.client(instance_id).stop(job_id, abort=True)


async def _add_runs(db: Database, commands: list[str], runs: int) -> list[str]:
    """More runs in the project of the runs there are."""
    async with db.session() as s:
        first = (await s.execute(select(JobModel))).scalars().first()
        assert first is not None
        project_id = first.project_id
        user_id = (await s.execute(select(RunModel.user_id).where(RunModel.id == first.run_id))).scalar_one()
        ids = []
        for _ in range(runs):
            run = make_run({"commands": commands}, project_id=project_id, user_id=user_id)
            ids.append(add_job(run, spec={"commands": commands}).id)
            s.add(run)
        await s.commit()
    return ids
