"""Constants and small helpers every state of the pipeline shares."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

from dstack.core.exit_status import exit_error
from dstack.core.models.runs import JobStatus, JobTerminationReason, RunStatus, RunType
from dstack.server.models import JobModel

FINISHED_JOB = [s.value for s in JobStatus.finished_statuses()]
FINISHED_RUN = [s.value for s in RunStatus.finished_statuses()]
# A replica that fails within REPLICA_STABLE_SECONDS of starting has crashed rather than served.
# Crashes in a row back off (the k-th replacement waits min(2**(k-2), 30) s after the failure),
# and after MAX_REPLICA_FAILURES with no replica running the run fails with the last one's error:
# an engine whose kernels segfault on this CPU is not restarted forever.
MAX_REPLICA_FAILURES = 5
REPLICA_STABLE_SECONDS = 300.0
REPLICA_BACKOFF_MAX_SECONDS = 30.0
# While a job keeps printing, the agent holds a pull's answer this long for more lines (a state
# change still answers at once): a chatty job (a serverless worker logging every request) then
# costs one transaction per interval, not one per line.
LOG_LINGER_SECONDS = 0.1
# A job being submitted when its agent died waits this long for the supervisor to bring one back.
AGENT_RECOVERY_WAIT_SECONDS = 30.0
# The reason's message of jobs an agent's death ended (termination reason `instance_unreachable`,
# retried under `retry` on `interruption`).
AGENT_LOST = "agent lost"


def lost_job_message(replaced: bool, otherwise: str) -> str:
    """Why a job its agent no longer answers for ended: its agent was replaced by one that does not
    know it (``replaced``), else ``otherwise``."""
    if replaced:
        return f"{AGENT_LOST}: the instance's agent died and its successor does not know the job"
    return otherwise


# What an agent that starts reports for the jobs its dead predecessor was running (it kills them).
AGENT_RESTARTED_MESSAGE = "agent restarted"
# Date arithmetic on user-given durations is capped here: `timedelta` and `datetime` overflow
# (OverflowError) near 10**9 days, far beyond any deadline that matters.
MAX_DEADLINE_SECONDS = 100 * 365 * 86400
# Runs of these types keep running while their replicas come and go (see `runs_active`).
REPLICATED_RUN_TYPES = (RunType.SERVICE, RunType.SERVERLESS)


def retry_delays() -> list[float]:
    raw = os.environ.get("DSTACK_SERVER_RETRY_DELAYS", "15,30,60,120,300,600")
    return [float(x) for x in raw.split(",") if x.strip()]


def capped_timedelta(seconds: float) -> timedelta:
    """`timedelta(seconds=...)` that never overflows: clamped to [0, MAX_DEADLINE_SECONDS]."""
    return timedelta(seconds=min(max(seconds, 0), MAX_DEADLINE_SECONDS))  # no float(): huge ints overflow it


def aware(dt: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; they are stored in UTC."""
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt


def earliest(a: float | None, b: float | None) -> float | None:
    """The earlier of two optional wake-up times (epoch seconds)."""
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def is_finished(job: JobModel) -> bool:
    return JobStatus(job.status).is_finished()


def is_failed(job: JobModel, replicated: bool) -> bool:
    """Whether a job ended in a way that fails its run (a task) or needs replacing (a replica).

    The one predicate for both, and the one place they differ: a job the user stopped fails a
    task's run (the task cannot complete without it), while a replica the user stopped was
    meant to go and is neither replaced nor counted as a crash. A scaled-down job is never a
    failure.
    """
    if job.status in (JobStatus.FAILED, JobStatus.ABORTED):
        return True
    if job.status != JobStatus.TERMINATED:
        return False
    on_purpose = {JobTerminationReason.SCALED_DOWN}
    if replicated:
        on_purpose.add(JobTerminationReason.TERMINATED_BY_USER)
    return job.termination_reason not in on_purpose


def job_error(job: JobModel) -> str:
    """What a failed job's run reports as its error."""
    if job.exit_status is not None:
        return exit_error(job.exit_status, job.termination_reason_message)
    return job.termination_reason_message or job.termination_reason or "failed"
