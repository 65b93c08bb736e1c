"""The event-driven pipeline that moves runs and jobs through their states.

A submit, an agent report or a deadline wakes it; every transition is committed before the
next step, so a server killed at any point resumes from the database. Each job on an agent
has a watcher that long-polls the agent and stores its logs and state in one transaction.
"""

import asyncio
import base64
import hashlib
import json
import logging
import os
import sys
import time
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm.exc import StaleDataError

from dstack.core.exit_status import describe_engine_exit, describe_exit, exit_error
from dstack.core.models.resources import ResourcesSpec
from dstack.core.models.runs import (
    JobProvisioningData,
    JobSpec,
    JobStatus,
    JobTerminationReason,
    RunSpec,
    RunStatus,
    RunTerminationReason,
)
from dstack.server.agent_client import AgentError
from dstack.server.db import Database, retry_on_conflict
from dstack.server.models import CodeModel, InstanceModel, JobLogModel, JobModel, RepoModel, RunModel, utcnow
from dstack.server.services import offers, secret_store
from dstack.server.services.instances import InstanceManager
from dstack.server.services.jobs import dstack_env, nodes_count
from dstack.server.services.logs import LogNotifier
from dstack.server.services.runs import (
    held_reservations,
    instance_resources,
    latest_jobs,
    list_instances,
    mark_job_terminating,
    new_jobs,
    parse_configuration,
)
from dstack.server.services.secrets import reveal_env, reveal_registry_auth

logger = logging.getLogger(__name__)

FINISHED_JOB = [s.value for s in JobStatus.finished_statuses()]
FINISHED_RUN = [s.value for s in RunStatus.finished_statuses()]
# A replica that fails within REPLICA_STABLE_SECONDS of starting has crashed rather than served.
# Crashes in a row back off (the k-th replacement waits min(2**(k-2), 30) s after the failure),
# and after MAX_REPLICA_FAILURES with no replica running the run fails with the last one's error:
# an engine whose kernels segfault on this CPU is not restarted forever.
MAX_REPLICA_FAILURES = 5
REPLICA_STABLE_SECONDS = 300.0
REPLICA_BACKOFF_MAX_SECONDS = 30.0
AGENT_UNREACHABLE_SECONDS = float(os.environ.get("DSTACK_SERVER_AGENT_UNREACHABLE_SECONDS", "60"))
# While a job keeps printing, the agent holds a pull's answer this long for more lines (a state
# change still answers at once): a chatty job (a serverless worker logging every request) then
# costs one transaction per interval, not one per line.
LOG_LINGER_SECONDS = 0.1
# A job being submitted when its agent died waits this long for the supervisor to bring one back.
AGENT_RECOVERY_WAIT_SECONDS = 30.0
# The reason's message of jobs an agent's death ended (termination reason `instance_unreachable`,
# retried under `retry` on `interruption`).
AGENT_LOST = "agent lost"
# What an agent that starts reports for the jobs its dead predecessor was running (it kills them).
AGENT_RESTARTED_MESSAGE = "agent restarted"
# Date arithmetic on user-given durations is capped here: `timedelta` and `datetime` overflow
# (OverflowError) near 10**9 days, far beyond any deadline that matters.
MAX_DEADLINE_SECONDS = 100 * 365 * 86400


def retry_delays() -> list[float]:
    raw = os.environ.get("DSTACK_SERVER_RETRY_DELAYS", "15,30,60,120,300,600")
    return [float(x) for x in raw.split(",") if x.strip()]


def capped_timedelta(seconds: float) -> timedelta:
    """`timedelta(seconds=...)` that never overflows: clamped to [0, MAX_DEADLINE_SECONDS]."""
    return timedelta(seconds=min(max(seconds, 0), MAX_DEADLINE_SECONDS))  # no float(): huge ints overflow it


def _aware(dt: datetime | None) -> datetime | None:
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt


