"""Per-job usage metrics: pulled from the agents, kept for a retention window, served and exported.

Each agent samples its running jobs (agent.metrics) and keeps a short window in memory; the
collector here asks every agent that runs a job for its jobs' samples newer than the last one stored
(one `POST /api/metrics` per agent, every DSTACK_SERVER_METRICS_INTERVAL s, default 2; per job,
`GET /api/jobs/{id}/metrics?after=TS`, from an agent older than that route) and
stores them in `job_metrics_points`. Points older than DSTACK_SERVER_METRICS_RETENTION_SECONDS
(default 3600) are deleted, so what is stored is bounded by time whatever runs. The API answers
in dstack's shape (`{"metrics": [{"name", "timestamps", "values"}]}`, newest first), and
`/metrics` exports each running job's latest point for Prometheus with dstack's metric names and
`dstack_project_name` / `dstack_run_name` / `dstack_job_name` labels.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import ValidationError
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.models.metrics import JobMetricsSample
from dstack.core.models.runs import JobStatus
from dstack.server.agent_client import AgentError
from dstack.server.db import Database
from dstack.server.models import JobMetricsPointModel, JobModel, ProjectModel, RunModel

logger = logging.getLogger(__name__)

MAX_POINTS_PER_ANSWER = 10_000
MAX_CONCURRENT_PULLS = 32


class MetricsCollector:
    """The server's side of job metrics: one loop that pulls, stores and expires points."""

    def __init__(self, db: Database, instances: Any, interval: float = 2.0, retention: float = 3600.0) -> None:
        self.db = db
        self.instances = instances  # services.instances.InstanceManager: `client(instance_id)`
        self.interval = interval  # settings: DSTACK_SERVER_METRICS_INTERVAL
        self.retention = retention  # settings: DSTACK_SERVER_METRICS_RETENTION_SECONDS
        self._last_ts: dict[str, float] = {}  # job id -> newest stored sample's time
        self._task: asyncio.Task[None] | None = None
        self._limit = asyncio.Semaphore(MAX_CONCURRENT_PULLS)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="job-metrics")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.collect_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("collecting job metrics failed")
            await asyncio.sleep(max(0.1, self.interval - (time.monotonic() - started)))

    async def collect_once(self) -> int:
        """One round: pull new samples of every running job, store them, expire old ones."""
        async with self.db.session() as session:
            rows = (
                await session.execute(
                    select(JobModel.id, JobModel.instance_id).where(
                        JobModel.status == JobStatus.RUNNING, JobModel.instance_id.is_not(None)
                    )
                )
            ).all()
            unknown = [job_id for job_id, _ in rows if job_id not in self._last_ts]
            if unknown:
                stored = await session.execute(
                    select(JobMetricsPointModel.job_id, func.max(JobMetricsPointModel.timestamp))
                    .where(JobMetricsPointModel.job_id.in_(unknown))
                    .group_by(JobMetricsPointModel.job_id)
                )
                for job_id, ts in stored.all():
                    self._last_ts[job_id] = float(ts)
        running = {job_id for job_id, _ in rows}
        for job_id in [j for j in self._last_ts if j not in running]:
            del self._last_ts[job_id]
        by_instance: dict[str, list[str]] = {}
        for job_id, inst in rows:
            if inst is not None:
                by_instance.setdefault(inst, []).append(job_id)
        pulled = [
            pair
            for pairs in await asyncio.gather(*(self._pull_instance(i, jobs) for i, jobs in by_instance.items()))
            for pair in pairs
        ]
        points = [
            JobMetricsPointModel(
                job_id=job_id,
                timestamp=s.ts,
                cpu_percent=s.cpu_percent,
                cpu_seconds=s.cpu_seconds,
                memory_bytes=s.memory_bytes,
                gpus=json.dumps([g.model_dump() for g in s.gpus]),
            )
            for job_id, samples in pulled
            for s in samples
        ]
        async with self.db.session() as session:
            session.add_all(points)
            await session.execute(
                delete(JobMetricsPointModel).where(JobMetricsPointModel.timestamp < time.time() - self.retention)
            )
            await session.commit()
        for job_id, samples in pulled:
            if samples:
                self._last_ts[job_id] = max(self._last_ts.get(job_id, 0.0), samples[-1].ts)
        return len(points)

    async def _pull_instance(self, instance_id: str, job_ids: list[str]) -> list[tuple[str, list[JobMetricsSample]]]:
        """Every job of one agent in one request (an agent with many jobs would otherwise be asked
        once per job every interval); per job from an agent that predates the batch route."""
        try:
            client = self.instances.client(instance_id)
        except KeyError:  # an instance without an agent client (yet)
            return []
        async with self._limit:
            try:
                answer = await client.metrics_many({j: self._last_ts.get(j, 0.0) for j in job_ids})
            except (AgentError, httpx.HTTPError, ValueError, KeyError, RuntimeError):
                return []  # an agent restarting or gone: the pipeline deals with it
        if answer is None:
            return list(await asyncio.gather(*(self._pull(j, instance_id) for j in job_ids)))
        return [(j, [sample for s in answer.get(j, []) if (sample := _valid_sample(s)) is not None]) for j in job_ids]

    async def _pull(self, job_id: str, instance_id: str) -> tuple[str, list[JobMetricsSample]]:
        try:
            client = self.instances.client(instance_id)
        except KeyError:  # an instance without an agent client (yet)
            return job_id, []
        async with self._limit:
            try:
                samples = await client.metrics(job_id, self._last_ts.get(job_id, 0.0))
            except (AgentError, httpx.HTTPError, ValueError, KeyError, RuntimeError):
                return job_id, []  # an agent restarting or gone: the pipeline deals with it
        return job_id, [sample for s in samples if (sample := _valid_sample(s)) is not None]


