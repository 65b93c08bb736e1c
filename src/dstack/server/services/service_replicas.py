"""Services: publishing replicas to the proxy, readiness probes, autoscaling and scale-from-zero.

The database says which replica jobs run; this module turns that into the proxy registry's
view (ready replicas only), probes readiness, and moves `desired_replica_count` from the
proxy's request counts. Replica jobs themselves are started and stopped by the pipeline.
"""

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.http_client import internal_client
from dstack.core.models.configurations import ProbeSpec, ServiceConfiguration
from dstack.core.models.runs import JobProvisioningData, JobStatus, JobTerminationReason, RunSpec, RunStatus, RunType
from dstack.proxy import ModelInfo, Replica, ServiceInfo, ServiceRegistry
from dstack.proxy.ratelimit import RateLimitRule
from dstack.server.backends.slurm.allocations import replica_url as slurm_replica_url
from dstack.server.backends.ssh.forwards import reachable_through_forward
from dstack.server.db import Database, retry_on_conflict
from dstack.server.models import JobModel, RunModel, utcnow
from dstack.server.services import probes as probes_service
from dstack.server.services.fleets import replica_url
from dstack.server.services.runs import latest_jobs, mark_job_terminating, new_jobs, parse_configuration

logger = logging.getLogger(__name__)

AUTOSCALER_TICK = 1.0
DRAIN_TIMEOUT = 60.0


@dataclass
class ServiceState:
    run_id: str
    project: str
    run_name: str
    conf: ServiceConfiguration
    last_scaled_at: float = field(default_factory=time.monotonic)
    replicas: dict[str, Replica] = field(default_factory=dict)
    probes: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    draining: dict[str, float] = field(default_factory=dict)  # job id → when draining began


#: a gateway publisher: told (state, info, replicas) on every change, (state, None, None) on removal
Publisher = Callable[[ServiceState, ServiceInfo | None, list[Replica] | None], Awaitable[None]]


def replica_bounds(conf: ServiceConfiguration) -> tuple[int, int]:
    """`replicas` as (min, max): the configuration's validator requires both ends."""
    low, high = conf.replicas.min, conf.replicas.max
    if low is None or high is None:
        raise ValueError("replicas needs both bounds")  # unreachable: ServiceConfiguration refuses it
    return low, high


def service_configuration(run_spec: RunSpec) -> ServiceConfiguration:
    """The run's configuration, which is a service's (the caller checked the run type)."""
    conf = parse_configuration(run_spec)
    if not isinstance(conf, ServiceConfiguration):
        raise TypeError(f"run is a {conf.type}, not a service")
    return conf


def latest_replicas(run: RunModel) -> dict[int, JobModel]:
    """The latest submission of each replica (a service replica is a single job)."""
    return {replica: job for (replica, _), job in latest_jobs(run).items()}


def model_info(conf: ServiceConfiguration, meta: dict[str, Any] | None) -> ModelInfo | None:
    if conf.model is None:
        return None
    meta = meta or {}
    return ModelInfo(
        name=conf.model.name,
        format=conf.model.format,
        prefix=conf.model.prefix,
        chat_template=meta.get("chat_template"),
        eos_token=meta.get("eos_token"),
        bos_token=meta.get("bos_token"),
    )


