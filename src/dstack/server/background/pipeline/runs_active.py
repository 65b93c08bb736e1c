"""An active run (`submitted`, `provisioning`, `running`): its status from its jobs, and what a
failed job leads to: a retry, the run's failure, or (for services) the replica's replacement,
with a back-off when replicas crash in a row."""

from __future__ import annotations

from datetime import datetime, timedelta

from dstack.core.models.configurations import Retry
from dstack.core.models.runs import JobStatus, JobTerminationReason, RunStatus, RunTerminationReason, RunType
from dstack.server.background.pipeline.common import (
    MAX_REPLICA_FAILURES,
    REPLICA_BACKOFF_MAX_SECONDS,
    REPLICA_STABLE_SECONDS,
    REPLICATED_RUN_TYPES,
    aware,
    capped_timedelta,
    earliest,
    is_failed,
    job_error,
    retry_delays,
)
from dstack.server.background.pipeline.decisions import Resubmit, RunDecision, end_run, stop_remaining
from dstack.server.models import JobModel, RunModel
from dstack.server.services.runs import latest_jobs


def status_from_jobs(
    statuses: list[JobStatus], current: RunStatus, replicated: bool, desired_replicas: int
) -> RunStatus:
    """An active run's status from its latest jobs' (none failed, not all done).

    A job running makes the run running, one on its way makes it provisioning. Otherwise a
    task's run waits for jobs being stopped and is back to submitted when all wait for a host;
    a replicated run scaled to zero is running (a request wakes it), and one whose replicas are
    being replaced or wait for capacity is provisioning once it has started.
    """
    if JobStatus.RUNNING in statuses:
        return RunStatus.RUNNING
    if JobStatus.PROVISIONING in statuses or JobStatus.PULLING in statuses:
        return RunStatus.PROVISIONING
    if replicated:
        if desired_replicas == 0:
            return RunStatus.RUNNING
        return current if current == RunStatus.SUBMITTED else RunStatus.PROVISIONING
    if JobStatus.TERMINATING in statuses:
        return current
    return RunStatus.SUBMITTED


def should_retry(retry: Retry | None, job: JobModel, run_submitted_at: datetime, now: datetime) -> bool:
    """Whether the run's retry policy covers how `job` ended, and its time is not up."""
    if retry is None or job.termination_reason is None:
        return False
    event = JobTerminationReason(job.termination_reason).retry_event()
    if event is None or event not in retry.on_events:
        return False
    submitted = aware(run_submitted_at) or now
    return retry.duration is None or now - submitted <= capped_timedelta(retry.duration)


def process_active_run(run: RunModel, retry: Retry | None, now: datetime) -> RunDecision:
    latest = list(latest_jobs(run).values())
    if run.run_type in REPLICATED_RUN_TYPES:
        return _process_replicated_run(run, latest, now)
    current = RunStatus(run.status)
    failed = [j for j in latest if is_failed(j, replicated=False)]
    if failed:
        job = failed[0]
        if should_retry(retry, job, run.submitted_at, now):
            stops = stop_remaining(latest)
            if any(not JobStatus(j.status).is_finished() for j in latest):
                return RunDecision(stop_jobs=stops)  # retried once every job has stopped
            delays = retry_delays()
            due = now + capped_timedelta(delays[min(run.resubmission_attempt, len(delays) - 1)])
            return RunDecision(
                status=RunStatus.PENDING, next_attempt_at=due, resubmission_attempts=1, wake_at=due.timestamp()
            )
        reason = (
            RunTerminationReason.MAX_DURATION_EXCEEDED
            if job.termination_reason == JobTerminationReason.MAX_DURATION_EXCEEDED
            else RunTerminationReason.JOB_FAILED
        )
        return end_run(latest, reason, job_error(job))
    statuses = [JobStatus(j.status) for j in latest]
    if latest and all(s == JobStatus.DONE for s in statuses):
        return RunDecision(status=RunStatus.DONE, termination_reason=RunTerminationReason.ALL_JOBS_DONE)
    return RunDecision(status=status_from_jobs(statuses, current, False, run.desired_replica_count))


def _process_replicated_run(run: RunModel, latest: list[JobModel], now: datetime) -> RunDecision:
    """Services (and serverless workers) keep running while replicas come and go.

    A failed replica of a service is replaced; after several failures in a row with none
    running, the run fails with the last replica's error. (Serverless workers are replaced by
    the endpoint's scaler, not here.)
    """
    decision = RunDecision()
    failed = [j for j in latest if is_failed(j, replicated=True)]
    running = [j for j in latest if j.status == JobStatus.RUNNING]
    if failed and run.run_type == RunType.SERVICE:
        streaks = {j.id: crash_streak(run, j) for j in failed}
        worst = max(failed, key=lambda j: streaks[j.id])
        if streaks[worst.id] >= MAX_REPLICA_FAILURES and not running:
            error = f"replica {worst.replica_num} failed {streaks[worst.id]} times in a row: {job_error(worst)}"
            return end_run(latest, RunTerminationReason.JOB_FAILED, error)
        for job in failed:
            if job.replica_num >= run.desired_replica_count:
                continue
            streak = streaks[job.id]
            delay = 0.0 if streak <= 1 else min(2.0 ** (streak - 2), REPLICA_BACKOFF_MAX_SECONDS)
            due = (aware(job.finished_at) or now) + timedelta(seconds=delay)
            decision.error = (
                f"replica {job.replica_num} failed ({job_error(job)}); "
                f"replacing it{f' in {delay:g} s' if due > now else ''}"
                + (f", failure {streak} of {MAX_REPLICA_FAILURES} in a row" if streak else "")
            )
            if due > now:
                decision.wake_at = earliest(decision.wake_at, due.timestamp())
                continue
            decision.resubmit.append(Resubmit(job.replica_num, job.job_num, job.submission_num + 1))
            decision.resubmission_attempts += 1
    elif run.error and any(_served_for(j, now) >= REPLICA_STABLE_SECONDS for j in running):
        decision.error = None  # the crash loop is over: a replica has been serving for a while
    statuses = [JobStatus(j.status) for j in latest]
    decision.status = status_from_jobs(statuses, RunStatus(run.status), True, run.desired_replica_count)
    return decision


def _served_for(job: JobModel, now: datetime) -> float:
    started = aware(job.started_at)
    return (now - started).total_seconds() if started else 0.0


def crash_streak(run: RunModel, job: JobModel) -> int:
    """How many submissions of `job`'s replica in a row, ending with `job`, failed without
    having run for REPLICA_STABLE_SECONDS (a replica that served a while and then failed is no
    crash loop; one stopped on purpose is none either)."""
    history = sorted(
        (j for j in run.jobs if j.replica_num == job.replica_num and j.job_num == job.job_num),
        key=lambda j: j.submission_num,
        reverse=True,
    )
    streak = 0
    for j in history:
        if not is_failed(j, replicated=True):
            break
        started, finished = aware(j.started_at), aware(j.finished_at)
        if started and finished and (finished - started).total_seconds() >= REPLICA_STABLE_SECONDS:
            break
        streak += 1
    return streak