class Pipeline:
    def __init__(self, db: Database, instances: InstanceManager, notifier: LogNotifier) -> None:
        self.db = db
        self.instances = instances
        self.notifier = notifier
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._watchers: dict[str, asyncio.Task] = {}
        self._provisioning: set[str] = set()
        self._stops_sent: set[str] = set()
        self._failed_runs: set[str] = set()  # runs whose processing raised (logged once each)
        self._stopping = False
        #: called with a run id whenever a run's jobs change (services re-register replicas)
        self.run_listeners: list = []
        instances.agent_listeners.append(self._on_agent_replaced)

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="pipeline")
        self.wake()

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in [self._task, *self._watchers.values()] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            timeout = 5.0
            try:
                deadline = await self.process()
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
        """One pass over active runs; returns the next time-based deadline (epoch seconds)."""
        deadlines: list[float] = []
        async with self.db.session() as session:
            runs = (
                (
                    await session.execute(
                        select(RunModel).where(RunModel.status.notin_(FINISHED_RUN)).order_by(RunModel.submitted_at)
                    )
                )
                .scalars()
                .all()
            )
            run_ids = [r.id for r in runs]
        for run_id in run_ids:
            d = await self._process_run_isolated(run_id)
            if d is not None:
                deadlines.append(d)
        return min(deadlines) if deadlines else None

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

    async def _fail_run(self, run_id: str, error: Exception) -> None:
        """Fail a run whose processing raised: SERVER_ERROR with the error, its jobs stopped
        through the usual terminating path. Reads only what that path needs, never the run's
        spec, so a spec the pipeline cannot parse still ends here."""
        message = f"server error while processing the run: {type(error).__name__}: {error}"[:1000]

        async def fail() -> str:
            run = (await session.execute(select(RunModel).where(RunModel.id == run_id))).scalar_one()
            if RunStatus(run.status).is_finished():
                return run.status
            if run.termination_reason != RunTerminationReason.SERVER_ERROR.value:
                run.termination_reason = RunTerminationReason.SERVER_ERROR.value
                run.error = message
            active = [j for j in run.jobs if not JobStatus(j.status).is_finished()]
            for job in active:
                if job.status != JobStatus.TERMINATING.value:
                    mark_job_terminating(job, JobTerminationReason.TERMINATED_BY_SERVER, message=message)
            run.status = RunStatus.TERMINATING.value if active else RunStatus.FAILED.value
            run.last_processed_at = utcnow()
            await session.commit()
            for job in active:
                await self._terminate(session, job)
            if run.status == RunStatus.TERMINATING.value and all(JobStatus(j.status).is_finished() for j in run.jobs):
                run.status = RunStatus.FAILED.value
                await session.commit()
            return run.status

        async with self.db.session() as session:
            await retry_on_conflict(session, fail)
        self._notify_run_changed(run_id)

    def _notify_run_changed(self, run_id: str) -> None:
        self.notifier.notify(run_id)
        for listener in self.run_listeners:
            try:
                listener(run_id)
            except Exception:
                logger.exception("a run listener failed for run %s", run_id)

    async def _process_run(self, run_id: str) -> float | None:
        async with self.db.session() as session:
            return await retry_on_conflict(session, lambda: self._process_run_once(session, run_id))

    async def _process_run_once(self, session, run_id: str) -> float | None:
        """Every step decides from the rows as read and commits; a concurrent change (a stop, an
        agent report) makes the commit fail and the whole pass run again on fresh rows."""
        run = (await session.execute(select(RunModel).where(RunModel.id == run_id))).scalar_one()
        deadline = None
        if run.status == RunStatus.PENDING.value:
            due = _aware(run.next_attempt_at)
            if due is not None and due > utcnow():
                return due.timestamp()
            self._resubmit(session, run)
            await session.commit()
        changed = False
        for job in list(run.jobs):
            status = JobStatus(job.status)
            if status == JobStatus.SUBMITTED:
                d = await self._try_assign(session, run, job)
                deadline = _min(deadline, d)
            elif status == JobStatus.TERMINATING:
                await self._terminate(session, job)
            elif status in (JobStatus.PROVISIONING, JobStatus.PULLING, JobStatus.RUNNING):
                d = self._check_max_duration(job)
                if d == 0:
                    mark_job_terminating(job, JobTerminationReason.MAX_DURATION_EXCEEDED)
                    changed = True
                else:
                    deadline = _min(deadline, d)
                self._ensure_running_on_agent(job)
        if changed:
            await session.commit()
        old_status, old_error = run.status, run.error
        d = await self._update_run_status(session, run)
        deadline = _min(deadline, d)
        await session.commit()
        if run.status != old_status or run.error != old_error:
            self._notify_run_changed(run.id)
        return deadline

    # --- assignment -----------------------------------------------------------------------

    async def _try_assign(self, session, run: RunModel, job: JobModel) -> float | None:
        spec = JobSpec.model_validate_json(job.job_spec)
        resources = ResourcesSpec.model_validate(spec.requirements)
        conf = parse_configuration(RunSpec.model_validate_json(run.run_spec))
        retry = conf.effective_retry()
        instances = await list_instances(session)
        if any(self.instances.is_down(i.id) for i in instances):
            # An agent is being brought back (seconds): wait for it rather than fail for lack of a host.
            instances = [i for i in instances if not self.instances.is_down(i.id)]
            recovering = True
        else:
            recovering = False
        fitting = [i for i in instances if offers.fits_total(resources, instance_resources(i))]
        port_conflicts: list[str] = []
        for inst in fitting:
            conflict = await _port_conflict(session, inst, spec)
            if conflict:
                port_conflicts.append(conflict)
                continue
            res = instance_resources(inst)
            reservation = offers.reserve(resources, res, await held_reservations(session, inst.id))
            if reservation is None:
                continue
            job.instance_id = inst.id
            job.reserved = json.dumps(reservation.to_dict())
            job.status = JobStatus.PROVISIONING.value
            job.last_processed_at = utcnow()
            job.job_provisioning_data = JobProvisioningData(
                backend=inst.backend,
                region=inst.region,
                instance_id=inst.id,
                instance_name=inst.name,
                hostname=inst.hostname,
                resources=res,
                reserved=reservation.to_dict(),
                price=inst.price,
            ).model_dump_json()
            await session.commit()
            self._spawn_provisioning(job.id)
            return None
        # Nothing free now.
        if recovering:
            return time.time() + 1.0
        # Replicas of services and workers of endpoints wait for a busy host; so do jobs whose
        # retry policy covers no-capacity. A request no host could ever meet fails at once.
        waits = (
            bool(fitting)
            and not (port_conflicts and len(port_conflicts) == len(fitting))
            and (
                (retry is not None and "no-capacity" in retry.on_events) or _run_type(run) in ("service", "serverless")
            )
        )
        if waits:
            if retry is not None and retry.duration is not None:
                give_up = _aware(run.submitted_at) + capped_timedelta(retry.duration)
                if utcnow() < give_up:
                    return give_up.timestamp()
            else:
                return None
        if port_conflicts and len(port_conflicts) == len(fitting):
            msg = "; ".join(port_conflicts)
        elif fitting:
            msg = f"all instances that fit {resources.pretty_format()} are busy with other jobs"
        else:
            msg = offers.describe_shortfall(resources, [(i.name, instance_resources(i)) for i in instances])
        job.status = JobStatus.FAILED.value
        job.termination_reason = JobTerminationReason.FAILED_TO_START_DUE_TO_NO_CAPACITY.value
        job.termination_reason_message = msg
        job.finished_at = utcnow()
        await session.commit()
        return None

    def _spawn_provisioning(self, job_id: str) -> None:
        if job_id in self._provisioning or job_id in self._watchers:
            return
        self._provisioning.add(job_id)
        asyncio.create_task(self._provision(job_id), name=f"provision-{job_id}")

    def _ensure_running_on_agent(self, job: JobModel) -> None:
        """After a restart: re-provision jobs that never reached the agent, watch the rest."""
        if job.instance_id is None:
            return
        if job.agent_state is None:
            self._spawn_provisioning(job.id)
        else:
            self._spawn_watcher(job.id)

    async def _provision(self, job_id: str) -> None:
        try:
            async with self.db.session() as session:
                job = (await session.execute(select(JobModel).where(JobModel.id == job_id))).scalar_one()
                run = (await session.execute(select(RunModel).where(RunModel.id == job.run_id))).scalar_one()
                spec = JobSpec.model_validate_json(job.job_spec)
                run_spec = RunSpec.model_validate_json(run.run_spec)
                conf = parse_configuration(run_spec)
                reservation = offers.Reservation.from_dict(json.loads(job.reserved or "{}"))
                inst = (
                    await session.execute(select(InstanceModel).where(InstanceModel.id == job.instance_id))
                ).scalar_one()
                code = await _code_blob(session, run.project_id, run_spec)
                env = reveal_env(spec.env)  # stored encrypted (services.secrets)
                env.update(dstack_env(run.run_name, run.id, spec, nodes_count(conf), reservation.gpus, inst.hostname))
                # The built-in engine ships with dstack: engine jobs run it with the agent's Python.
                env.setdefault("DSTACK_ENGINE_PYTHON", sys.executable)
                serverless = run_spec.configuration.get("type") == "serverless"
                submission = {
                    "job_id": job.id,
                    "run_name": run.run_name,
                    "project_id": run.project_id,  # the agent runs each project's jobs as its own user
                    "commands": spec.commands,
                    "setup": spec.setup,
                    "env": env,
                    "working_dir": spec.working_dir,
                    "python": spec.python,
                    "image": spec.image,
                    "registry_auth": reveal_registry_auth(run_spec.configuration) if spec.image else None,
                    "gpus": reservation.gpus,
                    "ports": spec.ports,
                    "stop_grace_seconds": spec.stop_grace_seconds,
                    # Replicas of a service share one fixed port: each gets its own network namespace.
                    "network": "isolated" if run_spec.configuration.get("type") == "service" or spec.ports else "host",
                    "venv_key": venv_key(run.project_id, spec),
                    # Serverless workers start from the venv's warm zygote (agent.prewarm),
                    # unless the configuration's env says DSTACK_PREWARM=0 ...
                    "prewarm": serverless and env.get("DSTACK_PREWARM") != "0",
                    # ... and run the runpod SDK's job loops event-driven (agent.workersite),
                    # unless it says DSTACK_RUNPOD_LOOP=0.
                    "worker_site": serverless and env.get("DSTACK_RUNPOD_LOOP") != "0",
                }
                from dstack.server.services.engines import engine_submission  # GPU hosts: TGI image or vLLM

                submission.update(engine_submission(conf, reservation.gpus, json.loads(inst.agent or "{}"), env))
                submission = await secret_store.resolve_submission(session, run.project_id, submission)
            client = self.instances.client(inst.id)
            try:
                result = await _submit_to_agent(client, submission, code)
            except httpx.TransportError as e:
                # The agent may have just died: once the supervisor has brought it back, submit
                # again (the new agent does not know the job); else fail as before.
                logger.warning("provisioning job %s: agent unreachable (%s); waiting for it", job_id, e)
                client = await self.instances.wait_recovered(inst.id, client, AGENT_RECOVERY_WAIT_SECONDS)
                if client is None:
                    raise
                result = await _submit_to_agent(client, submission, code)

            async def note_started() -> None:
                job = (await session.execute(select(JobModel).where(JobModel.id == job_id))).scalar_one()
                job.agent_state = result.get("state", "submitted")
                await session.commit()

            async with self.db.session() as session:
                await retry_on_conflict(session, note_started)
            self._spawn_watcher(job_id)
        except (AgentError, httpx.HTTPError) as e:
            logger.warning("provisioning job %s failed: %s", job_id, e)
            await self._finish_job(job_id, JobStatus.FAILED, JobTerminationReason.EXECUTOR_ERROR, str(e))
        except Exception as e:
            logger.exception("provisioning job %s failed", job_id)
            await self._finish_job(job_id, JobStatus.FAILED, JobTerminationReason.EXECUTOR_ERROR, str(e))
        finally:
            self._provisioning.discard(job_id)

    async def _on_agent_replaced(self, instance_id: str) -> None:
        """An instance's agent died and another answers now. Watchers switch to it by themselves
        (they fetch the instance's client on every retry) and learn what it knows: a job the new
        agent stopped at its start ends as lost (see `_apply_agent_state`), one it does not know
        at all likewise (see `_watch`); jobs never submitted are provisioned again. A pass now
        assigns what waited for the instance."""
        self.wake()

    # --- watching -------------------------------------------------------------------------

    def _spawn_watcher(self, job_id: str) -> None:
        task = self._watchers.get(job_id)
        if task is not None and not task.done():
            return
        self._watchers[job_id] = asyncio.create_task(self._watch(job_id), name=f"watch-{job_id}")

    async def _watch(self, job_id: str) -> None:
        try:
            async with self.db.session() as session:
                job = (await session.execute(select(JobModel).where(JobModel.id == job_id))).scalar_one()
                cursor, known, instance_id, run_id = job.log_cursor, job.agent_state, job.instance_id, job.run_id
            client = first_client = self.instances.client(instance_id)
            failing_since: float | None = None
            while not self._stopping:
                client = self.instances.client(instance_id)  # a replaced agent: its successor
                try:
                    resp = await client.pull(job_id, cursor, known, wait=20, linger=LOG_LINGER_SECONDS)
                    failing_since = None
                except (httpx.HTTPError, AgentError) as e:
                    now = time.time()
                    failing_since = failing_since or now
                    if now - failing_since > AGENT_UNREACHABLE_SECONDS or isinstance(e, AgentError):
                        msg = (
                            f"{AGENT_LOST}: the instance's agent died and its successor does not know the job"
                            if client is not first_client
                            else f"agent unreachable: {e}"
                        )
                        await self._finish_job(job_id, JobStatus.FAILED, JobTerminationReason.INSTANCE_UNREACHABLE, msg)
                        return
                    await asyncio.sleep(0.5)
                    continue
                state = resp["state"]
                final = state in ("done", "failed", "terminated", "aborted")
                records = resp.get("logs", [])
                state_changed = state != known
                async with self.db.session() as session:
                    await retry_on_conflict(
                        session,
                        lambda: _store_report(
                            session, job_id, resp, records, state_changed and not (final and records)
                        ),
                    )
                cursor = resp["next_cursor"] if records else cursor
                if records:
                    self.notifier.notify(run_id)
                if state_changed and not (final and records):
                    known = state
                    self.notifier.notify(run_id)
                    self.wake()
                    for listener in self.run_listeners:
                        listener(run_id)
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

    async def _finish_job(self, job_id: str, status: JobStatus, reason: JobTerminationReason, message: str) -> None:
        async def finish() -> str | None:
            job = (await session.execute(select(JobModel).where(JobModel.id == job_id))).scalar_one()
            if JobStatus(job.status).is_finished():
                return None
            if job.termination_reason and job.status == JobStatus.TERMINATING.value:
                job.status = JobTerminationReason(job.termination_reason).to_status().value
            else:
                job.termination_reason = reason.value
                job.termination_reason_message = message
                job.status = status.value
            job.finished_at = utcnow()
            await session.commit()
            return job.run_id

        async with self.db.session() as session:
            run_id = await retry_on_conflict(session, finish)
        if run_id is not None:
            self.notifier.notify(run_id)
        self.wake()

    # --- stopping -------------------------------------------------------------------------

    async def _terminate(self, session, job: JobModel) -> None:
        if job.id in self._provisioning:
            # The agent may not know the job yet: a stop now would be lost and the job would then
            # start. The next pass, once provisioning has finished, sends it.
            return
        if job.instance_id is None or job.agent_state is None:
            # Never reached an agent: nothing runs, the job ends here.
            job.status = JobTerminationReason(job.termination_reason or "terminated_by_server").to_status().value
            job.finished_at = utcnow()
            await session.commit()
            return
        if job.id in self._stops_sent:
            return
        self._stops_sent.add(job.id)
        try:
            await self.instances.client(job.instance_id).stop(job.id, abort=job.stop_requested == "abort")
        except (AgentError, httpx.HTTPError) as e:
            logger.warning("stopping job %s failed: %s", job.id, e)
            self._stops_sent.discard(job.id)
        self._spawn_watcher(job.id)

    def _check_max_duration(self, job: JobModel) -> float | None:
        """0 when the job has run out of time, else the deadline (or None)."""
        spec = JobSpec.model_validate_json(job.job_spec)
        if not spec.max_duration or job.started_at is None:
            return None
        deadline = _aware(job.started_at).timestamp() + min(spec.max_duration, MAX_DEADLINE_SECONDS)
        return 0 if time.time() >= deadline else deadline

    # --- runs -----------------------------------------------------------------------------

    def _resubmit(self, session, run: RunModel) -> None:
        conf = parse_configuration(RunSpec.model_validate_json(run.run_spec))
        latest = latest_jobs(run)
        for (replica_num, _), job in sorted(latest.items()):
            if job.status != JobStatus.DONE.value:
                for new in new_jobs(run, conf, replica_num, submission_num=job.submission_num + 1):
                    if new.job_num == job.job_num:
                        session.add(new)
                        run.jobs.append(new)
        run.status = RunStatus.SUBMITTED.value
        run.next_attempt_at = None
        run.last_processed_at = utcnow()

    async def _update_run_status(self, session, run: RunModel) -> float | None:
        latest = list(latest_jobs(run).values())
        statuses = [JobStatus(j.status) for j in latest]
        old = run.status
        replica_deadline = None
        if run.status == RunStatus.TERMINATING.value:
            if all(s.is_finished() for s in statuses):
                reason = RunTerminationReason(run.termination_reason or RunTerminationReason.STOPPED_BY_USER.value)
                run.status = reason.to_status().value
        elif run.status == RunStatus.PENDING.value:
            return None
        elif _run_type(run) in ("service", "serverless"):
            replica_deadline = self._update_replicated_run(session, run, latest)
        else:
            failed = [
                j
                for j in latest
                if j.status in (JobStatus.FAILED.value, JobStatus.ABORTED.value)
                or (
                    j.status == JobStatus.TERMINATED.value
                    and j.termination_reason != JobTerminationReason.SCALED_DOWN.value
                )
            ]
            if failed:
                job = failed[0]
                if self._should_retry(run, job):
                    active = [j for j in latest if not JobStatus(j.status).is_finished()]
                    for j in active:
                        mark_job_terminating(j, JobTerminationReason.TERMINATED_BY_SERVER)
                    if not active:
                        delays = retry_delays()
                        delay = delays[min(run.resubmission_attempt, len(delays) - 1)]
                        run.resubmission_attempt += 1
                        run.status = RunStatus.PENDING.value
                        run.next_attempt_at = utcnow() + capped_timedelta(delay)
                else:
                    reason = JobTerminationReason(job.termination_reason) if job.termination_reason else None
                    if reason == JobTerminationReason.MAX_DURATION_EXCEEDED:
                        run.termination_reason = RunTerminationReason.MAX_DURATION_EXCEEDED.value
                    else:
                        run.termination_reason = RunTerminationReason.JOB_FAILED.value
                    run.error = _job_error(job)
                    active = [j for j in latest if not JobStatus(j.status).is_finished()]
                    for j in active:
                        mark_job_terminating(j, JobTerminationReason.TERMINATED_BY_SERVER)
                    run.status = (
                        RunStatus.TERMINATING.value
                        if active
                        else RunTerminationReason(run.termination_reason).to_status().value
                    )
            elif latest and all(s == JobStatus.DONE for s in statuses):
                run.status = RunStatus.DONE.value
                run.termination_reason = RunTerminationReason.ALL_JOBS_DONE.value
            elif any(s == JobStatus.RUNNING for s in statuses):
                run.status = RunStatus.RUNNING.value
            elif any(s in (JobStatus.PROVISIONING, JobStatus.PULLING) for s in statuses):
                run.status = RunStatus.PROVISIONING.value
            elif any(s == JobStatus.TERMINATING for s in statuses):
                pass
            else:
                run.status = RunStatus.SUBMITTED.value
        if run.status != old:
            run.last_processed_at = utcnow()
        if run.status == RunStatus.PENDING.value and run.next_attempt_at is not None:
            return _aware(run.next_attempt_at).timestamp()
        return replica_deadline

    def _update_replicated_run(self, session, run: RunModel, latest: list[JobModel]) -> float | None:
        """Services (and serverless workers) keep running while replicas come and go.

        A replica that fails is replaced; after several failures in a row with none running,
        the run fails with the last replica's error.
        """
        conf = parse_configuration(RunSpec.model_validate_json(run.run_spec))
        failed = [
            j
            for j in latest
            if j.status in (JobStatus.FAILED.value, JobStatus.ABORTED.value)
            or (
                j.status == JobStatus.TERMINATED.value
                and j.termination_reason
                not in (JobTerminationReason.SCALED_DOWN.value, JobTerminationReason.TERMINATED_BY_USER.value)
            )
        ]
        running = [j for j in latest if j.status == JobStatus.RUNNING.value]
        deadline = None
        if failed and _run_type(run) == "service":
            streaks = {j.id: _crash_streak(run, j) for j in failed}
            worst = max(failed, key=lambda j: streaks[j.id])
            if streaks[worst.id] >= MAX_REPLICA_FAILURES and not running:
                run.termination_reason = RunTerminationReason.JOB_FAILED.value
                run.error = (
                    f"replica {worst.replica_num} failed {streaks[worst.id]} times in a row: {_job_error(worst)}"
                )
                active = [j for j in latest if not JobStatus(j.status).is_finished()]
                for j in active:
                    mark_job_terminating(j, JobTerminationReason.TERMINATED_BY_SERVER)
                run.status = RunStatus.TERMINATING.value if active else RunStatus.FAILED.value
                return None
            now = utcnow()
            for job in failed:
                if job.replica_num >= run.desired_replica_count:
                    continue
                streak = streaks[job.id]
                delay = 0.0 if streak <= 1 else min(2.0 ** (streak - 2), REPLICA_BACKOFF_MAX_SECONDS)
                due = (_aware(job.finished_at) or now) + timedelta(seconds=delay)
                run.error = (
                    f"replica {job.replica_num} failed ({_job_error(job)}); "
                    f"replacing it{f' in {delay:g} s' if due > now else ''}"
                    + (f", failure {streak} of {MAX_REPLICA_FAILURES} in a row" if streak else "")
                )
                if due > now:
                    deadline = _min(deadline, due.timestamp())
                    continue
                for new in new_jobs(run, conf, job.replica_num, submission_num=job.submission_num + 1):
                    if new.job_num == job.job_num:
                        session.add(new)
                        run.jobs.append(new)
                run.resubmission_attempt += 1
                logger.info("replacing failed replica %s of %s (%s)", job.replica_num, run.run_name, _job_error(job))
        elif run.error and any(
            _aware(j.started_at) and (utcnow() - _aware(j.started_at)).total_seconds() >= REPLICA_STABLE_SECONDS
            for j in running
        ):
            run.error = None  # the crash loop is over: a replica has been serving for a while
        statuses = [JobStatus(j.status) for j in latest_jobs(run).values()]
        if any(s == JobStatus.RUNNING for s in statuses):
            run.status = RunStatus.RUNNING.value
        elif any(s in (JobStatus.PROVISIONING, JobStatus.PULLING) for s in statuses):
            run.status = RunStatus.PROVISIONING.value
        elif run.desired_replica_count == 0:
            run.status = RunStatus.RUNNING.value  # scaled to zero; a request wakes it
        elif run.status != RunStatus.SUBMITTED.value:
            run.status = RunStatus.PROVISIONING.value  # replicas being replaced or waiting for capacity
        return deadline

    def _should_retry(self, run: RunModel, job: JobModel) -> bool:
        conf = parse_configuration(RunSpec.model_validate_json(run.run_spec))
        retry = conf.effective_retry()
        if retry is None or job.termination_reason is None:
            return False
        reason = JobTerminationReason(job.termination_reason)
        if reason == JobTerminationReason.FAILED_TO_START_DUE_TO_NO_CAPACITY:
            event = "no-capacity"
        elif reason == JobTerminationReason.INSTANCE_UNREACHABLE:
            event = "interruption"
        elif reason.is_retryable_error():
            event = "error"
        else:
            return False
        if event not in retry.on_events:
            return False
        if retry.duration is not None and utcnow() - _aware(run.submitted_at) > capped_timedelta(retry.duration):
            return False
        return True


