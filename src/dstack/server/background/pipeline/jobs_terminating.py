"""A `terminating` job: one that never reached an agent ends here; the others' agents are told
to stop them (after the commit; the watcher stores how they ended)."""

from __future__ import annotations

from dstack.core.models.runs import JobTerminationReason
from dstack.server.background.pipeline.decisions import JobDecision, JobEnd
from dstack.server.models import JobModel


def process_terminating_job(job: JobModel, provisioning: bool) -> JobDecision:
    """`provisioning`: the job is being submitted to its agent right now."""
    if provisioning:
        # The agent may not know the job yet: a stop now would be lost and the job would then
        # start. A pass after provisioning has finished sends it.
        return JobDecision()
    if job.instance_id is None or job.agent_state is None:
        # Never reached an agent: nothing runs, the job ends here, as its reason says.
        reason = JobTerminationReason(job.termination_reason or JobTerminationReason.TERMINATED_BY_SERVER)
        return JobDecision(end=JobEnd(reason.to_status()))
    return JobDecision(send_stop=True)
