"""`terminating` jobs: those that never reached an agent end here; the others' agents are told."""

from dstack.core.models.runs import JobStatus, JobTerminationReason
from dstack.server.background.pipeline.jobs_terminating import process_terminating_job
from tests.server.pipeline.factories import add_job, make_run


def _job(**fields):
    return add_job(make_run(), JobStatus.TERMINATING, **fields)


def test_a_job_being_provisioned_waits_for_its_agent_to_know_it():
    decision = process_terminating_job(_job(instance_id="i", agent_state=None), provisioning=True)
    assert decision.end is None and not decision.send_stop


def test_a_job_that_never_reached_an_agent_ends_as_its_reason_says():
    job = _job(termination_reason=JobTerminationReason.ABORTED_BY_USER.value)
    decision = process_terminating_job(job, provisioning=False)
    assert decision.end is not None and decision.end.status == JobStatus.ABORTED and decision.end.reason is None
    assert process_terminating_job(_job(instance_id="i"), False).end.status == JobStatus.TERMINATED


def test_a_job_on_an_agent_is_stopped_there():
    decision = process_terminating_job(_job(instance_id="i", agent_state="running"), provisioning=False)
    assert decision.send_stop and decision.end is None