def venv_key(project_id: str, spec: JobSpec) -> str | None:
    """Jobs of one project with the same python + setup share one prepared venv on the agent
    (kept across runs), so their `pip install`s are paid once. Scoped per project, so one
    project's setup never changes what another's jobs import. No setup: a fresh venv per job."""
    if not spec.setup:
        return None
    return hashlib.sha256(json.dumps([project_id, spec.python, spec.setup]).encode()).hexdigest()[:16]


async def _port_conflict(session, inst: InstanceModel, spec: JobSpec) -> str | None:
    """Why the job can't share this instance's network, or None. Only hosts whose agent cannot
    give jobs their own network namespace (not root, not Linux) have this limit."""
    if not spec.ports or json.loads(inst.agent or "{}").get("network_isolation"):
        return None
    rows = await session.execute(
        select(JobModel.job_spec, JobModel.job_name).where(
            JobModel.instance_id == inst.id, JobModel.status.notin_(FINISHED_JOB)
        )
    )
    for other_spec, other_name in rows:
        taken = set(JobSpec.model_validate_json(other_spec).ports) & set(spec.ports)
        if taken:
            return (
                f"port {sorted(taken)[0]} on {inst.name} is already used by job {other_name}, and this host's "
                "agent cannot give jobs their own network namespaces (that needs root on Linux with iproute2)"
            )
    return None


