"""A `terminating` run ends, as its termination reason says, once every job has; and a run
whose processing raised is ended here with a server error."""

from __future__ import annotations

from dstack.core.models.runs import JobStatus, RunTerminationReason
from dstack.server.background.pipeline.decisions import UNSET, RunDecision, end_run
from dstack.server.models import RunModel
from dstack.server.services.runs import latest_jobs


def process_terminating_run(run: RunModel) -> RunDecision:
    if all(JobStatus(j.status).is_finished() for j in latest_jobs(run).values()):
        reason = RunTerminationReason(run.termination_reason or RunTerminationReason.STOPPED_BY_USER)
        return RunDecision(status=reason.to_status())
    return RunDecision()


def process_failed_run(run: RunModel, error: Exception) -> RunDecision:
    """Fail a run whose processing raised: SERVER_ERROR with the error, its jobs stopped through
    the usual terminating path. Reads only the run's and jobs' states, never the run's spec, so
    a spec the pipeline cannot parse still ends here."""
    message = f"server error while processing the run: {type(error).__name__}: {error}"[:1000]
    first = run.termination_reason != RunTerminationReason.SERVER_ERROR
    return end_run(list(run.jobs), RunTerminationReason.SERVER_ERROR, message if first else UNSET, message)
