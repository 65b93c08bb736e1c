"""The server's side of serverless endpoints: workers are jobs of the endpoint's run.

`server_ports` is everything the queue needs from the server (`dstack.serverless.ports`): the
database, the auth cache the proxy shares, project names, and `JobWorkerLauncher`, which turns the
serverless scaler's start/stop requests into replica jobs that run the configuration's commands
with the RUNPOD_* environment. `ServerlessBridge` registers an endpoint when its run is submitted,
reports worker jobs that end, and removes the endpoint when the run stops.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.models.runs import JobSpec, JobStatus, JobTerminationReason, RunSpec, RunStatus, RunType
from dstack.server import crypto
from dstack.server.db import Database, retry_on_conflict
from dstack.server.errors import ResourceExists
from dstack.server.models import JobModel, ProjectModel, RunModel
from dstack.server.services.runs import mark_job_terminating, new_jobs, parse_configuration
from dstack.serverless.ports import AccessCheck, ServerPorts
from dstack.serverless.service import ServerlessService
from dstack.serverless.settings import EndpointSettings

logger = logging.getLogger(__name__)
LOG_LEVEL_KEYS = {"RUNPOD_LOG_LEVEL", "RUNPOD_DEBUG_LEVEL"}  # the SDK reads the first it finds


def is_serverless(run: RunModel) -> bool:
    return run.run_type == RunType.SERVERLESS


async def _active_endpoint_run(session: AsyncSession, endpoint_id: str) -> RunModel | None:
    runs = (
        (
            await session.execute(
                select(RunModel).where(
                    RunModel.run_name == endpoint_id,
                    RunModel.run_type == RunType.SERVERLESS,
                    RunModel.deleted.is_(False),
                    RunModel.status.notin_(RunStatus.finished_statuses()),
                )
            )
        )
        .scalars()
        .all()
    )
    return next(iter(runs), None)


class JobWorkerLauncher:
    def __init__(self, db: Database, wake_pipeline: Callable[[], None]) -> None:
        self.db = db
        self.wake_pipeline = wake_pipeline

    async def start_worker(self, endpoint_id: str, worker_id: str, env: dict[str, str]) -> None:
        async with self.db.session() as session:
            run = await _active_endpoint_run(session, endpoint_id)
            if run is None:
                raise RuntimeError(f"endpoint '{endpoint_id}' has no active run")
            conf = parse_configuration(RunSpec.model_validate_json(run.run_spec))
            replica_num = max((j.replica_num for j in run.jobs), default=-1) + 1
            job = new_jobs(run, conf, replica_num, submission_num=0)[0]
            spec = JobSpec.model_validate_json(job.job_spec)
            if LOG_LEVEL_KEYS & spec.env.keys():  # the configuration's log level wins over dstack's default
                env = {k: v for k, v in env.items() if k not in LOG_LEVEL_KEYS}
            spec.env.update(crypto.encrypt_env(env))  # RUNPOD_AI_API_KEY is a credential
            job.job_spec = spec.model_dump_json()
            job.job_name = worker_id  # how stop_worker and exit reports find it
            session.add(job)
            await session.commit()
        self.wake_pipeline()

    async def stop_worker(self, endpoint_id: str, worker_id: str) -> None:
        async def stop() -> None:
            job = (await session.execute(select(JobModel).where(JobModel.job_name == worker_id))).scalar_one_or_none()
            if job is not None and not job.status.is_finished() and job.status != JobStatus.TERMINATING:
                mark_job_terminating(job, JobTerminationReason.SCALED_DOWN)
                await session.commit()

        async with self.db.session() as session:
            await retry_on_conflict(session, stop)
        self.wake_pipeline()


def project_names(db: Database) -> Callable[[str], Awaitable[str | None]]:
    """`project_id -> name` (None when the project is gone), for `ServerPorts.project_name`."""

    async def project_name(project_id: str) -> str | None:
        async with db.session() as session:
            project = await session.get(ProjectModel, project_id)
            return project.name if project is not None else None

    return project_name


def server_ports(db: Database, wake_pipeline: Callable[[], None], access: AccessCheck) -> ServerPorts:
    """The server's side of the queue's seam; `access` is the auth cache the proxy uses too."""
    return ServerPorts(db, JobWorkerLauncher(db, wake_pipeline), access, project_names(db))


SWEEP_INTERVAL = 2.0


class ServerlessBridge:
    def __init__(self, db: Database, service: ServerlessService) -> None:
        self.db = db
        self.service = service
        self._reported: set[str] = set()
        self._deregistered: set[str] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._ensure_sweeper()

    def _ensure_sweeper(self) -> None:
        """Run listeners fire only when a run's status changes; a worker job that fails while the
        run's status stays the same (e.g. no capacity while another worker keeps the run RUNNING)
        would go unreported and the scaler would wait for it until its init timeout. The sweep
        reports such jobs within seconds."""
        if self._sweeper is not None and not self._sweeper.done():
            return
        try:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())
        except RuntimeError:  # no loop yet: started by the first submission or run change
            self._sweeper = None

    async def _sweep_loop(self) -> None:
        while not self.service.closing:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("serverless: sweeping worker jobs failed")

    async def sweep(self) -> None:
        """Report worker jobs that ended while the service still counts them as workers."""
        ids = [w for w in self.service.worker_ids() if w not in self._reported]
        if not ids:
            return
        async with self.db.session() as session:
            rows = (
                await session.execute(
                    select(JobModel.run_id, JobModel.job_name, JobModel.status).where(JobModel.job_name.in_(ids))
                )
            ).all()
        for run_id in {r.run_id for r in rows if r.status.is_finished()}:
            await self.on_run_changed(run_id)

    async def on_run_submitted(self, run: RunModel) -> None:
        self._ensure_sweeper()
        if not is_serverless(run):
            return
        conf = parse_configuration(RunSpec.model_validate_json(run.run_spec))
        async with self.db.session() as session:
            others = (
                (
                    await session.execute(
                        select(RunModel).where(
                            RunModel.run_name == run.run_name,
                            RunModel.id != run.id,
                            RunModel.deleted.is_(False),
                            RunModel.status.notin_(RunStatus.finished_statuses()),
                        )
                    )
                )
                .scalars()
                .all()
            )
            if any(is_serverless(o) for o in others):

                async def refuse() -> None:
                    db_run = await session.get(RunModel, run.id)
                    assert db_run is not None  # the run being submitted
                    db_run.status = RunStatus.FAILED
                    db_run.error = f"endpoint id '{run.run_name}' is taken by another project's endpoint"
                    await session.commit()

                await retry_on_conflict(session, refuse)
                raise ResourceExists(
                    f"serverless endpoint '{run.run_name}' already exists (endpoint ids are global); pick another name"
                )
            await self.service.register_endpoint(
                session, run.run_name, run.project_id, run.id, EndpointSettings.from_configuration(conf)
            )
            await session.commit()

    async def on_run_changed(self, run_id: str) -> None:
        self._ensure_sweeper()
        async with self.db.session() as session:
            run = await session.get(RunModel, run_id)
            if run is None or not is_serverless(run):
                return
            jobs = (await session.execute(select(JobModel).where(JobModel.run_id == run_id))).scalars().all()
            finished = [
                (j.job_name, j.termination_reason or j.status)
                for j in jobs
                if j.status.is_finished() and j.job_name not in self._reported
            ]
            stopping = run.status == RunStatus.TERMINATING or run.status.is_finished()
            name = run.run_name
        for worker_id, reason in finished:
            self._reported.add(worker_id)
            await self.service.on_worker_exited(name, worker_id, str(reason))
        if stopping and run_id not in self._deregistered:
            self._deregistered.add(run_id)
            await self.service.deregister_endpoint(name)

    async def status(self, run_name: str) -> dict[str, Any] | None:
        try:
            return await self.service.endpoint_status(run_name)
        except Exception:
            return None