def _run_type(run: RunModel) -> str:
    return json.loads(run.run_spec)["configuration"].get("type", "task")


def _crash_streak(run: RunModel, job: JobModel) -> int:
    """How many submissions of `job`'s replica in a row, ending with `job`, failed without
    having run for REPLICA_STABLE_SECONDS (a replica that served a while and then failed is no crash loop)."""
    history = sorted(
        (j for j in run.jobs if j.replica_num == job.replica_num and j.job_num == job.job_num),
        key=lambda j: j.submission_num,
        reverse=True,
    )
    streak = 0
    for j in history:
        if j.status not in (JobStatus.FAILED.value, JobStatus.ABORTED.value, JobStatus.TERMINATED.value):
            break
        started, finished = _aware(j.started_at), _aware(j.finished_at)
        if started and finished and (finished - started).total_seconds() >= REPLICA_STABLE_SECONDS:
            break
        if j.status == JobStatus.TERMINATED.value and j.termination_reason in (
            JobTerminationReason.SCALED_DOWN.value,
            JobTerminationReason.TERMINATED_BY_USER.value,
        ):
            break
        streak += 1
    return streak


def _job_error(job: JobModel) -> str:
    if job.exit_status is not None:
        return exit_error(job.exit_status, job.termination_reason_message)
    return job.termination_reason_message or job.termination_reason or "failed"