def _valid_sample(s: Any) -> JobMetricsSample | None:
    """The sample if it is one (an agent's answer is input like any other), else None: skipped."""
    try:
        return JobMetricsSample.model_validate(s)
    except ValidationError:
        return None


def install(app: FastAPI) -> None:
    """Start the collector with the server and stop it with it (the app's lifespan hooks)."""

    async def _start(app: FastAPI) -> None:
        settings = app.state.settings
        collector = MetricsCollector(
            app.state.db,
            app.state.instances,
            interval=settings.metrics_interval_seconds,
            retention=settings.metrics_retention_seconds,
        )
        app.state.job_metrics = collector
        await collector.start()

    async def _stop(app: FastAPI) -> None:
        collector = getattr(app.state, "job_metrics", None)
        if collector is not None:
            await collector.stop()

    app.state.startup_hooks.append(_start)
    app.state.shutdown_hooks.insert(0, _stop)


# --- reading ------------------------------------------------------------------------------------


async def find_job(
    session: AsyncSession,
    project: ProjectModel,
    run_name: str,
    run_id: str | None,
    replica_num: int,
    job_num: int,
) -> JobModel | None:
    """The latest submission of the job (replica, job) of the project's latest run of that name."""
    query = select(RunModel.id).where(RunModel.project_id == project.id, RunModel.run_name == run_name)
    if run_id is not None:
        query = query.where(RunModel.id == run_id)
    run = (await session.execute(query.order_by(RunModel.submitted_at.desc()).limit(1))).scalar_one_or_none()
    if run is None:
        return None
    job: JobModel | None = (
        await session.execute(
            select(JobModel)
            .where(JobModel.run_id == run, JobModel.replica_num == replica_num, JobModel.job_num == job_num)
            .order_by(JobModel.submission_num.desc(), JobModel.submitted_at.desc())
            .limit(1)
        )
    ).scalar_one_or_none()
    return job


async def job_metrics(
    session: AsyncSession,
    job: JobModel,
    limit: int = 1,
    after: datetime | None = None,
    before: datetime | None = None,
) -> dict[str, Any]:
    """dstack's JobMetrics: `{"metrics": [{"name", "timestamps", "values"}]}`, newest first."""
    query = select(JobMetricsPointModel).where(JobMetricsPointModel.job_id == job.id)
    if after is not None:
        query = query.where(JobMetricsPointModel.timestamp > after.timestamp())
    if before is not None:
        query = query.where(JobMetricsPointModel.timestamp < before.timestamp())
    query = query.order_by(JobMetricsPointModel.timestamp.desc()).limit(min(limit, MAX_POINTS_PER_ANSWER))
    points = list((await session.execute(query)).scalars())
    return {"metrics": _series(job, points)}


