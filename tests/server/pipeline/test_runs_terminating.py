"""`terminating` runs end once their jobs have; a run whose processing raised ends with a server error."""

from dstack.core.models.runs import JobStatus, JobTerminationReason, RunStatus, RunTerminationReason
from dstack.server.background.pipeline.decisions import UNSET, StopJob
from dstack.server.background.pipeline.runs_terminating import process_failed_run, process_terminating_run
from tests.server.pipeline.factories import add_job, make_run


def test_waits_for_jobs_then_ends_as_its_reason_says():
    run = make_run(status=RunStatus.TERMINATING, termination_reason=RunTerminationReason.ABORTED_BY_USER.value)
    job = add_job(run, JobStatus.TERMINATING, termination_reason=JobTerminationReason.ABORTED_BY_USER.value)
    assert process_terminating_run(run).status is None
    job.status = JobStatus.ABORTED.value
    assert process_terminating_run(run).status == RunStatus.TERMINATED


def test_without_a_reason_a_stop_by_the_user_is_assumed():
    run = make_run(status=RunStatus.TERMINATING)
    add_job(run, JobStatus.FAILED)
    assert process_terminating_run(run).status == RunStatus.TERMINATED


def test_a_run_that_raised_fails_with_the_error_and_stops_its_jobs():
    run = make_run(status=RunStatus.RUNNING, run_spec="not json")
    running = add_job(run, JobStatus.RUNNING)
    decision = process_failed_run(run, ValueError("bad spec"))
    assert decision.status == RunStatus.TERMINATING
    assert decision.termination_reason == RunTerminationReason.SERVER_ERROR
    assert decision.error == "server error while processing the run: ValueError: bad spec"
    assert decision.stop_jobs == [StopJob(running.id, JobTerminationReason.TERMINATED_BY_SERVER, decision.error)]
    # Failing again (its jobs still stopping) keeps the first error.
    run.termination_reason = RunTerminationReason.SERVER_ERROR.value
    running.status = JobStatus.TERMINATING.value
    again = process_failed_run(run, KeyError("other"))
    assert again.error is UNSET and again.stop_jobs == [] and again.status == RunStatus.TERMINATING


def test_a_run_that_raised_with_no_job_active_fails_at_once():
    run = make_run(status=RunStatus.SUBMITTED)
    add_job(run, JobStatus.FAILED)
    assert process_failed_run(run, RuntimeError("x")).status == RunStatus.FAILED
