"""Jobs on an agent: `max_duration`, and what the agent's reports change."""

from dstack.core.models.runs import JobStatus, JobTerminationReason
from dstack.server.background.pipeline.common import AGENT_RESTARTED_MESSAGE
from dstack.server.background.pipeline.jobs_running import apply_agent_report, process_running_job
from tests.server.pipeline.factories import NOW, add_job, ago, make_run


def _job(status=JobStatus.RUNNING, spec=None, **fields):
    return add_job(make_run(), status, spec=spec, **fields)


def test_max_duration_stops_the_job_when_it_is_reached_and_wakes_then():
    job = _job(spec={"max_duration": 60}, started_at=ago(30))
    assert process_running_job(job, NOW).wake_at == ago(-30).timestamp()
    job.started_at = ago(61)
    stop = process_running_job(job, NOW).stop
    assert stop is not None and stop.reason == JobTerminationReason.MAX_DURATION_EXCEEDED
    assert process_running_job(_job(started_at=ago(10**6)), NOW).stop is None  # no limit


def test_reports_move_the_job_forward():
    job = _job(JobStatus.PROVISIONING)
    apply_agent_report(job, {"state": "preparing"}, NOW)
    assert job.status == JobStatus.PULLING.value
    apply_agent_report(job, {"state": "running", "started_at": ago(2).timestamp()}, NOW)
    assert job.status == JobStatus.RUNNING.value and job.started_at == ago(2)
    apply_agent_report(job, {"state": "done", "exit_status": 0}, NOW)
    assert job.status == JobStatus.DONE.value and job.finished_at == NOW
    assert job.termination_reason == JobTerminationReason.DONE_BY_RUNNER.value


def test_a_failure_says_why():
    job = _job()
    apply_agent_report(job, {"state": "failed", "exit_status": 2, "message": "boom"}, NOW)
    assert job.status == JobStatus.FAILED.value
    assert job.termination_reason == JobTerminationReason.CONTAINER_EXITED_WITH_ERROR.value
    assert job.termination_reason_message == "boom"
    lost = _job()
    apply_agent_report(lost, {"state": "failed", "exit_status": None, "message": AGENT_RESTARTED_MESSAGE}, NOW)
    assert lost.termination_reason == JobTerminationReason.INSTANCE_UNREACHABLE.value
    assert lost.termination_reason_message.startswith("agent lost")


def test_a_stopped_job_ends_as_the_servers_reason_says():
    job = _job(JobStatus.TERMINATING, termination_reason=JobTerminationReason.MAX_DURATION_EXCEEDED.value)
    apply_agent_report(job, {"state": "terminated", "exit_status": -15}, NOW)
    assert job.status == JobStatus.TERMINATED.value
    aborted = _job(JobStatus.TERMINATING, termination_reason="terminated_by_user", stop_requested="abort")
    apply_agent_report(aborted, {"state": "terminated"}, NOW)
    assert aborted.status == JobStatus.ABORTED.value
