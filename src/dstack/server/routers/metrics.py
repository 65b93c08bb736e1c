"""Job metrics at dstack's path: `GET /api/project/{p}/metrics/job/{run_name}` (services.job_metrics)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.server.db import get_session
from dstack.server.errors import ResourceNotFound
from dstack.server.models import ProjectModel, UserModel
from dstack.server.security import require_project_member
from dstack.server.services import job_metrics

router = APIRouter(prefix="/api/project/{project_name}/metrics", tags=["metrics"])


@router.get("/job/{run_name}")
async def get_job_metrics(
    run_name: str,
    run_id: str | None = Query(None, max_length=36),
    replica_num: int = Query(0, ge=0, le=100_000),
    job_num: int = Query(0, ge=0, le=100_000),
    limit: int = Query(1, ge=1, le=job_metrics.MAX_POINTS_PER_ANSWER),
    after: datetime | None = None,
    before: datetime | None = None,
    member: tuple[UserModel, ProjectModel] = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    """The job's newest `limit` samples (default one), newest first; `after`/`before` bound their
    times. Metrics: `cpu_usage_percent` (of one core), `memory_usage_bytes`, `cpus_detected_num`
    and `memory_total_bytes` (what the job reserved), `gpus_detected_num`, `gpu_memory_total_bytes`,
    `gpu_memory_usage_bytes_gpu{i}`, `gpu_util_percent_gpu{i}`."""
    _, project = member
    job = await job_metrics.find_job(session, project, run_name, run_id, replica_num, job_num)
    if job is None:
        raise ResourceNotFound(
            f"run '{run_name}' has no job with replica_num={replica_num} job_num={job_num} in project '{project.name}'"
        )
    return await job_metrics.job_metrics(session, job, limit, after, before)
