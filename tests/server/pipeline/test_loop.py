"""The whole state machine in-process: real database rows, the pipeline's loop, fake agents on
`httpx.MockTransport`. Each test drives passes with `Pipeline.process()`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import select

from dstack.core.models.runs import JobStatus, JobTerminationReason, RunStatus, RunTerminationReason
from dstack.server.background.pipeline import Pipeline
from dstack.server.db import Database
from dstack.server.models import JobLogModel, JobModel, RunModel
from dstack.server.services.logs import LogNotifier
from dstack.server.services.runs import mark_job_terminating
from tests.server.pipeline.factories import add_job, make_instance, make_run, owner
from tests.server.pipeline.fake_agent import FakeAgent, FakeAgents


class World:
    """A database with one project, instances with fake agents, and a pipeline over them."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.agents = FakeAgents()
        self.pipeline = Pipeline(db, self.agents, LogNotifier())
        self.user, self.project = owner()

    async def setup(self) -> None:
        async with self.db.session() as s:
            s.add(self.user)
            await s.flush()
            s.add(self.project)
            await s.commit()

    async def add_instance(self, agent: FakeAgent | None = None, **kwargs: Any) -> tuple[str, FakeAgent]:
        inst = make_instance(**kwargs)
        async with self.db.session() as s:
            s.add(inst)
            await s.commit()
        return inst.id, self.agents.add(inst.id, agent)

    async def add_run(self, configuration: dict[str, Any] | None = None, jobs: int = 1, **job_fields: Any) -> str:
        run = make_run(configuration, project_id=self.project.id, user_id=self.user.id)
        for n in range(jobs):
            add_job(run, job_num=n, **job_fields)
        async with self.db.session() as s:
            s.add(run)
            await s.commit()
        return run.id

    async def run(self, run_id: str) -> RunModel:
        async with self.db.session() as s:
            return (await s.execute(select(RunModel).where(RunModel.id == run_id))).scalar_one()

    async def jobs(self, run_id: str) -> list[JobModel]:
        return sorted((await self.run(run_id)).jobs, key=lambda j: (j.job_num, j.submission_num))

    async def until(self, what: str, check: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
        """Passes of the pipeline until `check()` holds (agents answer in the background)."""
        deadline = time.monotonic() + timeout
        while not await check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await self.pipeline.process()
            await self.pipeline.agents.wait_idle()
            await asyncio.sleep(0.02)

    async def job_status(self, run_id: str, status: JobStatus) -> bool:
        return all(j.status == status.value for j in await self.jobs(run_id))

    async def run_status(self, run_id: str, status: RunStatus) -> bool:
        return (await self.run(run_id)).status == status.value

    async def close(self) -> None:
        await self.pipeline.stop()
        await self.agents.close()


@pytest.fixture
async def world(db):
    w = World(db)
    await w.setup()
    yield w
    await w.close()


async def test_a_task_runs_to_done_through_its_agent(world):
    _, agent = await world.add_instance()
    run_id = await world.add_run()
    await world.until("the job running", lambda: world.job_status(run_id, JobStatus.RUNNING))
    (job,) = await world.jobs(run_id)
    sent = agent.jobs[job.id].submission
    assert sent.commands == ["true"] and sent.project_id == world.project.id
    assert sent.env["DSTACK_RUN_NAME"] == (await world.run(run_id)).run_name
    assert job.instance_id is not None and job.job_provisioning_data is not None
    await world.until("the run running", lambda: world.run_status(run_id, RunStatus.RUNNING))

    agent.print(job.id, "hello\n")
    agent.set_state(job.id, "done", exit_status=0)
    await world.until("the run done", lambda: world.run_status(run_id, RunStatus.DONE))
    (job,) = await world.jobs(run_id)
    assert job.termination_reason == JobTerminationReason.DONE_BY_RUNNER.value
    async with world.db.session() as s:
        logs = (await s.execute(select(JobLogModel.data).where(JobLogModel.job_id == job.id))).scalars().all()
    assert b"".join(logs) == b"hello\n"
    assert ("DELETE", f"/api/jobs/{job.id}") in agent.requests  # forgotten once stored


async def test_a_stopped_run_stops_its_job_on_the_agent(world):
    _, agent = await world.add_instance()
    run_id = await world.add_run()
    await world.until("the job running", lambda: world.job_status(run_id, JobStatus.RUNNING))
    async with world.db.session() as s:
        run = (await s.execute(select(RunModel).where(RunModel.id == run_id))).scalar_one()
        run.status = RunStatus.TERMINATING.value
        run.termination_reason = RunTerminationReason.STOPPED_BY_USER.value
        for job in run.jobs:
            mark_job_terminating(job, JobTerminationReason.TERMINATED_BY_USER)
        await s.commit()
    await world.until("the run terminated", lambda: world.run_status(run_id, RunStatus.TERMINATED))
    (job,) = await world.jobs(run_id)
    assert job.status == JobStatus.TERMINATED.value
    assert job.termination_reason == JobTerminationReason.TERMINATED_BY_USER.value
    assert agent.requests.count(("POST", f"/api/jobs/{job.id}/stop")) == 1


async def test_a_failed_job_fails_the_run_with_its_error(world):
    _, agent = await world.add_instance()
    run_id = await world.add_run()
    await world.until("the job running", lambda: world.job_status(run_id, JobStatus.RUNNING))
    (job,) = await world.jobs(run_id)
    agent.set_state(job.id, "failed", exit_status=3, message="exit status 3")
    await world.until("the run failed", lambda: world.run_status(run_id, RunStatus.FAILED))
    run = await world.run(run_id)
    assert run.termination_reason == RunTerminationReason.JOB_FAILED.value
    assert run.error is not None and "3" in run.error


async def test_jobs_of_one_pass_do_not_share_a_reservation(world):
    await world.add_instance(cpus=4)
    big = {"cpu": 3, "memory": "0.5GB", "disk": "1GB"}
    run_id = await world.add_run({"nodes": 2}, jobs=2, spec={"requirements": big})
    await world.pipeline.process()
    first, second = await world.jobs(run_id)
    assert first.instance_id is not None and first.reserved
    assert second.instance_id is None and second.status == JobStatus.FAILED.value
    assert second.termination_reason == JobTerminationReason.FAILED_TO_START_DUE_TO_NO_CAPACITY.value
    assert "busy" in (second.termination_reason_message or "")
    # The run failed with it, in the same pass; the first job never reached its agent, so it ends here.
    assert first.status == JobStatus.TERMINATED.value
    assert (await world.run(run_id)).status == RunStatus.FAILED.value
    await world.pipeline.agents.wait_idle()
    assert world.agents.agents[first.instance_id].requests == []


async def test_a_job_no_instance_fits_fails_the_run_at_once(world):
    await world.add_instance(cpus=2)
    run_id = await world.add_run(spec={"requirements": {"cpu": 64, "memory": "0.5GB", "disk": "1GB"}})
    await world.pipeline.process()
    (job,) = await world.jobs(run_id)
    assert job.status == JobStatus.FAILED.value and job.termination_reason_message
    run = await world.run(run_id)
    assert run.status == RunStatus.FAILED.value
    assert run.error == job.termination_reason_message


async def test_a_port_taken_on_a_host_without_namespaces_fails_with_why(world):
    inst_id, _ = await world.add_instance()
    busy = await world.add_run(spec={"ports": [8000]})
    await world.until("the first job running", lambda: world.job_status(busy, JobStatus.RUNNING))
    run_id = await world.add_run(spec={"ports": [8000]})
    await world.pipeline.process()
    (job,) = await world.jobs(run_id)
    assert job.status == JobStatus.FAILED.value
    assert "port 8000" in (job.termination_reason_message or "") and "namespaces" in job.termination_reason_message


async def test_a_refused_submission_fails_the_job(world):
    await world.add_instance(FakeAgent(refuse_submissions=True))
    run_id = await world.add_run()
    await world.until("the run failed", lambda: world.run_status(run_id, RunStatus.FAILED))
    (job,) = await world.jobs(run_id)
    assert job.termination_reason == JobTerminationReason.EXECUTOR_ERROR.value
    assert "refused" in (job.termination_reason_message or "")


async def test_a_job_the_agent_forgot_ends_as_unreachable(world):
    _, agent = await world.add_instance()
    run_id = await world.add_run()
    await world.until("the job running", lambda: world.job_status(run_id, JobStatus.RUNNING))
    (job,) = await world.jobs(run_id)
    agent.forget(job.id)
    await world.until("the run failed", lambda: world.run_status(run_id, RunStatus.FAILED))
    (job,) = await world.jobs(run_id)
    assert job.termination_reason == JobTerminationReason.INSTANCE_UNREACHABLE.value


async def test_an_unreachable_agent_is_given_up_after_the_directorys_hold(world):
    """The watcher waits out the instance directory's recovery hold (the server's one
    DSTACK_SERVER_AGENT_UNREACHABLE_SECONDS setting), then ends the job instance_unreachable."""
    world.agents.recovery_hold_seconds = 60.0
    _, agent = await world.add_instance()
    run_id = await world.add_run()
    await world.until("the job running", lambda: world.job_status(run_id, JobStatus.RUNNING))
    agent.cut_off()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # well within the hold: still running
        await world.pipeline.process()
        await asyncio.sleep(0.1)
    assert await world.job_status(run_id, JobStatus.RUNNING)
    world.agents.recovery_hold_seconds = 0.5
    await world.until("the run failed", lambda: world.run_status(run_id, RunStatus.FAILED))
    (job,) = await world.jobs(run_id)
    assert job.termination_reason == JobTerminationReason.INSTANCE_UNREACHABLE.value
    assert (job.termination_reason_message or "").startswith("agent unreachable")


async def test_a_run_that_cannot_be_processed_fails_alone(world):
    await world.add_instance()
    good = await world.add_run()
    bad = await world.add_run()
    async with world.db.session() as s:
        run = (await s.execute(select(RunModel).where(RunModel.id == bad))).scalar_one()
        run.run_spec = '{"configuration": {"type": "task", "commands": 5}}'
        await s.commit()
    await world.until("the good job running", lambda: world.job_status(good, JobStatus.RUNNING))
    run = await world.run(bad)
    assert run.status == RunStatus.FAILED.value
    assert run.termination_reason == RunTerminationReason.SERVER_ERROR.value
    assert run.error is not None and run.error.startswith("server error while processing the run")
    assert await world.job_status(bad, JobStatus.TERMINATED)


async def test_a_retried_task_is_submitted_again_after_its_delay(world, monkeypatch):
    monkeypatch.setenv("DSTACK_SERVER_RETRY_DELAYS", "0.05")
    _, agent = await world.add_instance()
    run_id = await world.add_run({"retry": {"on_events": ["error"]}})
    await world.until("the job running", lambda: world.job_status(run_id, JobStatus.RUNNING))
    (first,) = await world.jobs(run_id)
    agent.set_state(first.id, "failed", exit_status=1)
    await world.until("a second submission", lambda: _submissions(world, run_id, 2))
    run = await world.run(run_id)
    assert run.resubmission_attempt == 1
    await world.until("the second job running", lambda: _latest_status(world, run_id, JobStatus.RUNNING))


async def _submissions(world: World, run_id: str, n: int) -> bool:
    return len(await world.jobs(run_id)) >= n


async def _latest_status(world: World, run_id: str, status: JobStatus) -> bool:
    return (await world.jobs(run_id))[-1].status == status.value


async def test_a_job_not_yet_submitted_before_a_restart_is_not_submitted_once_its_run_failed(world):
    inst_id, agent = await world.add_instance()
    run = make_run({"nodes": 2}, project_id=world.project.id, user_id=world.user.id, status=RunStatus.PROVISIONING)
    add_job(run, JobStatus.FAILED, job_num=0, exit_status=1, termination_reason="container_exited_with_error")
    add_job(run, JobStatus.PROVISIONING, job_num=1, instance_id=inst_id, reserved='{"cpus": 1, "memory_mib": 512}')
    async with world.db.session() as s:
        s.add(run)
        await s.commit()
    await world.pipeline.process()
    await world.pipeline.agents.wait_idle()
    assert [j.status for j in await world.jobs(run.id)] == [JobStatus.FAILED, JobStatus.TERMINATED]
    assert (await world.run(run.id)).status == RunStatus.FAILED
    assert agent.requests == []
