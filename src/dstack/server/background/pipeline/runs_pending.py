"""A `pending` run waits out its retry delay, then its unfinished jobs are submitted again."""

from __future__ import annotations

from datetime import datetime

from dstack.core.models.runs import JobStatus, RunStatus
from dstack.server.background.pipeline.common import aware
from dstack.server.background.pipeline.decisions import Resubmit, RunDecision
from dstack.server.models import RunModel
from dstack.server.services.runs import latest_jobs


def process_pending_run(run: RunModel, now: datetime) -> RunDecision:
    due = aware(run.next_attempt_at)
    if due is not None and due > now:
        return RunDecision(wake_at=due.timestamp())
    resubmit = [
        Resubmit(replica_num, job.job_num, job.submission_num + 1)
        for (replica_num, _), job in sorted(latest_jobs(run).items())
        if job.status != JobStatus.DONE
    ]
    return RunDecision(status=RunStatus.SUBMITTED, resubmit=resubmit, next_attempt_at=None)