async def _store_report(session, job_id: str, resp: dict, records: list[dict], apply_state: bool) -> None:
    """Store an agent report: new log records, and the job's new state once every record of a
    final state is stored."""
    job = (await session.execute(select(JobModel).where(JobModel.id == job_id))).scalar_one()
    if records:
        session.add_all(
            JobLogModel(job_id=job_id, timestamp=r["ts"], stream=r["stream"], data=base64.b64decode(r["data"]))
            for r in records
        )
        job.log_cursor = resp["next_cursor"]
    if apply_state:
        _apply_agent_state(job, resp)
        job.agent_state = resp["state"]
        if resp.get("address") and job.job_provisioning_data:
            jpd = JobProvisioningData.model_validate_json(job.job_provisioning_data)
            if jpd.address != resp["address"]:
                jpd.address = resp["address"]
                jpd.network = resp.get("network", jpd.network)
                job.job_provisioning_data = jpd.model_dump_json()
    await session.commit()


def _apply_agent_state(job: JobModel, resp: dict) -> None:
    state = resp["state"]
    now = utcnow()
    if state == "preparing" and job.status == JobStatus.PROVISIONING.value:
        job.status = JobStatus.PULLING.value
    elif state == "running":
        if job.status in (JobStatus.PROVISIONING.value, JobStatus.PULLING.value):
            job.status = JobStatus.RUNNING.value
        if resp.get("started_at"):
            job.started_at = datetime.fromtimestamp(resp["started_at"], tz=UTC)
        else:
            job.started_at = job.started_at or now
    elif state in ("done", "failed", "terminated", "aborted"):
        job.exit_status = resp.get("exit_status")
        job.finished_at = now
        if job.started_at is None and resp.get("started_at"):
            job.started_at = datetime.fromtimestamp(resp["started_at"], tz=UTC)
        if job.status == JobStatus.TERMINATING.value and job.termination_reason:
            job.status = JobTerminationReason(job.termination_reason).to_status().value
            if job.stop_requested == "abort":
                job.status = JobStatus.ABORTED.value
        elif state == "done":
            job.status = JobStatus.DONE.value
            job.termination_reason = JobTerminationReason.DONE_BY_RUNNER.value
        elif state == "failed":
            job.status = JobStatus.FAILED.value
            if job.exit_status is None and resp.get("message") == AGENT_RESTARTED_MESSAGE:
                job.termination_reason = JobTerminationReason.INSTANCE_UNREACHABLE.value
                job.termination_reason_message = (
                    f"{AGENT_LOST}: the agent running the job died; a new agent "
                    "was started and stopped what the job left running"
                )
            elif job.exit_status is not None:
                job.termination_reason = JobTerminationReason.CONTAINER_EXITED_WITH_ERROR.value
                job.termination_reason_message = (
                    describe_engine_exit(job.exit_status)
                    if JobSpec.model_validate_json(job.job_spec).engine
                    else resp.get("message") or describe_exit(job.exit_status)
                )
            else:
                job.termination_reason = JobTerminationReason.EXECUTOR_ERROR.value
                job.termination_reason_message = resp.get("message")
        else:
            job.status = JobStatus.TERMINATED.value if state == "terminated" else JobStatus.ABORTED.value
            job.termination_reason = job.termination_reason or JobTerminationReason.TERMINATED_BY_SERVER.value
    job.last_processed_at = now


async def _submit_to_agent(client, submission: dict, code: bytes) -> dict:
    await client.submit(submission)
    await client.upload_code(submission["job_id"], code)
    return await client.start(submission["job_id"])


async def _code_blob(session, project_id: str, run_spec: RunSpec) -> bytes:
    if not run_spec.repo_code_hash or not run_spec.repo_id:
        return b""
    result = await session.execute(
        select(CodeModel.blob)
        .join(RepoModel, RepoModel.id == CodeModel.repo_id)
        .where(
            RepoModel.project_id == project_id,
            RepoModel.name == run_spec.repo_id,
            CodeModel.blob_hash == run_spec.repo_code_hash,
        )
    )
    blob = result.scalar_one_or_none()
    if blob is None:
        raise AgentError(f"code {run_spec.repo_code_hash} of repo {run_spec.repo_id} was not uploaded")
    return blob


async def _forget_on_agent(client, job_id: str) -> None:
    try:
        await client.delete(job_id)
    except httpx.HTTPError:
        pass


def _min(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
