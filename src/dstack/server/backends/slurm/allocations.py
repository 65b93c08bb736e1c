"""Slurm allocations of dstack jobs: submitting them, showing Slurm's pending reason, handing the
agent to the pipeline once it answers, and releasing the allocation when the job is over.

A job the pipeline placed on Slurm is `provisioning` with no instance; `launch` submits it (or
finds the Slurm job a previous server submitted, by its name `dstack-<job id>`: nothing is
submitted twice), writes Slurm's state and reason into the job's provisioning data while it is
pending, and once the agent in the allocation answers, stores the allocation as an instance
(`slurm-<Slurm job id>-<job id prefix>`, backend `slurm`, region the partition) and asks the
pipeline to provision the job on it like on any host. A reconciling pass every second ends jobs
whose Slurm job ended under them (NODE_FAIL, TIMEOUT, ...) with the mapped reason, cancels the
allocations of finished jobs, and re-launches jobs left mid-launch by a server restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
from collections.abc import Callable
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.agent.models import AgentJobSubmission
from dstack.core.models.configurations import BaseRunConfiguration
from dstack.core.models.resources import ResourcesSpec
from dstack.core.models.runs import (
    InstanceResources,
    InstanceStatus,
    JobProvisioningData,
    JobSpec,
    JobStatus,
    JobTerminationReason,
    RunSpec,
)
from dstack.server import crypto
from dstack.server.backends.base import AgentEndpoint, ProvisionedInstance
from dstack.server.backends.slurm.backend import SlurmBackend, SlurmBackendError, SlurmSubmission
from dstack.server.backends.slurm.commands import SlurmCommandError
from dstack.server.backends.slurm.registry import SlurmBackends
from dstack.server.config_file import ConfigReloader
from dstack.server.db import Database, retry_on_conflict
from dstack.server.models import InstanceModel, JobModel, ProjectModel, RunModel, utcnow
from dstack.server.services.instances import InstanceManager
from dstack.server.services.jobs import nodes_count
from dstack.server.services.runs import parse_configuration

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0
#: a running allocation's agent is awaited this long per transport command (checked every 50 ms)
AGENT_WAIT_SECONDS = 1.0
#: `sinfo` at most this often per cluster (placement reads the cached shapes)
SHAPES_MAX_AGE_SECONDS = 5.0
_INSTANCE_NAME = re.compile(r"^slurm-(\d+)-")
ACTIVE_JOB = [s for s in JobStatus if not s.is_finished()]


def slurm_job_name(job_id: str) -> str:
    return f"dstack-{job_id}"


def _jpd(job: JobModel) -> JobProvisioningData | None:
    return JobProvisioningData.model_validate_json(job.job_provisioning_data) if job.job_provisioning_data else None


class SlurmAllocations:
    def __init__(
        self,
        db: Database,
        instances: InstanceManager,
        backends: SlurmBackends,
        provision: Callable[[str], None],
        on_job_changed: Callable[[str], None],
        reloader: ConfigReloader | None = None,
    ) -> None:
        self.db = db
        self.instances = instances
        self.backends = backends
        self._provision = provision  # the pipeline submits the job to the agent that answered
        self._on_job_changed = on_job_changed  # run id: wake the pipeline
        self._launching: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.Task[None] | None = None
        self._stopping = False
        self._reloader = reloader  # config.yml edits (checked every pass) and SIGHUP
        self._reload_now = asyncio.Event()
        self._sighup = False
        self._backend_by_instance: dict[str, SlurmBackend] = {}  # for the proxy's way to a replica
        self._node_address: dict[str, str] = {}  # instance name -> the node's NodeAddr

    # -- start / stop --------------------------------------------------------------------------

    async def start(self) -> None:
        """Re-attach to the agents of allocations that outlived a previous server (before the
        pipeline starts watching their jobs), then reconcile every second."""
        await self.backends.refresh()
        async with self.db.session() as session:
            rows = (
                await session.execute(
                    select(InstanceModel).where(
                        InstanceModel.backend == "slurm", InstanceModel.status != InstanceStatus.TERMINATED
                    )
                )
            ).scalars()
            found = list(rows)
        for row in found:
            await self._reattach(row)
        if self._reloader is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload_now.set)
                self._sighup = True
        global _current
        _current = self
        self._loop = asyncio.create_task(self._run(), name="slurm-allocations")

    async def replica_url(self, jpd: JobProvisioningData, port: int) -> str:
        """Where the proxy reaches a replica in an allocation: the node's address, or a local
        forward through the login host's SSH connection when Slurm's commands go through one."""
        # Jobs on Slurm use the node's network: the agent reports them on loopback.
        address = self._node_address.get(jpd.instance_name) or jpd.address or jpd.hostname
        backend = self._backend_by_instance.get(jpd.instance_name)
        if backend is None:
            return f"http://{address}:{port}"
        try:
            host, local = await backend.runner.forward(address, port)
        except SlurmCommandError as e:
            logger.warning("replica %s:%s on %s: %s", address, port, jpd.instance_name, e)
            return f"http://{address}:{port}"
        if (host, local) != (address, port):
            logger.info(
                "replica %s:%s on %s is reached through the login host (%s:%s)",
                address,
                port,
                jpd.instance_name,
                host,
                local,
            )
        return f"http://{host}:{local}"

    def reload(self, force: bool = False) -> bool:
        """Apply `config.yml` if it changed (or re-read it, `force`); False when nothing changed
        or the edit was refused (logged with file, line and field)."""
        if self._reloader is None:
            return False
        new = self._reloader.check(force=force)
        if new is None:
            return False
        self.backends.apply(new)
        return True

    async def close(self) -> None:
        global _current
        if _current is self:
            _current = None
        self._stopping = True
        if self._sighup:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        tasks = [t for t in [self._loop, *self._launching.values()] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.backends.close()

    async def _reattach(self, row: InstanceModel) -> None:
        found = await self._backend_of_instance(row)
        m = _INSTANCE_NAME.match(row.name)
        if found is None or m is None:
            return
        backend, _ = found
        agent = json.loads(row.agent or "{}")
        try:
            st = await backend.state(m.group(1))
            token = crypto.decrypt(agent["token"])
        except (SlurmBackendError, SlurmCommandError, KeyError, crypto.DecryptionError) as e:
            logger.warning("Slurm allocation %s: cannot re-attach: %s", row.name, e)
            return
        if st is None or st.state != "RUNNING":
            return  # the reconciling pass ends its jobs with Slurm's reason
        endpoint = AgentEndpoint(url=agent["url"], token=token, pid=agent.get("pid"))
        if backend.config.login is not None:  # the stored URL was the previous server's forward
            try:
                direct = await backend.agent_on(st, row.hostname, row.region)
            except (SlurmBackendError, SlurmCommandError) as e:
                logger.warning("Slurm allocation %s: cannot re-attach: %s", row.name, e)
                return
            if direct is None:
                logger.warning("Slurm allocation %s: its agent.json is gone; not re-attached", row.name)
                return
            endpoint = direct
        inst = ProvisionedInstance(
            name=row.name,
            backend="slurm",
            region=row.region,
            hostname=row.hostname,
            resources=_resources(row),
            price=0.0,
            agent=endpoint,
        )
        try:
            inst = await backend.reach(inst)
        except SlurmCommandError as e:
            logger.warning("Slurm allocation %s: cannot re-attach: %s", row.name, e)
            return
        await self.instances.add(row.id, backend, inst)
        self._backend_by_instance[row.name] = backend
        self._node_address[row.name] = urlsplit(endpoint.url).hostname or row.hostname
        logger.info("re-attached to Slurm allocation %s (job %s)", row.name, m.group(1))

    # -- launching -----------------------------------------------------------------------------

    def launch(self, job_id: str, relaunch: bool = False) -> None:
        """Submit the job's Slurm job and hand its agent to the pipeline (after the commit).

        `relaunch`: the job was placed before (a server restart left it mid-launch), so the Slurm
        job that server may have submitted is looked for first; a fresh placement has none."""
        task = self._launching.get(job_id)
        if (task is not None and not task.done()) or self._stopping:
            return
        self._launching[job_id] = asyncio.create_task(
            self._launch_logged(job_id, relaunch), name=f"slurm-launch-{job_id}"
        )

    async def _launch_logged(self, job_id: str, relaunch: bool) -> None:
        try:
            await self._launch(job_id, relaunch)
        except asyncio.CancelledError:
            raise
        except (SlurmBackendError, SlurmCommandError) as e:
            logger.warning("Slurm job for %s: %s", job_id, e)
            await self._finish(job_id, JobTerminationReason.FAILED_TO_START_DUE_TO_NO_CAPACITY, str(e))
        except Exception as e:
            logger.exception("launching job %s on Slurm failed", job_id)
            await self._finish(job_id, JobTerminationReason.EXECUTOR_ERROR, f"slurm: {e}")
        finally:
            if self._launching.get(job_id) is asyncio.current_task():
                self._launching.pop(job_id, None)

    async def _launch(self, job_id: str, relaunch: bool) -> None:
        async with self.db.session() as session:
            job = (await session.execute(select(JobModel).where(JobModel.id == job_id))).scalar_one()
            if JobStatus(job.status).is_finished() or job.instance_id is not None:
                return
            run = (await session.execute(select(RunModel).where(RunModel.id == job.run_id))).scalar_one()
            project = (
                await session.execute(select(ProjectModel.name).where(ProjectModel.id == run.project_id))
            ).scalar_one()
            spec = JobSpec.model_validate_json(job.job_spec)
            conf = parse_configuration(RunSpec.model_validate_json(run.run_spec))
            jpd = _jpd(job)
            nodes = nodes_count(conf)
            rank = job.job_num if nodes > 1 else 0
            leader_id = job_id if rank == 0 else await self._leader_of(session, job)
        backend, index, partition = self._backend_for(project, jpd, conf)
        requirements = ResourcesSpec.model_validate(spec.requirements)
        if leader_id is None:
            await self._finish(job_id, JobTerminationReason.EXECUTOR_ERROR, "slurm: node 0 of the task is gone")
            return
        # A multi-node task is one allocation of `nodes` nodes, submitted by its rank 0 job and
        # named after it; the other ranks wait for it and take the agent on their node.
        name = slurm_job_name(leader_id)
        if rank > 0:
            found_sub = await self._wait_leader(job_id, leader_id, backend, name, partition, nodes)
            if found_sub is None:
                return
            sub = found_sub
        else:
            found = await backend.find(name) if relaunch else None
            if found is not None:
                sub = backend.submission(found, name, partition, nodes)
                logger.info("job %s: found its Slurm job %s (submitted before a restart)", job_id, found)
            else:
                sub = await backend.submit(
                    name,
                    requirements,
                    partition=partition,
                    max_duration=spec.max_duration,
                    nodes=nodes,
                    known_shapes=self.backends.cached_shapes(project, index),
                )
        shown = ""
        while not self._stopping:
            if await self._job_over(job_id):
                if rank == 0:  # the allocation is rank 0's to release
                    await backend.cancel(sub.job_id)
                return
            st = await backend.state(sub.job_id)
            if st is None or st.final:
                reason = (st.termination_reason() if st else None) or JobTerminationReason.EXECUTOR_ERROR
                if reason == JobTerminationReason.DONE_BY_RUNNER:
                    reason = JobTerminationReason.EXECUTOR_ERROR  # the agent ended before the job started
                await self._finish(job_id, reason, st.message() if st else f"Slurm job {sub.job_id} vanished")
                return
            message = st.message()
            if message != shown:
                await self._note(job_id, message)
                shown = message
            # Running: wait for the agent on the transport's side (noticed within 50 ms), looking
            # at Slurm's state and the job's own between waits; pending: poll Slurm's state.
            found_agent = await backend.try_agent(sub, st, wait=AGENT_WAIT_SECONDS, rank=rank)
            if found_agent is not None:
                endpoint, node = found_agent
                await self._attach(job_id, backend, sub, node, endpoint, requirements)
                return
            if st.state != "RUNNING":
                await asyncio.sleep(0.3)

    async def _leader_of(self, session: AsyncSession, job: JobModel) -> str | None:
        """The rank 0 job of `job`'s replica (its latest submission that is not over)."""
        rows = (
            await session.execute(
                select(JobModel.id, JobModel.status)
                .where(JobModel.run_id == job.run_id, JobModel.replica_num == job.replica_num, JobModel.job_num == 0)
                .order_by(JobModel.submission_num.desc())
                .limit(1)
            )
        ).first()
        return None if rows is None or JobStatus(rows[1]).is_finished() else str(rows[0])

    async def _wait_leader(
        self, job_id: str, leader_id: str, backend: SlurmBackend, name: str, partition: str, nodes: int
    ) -> SlurmSubmission | None:
        """The allocation rank 0 submitted, once Slurm lists it; None when this job or rank 0 ended."""
        while not self._stopping:
            if await self._job_over(job_id):
                return None
            found = await backend.find(name)
            if found is not None:
                return backend.submission(found, name, partition, nodes)
            if await self._job_over(leader_id):
                await self._finish(job_id, JobTerminationReason.EXECUTOR_ERROR, "slurm: node 0 of the task ended")
                return None
            await asyncio.sleep(0.2)
        return None

    def _backend_for(
        self, project: str, jpd: JobProvisioningData | None, conf: BaseRunConfiguration
    ) -> tuple[SlurmBackend, int, str]:
        partition = jpd.region if jpd is not None else ""
        index = 0
        if jpd is not None and jpd.instance_id.startswith("slurm:"):
            index = int(jpd.instance_id.split(":")[1])
        backend = self.backends.backend(project, index)
        if backend is None:
            raise SlurmBackendError(f"slurm: project {project} has no Slurm backend {index} in config.yml any more")
        return backend, index, partition

    async def _attach(
        self,
        job_id: str,
        backend: SlurmBackend,
        sub: SlurmSubmission,
        node: str,
        endpoint: AgentEndpoint,
        requirements: ResourcesSpec,
    ) -> None:
        inst = backend.instance(sub, node, endpoint, requirements)
        inst.name = f"{inst.name}-{job_id[:8]}"
        inst = await backend.reach(inst)  # through the login host's forward when there is one
        gpus = requirements.gpu.count.min if requirements.gpu is not None and requirements.gpu.count.min else 0
        inst.resources.gpus = [{"index": i, "name": "gpu", "memory_mib": 0, "vendor": "nvidia"} for i in range(gpus)]

        async def store() -> str | None:
            job = (await session.execute(select(JobModel).where(JobModel.id == job_id))).scalar_one()
            if JobStatus(job.status).is_finished():
                return None
            row = InstanceModel(
                name=inst.name,
                backend="slurm",
                region=inst.region,
                hostname=node,
                resources=inst.resources.model_dump_json(),
                status=InstanceStatus.PROVISIONING,
            )
            session.add(row)
            await session.flush()
            job.instance_id = row.id
            job.reserved = json.dumps(
                {"cpus": inst.resources.cpus, "memory_mib": inst.resources.memory_mib, "gpus": list(range(gpus))}
            )
            job.job_provisioning_data = JobProvisioningData(
                backend="slurm",
                region=inst.region,
                instance_id=row.id,
                instance_name=inst.name,
                hostname=node,
                address=urlsplit(endpoint.url).hostname,  # the node's NodeAddr: where its ports are
                resources=inst.resources,
                reserved=json.loads(job.reserved),
                price=0.0,
            ).model_dump_json()
            await session.commit()
            return row.id

        async with self.db.session() as session:
            instance_id = await retry_on_conflict(session, store)
        if instance_id is None:
            await backend.release(inst.name)
            await backend.cancel(sub.job_id)
            return
        await self.instances.add(instance_id, backend, inst)  # stores the agent, supervises it
        self._backend_by_instance[inst.name] = backend
        self._node_address[inst.name] = urlsplit(endpoint.url).hostname or node
        logger.info("job %s runs in Slurm job %s on %s", job_id, sub.job_id, node)
        if sub.nodes == 1:
            self._provision(job_id)
            return
        # Every rank is started once all have their node: their env lists every node's address.
        async with self.db.session() as session:
            job = (await session.execute(select(JobModel).where(JobModel.id == job_id))).scalar_one()
            latest: dict[int, JobModel] = {}
            for j in (
                await session.execute(
                    select(JobModel).where(JobModel.run_id == job.run_id, JobModel.replica_num == job.replica_num)
                )
            ).scalars():
                if j.job_num not in latest or j.submission_num > latest[j.job_num].submission_num:
                    latest[j.job_num] = j
        ranks = [latest.get(k) for k in range(sub.nodes)]
        # A rank counts once its agent is stored (`instances.add`), not when its row is committed:
        # the ranks' env lists every node's address, read from there.
        if all(j is not None and j.instance_id is not None and self.instances.has_client(j.instance_id) for j in ranks):
            for r in ranks:
                if r is not None and not JobStatus(r.status).is_finished():
                    self._provision(r.id)

    # -- reconciling ---------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            try:
                self.reload(force=self._reload_now.is_set())
                self._reload_now.clear()
                if self.backends:  # none configured (yet): nothing to look at
                    await self.backends.refresh(max_age=SHAPES_MAX_AGE_SECONDS)
                    await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("reconciling Slurm allocations failed")
            with contextlib.suppress(TimeoutError):  # a SIGHUP reloads at once
                await asyncio.wait_for(self._reload_now.wait(), POLL_SECONDS)

    async def reconcile(self) -> None:
        async with self.db.session() as session:
            rows = list(
                (
                    await session.execute(
                        select(InstanceModel).where(
                            InstanceModel.backend == "slurm", InstanceModel.status != InstanceStatus.TERMINATED
                        )
                    )
                ).scalars()
            )
            waiting = list(
                (
                    await session.execute(
                        select(JobModel.id, JobModel.job_provisioning_data).where(
                            JobModel.status.in_(ACTIVE_JOB), JobModel.instance_id.is_(None)
                        )
                    )
                ).all()
            )
        for job_id, jpd_text in waiting:  # placed on Slurm, launch lost (a restart): launch again
            if jpd_text and json.loads(jpd_text).get("backend") == "slurm" and job_id not in self._launching:
                self.launch(job_id, relaunch=True)
        # The nodes of one allocation (a multi-node task) are instances named after the same Slurm job.
        groups: dict[str, list[InstanceModel]] = {}
        for row in rows:
            m = _INSTANCE_NAME.match(row.name)
            if m is not None:
                groups.setdefault(m.group(1), []).append(row)
        for slurm_id, group in groups.items():
            async with self.db.session() as session:
                busy = (
                    await session.execute(
                        select(JobModel.instance_id).where(
                            JobModel.instance_id.in_([r.id for r in group]), JobModel.status.in_(ACTIVE_JOB)
                        )
                    )
                ).scalars()
                busy_ids = set(busy)
            for row in group:
                others_busy = bool(busy_ids - {row.id})
                await self._reconcile_instance(row, slurm_id, others_busy)

    async def _reconcile_instance(self, row: InstanceModel, slurm_id: str, others_busy: bool) -> None:
        """End the instance's jobs whose Slurm job ended; release an instance with none left (and
        the Slurm job, once no other node of it has a job)."""
        found = await self._backend_of_instance(row)
        if found is None:
            return
        backend, _ = found
        async with self.db.session() as session:
            jobs = list((await session.execute(select(JobModel).where(JobModel.instance_id == row.id))).scalars())
        active = [j for j in jobs if not JobStatus(j.status).is_finished()]
        st = await backend.state(slurm_id)
        if active and (st is None or st.final):
            reason = (st.termination_reason() if st else None) or JobTerminationReason.INSTANCE_UNREACHABLE
            if reason == JobTerminationReason.DONE_BY_RUNNER:
                reason = JobTerminationReason.INSTANCE_UNREACHABLE  # the agent ended under a running job
            message = st.message() if st else f"Slurm job {slurm_id} vanished"
            for j in active:
                await self._finish(j.id, reason, message)
            active = []
        if not active:
            if st is not None and not st.final and not others_busy:
                await backend.cancel(slurm_id)
            await self.instances.remove(row.id)
            await backend.release(row.name)
            self._backend_by_instance.pop(row.name, None)
            self._node_address.pop(row.name, None)
            await self._set_instance_status(row.id, InstanceStatus.TERMINATED)

    async def _backend_of_instance(self, row: InstanceModel) -> tuple[SlurmBackend, str] | None:
        async with self.db.session() as session:
            found = (
                await session.execute(
                    select(ProjectModel.name, JobModel.job_provisioning_data)
                    .join(RunModel, RunModel.project_id == ProjectModel.id)
                    .join(JobModel, JobModel.run_id == RunModel.id)
                    .where(JobModel.instance_id == row.id)
                    .limit(1)
                )
            ).first()
        if found is None:
            return None
        project, _ = found
        backends = self.backends.by_project.get(project, [])
        for b in backends:
            if any(s.partition == row.region for s in await b.shapes()) or len(backends) == 1:
                return b, project
        return None

    # -- rows ----------------------------------------------------------------------------------

    async def _job_over(self, job_id: str) -> bool:
        async with self.db.session() as session:
            status = (await session.execute(select(JobModel.status).where(JobModel.id == job_id))).scalar_one()
        return JobStatus(status).is_finished() or status == JobStatus.TERMINATING

    async def _note(self, job_id: str, message: str) -> None:
        """Slurm's state and reason where the job's placement is shown (`instance_name`)."""

        async def note() -> str | None:
            job = (await session.execute(select(JobModel).where(JobModel.id == job_id))).scalar_one()
            jpd = _jpd(job)
            if jpd is None or job.instance_id is not None or JobStatus(job.status).is_finished():
                return None
            jpd.instance_name = message[:200]
            job.job_provisioning_data = jpd.model_dump_json()
            job.last_processed_at = utcnow()
            await session.commit()
            return job.run_id

        async with self.db.session() as session:
            run_id = await retry_on_conflict(session, note)
        if run_id is not None:
            self._on_job_changed(run_id)

    async def _finish(self, job_id: str, reason: JobTerminationReason, message: str) -> None:
        async def finish() -> str | None:
            job = (await session.execute(select(JobModel).where(JobModel.id == job_id))).scalar_one()
            if JobStatus(job.status).is_finished():
                return None
            if job.status == JobStatus.TERMINATING and job.termination_reason:
                job.status = JobTerminationReason(job.termination_reason).to_status()
            else:
                job.termination_reason = reason
                job.termination_reason_message = message
                job.status = reason.to_status()
            job.finished_at = utcnow()
            await session.commit()
            return job.run_id

        async with self.db.session() as session:
            run_id = await retry_on_conflict(session, finish)
        if run_id is not None:
            self._on_job_changed(run_id)

    async def _set_instance_status(self, instance_id: str, status: InstanceStatus) -> None:
        async def update() -> None:
            row = (await session.execute(select(InstanceModel).where(InstanceModel.id == instance_id))).scalar_one()
            row.status = status
            await session.commit()

        async with self.db.session() as session:
            await retry_on_conflict(session, update)


