"""The pipeline's loop: load a run's rows, ask each state's `process_*` function what to do,
apply the decisions in one transaction, then talk to agents.

A submit, an agent report or a deadline wakes it; every pass's changes are committed before
any agent hears of them, so a server killed at any point resumes from the database. A run
whose processing raises fails alone (SERVER_ERROR); contention only defers it.

A wake names the run it concerns (a submit, an agent's report) or none (everything). A pass
over one run's wake takes that run, the runs whose deadline is due and the runs with jobs still
waiting for an instance (a job that ended may have freed one); every active run is looked at
on a plain wake and every FULL_PASS_SECONDS, so with 1,000 active runs one report costs one
run's pass, not 1,000.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from dstack.core.models.runs import JobProvisioningData, JobStatus, RunSpec, RunStatus
from dstack.server.background.pipeline.agent_tasks import AgentDirectory, AgentTasks
from dstack.server.background.pipeline.common import FINISHED_RUN, earliest
from dstack.server.background.pipeline.decisions import UNSET, JobDecision, RunDecision
from dstack.server.background.pipeline.jobs_running import ON_AGENT, process_running_job
from dstack.server.background.pipeline.jobs_submitted import load_assign_context, process_submitted_job
from dstack.server.background.pipeline.jobs_terminating import process_terminating_job
from dstack.server.background.pipeline.runs_active import process_active_run
from dstack.server.background.pipeline.runs_pending import process_pending_run
from dstack.server.background.pipeline.runs_terminating import process_failed_run, process_terminating_run
from dstack.server.db import Database, retry_on_conflict
from dstack.server.models import JobModel, RunModel, utcnow
from dstack.server.services.logs import LogNotifier
from dstack.server.services.runs import mark_job_terminating, new_jobs, parse_configuration

logger = logging.getLogger(__name__)

IDLE_WAKE_SECONDS = 5.0
#: every active run is passed over at least this often (a safety net: wakes name what changed)
FULL_PASS_SECONDS = 30.0


@dataclass
class AgentWork:
    """What a committed pass asks of agents."""

    provision: list[str] = field(default_factory=list)  # job ids
    slurm: list[str] = field(default_factory=list)  # job ids placed on Slurm (launched after the commit)
    watch: list[tuple[str, str | None]] = field(default_factory=list)  # (job id, agent state)
    stop: list[tuple[str, str, bool]] = field(default_factory=list)  # (job id, instance id, abort)


@dataclass
class PassResult:
    wake_at: float | None = None
    work: AgentWork = field(default_factory=AgentWork)
    run_changed: bool = False
    #: a job of the run still waits for an instance with room
    waiting: bool = False


class Pipeline:
    def __init__(self, db: Database, instances: AgentDirectory, notifier: LogNotifier) -> None:
        self.db = db
        self.instances = instances
        self.notifier = notifier
        self.agents = AgentTasks(db, instances, on_logs=notifier.notify, on_job_changed=self._on_job_changed)
        self._wake = asyncio.Event()
        self._full = True  # the next pass looks at every active run
        self._last_full = 0.0  # monotonic time of the last full pass
        self._dirty: set[str] = set()  # runs woken by name since the last pass
        self._due: dict[str, float] = {}  # run id -> when it asked to be looked at again (epoch s)
        self._waiting: set[str] = set()  # runs with a job waiting for an instance with room
        self._task: asyncio.Task[None] | None = None
        self._failed_runs: set[str] = set()  # runs whose processing raised (logged once each)
        self._stopping = False
        #: called with a run id whenever a run's jobs change (services re-register replicas)
        self.run_listeners: list[Callable[[str], object]] = []
        #: submits a job placed on Slurm (backends/slurm/allocations.py; None: no Slurm backend)
        self.slurm_launch: Callable[[str], None] | None = None
        instances.agent_listeners.append(self._on_agent_replaced)

    def wake(self, run_id: str | None = None) -> None:
        """Pass over `run_id` soon (a submit, an agent's report), or over every active run."""
        if run_id is None:
            self._full = True
        else:
            self._dirty.add(run_id)
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="pipeline")
        self.wake()

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.agents.close()

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            timeout = IDLE_WAKE_SECONDS
            try:
                if self._full or time.monotonic() - self._last_full >= FULL_PASS_SECONDS:
                    self._full = False
                    deadline = await self.process()
                else:
                    deadline = await self._process_some()
                if deadline is not None:
                    timeout = min(timeout, max(0.01, deadline - time.time()))
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("pipeline step failed")
                timeout = 1.0
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def process(self) -> float | None:
        """One pass over every active run; returns the next time-based deadline (epoch seconds)."""
        self._last_full = time.monotonic()
        self._dirty.clear()
        self._due.clear()
        return await self._process_runs(None)

    async def _process_some(self) -> float | None:
        """A pass over the runs woken by name, those whose deadline is due and those waiting for room."""
        now = time.time()
        targets = self._dirty | self._waiting | {r for r, at in self._due.items() if at <= now}
        self._dirty = set()
        if targets:
            await self._process_runs(targets)
        return min(self._due.values(), default=None)

    async def _process_runs(self, only: set[str] | None) -> float | None:
        query = select(RunModel.id).where(RunModel.status.notin_(FINISHED_RUN)).order_by(RunModel.submitted_at)
        if only is not None:
            query = query.where(RunModel.id.in_(only))
        async with self.db.session() as session:
            run_ids = list((await session.execute(query)).scalars())
        for run_id in only or ():
            self._due.pop(run_id, None)  # finished or processed below (which sets it again)
            self._waiting.discard(run_id)
        if only is None:
            self._waiting.clear()
        deadline: float | None = None
        for run_id in run_ids:
            wake_at = await self._process_run_isolated(run_id)
            if wake_at is not None:
                self._due[run_id] = wake_at
            deadline = earliest(deadline, wake_at)
        return deadline

    async def _process_run_isolated(self, run_id: str) -> float | None:
        """One run's step; whatever it raises stays with that run, so one bad row (a spec the
        code cannot handle) never stops the pass for every other run and project."""
        try:
            return await self._process_run(run_id)
        except asyncio.CancelledError:
            raise
        except (StaleDataError, OperationalError) as e:
            # Contention (conflicts past their retries, a locked database): not the run's fault.
            logger.warning("processing run %s deferred: %s", run_id, e)
            return time.time() + 1.0
        except Exception as e:
            if run_id not in self._failed_runs:
                self._failed_runs.add(run_id)
                logger.exception("processing run %s failed; failing the run", run_id)
            try:
                await self._fail_run(run_id, e)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.debug("failing run %s failed", run_id, exc_info=True)
            return None

    async def _process_run(self, run_id: str) -> float | None:
        async with self.db.session() as session:
            result = await retry_on_conflict(session, lambda: self._run_pass(session, run_id))
        await self._do_agent_work(result.work)
        if result.waiting:
            self._waiting.add(run_id)
        if result.run_changed:
            self._notify_run_changed(run_id)
        return result.wake_at

    async def _fail_run(self, run_id: str, error: Exception) -> None:
        async def fail() -> PassResult:
            run = await _load_run(session, run_id)
            result = PassResult()
            if RunStatus(run.status).is_finished():
                return result
            self._apply_run(session, run, process_failed_run(run, error))
            self._terminating_jobs(run, result)
            if run.status == RunStatus.TERMINATING:
                self._apply_run(session, run, process_terminating_run(run))
            run.last_processed_at = utcnow()
            await session.commit()
            result.run_changed = True
            return result

        async with self.db.session() as session:
            result = await retry_on_conflict(session, fail)
        await self._do_agent_work(result.work)
        if result.run_changed:
            self._notify_run_changed(run_id)

    async def _run_pass(self, session: AsyncSession, run_id: str) -> PassResult:
        """Every step decides from the rows as read; the pass commits once. A concurrent change
        (a stop, an agent report) makes the commit fail and the pass run again on fresh rows."""
        run = await _load_run(session, run_id)
        now = utcnow()
        result = PassResult()
        old_status, old_error = run.status, run.error
        if run.status == RunStatus.PENDING:
            pending = process_pending_run(run, now)
            if pending.wake_at is not None:
                return PassResult(wake_at=pending.wake_at)
            self._apply_run(session, run, pending)
        for job in list(run.jobs):
            status = JobStatus(job.status)
            if status == JobStatus.SUBMITTED:
                ctx = await load_assign_context(session, run, job, self.instances.is_down)
                decision = process_submitted_job(ctx, now)
                self._apply_job(job, decision)
                await session.flush()  # the next job's context sees this one's reservation
                if decision.assign is not None:
                    result.work.provision.append(job.id)
                if decision.slurm is not None:
                    result.work.slurm.append(job.id)
            elif status in ON_AGENT:
                decision = process_running_job(job, now)
                self._apply_job(job, decision)
                if job.instance_id is not None:
                    result.work.watch.append((job.id, job.agent_state))
            else:
                continue
            result.wake_at = earliest(result.wake_at, decision.wake_at)
        if run.status == RunStatus.TERMINATING:
            run_decision = process_terminating_run(run)
        elif run.status != RunStatus.PENDING:
            run_decision = process_active_run(
                run,
                parse_configuration(RunSpec.model_validate_json(run.run_spec)).effective_retry(),
                now,
            )
        else:
            run_decision = RunDecision()
        self._apply_run(session, run, run_decision)
        result.wake_at = earliest(result.wake_at, run_decision.wake_at)
        self._terminating_jobs(run, result)
        if run.status == RunStatus.TERMINATING:
            self._apply_run(session, run, process_terminating_run(run))
        if run_decision.resubmit or run_decision.stop_jobs:
            result.wake_at = earliest(result.wake_at, time.time())  # new jobs to assign, stops to finish
        await session.commit()
        result.run_changed = run.status != old_status or run.error != old_error
        result.waiting = any(j.status == JobStatus.SUBMITTED for j in run.jobs)
        return result

    def _terminating_jobs(self, run: RunModel, result: PassResult) -> None:
        """Jobs being stopped: those that never reached an agent end now; the others' agents
        are told once the pass is committed."""
        for job in run.jobs:
            if job.status != JobStatus.TERMINATING:
                continue
            if job.id in result.work.provision:
                # Assigned in this very pass, stopped before any agent heard of it.
                result.work.provision.remove(job.id)
            if job.id in result.work.slurm:
                result.work.slurm.remove(job.id)
            decision = process_terminating_job(job, self.agents.is_provisioning(job.id))
            self._apply_job(job, decision)
            if decision.end is not None:  # nothing of it is on an agent: nothing to provision or watch
                result.work.watch = [w for w in result.work.watch if w[0] != job.id]
            if decision.send_stop and job.instance_id is not None:
                result.work.stop.append((job.id, job.instance_id, job.stop_requested == "abort"))

    # --- applying decisions ---------------------------------------------------------------

    @staticmethod
    def _apply_job(job: JobModel, decision: JobDecision) -> None:
        now = utcnow()
        if decision.end is not None:
            job.status = decision.end.status
            if decision.end.reason is not None:
                job.termination_reason = decision.end.reason
                job.termination_reason_message = decision.end.message
            job.finished_at = now
        if decision.stop is not None:
            mark_job_terminating(job, decision.stop.reason, message=decision.stop.message)
        if decision.assign is not None:
            a = decision.assign
            job.instance_id = a.instance.id
            job.reserved = json.dumps(a.reservation.to_dict())
            job.status = JobStatus.PROVISIONING
            job.last_processed_at = now
            job.job_provisioning_data = JobProvisioningData(
                backend=a.instance.backend,
                region=a.instance.region,
                instance_id=a.instance.id,
                instance_name=a.instance.name,
                hostname=a.instance.hostname,
                resources=a.resources,
                reserved=a.reservation.to_dict(),
                price=a.instance.price,
            ).model_dump_json()
        if decision.slurm is not None:
            # No instance yet: the Slurm job's state and reason show as its name until the agent answers.
            p = decision.slurm
            job.status = JobStatus.PROVISIONING
            job.last_processed_at = now
            job.job_provisioning_data = JobProvisioningData(
                backend="slurm",
                region=p.partition,
                instance_id=f"slurm:{p.index}",
                instance_name="Slurm job being submitted",
                hostname="",
                resources=p.resources,
                price=0.0,
            ).model_dump_json()

    @staticmethod
    def _apply_run(session: AsyncSession, run: RunModel, decision: RunDecision) -> None:
        jobs = {j.id: j for j in run.jobs}
        for stop in decision.stop_jobs:
            mark_job_terminating(jobs[stop.job_id], stop.reason, message=stop.message)
        if decision.resubmit:
            conf = parse_configuration(RunSpec.model_validate_json(run.run_spec))
            for r in decision.resubmit:
                for new in new_jobs(run, conf, r.replica_num, submission_num=r.submission_num):
                    if new.job_num == r.job_num:
                        session.add(new)
                        run.jobs.append(new)
                logger.info("submitting job %s of replica %s of %s again", r.job_num, r.replica_num, run.run_name)
        run.resubmission_attempt += decision.resubmission_attempts
        if decision.termination_reason is not None:
            run.termination_reason = decision.termination_reason
        if decision.error is not UNSET:
            run.error = decision.error
        if decision.next_attempt_at is not UNSET:
            run.next_attempt_at = decision.next_attempt_at
        if decision.status is not None and decision.status != run.status:
            run.status = decision.status
            run.last_processed_at = utcnow()

    # --- after the commit -----------------------------------------------------------------

    async def _do_agent_work(self, work: AgentWork) -> None:
        for job_id in work.slurm:
            if self.slurm_launch is not None:
                self.slurm_launch(job_id)
        for job_id in work.provision:
            self.agents.provision(job_id)
        for job_id, agent_state in work.watch:
            self.agents.ensure_on_agent(job_id, agent_state)
        for job_id, instance_id, abort in work.stop:
            await self.agents.send_stop(job_id, instance_id, abort)

    def _on_job_changed(self, run_id: str) -> None:
        """An agent's report or a failed provisioning changed a job: decide what follows."""
        self.wake(run_id)
        self._notify_run_changed(run_id)

    def _notify_run_changed(self, run_id: str) -> None:
        self.notifier.notify(run_id)
        for listener in self.run_listeners:
            try:
                listener(run_id)
            except Exception:
                logger.exception("a run listener failed for run %s", run_id)

    async def _on_agent_replaced(self, instance_id: str) -> None:
        """An instance's agent died and another answers now. Watchers switch to it by themselves
        (they fetch the instance's client on every retry) and learn what it knows: a job the new
        agent stopped at its start ends as lost (see `jobs_running.apply_agent_report`), one it
        does not know at all likewise (see `agent_tasks`); jobs never submitted are provisioned
        again. A pass now assigns what waited for the instance."""
        self.wake()


async def _load_run(session: AsyncSession, run_id: str) -> RunModel:
    return (await session.execute(select(RunModel).where(RunModel.id == run_id))).scalar_one()
