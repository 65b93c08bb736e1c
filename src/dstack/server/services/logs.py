"""Job logs: stored rows, and a notifier so followers wake the moment lines arrive."""

import base64
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.notifier import KeyedNotifier
from dstack.server.models import JobLogModel, JobModel, RunModel

#: wakes log followers of a run (keyed by run id) when its lines or its status change
LogNotifier = KeyedNotifier[str]


async def poll_logs(
    session: AsyncSession,
    notifier: LogNotifier,
    run: RunModel,
    job_num: int,
    replica_num: int,
    start_after: int,
    limit: int,
    wait: float,
    submission_id: str | None = None,
    after_time: float | None = None,
) -> dict[str, Any]:
    """Log records of one job (all its submissions, in order) after the cursor `start_after`.

    `submission_id` narrows them to one submission (dstack's client asks so), `after_time` to
    lines at or after a unix time. `next_token` is the cursor to pass back as `start_after`.
    """
    run_id = run.id

    async def job_ids() -> list[str]:
        return await _job_ids(session, run_id, job_num, replica_num, submission_id)

    # subscribed before reading, so lines or a finish that arrive between the read and the wait wake it
    with notifier.subscribe(run_id) as change:
        # `run` was read before subscribing: read the status again, or a finish in between is missed
        status = (await session.execute(select(RunModel.status).where(RunModel.id == run_id))).scalar_one()
        finished = status.is_finished()
        rows = await _fetch(session, await job_ids(), start_after, limit, after_time)
        if not rows and wait > 0 and not finished:
            await change.wait(wait)
            status = (await session.execute(select(RunModel.status).where(RunModel.id == run_id))).scalar_one()
            finished = status.is_finished()
            rows = await _fetch(session, await job_ids(), start_after, limit, after_time)
    logs = [
        {"timestamp": r.timestamp, "log_source": r.stream, "message": base64.b64encode(r.data).decode()} for r in rows
    ]
    next_token = rows[-1].id if rows else start_after
    return {"logs": logs, "next_token": next_token, "finished": finished and len(rows) < limit}


async def _job_ids(
    session: AsyncSession, run_id: str, job_num: int, replica_num: int, submission_id: str | None = None
) -> list[str]:
    if submission_id is not None:
        query = select(JobModel.id).where(JobModel.run_id == run_id, JobModel.id == submission_id)
    else:
        query = select(JobModel.id).where(
            JobModel.run_id == run_id, JobModel.job_num == job_num, JobModel.replica_num == replica_num
        )
    return list((await session.execute(query)).scalars())


async def _fetch(
    session: AsyncSession, job_ids: list[str], start_after: int, limit: int, after_time: float | None = None
) -> list[JobLogModel]:
    if not job_ids:
        return []
    query = select(JobLogModel).where(JobLogModel.job_id.in_(job_ids), JobLogModel.id > start_after)
    if after_time is not None:
        query = query.where(JobLogModel.timestamp >= after_time)
    result = await session.execute(query.order_by(JobLogModel.id).limit(limit))
    return list(result.scalars())