_current: SlurmAllocations | None = None


async def replica_url(jpd: JobProvisioningData, port: int) -> str:
    """The proxy's URL of a service replica running in a Slurm allocation (see
    `SlurmAllocations.replica_url`); the node's address when no allocation manager runs."""
    if _current is None:
        return f"http://{jpd.address or jpd.hostname}:{port}"
    return await _current.replica_url(jpd, port)


#: set in every serverless worker's env to a URL on the server (runpod's SDK polls it for jobs)
_SERVER_URL_ENV = "RUNPOD_WEBHOOK_GET_JOB"


def with_server_url(instance_name: str, backend_name: str, submission: AgentJobSubmission) -> AgentJobSubmission:
    """A job for a Slurm allocation, with the server's URL in its env (serverless workers'
    RUNPOD_WEBHOOK_* and anything else that starts with it) replaced by the backend's
    `server_url`: the address the server gives its jobs may be its loopback, which a compute
    node does not reach."""
    if backend_name != "slurm" or _current is None:
        return submission
    backend = _current._backend_by_instance.get(instance_name)
    target = backend.config.server_url if backend is not None else None
    seen = submission.env.get(_SERVER_URL_ENV)
    if not target or not seen:
        return submission
    parts = urlsplit(seen)
    server = f"{parts.scheme}://{parts.netloc}"
    target = target.rstrip("/")
    env = {
        k: target + v[len(server) :] if v == server or v.startswith(server + "/") else v
        for k, v in submission.env.items()
    }
    return submission.model_copy(update={"env": env})


def _resources(row: InstanceModel) -> InstanceResources:
    return InstanceResources.model_validate_json(row.resources)
