"""A page of a job's stored logs within a time window, newest first when asked.

What dstack's `logs/poll` allows beyond following the tail (`services/logs.poll_logs`):
`end_time` (lines strictly before it), `descending` (newest first; the cursor then moves toward
older lines). No waiting: such a page is a look at what is stored now.
"""

from __future__ import annotations

import base64
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.server.models import JobLogModel, RunModel
from dstack.server.services.logs import _job_ids


async def log_window(
    session: AsyncSession,
    run: RunModel,
    job_num: int,
    replica_num: int,
    cursor: int | None,
    limit: int,
    *,
    submission_id: str | None = None,
    after_time: float | None = None,
    before_time: float | None = None,
    descending: bool = False,
) -> dict[str, Any]:
    """`logs`, and `next_token`: the cursor to pass back (None when this page held the last ones).

    `cursor` is a record id: ascending pages start after it, descending ones before it."""
    job_ids = await _job_ids(session, run.id, job_num, replica_num, submission_id)
    rows: list[JobLogModel] = []
    if job_ids:
        query = select(JobLogModel).where(JobLogModel.job_id.in_(job_ids))
        if cursor is not None:
            query = query.where(JobLogModel.id < cursor if descending else JobLogModel.id > cursor)
        if after_time is not None:
            query = query.where(JobLogModel.timestamp >= after_time)
        if before_time is not None:
            query = query.where(JobLogModel.timestamp < before_time)
        order = JobLogModel.id.desc() if descending else JobLogModel.id
        rows = list((await session.execute(query.order_by(order).limit(limit))).scalars())
    logs = [
        {"timestamp": r.timestamp, "log_source": r.stream, "message": base64.b64encode(r.data).decode()} for r in rows
    ]
    last = rows[-1].id if rows else cursor
    return {
        "logs": logs,
        "next_token": str(last) if rows and len(rows) >= limit else None,
        "cursor": last if last is not None else 0,
    }
