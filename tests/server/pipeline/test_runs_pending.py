"""`pending` runs: wait out the retry delay, then submit every unfinished job again."""

from dstack.core.models.runs import JobStatus, RunStatus
from dstack.server.background.pipeline.decisions import UNSET, Resubmit
from dstack.server.background.pipeline.runs_pending import process_pending_run
from tests.server.pipeline.factories import NOW, add_job, ago, make_run


def test_waits_until_the_next_attempt():
    run = make_run(status=RunStatus.PENDING, next_attempt_at=ago(-30))
    add_job(run, JobStatus.FAILED)
    decision = process_pending_run(run, NOW)
    assert decision.wake_at == ago(-30).timestamp()
    assert decision.status is None and decision.resubmit == []


def test_resubmits_the_latest_unfinished_submission_of_each_job():
    run = make_run({"nodes": 3}, status=RunStatus.PENDING, next_attempt_at=ago(1))
    add_job(run, JobStatus.FAILED, job_num=0, submission_num=0)
    add_job(run, JobStatus.FAILED, job_num=0, submission_num=1)
    add_job(run, JobStatus.DONE, job_num=1)
    add_job(run, JobStatus.TERMINATED, job_num=2)
    decision = process_pending_run(run, NOW)
    assert decision.status == RunStatus.SUBMITTED
    assert decision.resubmit == [Resubmit(0, 0, 2), Resubmit(0, 2, 1)]
    assert decision.next_attempt_at is None and decision.next_attempt_at is not UNSET
