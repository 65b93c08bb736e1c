"""A job on its agent (`provisioning`, `pulling`, `running`): its deadline, and what an agent's
report changes (`apply_agent_report`, pure; `store_report` commits it with the new log lines)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.agent.models import FINAL_STATES
from dstack.core.exit_status import describe_engine_exit, describe_exit
from dstack.core.models.runs import JobProvisioningData, JobSpec, JobStatus, JobTerminationReason
from dstack.server.background.pipeline.common import AGENT_LOST, AGENT_RESTARTED_MESSAGE, MAX_DEADLINE_SECONDS, aware
from dstack.server.background.pipeline.decisions import JobDecision, StopJob
from dstack.server.models import JobLogModel, JobModel, utcnow

#: the job statuses whose job is (or is being put) on an agent
ON_AGENT = (JobStatus.PROVISIONING, JobStatus.PULLING, JobStatus.RUNNING)


def process_running_job(job: JobModel, now: datetime) -> JobDecision:
    """Stop a job that has run out of `max_duration`; else wake when it will have."""
    spec = JobSpec.model_validate_json(job.job_spec)
    started = aware(job.started_at)
    if not spec.max_duration or started is None:
        return JobDecision()
    deadline = started.timestamp() + min(spec.max_duration, MAX_DEADLINE_SECONDS)
    if now.timestamp() >= deadline:
        return JobDecision(stop=StopJob(job.id, JobTerminationReason.MAX_DURATION_EXCEEDED))
    return JobDecision(wake_at=deadline)


def apply_agent_report(job: JobModel, report: dict[str, Any], now: datetime) -> None:
    """The job's status, times and end reason after the agent reported `report["state"]`."""
    state = report["state"]
    if state == "preparing" and job.status == JobStatus.PROVISIONING:
        job.status = JobStatus.PULLING
    elif state == "running":
        if job.status in (JobStatus.PROVISIONING, JobStatus.PULLING):
            job.status = JobStatus.RUNNING
        if report.get("started_at"):
            job.started_at = datetime.fromtimestamp(report["started_at"], tz=UTC)
        else:
            job.started_at = job.started_at or now
    elif state in FINAL_STATES:
        job.exit_status = report.get("exit_status")
        job.finished_at = now
        if job.started_at is None and report.get("started_at"):
            job.started_at = datetime.fromtimestamp(report["started_at"], tz=UTC)
        if job.status == JobStatus.TERMINATING and job.termination_reason:
            # The server asked for the stop: its reason says how the job ended.
            job.status = JobTerminationReason(job.termination_reason).to_status()
            if job.stop_requested == "abort":
                job.status = JobStatus.ABORTED
        elif state == "done":
            job.status = JobStatus.DONE
            job.termination_reason = JobTerminationReason.DONE_BY_RUNNER
        elif state == "failed":
            job.status = JobStatus.FAILED
            _explain_failure(job, report)
        else:
            job.status = JobStatus.TERMINATED if state == "terminated" else JobStatus.ABORTED
            job.termination_reason = job.termination_reason or JobTerminationReason.TERMINATED_BY_SERVER
    job.last_processed_at = now


def _explain_failure(job: JobModel, report: dict[str, Any]) -> None:
    if job.exit_status is None and report.get("message") == AGENT_RESTARTED_MESSAGE:
        job.termination_reason = JobTerminationReason.INSTANCE_UNREACHABLE
        job.termination_reason_message = f"{AGENT_LOST}: the agent running the job died; a new agent was started and stopped what the job left running"
    elif job.exit_status is not None:
        job.termination_reason = JobTerminationReason.CONTAINER_EXITED_WITH_ERROR
        job.termination_reason_message = (
            describe_engine_exit(job.exit_status)
            if JobSpec.model_validate_json(job.job_spec).engine
            else report.get("message") or describe_exit(job.exit_status)
        )
    else:
        job.termination_reason = JobTerminationReason.EXECUTOR_ERROR
        job.termination_reason_message = report.get("message")


async def store_report(
    session: AsyncSession, job_id: str, report: dict[str, Any], records: list[dict[str, Any]], apply_state: bool
) -> None:
    """Store an agent report: new log records, and the job's new state once every record of a
    final state is stored. Commits; run it under `db.retry_on_conflict`."""
    job = (await session.execute(select(JobModel).where(JobModel.id == job_id))).scalar_one()
    _store_one(session, job, report, records, apply_state)
    await session.commit()


#: one job's part of a watch answer: (job id, report, its log records, whether to apply its state)
ReportItem = tuple[str, dict[str, Any], list[dict[str, Any]], bool]


async def store_reports(session: AsyncSession, items: list[ReportItem]) -> set[str]:
    """Store many jobs' reports (one watch answer) in one transaction; the ids of the jobs that no
    longer exist (left out). Commits; run it under `db.retry_on_conflict`."""
    ids = [item[0] for item in items]
    jobs = {j.id: j for j in (await session.execute(select(JobModel).where(JobModel.id.in_(ids)))).scalars()}
    for job_id, report, records, apply_state in items:
        job = jobs.get(job_id)
        if job is not None:
            _store_one(session, job, report, records, apply_state)
    await session.commit()
    return set(ids) - set(jobs)


def store_started(job: JobModel, answer: dict[str, Any]) -> None:
    """The agent's answer to a submit with start (`POST /api/jobs?start=true`): a job already
    `running` is stored as such (no watch round trip needed); a final state is left for the watch,
    which stores it with the job's last lines."""
    if answer.get("state") == "running":
        _store_one(None, job, answer, [], apply_state=True)
    else:
        job.agent_state = "preparing" if answer.get("state") in FINAL_STATES else str(answer.get("state", "submitted"))


def _store_one(
    session: AsyncSession | None,
    job: JobModel,
    report: dict[str, Any],
    records: list[dict[str, Any]],
    apply_state: bool,
) -> None:
    if records and session is not None:
        session.add_all(
            JobLogModel(job_id=job.id, timestamp=r["ts"], stream=r["stream"], data=base64.b64decode(r["data"]))
            for r in records
        )
        job.log_cursor = report["next_cursor"]
    if apply_state:
        apply_agent_report(job, report, utcnow())
        job.agent_state = report["state"]
        if report.get("address") and job.job_provisioning_data:
            jpd = JobProvisioningData.model_validate_json(job.job_provisioning_data)
            if jpd.address != report["address"]:
                jpd.address = report["address"]
                jpd.network = report.get("network", jpd.network)
                job.job_provisioning_data = jpd.model_dump_json()