def _series(job: JobModel, points: Sequence[JobMetricsPointModel]) -> list[dict[str, Any]]:
    if not points:
        return []
    stamps = [datetime.fromtimestamp(p.timestamp, UTC).isoformat() for p in points]

    def metric(name: str, values: list[Any]) -> dict[str, Any]:
        return {"name": name, "timestamps": stamps, "values": values}

    out = [
        metric("cpu_usage_percent", [p.cpu_percent for p in points]),
        metric("memory_usage_bytes", [p.memory_bytes for p in points]),
    ]
    reserved = json.loads(job.reserved or "{}")
    if reserved.get("cpus"):
        out.append(metric("cpus_detected_num", [reserved["cpus"]] * len(points)))
    if reserved.get("memory_mib"):
        out.append(metric("memory_total_bytes", [int(reserved["memory_mib"]) * 2**20] * len(points)))
    gpus = [json.loads(p.gpus or "[]") for p in points]
    indices = sorted({g["index"] for sample in gpus for g in sample})
    out.append(metric("gpus_detected_num", [len(sample) for sample in gpus]))
    if indices:
        out.append(
            metric("gpu_memory_total_bytes", [max((g["memory_total_bytes"] for g in s), default=0) for s in gpus])
        )
    for i in indices:
        by_index = [{g["index"]: g for g in sample}.get(i) for sample in gpus]
        out.append(metric(f"gpu_memory_usage_bytes_gpu{i}", [g["memory_used_bytes"] if g else None for g in by_index]))
        out.append(metric(f"gpu_util_percent_gpu{i}", [g["util_percent"] if g else None for g in by_index]))
    return out


# --- Prometheus ---------------------------------------------------------------------------------

_PROMETHEUS = (
    ("dstack_job_cpu_usage_percent", "gauge", "Job CPU usage, percent of one core"),
    ("dstack_job_cpu_time_seconds_total", "counter", "Total CPU time consumed by the job, seconds"),
    ("dstack_job_memory_usage_bytes", "gauge", "Memory used by the job's processes (RSS), bytes"),
    ("dstack_job_gpu_usage_ratio", "gauge", "Job GPU usage, percent (as 0.0-1.0)"),
    ("dstack_job_gpu_memory_usage_bytes", "gauge", "GPU memory used on the job's GPU, bytes"),
    ("dstack_job_gpu_memory_total_bytes", "gauge", "Total memory of the job's GPU, bytes"),
)


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, object]) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


async def render_prometheus(session: AsyncSession) -> str:
    """The latest point of every running job, in the text exposition format."""
    latest = (
        select(JobMetricsPointModel.job_id, func.max(JobMetricsPointModel.timestamp).label("ts"))
        .group_by(JobMetricsPointModel.job_id)
        .subquery()
    )
    rows = (
        await session.execute(
            select(JobMetricsPointModel, JobModel, RunModel.run_name, ProjectModel.name)
            .join(
                latest,
                (latest.c.job_id == JobMetricsPointModel.job_id) & (latest.c.ts == JobMetricsPointModel.timestamp),
            )
            .join(JobModel, JobModel.id == JobMetricsPointModel.job_id)
            .join(RunModel, RunModel.id == JobModel.run_id)
            .join(ProjectModel, ProjectModel.id == JobModel.project_id)
            .where(JobModel.status == JobStatus.RUNNING)
            .order_by(ProjectModel.name, RunModel.run_name, JobModel.replica_num, JobModel.job_num)
        )
    ).all()
    samples: dict[str, list[str]] = {name: [] for name, _, _ in _PROMETHEUS}
    for point, job, run_name, project_name in rows:
        labels: dict[str, object] = {
            "dstack_project_name": project_name,
            "dstack_run_name": run_name,
            "dstack_job_name": job.job_name,
            "dstack_job_id": job.id,
            "dstack_replica_num": job.replica_num,
            "dstack_job_num": job.job_num,
        }
        ls = _labels(labels)
        samples["dstack_job_cpu_usage_percent"].append(f"dstack_job_cpu_usage_percent{ls} {point.cpu_percent}")
        samples["dstack_job_cpu_time_seconds_total"].append(
            f"dstack_job_cpu_time_seconds_total{ls} {point.cpu_seconds}"
        )
        samples["dstack_job_memory_usage_bytes"].append(f"dstack_job_memory_usage_bytes{ls} {point.memory_bytes}")
        for g in json.loads(point.gpus or "[]"):
            gl = _labels({**labels, "dstack_gpu_num": g["index"]})
            samples["dstack_job_gpu_usage_ratio"].append(f"dstack_job_gpu_usage_ratio{gl} {g['util_percent'] / 100}")
            samples["dstack_job_gpu_memory_usage_bytes"].append(
                f"dstack_job_gpu_memory_usage_bytes{gl} {g['memory_used_bytes']}"
            )
            samples["dstack_job_gpu_memory_total_bytes"].append(
                f"dstack_job_gpu_memory_total_bytes{gl} {g['memory_total_bytes']}"
            )
    lines: list[str] = []
    for name, kind, help_text in _PROMETHEUS:
        if samples[name]:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples[name]]
    return "\n".join(lines) + "\n" if lines else ""
