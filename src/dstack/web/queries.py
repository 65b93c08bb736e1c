"""Reads the dashboard needs beyond the JSON API's: filtered run pages, endpoint statistics."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.models.runs import InstanceResources, JobStatus, RunStatus, RunType
from dstack.server.models import InstanceModel, JobMetricsPointModel, JobModel, ProjectModel, RunModel
from dstack.serverless.models import ServerlessEndpointModel, ServerlessJobModel

PAGE = 100  # runs per page: the list stays fast with any number stored


async def runs_page(
    session: AsyncSession,
    project_ids: list[str],
    status: str,
    run_type: str | None,
    name: str | None,
    offset: int,
) -> tuple[list[RunModel], bool]:
    """One page of runs, newest first, and whether more follow."""
    query = select(RunModel).where(RunModel.project_id.in_(project_ids), RunModel.deleted.is_(False))
    finished = list(RunStatus.finished_statuses())
    if status == "active":
        query = query.where(RunModel.status.notin_(finished))
    elif status == "finished":
        query = query.where(RunModel.status.in_(finished))
    if run_type:
        query = query.where(RunModel.run_type == RunType(run_type))
    if name:
        escaped = name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(RunModel.run_name.like(f"%{escaped}%", escape="\\"))
    query = query.order_by(RunModel.submitted_at.desc()).offset(offset).limit(PAGE + 1)
    rows = list((await session.execute(query)).scalars())
    return rows[:PAGE], len(rows) > PAGE


def _percentiles(values: list[float]) -> dict[str, float | None]:
    values = sorted(values)
    if not values:
        return {"p50": None, "p95": None}
    return {
        "p50": values[int(0.5 * (len(values) - 1))],
        "p95": values[int(0.95 * (len(values) - 1))],
    }


async def endpoint_of_run(session: AsyncSession, run_id: str) -> str | None:
    """The id of run `run_id`'s serverless endpoint, if it has one."""
    result = await session.execute(
        select(ServerlessEndpointModel.endpoint_id).where(ServerlessEndpointModel.run_id == run_id)
    )
    return result.scalar_one_or_none()


async def endpoint_stats(session: AsyncSession, run_id: str, window: float = 300.0) -> dict[str, Any] | None:
    """Recent jobs and throughput of the serverless endpoint of run `run_id` (None if it has none)."""
    endpoint_id = await endpoint_of_run(session, run_id)
    if endpoint_id is None:
        return None
    J = ServerlessJobModel
    now = time.time()
    done = (
        await session.execute(
            select(J.queued_at, J.started_at, J.finished_at)
            .where(J.endpoint_id == endpoint_id, J.finished_at >= now - window)
            .order_by(J.finished_at.desc())
            .limit(5000)
        )
    ).all()
    last_minute = sum(1 for r in done if r.finished_at >= now - 60)
    delays = [(r.started_at - r.queued_at) * 1000 for r in done if r.started_at is not None]
    runs = [(r.finished_at - r.started_at) * 1000 for r in done if r.started_at is not None]
    recent = (
        await session.execute(
            select(J.id, J.status, J.created_at, J.output, J.error)
            .where(J.endpoint_id == endpoint_id)
            .order_by(J.created_at.desc())
            .limit(20)
        )
    ).all()
    total = (await session.execute(select(func.count()).where(J.endpoint_id == endpoint_id))).scalar_one()
    return {
        "endpoint_id": endpoint_id,
        "jobs_per_s": round(last_minute / 60, 2),
        "delay_ms": _percentiles(delays),
        "execution_ms": _percentiles(runs),
        "stored_jobs": total,
        "recent": [
            {
                "id": r.id,
                "status": r.status,
                "age_s": int(now - r.created_at),
                "output": (r.output or r.error or "")[:300],
            }
            for r in recent
        ],
    }


async def instances_with_jobs(session: AsyncSession) -> list[dict[str, Any]]:
    """Every instance with the active jobs placed on it (what runs where), for admins."""
    instances = list((await session.execute(select(InstanceModel).order_by(InstanceModel.name))).scalars())
    active = (
        await session.execute(
            select(JobModel.instance_id, JobModel.job_name, JobModel.status, RunModel.run_name, ProjectModel.name)
            .join(RunModel, RunModel.id == JobModel.run_id)
            .join(ProjectModel, ProjectModel.id == JobModel.project_id)
            .where(JobModel.instance_id.is_not(None), JobModel.status.notin_(list(JobStatus.finished_statuses())))
            .order_by(JobModel.submitted_at)
        )
    ).all()
    by_instance: dict[str, list[dict[str, str]]] = {}
    for row in active:
        if row[0] is None:
            continue
        by_instance.setdefault(row[0], []).append(
            {"job": row[1], "status": str(getattr(row[2], "value", row[2])), "run": row[3], "project": row[4]}
        )
    out = []
    for inst in instances:
        try:
            resources = InstanceResources.model_validate_json(inst.resources).pretty()
        except ValueError:
            resources = "-"
        out.append(
            {
                "name": inst.name,
                "backend": inst.backend,
                "region": inst.region,
                "hostname": inst.hostname,
                "status": str(getattr(inst.status, "value", inst.status)),
                "resources": resources,
                "price": inst.price,
                "jobs": by_instance.get(inst.id, []),
            }
        )
    return out


async def jobs_on_instances(session: AsyncSession, instance_names: list[str]) -> dict[str, list[dict[str, Any]]]:
    """What runs on each named instance (its active jobs) with each job's latest usage sample.

    Keyed by instance name (the fleets service answers names); the usage is the newest point the
    metrics collector stored (`job_metrics_points`), or None before the first sample."""
    if not instance_names:
        return {}
    active = (
        await session.execute(
            select(InstanceModel.name, JobModel.id, JobModel.job_name, JobModel.status, RunModel.run_name)
            .join(JobModel, JobModel.instance_id == InstanceModel.id)
            .join(RunModel, RunModel.id == JobModel.run_id)
            .where(InstanceModel.name.in_(instance_names), JobModel.status.in_(list(JobStatus.active_statuses())))
            .order_by(JobModel.submitted_at)
        )
    ).all()
    job_ids = [row[1] for row in active]
    usage: dict[str, tuple[float, int]] = {}
    if job_ids:
        P = JobMetricsPointModel
        newest = (
            select(P.job_id, func.max(P.timestamp).label("ts")).where(P.job_id.in_(job_ids)).group_by(P.job_id)
        ).subquery()
        points = await session.execute(
            select(P.job_id, P.cpu_percent, P.memory_bytes).join(
                newest, (newest.c.job_id == P.job_id) & (newest.c.ts == P.timestamp)
            )
        )
        usage = {job_id: (cpu, memory) for job_id, cpu, memory in points.all()}
    out: dict[str, list[dict[str, Any]]] = {}
    for name, job_id, job_name, status, run_name in active:
        sample = usage.get(job_id)
        out.setdefault(name, []).append(
            {
                "run": run_name,
                "job": job_name,
                "status": str(getattr(status, "value", status)),
                "cpu": f"{sample[0]:.0f}%" if sample else None,
                "memory": f"{sample[1] / 2**20:.0f}MB" if sample else None,
            }
        )
    return out
