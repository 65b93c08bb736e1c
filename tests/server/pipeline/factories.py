"""Small row factories for the pipeline's tests: runs, jobs and instances as the server stores them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from dstack.core.models.runs import InstanceResources, JobSpec, JobStatus, RunSpec, RunStatus, RunType
from dstack.server.models import InstanceModel, JobModel, ProjectModel, RunModel, UserModel, new_id

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
SMALL = {"cpu": 1, "memory": "0.5GB", "disk": "1GB"}


def ago(seconds: float, now: datetime = NOW) -> datetime:
    return now - timedelta(seconds=seconds)


def owner() -> tuple[UserModel, ProjectModel]:
    user = UserModel(id=new_id(), name=f"u-{new_id()[:8]}", token_hash=new_id().replace("-", "")[:64])
    project = ProjectModel(id=new_id(), name=f"p-{new_id()[:8]}", owner_id=user.id)
    return user, project


def make_run(
    configuration: dict[str, Any] | None = None,
    status: RunStatus = RunStatus.SUBMITTED,
    project_id: str | None = None,
    user_id: str | None = None,
    **fields: Any,
) -> RunModel:
    conf = {"type": "task", "commands": ["true"], "resources": SMALL, **(configuration or {})}
    run_id = new_id()
    run_spec = fields.pop("run_spec", None) or RunSpec(configuration=conf).model_dump_json()
    return RunModel(
        id=run_id,
        project_id=project_id or new_id(),
        user_id=user_id or new_id(),
        run_name=fields.pop("run_name", f"run-{run_id[:8]}"),
        submitted_at=fields.pop("submitted_at", NOW),
        last_processed_at=NOW,
        status=status,
        run_spec=run_spec,
        run_type=RunType(conf["type"]),
        desired_replica_count=fields.pop("desired_replica_count", 1),
        resubmission_attempt=fields.pop("resubmission_attempt", 0),
        **fields,
    )


def add_job(
    run: RunModel,
    status: JobStatus = JobStatus.SUBMITTED,
    replica_num: int = 0,
    job_num: int = 0,
    submission_num: int = 0,
    spec: dict[str, Any] | None = None,
    **fields: Any,
) -> JobModel:
    """A job of `run` (appended to `run.jobs`)."""
    name = f"{run.run_name}-{job_num}-{replica_num}"
    job_spec = JobSpec(**{"job_name": name, "commands": ["true"], "requirements": SMALL, **(spec or {})})
    job = JobModel(
        id=new_id(),
        run_id=run.id,
        project_id=run.project_id,
        job_num=job_num,
        replica_num=replica_num,
        submission_num=submission_num,
        job_name=name,
        submitted_at=fields.pop("submitted_at", NOW + timedelta(microseconds=len(run.jobs))),
        last_processed_at=NOW,
        status=status,
        job_spec=job_spec.model_dump_json(),
        log_cursor=0,
        **fields,
    )
    run.jobs.append(job)
    return job


def make_instance(name: str = "local", cpus: int = 4, memory_mib: int = 8192, **agent: Any) -> InstanceModel:
    resources = InstanceResources(cpus=cpus, memory_mib=memory_mib, disk_mib=100_000)
    return InstanceModel(
        id=new_id(),
        name=f"{name}-{new_id()[:8]}",
        backend="local",
        region="local",
        hostname="127.0.0.1",
        status="idle",
        resources=resources.model_dump_json(),
        agent=json.dumps({"url": "http://agent.test", **agent}),
    )
