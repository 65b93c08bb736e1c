"""Active runs: status from jobs, retries, failures, and services' replica replacement."""

import pytest

from dstack.core.models.configurations import Retry
from dstack.core.models.runs import JobStatus, JobTerminationReason, RunStatus, RunTerminationReason
from dstack.server.background.pipeline.common import MAX_REPLICA_FAILURES, REPLICA_STABLE_SECONDS, is_failed
from dstack.server.background.pipeline.decisions import UNSET, Resubmit, StopJob
from dstack.server.background.pipeline.runs_active import (
    crash_streak,
    process_active_run,
    should_retry,
    status_from_jobs,
)
from tests.server.pipeline.factories import NOW, add_job, ago, make_run

S = JobStatus
SERVICE = {"type": "service", "commands": ["serve"], "port": 8000}


@pytest.mark.parametrize(
    "statuses, current, replicated, desired, expected",
    [
        ([S.RUNNING, S.SUBMITTED], RunStatus.SUBMITTED, False, 1, RunStatus.RUNNING),
        ([S.PULLING, S.SUBMITTED], RunStatus.SUBMITTED, False, 1, RunStatus.PROVISIONING),
        ([S.TERMINATING, S.SUBMITTED], RunStatus.RUNNING, False, 1, RunStatus.RUNNING),
        ([S.SUBMITTED], RunStatus.PROVISIONING, False, 1, RunStatus.SUBMITTED),
        ([], RunStatus.SUBMITTED, True, 0, RunStatus.RUNNING),
        ([S.SUBMITTED], RunStatus.SUBMITTED, True, 1, RunStatus.SUBMITTED),
        ([S.SUBMITTED], RunStatus.RUNNING, True, 1, RunStatus.PROVISIONING),
        ([S.RUNNING, S.FAILED], RunStatus.PROVISIONING, True, 2, RunStatus.RUNNING),
    ],
)
def test_status_from_jobs(statuses, current, replicated, desired, expected):
    assert status_from_jobs(statuses, current, replicated, desired) == expected


def test_a_task_whose_jobs_all_finished_is_done():
    run = make_run({"nodes": 2}, status=RunStatus.RUNNING)
    add_job(run, S.DONE, job_num=0)
    add_job(run, S.DONE, job_num=1)
    decision = process_active_run(run, None, NOW)
    assert decision.status == RunStatus.DONE
    assert decision.termination_reason == RunTerminationReason.ALL_JOBS_DONE


def test_a_failed_job_fails_the_task_and_stops_the_others():
    run = make_run({"nodes": 3}, status=RunStatus.RUNNING)
    failed = add_job(run, S.FAILED, job_num=0, exit_status=3, termination_reason="container_exited_with_error")
    running = add_job(run, S.RUNNING, job_num=1)
    add_job(run, S.TERMINATING, job_num=2, termination_reason="max_duration_exceeded")
    decision = process_active_run(run, None, NOW)
    assert decision.status == RunStatus.TERMINATING
    assert decision.termination_reason == RunTerminationReason.JOB_FAILED
    assert isinstance(decision.error, str) and "3" in decision.error
    # a stop already under way keeps its own reason
    assert decision.stop_jobs == [StopJob(running.id, JobTerminationReason.TERMINATED_BY_SERVER)]
    assert failed.id not in [s.job_id for s in decision.stop_jobs]


def test_a_job_out_of_time_terminates_the_run_for_that_reason():
    run = make_run(status=RunStatus.RUNNING)
    add_job(run, S.TERMINATED, termination_reason=JobTerminationReason.MAX_DURATION_EXCEEDED.value)
    decision = process_active_run(run, None, NOW)
    assert decision.termination_reason == RunTerminationReason.MAX_DURATION_EXCEEDED
    assert decision.status == RunStatus.TERMINATED  # no job left to stop


def test_a_retried_run_waits_for_its_jobs_to_stop_then_goes_pending(monkeypatch):
    monkeypatch.setenv("DSTACK_SERVER_RETRY_DELAYS", "7,11")
    retry = Retry(on_events=["error"])
    run = make_run({"nodes": 2}, status=RunStatus.RUNNING, resubmission_attempt=1)
    add_job(run, S.FAILED, job_num=0, termination_reason="executor_error")
    other = add_job(run, S.RUNNING, job_num=1)
    decision = process_active_run(run, retry, NOW)
    assert decision.status is None
    assert decision.stop_jobs == [StopJob(other.id, JobTerminationReason.TERMINATED_BY_SERVER)]
    other.status = S.TERMINATED.value
    other.termination_reason = JobTerminationReason.TERMINATED_BY_SERVER.value
    decision = process_active_run(run, retry, NOW)
    assert decision.status == RunStatus.PENDING
    assert decision.next_attempt_at == ago(-11)  # the second delay: one attempt was made
    assert decision.resubmission_attempts == 1 and decision.wake_at == ago(-11).timestamp()