class ServiceManager:
    def __init__(
        self,
        db: Database,
        registry: ServiceRegistry,
        wake_pipeline: Callable[[], None],
        autoscaler_window: float = 60.0,
    ) -> None:
        self.db = db
        #: seconds of request history the autoscaler looks at (settings: DSTACK_SERVER_AUTOSCALER_WINDOW)
        self.autoscaler_window = autoscaler_window
        self.registry = registry
        self.wake_pipeline = wake_pipeline
        self.services: dict[str, ServiceState] = {}
        self._sync_pending: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._http = internal_client()
        #: extra publishers (gateways) told about every change
        self.publishers: list[Publisher] = []
        self._background: set[asyncio.Task[None]] = set()  # held so they are not collected mid-way
        registry.on_wake = self.wake

    async def start(self) -> None:
        async with self.db.session() as session:
            ids = (
                (
                    await session.execute(
                        select(RunModel.id).where(RunModel.status.notin_(RunStatus.finished_statuses()))
                    )
                )
                .scalars()
                .all()
            )
        for run_id in ids:
            await self.sync(run_id)
        self._task = asyncio.create_task(self._autoscale_loop(), name="autoscaler")

    async def stop(self) -> None:
        tasks = [t for s in self.services.values() for t in s.probes.values()]
        if self._task:
            tasks.append(self._task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._http.aclose()

    # --- syncing the registry with the database -------------------------------------------

    def on_run_changed(self, run_id: str) -> None:
        """Pipeline hook (sync): coalesce bursts of changes into one sync per run."""
        if run_id in self._sync_pending:
            return
        self._sync_pending.add(run_id)

        async def _later() -> None:
            self._sync_pending.discard(run_id)
            try:
                await self.sync(run_id)
            except Exception:
                logger.exception("syncing service %s failed", run_id)

        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(_later()))

    async def sync(self, run_id: str, gateways_later: bool = False) -> None:
        """Make the proxy's view of a service match the database; `gateways_later`: tell gateways
        in the background (a submit answers without waiting on a slow gateway)."""
        async with self.db.session() as session:
            run = (await session.execute(select(RunModel).where(RunModel.id == run_id))).scalar_one_or_none()
            if run is None:
                return
            if run.run_type != RunType.SERVICE:
                return
            run_spec = RunSpec.model_validate_json(run.run_spec)
            project, run_name = run.project.name, run.run_name
            if run.status.is_finished() or run.deleted:
                self._forget(run_id)
                return
            conf = service_configuration(run_spec)
            assert conf.port is not None  # the configuration's validator requires it
            meta = json.loads(run.service_spec).get("model_meta") if run.service_spec else None
            jobs = [j for j in latest_replicas(run).values() if j.status == JobStatus.RUNNING]
            endpoints: dict[str, str] = {}
            for job in jobs:
                if job.job_provisioning_data is None:
                    continue  # a running job always has one; nothing to route to without it
                jpd = JobProvisioningData.model_validate_json(job.job_provisioning_data)
                if jpd.backend == "slurm":  # on a compute node, maybe behind a login host
                    endpoints[job.id] = await slurm_replica_url(jpd, conf.port.container_port)
                else:
                    endpoints[job.id] = await replica_url(jpd, conf.port.container_port)  # fleet hosts: tunneled
        state = self.services.get(run_id)
        if state is None:
            state = self.services[run_id] = ServiceState(run_id, project, run_name, conf)
        state.conf = conf
        info = ServiceInfo(
            project,
            run_name,
            auth=conf.auth,
            model=model_info(conf, meta),
            strip_prefix=conf.strip_prefix,
            hold_timeout=float(conf.request_hold_timeout),
            min_replicas=replica_bounds(conf)[0],
            last_error=run.error,
            rate_limits=tuple(
                RateLimitRule(prefix=r.prefix, rps=r.rps, burst=r.burst, key=r.key.type, header=r.key.header)
                for r in conf.rate_limits
            ),
        )
        self.registry.upsert_service(info)
        for job_id in list(state.replicas):
            if job_id not in endpoints:
                state.replicas.pop(job_id)
                task = state.probes.pop(job_id, None)
                if task:
                    task.cancel()
        for job_id, url in endpoints.items():
            if job_id not in state.replicas:
                state.replicas[job_id] = Replica(job_id, url, ready=False)
                state.probes[job_id] = asyncio.create_task(self._probe(state, job_id), name=f"probe-{job_id}")
        await self._publish(state, info, gateways_later)

    async def _publish(
        self, state: ServiceState, info: ServiceInfo | None = None, gateways_later: bool = False
    ) -> None:
        replicas = [r for jid, r in state.replicas.items() if jid not in state.draining]
        self.registry.set_replicas(state.project, state.run_name, replicas)
        if gateways_later:
            self._in_background(self._publish_to_gateways(state, info, replicas))
        else:
            await self._publish_to_gateways(state, info, replicas)

    async def _publish_to_gateways(
        self, state: ServiceState, info: ServiceInfo | None, replicas: list[Replica]
    ) -> None:
        for publisher in self.publishers:
            try:
                await publisher(state, info, replicas)
            except Exception:
                logger.exception("publishing %s to a gateway failed", state.run_name)

    def _in_background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _forget(self, run_id: str) -> None:
        state = self.services.pop(run_id, None)
        if state is None:
            return
        for task in state.probes.values():
            task.cancel()
        if any(s.project == state.project and s.run_name == state.run_name for s in self.services.values()):
            return  # the name belongs to a newer run now (submitted once this one finished)
        self.registry.remove_service(state.project, state.run_name)
        for publisher in self.publishers:
            self._in_background(publisher(state, None, None))

    # --- readiness ---------------------------------------------------------------------------

    async def _probe(self, state: ServiceState, job_id: str) -> None:
        """Mark the replica ready once its probe passes; take it out when it stops answering."""
        probes = state.conf.probes
        ready_after = probes_service.ready_after(probes)
        interval_ready = probes_service.interval(probes)
        successes = failures = 0
        while True:
            replica = state.replicas.get(job_id)
            if replica is None:
                return
            ok = await self._check(replica.url, probes)
            if ok:
                successes, failures = successes + 1, 0
            else:
                successes, failures = 0, failures + 1
            was_ready = replica.ready
            now_ready = successes >= ready_after if not was_ready else failures < 2
            if now_ready != was_ready:
                state.replicas[job_id] = Replica(job_id, replica.url, ready=now_ready)
                logger.info("replica %s of %s is %s", job_id, state.run_name, "ready" if now_ready else "not ready")
                await self._publish(state)
            await asyncio.sleep(interval_ready if now_ready else 0.1)

    async def _check(self, url: str, probes: Sequence[ProbeSpec]) -> bool:
        if not probes:
            host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
            through = await reachable_through_forward(host, int(port))
            if through is not None:  # an SSH forward's local port accepts whether or not the app listens
                return through
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2)
                writer.close()
                return True
            except (OSError, TimeoutError):
                return False
        return await probes_service.check_all(self._http, url, probes)

    # --- scaling -------------------------------------------------------------------------------

    async def wake(self, project: str, run_name: str) -> None:
        """A request arrived at a service with no ready replica: make sure one is coming."""
        state = next((s for s in self.services.values() if s.project == project and s.run_name == run_name), None)
        if state is None:
            return

        async def wake_from_zero() -> None:
            run = (await session.execute(select(RunModel).where(RunModel.id == state.run_id))).scalar_one()
            if run.desired_replica_count == 0:
                logger.info("waking %s from zero", run_name)
                await self._set_desired(session, run, state, 1)

        async with self.db.session() as session:
            await retry_on_conflict(session, wake_from_zero)

    async def _autoscale_loop(self) -> None:
        while True:
            await asyncio.sleep(AUTOSCALER_TICK)
            for state in list(self.services.values()):
                try:
                    await self._autoscale(state)
                    await self._finish_draining(state)
                except Exception:
                    logger.exception("autoscaling %s failed", state.run_name)

    async def _autoscale(self, state: ServiceState) -> None:
        conf = state.conf
        scaling = conf.scaling
        low, high = replica_bounds(conf)
        if scaling is None or low == high:
            return
        stats = self.registry.stats(state.project, state.run_name, window=self.autoscaler_window)
        rps = stats.rps
        desired = math.ceil(rps / scaling.target) if scaling.target > 0 else high
        if stats.in_flight > 0:
            desired = max(desired, 1)
        desired = max(low, min(high, desired))

        async def rescale() -> None:
            run = (await session.execute(select(RunModel).where(RunModel.id == state.run_id))).scalar_one()
            if run.status != RunStatus.RUNNING and run.desired_replica_count > 0:
                return
            current = run.desired_replica_count
            since = time.monotonic() - state.last_scaled_at
            if desired > current and (current == 0 or since >= scaling.scale_up_delay):
                await self._set_desired(session, run, state, desired)
            elif desired < current and since >= scaling.scale_down_delay:
                await self._set_desired(session, run, state, desired)

        async with self.db.session() as session:
            await retry_on_conflict(session, rescale)

    async def _set_desired(self, session: AsyncSession, run: RunModel, state: ServiceState, desired: int) -> None:
        """Start or stop replica jobs to reach `desired`; stop not-ready replicas first."""
        logger.info("scaling %s from %s to %s replicas", run.run_name, run.desired_replica_count, desired)
        run.desired_replica_count = desired
        state.last_scaled_at = time.monotonic()
        latest = latest_replicas(run)
        active = {
            n: j
            for n, j in latest.items()
            if not j.status.is_finished() and j.status != JobStatus.TERMINATING and j.id not in state.draining
        }
        if len(active) < desired:
            conf = parse_configuration(RunSpec.model_validate_json(run.run_spec))
            n = 0
            while len(active) < desired:
                if n not in active:
                    sub = latest[n].submission_num + 1 if n in latest else 0
                    for job in new_jobs(run, conf, n, submission_num=sub):
                        session.add(job)
                        active[n] = job
                n += 1
        elif len(active) > desired:

            def order(item: tuple[int, JobModel]) -> tuple[bool, int]:
                n, j = item
                replica = state.replicas.get(j.id)
                return (replica is not None and replica.ready, -n)

            for _, job in sorted(active.items(), key=order)[: len(active) - desired]:
                replica = state.replicas.get(job.id)
                if replica is not None and replica.ready:
                    state.draining[job.id] = time.monotonic()  # stop new traffic, let in-flight finish
                else:
                    mark_job_terminating(job, JobTerminationReason.SCALED_DOWN)
            await self._publish(state)
        run.last_processed_at = utcnow()
        await session.commit()
        self.wake_pipeline()

    async def _finish_draining(self, state: ServiceState) -> None:
        if not state.draining:
            return
        stats = self.registry.stats(state.project, state.run_name, window=self.autoscaler_window)
        done = [
            jid
            for jid, since in state.draining.items()
            if stats.replica_in_flight.get(jid, 0) == 0 or time.monotonic() - since > DRAIN_TIMEOUT
        ]
        if not done:
            return

        async def stop_drained() -> None:
            for jid in done:
                job = (await session.execute(select(JobModel).where(JobModel.id == jid))).scalar_one_or_none()
                if job is not None and not job.status.is_finished():
                    mark_job_terminating(job, JobTerminationReason.SCALED_DOWN)
            await session.commit()

        async with self.db.session() as session:
            await retry_on_conflict(session, stop_drained)
        for jid in done:
            state.draining.pop(jid, None)
        self.wake_pipeline()
