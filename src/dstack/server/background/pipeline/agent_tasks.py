"""The pipeline's conversations with agents, each outside any database transaction: submitting a
job (provisioning), watching it (one long poll per agent for all its jobs, `agent_watch`; one per
job for an agent older than that) and telling it to stop.

Every result is stored in a short transaction of its own, and the pipeline is woken to decide
what follows from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol

import httpx
from sqlalchemy import select

from dstack.agent.models import FINAL_STATES, AgentJobSubmission
from dstack.core.models.runs import JobStatus, JobTerminationReason, RunSpec
from dstack.server.agent_client import AgentClient, AgentError
from dstack.server.backends.slurm.allocations import with_server_url as slurm_with_server_url
from dstack.server.background.pipeline.agent_watch import InstanceWatch, Watched
from dstack.server.background.pipeline.common import (
    AGENT_RECOVERY_WAIT_SECONDS,
    LOG_LINGER_SECONDS,
    lost_job_message,
)
from dstack.server.background.pipeline.jobs_provisioning import (
    build_submission,
    code_blob,
    resolve_secrets,
    submit_to_agent,
)
from dstack.server.background.pipeline.jobs_running import store_report, store_started
from dstack.server.db import Database, retry_on_conflict
from dstack.server.models import InstanceModel, JobModel, RunModel, utcnow
from dstack.server.services import volumes
from dstack.server.services.fleets import node_ips as fleet_node_ips
from dstack.server.services.fleets import with_home as fleet_with_home
from dstack.server.services.jobs import nodes_count
from dstack.server.services.runs import parse_configuration

logger = logging.getLogger(__name__)

#: a job submitted with its start: the agent answers once it runs (or after this), so the common
#: quick start is stored as `running` by provisioning itself, not by a watch round trip later
START_WAIT_RUNNING_SECONDS = 1.0


class AgentDirectory(Protocol):
    """Which agent client serves an instance (services.instances.InstanceManager; tests give
    clients on `httpx.MockTransport`)."""

    agent_listeners: list[Callable[[str], Awaitable[None]]]
    #: how long an instance's agent may stay unreachable before its jobs are given up
    #: (settings: DSTACK_SERVER_AGENT_UNREACHABLE_SECONDS, the one ServerSettings value)
    recovery_hold_seconds: float

    def client(self, instance_id: str) -> AgentClient: ...

    def is_down(self, instance_id: str) -> bool: ...

    async def wait_recovered(self, instance_id: str, old: AgentClient, timeout: float) -> AgentClient | None: ...


class AgentTasks:
    """One provisioning task per job being submitted, one watch per agent (`InstanceWatch`)."""

    def __init__(
        self,
        db: Database,
        agents: AgentDirectory,
        on_logs: Callable[[str], None],
        on_job_changed: Callable[[str], None],
    ) -> None:
        self.db = db
        self.agents = agents
        self._on_logs = on_logs  # run id: new log lines are stored
        self._on_job_changed = on_job_changed  # run id: a job's state changed (wake the pipeline)
        self._watchers: dict[str, asyncio.Task[None]] = {}  # per-job pulls (agents without /api/watch)
        self._instances: dict[str, InstanceWatch] = {}  # instance id -> the watch of its agent
        self._watched: dict[str, str] = {}  # job id -> instance id whose watch has it
        self._to_route: set[str] = set()  # jobs to hand to their instance's watch
        self._router: asyncio.Task[None] | None = None
        #: clients of agents without `/api/watch` (their jobs are pulled one by one)
        self.legacy_clients: set[AgentClient] = set()
        self._provisioning: dict[str, asyncio.Task[None]] = {}
        self._stops_sent: set[str] = set()
        self._stopping = False

    def is_provisioning(self, job_id: str) -> bool:
        return job_id in self._provisioning

    async def close(self) -> None:
        self._stopping = True
        tasks = [*self._watchers.values(), *self._provisioning.values()]
        tasks += [w.task for w in self._instances.values() if w.task is not None]
        if self._router is not None:
            tasks.append(self._router)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Until no provisioning task is in flight (tests)."""
        while self._provisioning:
            await asyncio.gather(*self._provisioning.values(), return_exceptions=True)

    def ensure_on_agent(self, job_id: str, agent_state: str | None) -> None:
        """After a restart: provision a job that never reached its agent, watch the rest."""
        if agent_state is None:
            self.provision(job_id)
        else:
            self.watch(job_id)

    # --- provisioning ---------------------------------------------------------------------

    def provision(self, job_id: str) -> None:
        if job_id in self._provisioning or self._is_watched(job_id) or self._stopping:
            return
        self._provisioning[job_id] = asyncio.create_task(self._provision(job_id), name=f"provision-{job_id}")

    async def _provision(self, job_id: str) -> None:
        try:
            async with self.db.session() as session:
                job = (await session.execute(select(JobModel).where(JobModel.id == job_id))).scalar_one()
                if JobStatus(job.status).is_finished():
                    return  # ended before any agent heard of it
                run = (await session.execute(select(RunModel).where(RunModel.id == job.run_id))).scalar_one()
                inst = (
                    await session.execute(select(InstanceModel).where(InstanceModel.id == job.instance_id))
                ).scalar_one()
                run_spec = RunSpec.model_validate_json(run.run_spec)
                ips = await fleet_node_ips(session, run)
                conf = parse_configuration(run_spec)
                if ips is None and nodes_count(conf) > 1:
                    # A rank whose siblings have no node yet (a Slurm allocation's agents attach one
                    # by one): a pass must not start it without every node's address; the
                    # allocation starts all ranks once all are attached.
                    return
                submission = build_submission(run, job, run_spec, conf, inst, ips)
                submission = fleet_with_home(inst, submission)  # fleet hosts call the server through SSH
                # Slurm nodes call the server at config.yml's server_url
                submission = slurm_with_server_url(inst.name, inst.backend, submission)
                submission = await resolve_secrets(session, run.project_id, submission)
                submission = await volumes.with_mounts(session, run.project_id, conf, submission)
                code = await code_blob(session, run.project_id, run_spec)
            client = self.agents.client(inst.id)
            try:
                result = await _submit(client, submission, code)
            except httpx.TransportError as e:
                # The agent may have just died: once the supervisor has brought it back, submit
                # again (the new agent does not know the job); else fail as before.
                logger.warning("provisioning job %s: agent unreachable (%s); waiting for it", job_id, e)
                recovered = await self.agents.wait_recovered(inst.id, client, AGENT_RECOVERY_WAIT_SECONDS)
                if recovered is None:
                    raise
                result = await _submit(recovered, submission, code)

            async def note_started() -> None:
                row = (await session.execute(select(JobModel).where(JobModel.id == job_id))).scalar_one()
                store_started(row, result)
                await session.commit()

            async with self.db.session() as session:
                await retry_on_conflict(session, note_started)
            if result.get("state") == "running":
                self._on_job_changed(job.run_id)
            self._provisioning.pop(job_id, None)
            self.watch(job_id)
        except asyncio.CancelledError:
            raise
        except (AgentError, httpx.HTTPError) as e:
            logger.warning("provisioning job %s failed: %s", job_id, e)
            await self.finish_job(job_id, JobStatus.FAILED, JobTerminationReason.EXECUTOR_ERROR, str(e))
        except Exception as e:
            logger.exception("provisioning job %s failed", job_id)
            await self.finish_job(job_id, JobStatus.FAILED, JobTerminationReason.EXECUTOR_ERROR, str(e))
        finally:
            if self._provisioning.get(job_id) is asyncio.current_task():
                self._provisioning.pop(job_id, None)

    # --- stopping -------------------------------------------------------------------------

    async def send_stop(self, job_id: str, instance_id: str, abort: bool) -> None:
        """Tell the job's agent to stop it (once; again after a failed attempt), and watch it end."""
        if job_id in self._stops_sent:
            return
        self._stops_sent.add(job_id)
        try:
            await self.agents.client(instance_id).stop(job_id, abort=abort)
        except (AgentError, httpx.HTTPError) as e:
            logger.warning("stopping job %s failed: %s", job_id, e)
            self._stops_sent.discard(job_id)
        self.watch(job_id)

    # --- watching -------------------------------------------------------------------------

    def _is_watched(self, job_id: str) -> bool:
        task = self._watchers.get(job_id)
        return job_id in self._watched or job_id in self._to_route or (task is not None and not task.done())

    def watch(self, job_id: str) -> None:
        """Watch a job on its agent until it ends there (no-op while it is watched)."""
        if self._stopping or self._is_watched(job_id):
            return
        self._to_route.add(job_id)
        if self._router is None or self._router.done():
            self._router = asyncio.create_task(self._route(), name="watch-router")

    async def _route(self) -> None:
        """Hand the jobs to watch to their instances' watches: one query for all that wait."""
        while self._to_route and not self._stopping:
            ids = list(self._to_route)
            try:
                async with self.db.session() as session:
                    rows = (
                        await session.execute(
                            select(
                                JobModel.id,
                                JobModel.instance_id,
                                JobModel.log_cursor,
                                JobModel.agent_state,
                                JobModel.run_id,
                            ).where(JobModel.id.in_(ids))
                        )
                    ).all()
            except Exception:
                logger.exception("loading jobs to watch failed")
                self._to_route.difference_update(ids)  # the next pass asks again
                return
            self._to_route.difference_update(ids)
            for job_id, instance_id, cursor, known, run_id in rows:
                if instance_id is None:
                    continue
                try:
                    client = self.agents.client(instance_id)
                except KeyError:  # its instance is gone
                    continue
                if client in self.legacy_clients:
                    self._watchers[job_id] = asyncio.create_task(self._watch(job_id), name=f"watch-{job_id}")
                    continue
                inst = self._instances.get(instance_id)
                if inst is None:
                    inst = self._instances[instance_id] = InstanceWatch(self, instance_id, self._unwatched)
                self._watched[job_id] = instance_id
                inst.add(job_id, Watched(cursor=cursor, known=known, run_id=run_id, client=client))

    def _unwatched(self, job_id: str) -> None:
        self._watched.pop(job_id, None)

    async def _watch(self, job_id: str) -> None:
        """The per-job long poll (`/pull`), for agents without `/api/watch`."""
        try:
            async with self.db.session() as session:
                job = (await session.execute(select(JobModel).where(JobModel.id == job_id))).scalar_one()
                cursor, known, run_id = job.log_cursor, job.agent_state, job.run_id
                instance_id = job.instance_id
            if instance_id is None:
                return
            first_client = self.agents.client(instance_id)
            failing_since: float | None = None
            while not self._stopping:
                client = self.agents.client(instance_id)  # a replaced agent: its successor
                try:
                    report = await client.pull(job_id, cursor, known, wait=20, linger=LOG_LINGER_SECONDS)
                    failing_since = None
                except (httpx.HTTPError, AgentError) as e:
                    now = time.time()
                    failing_since = failing_since or now
                    if now - failing_since > self.agents.recovery_hold_seconds or isinstance(e, AgentError):
                        msg = lost_job_message(client is not first_client, f"agent unreachable: {e}")
                        await self.finish_job(job_id, JobStatus.FAILED, JobTerminationReason.INSTANCE_UNREACHABLE, msg)
                        return
                    await asyncio.sleep(0.5)
                    continue
                state = report["state"]
                final = state in FINAL_STATES
                records: list[dict[str, Any]] = report.get("logs", [])
                # A final state is stored with its last lines only: a job seen ended has all its output.
                apply_state = state != known and not (final and records)
                if not records and not apply_state:
                    continue  # a long poll that ran out with nothing new: no transaction for it
                async with self.db.session() as session:
                    await retry_on_conflict(
                        session, partial(store_report, session, job_id, report, records, apply_state)
                    )
                cursor = report["next_cursor"] if records else cursor
                if records:
                    self._on_logs(run_id)
                if apply_state:
                    known = state
                    self._on_job_changed(run_id)
                    if final:
                        await _forget_on_agent(client, job_id)
                        return
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("watching job %s failed", job_id)
        finally:
            if self._watchers.get(job_id) is asyncio.current_task():
                self._watchers.pop(job_id, None)

    async def finish_job(self, job_id: str, status: JobStatus, reason: JobTerminationReason, message: str) -> None:
        """End a job whose agent cannot say how it ended (unreachable, refused it)."""

        async def finish() -> str | None:
            job = (await session.execute(select(JobModel).where(JobModel.id == job_id))).scalar_one()
            if JobStatus(job.status).is_finished():
                return None
            if job.termination_reason and job.status == JobStatus.TERMINATING:
                job.status = JobTerminationReason(job.termination_reason).to_status()
            else:
                job.termination_reason = reason
                job.termination_reason_message = message
                job.status = status
            job.finished_at = utcnow()
            await session.commit()
            return job.run_id

        async with self.db.session() as session:
            run_id = await retry_on_conflict(session, finish)
        if run_id is not None:
            self._on_job_changed(run_id)


async def _submit(client: AgentClient, submission: AgentJobSubmission, code: bytes) -> dict[str, Any]:
    """Submit and start; a job without code in one request (`POST /api/jobs?start=true`), else
    submit, upload, start. The agent's answer to the start."""
    if code:
        return await submit_to_agent(client, submission, code)
    answer = await client.submit(submission, start=True, wait_running=START_WAIT_RUNNING_SECONDS)
    if "state" in answer:
        return answer
    return await client.start(submission.job_id)  # an agent older than `start=true`, or one that had it


async def _forget_on_agent(client: AgentClient, job_id: str) -> None:
    try:
        await client.delete(job_id)
    except httpx.HTTPError:
        pass