def test_retry_follows_the_events_and_the_duration():
    job = add_job(make_run(), S.FAILED, termination_reason="failed_to_start_due_to_no_capacity")
    assert should_retry(Retry(on_events=["no-capacity"]), job, ago(100), NOW)
    assert not should_retry(Retry(on_events=["error", "interruption"]), job, ago(100), NOW)
    assert not should_retry(Retry(on_events=["no-capacity"], duration=60), job, ago(100), NOW)
    assert should_retry(Retry(on_events=["no-capacity"], duration=600), job, ago(100), NOW)
    assert not should_retry(None, job, ago(100), NOW)


@pytest.mark.parametrize(
    "reason, event",
    [
        (JobTerminationReason.FAILED_TO_START_DUE_TO_NO_CAPACITY, "no-capacity"),
        (JobTerminationReason.INSTANCE_UNREACHABLE, "interruption"),
        (JobTerminationReason.CONTAINER_EXITED_WITH_ERROR, "error"),
        (JobTerminationReason.EXECUTOR_ERROR, "error"),
        (JobTerminationReason.TERMINATED_BY_USER, None),
        (JobTerminationReason.DONE_BY_RUNNER, None),
        (JobTerminationReason.MAX_DURATION_EXCEEDED, None),
    ],
)
def test_retry_event_of_termination_reasons(reason, event):
    assert reason.retry_event() == event


def test_user_stop_fails_a_task_but_is_no_failure_of_a_replica():
    job = add_job(make_run(), S.TERMINATED, termination_reason=JobTerminationReason.TERMINATED_BY_USER.value)
    assert is_failed(job, replicated=False)
    assert not is_failed(job, replicated=True)
    job.termination_reason = JobTerminationReason.SCALED_DOWN.value
    assert not is_failed(job, replicated=False) and not is_failed(job, replicated=True)


def test_a_failed_replica_is_replaced_at_once_then_with_backoff():
    run = make_run(SERVICE, status=RunStatus.RUNNING, desired_replica_count=2)
    add_job(run, S.RUNNING, replica_num=1, started_at=ago(10))
    add_job(run, S.FAILED, replica_num=0, started_at=ago(20), finished_at=ago(5), exit_status=1)
    decision = process_active_run(run, None, NOW)
    assert decision.resubmit == [Resubmit(0, 0, 1)]
    assert decision.resubmission_attempts == 1
    assert decision.status == RunStatus.RUNNING
    assert isinstance(decision.error, str) and "replacing it" in decision.error

    # The replacement crashed as well, 0.5 s ago: the next one waits 1 s after that failure.
    second = add_job(run, S.FAILED, replica_num=0, submission_num=1, started_at=ago(1), finished_at=ago(0.5))
    assert crash_streak(run, second) == 2
    decision = process_active_run(run, None, NOW)
    assert decision.resubmit == []
    assert decision.wake_at == ago(-0.5).timestamp()
    assert "in 1 s" in str(decision.error) and f"failure 2 of {MAX_REPLICA_FAILURES}" in str(decision.error)


def test_replicas_crashing_in_a_row_with_none_running_fail_the_service():
    run = make_run(SERVICE, status=RunStatus.PROVISIONING)
    for n in range(MAX_REPLICA_FAILURES):
        add_job(run, S.FAILED, submission_num=n, started_at=ago(60 - n), finished_at=ago(50 - n), exit_status=139)
    decision = process_active_run(run, None, NOW)
    assert decision.status == RunStatus.FAILED
    assert decision.termination_reason == RunTerminationReason.JOB_FAILED
    assert f"failed {MAX_REPLICA_FAILURES} times in a row" in str(decision.error)


def test_a_replica_that_served_a_while_is_no_crash_and_clears_the_error():
    run = make_run(SERVICE, status=RunStatus.RUNNING, error="replica 0 failed (exit 1); replacing it")
    add_job(run, S.FAILED, started_at=ago(REPLICA_STABLE_SECONDS + 100), finished_at=ago(50))
    latest = add_job(run, S.RUNNING, submission_num=1, started_at=ago(REPLICA_STABLE_SECONDS + 1))
    assert crash_streak(run, run.jobs[0]) == 0
    decision = process_active_run(run, None, NOW)
    assert decision.error is None and decision.error is not UNSET
    assert decision.status == RunStatus.RUNNING
    assert latest.status == S.RUNNING.value


def test_serverless_workers_are_not_replaced_here():
    run = make_run({"type": "serverless", "commands": ["python handler.py"]}, status=RunStatus.RUNNING)
    add_job(run, S.FAILED, exit_status=1)
    decision = process_active_run(run, None, NOW)
    assert decision.resubmit == [] and decision.status == RunStatus.PROVISIONING
