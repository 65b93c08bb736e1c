"""Who may reach which job through the SSH entry, read fresh from the database on every use.

An SSH user name is a job's id (what the wire shapes give dstack's client as the job's
`username`); the keys that open it are the run's `ssh_key_pub` and its owner's user key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from sqlalchemy import select

from dstack.core.models.runs import JobProvisioningData, JobSpec, JobStatus, RunType
from dstack.server.db import Database
from dstack.server.models import JobModel, RunModel
from dstack.server.ssh_entry.keys import EntryKeys

#: a job id as the server makes them (uuid4 text)
JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True)
class JobTarget:
    job_id: str
    run_id: str
    run_type: RunType
    status: JobStatus
    #: the ports the job declares: the only ones forwarded
    ports: frozenset[int]
    jpd: JobProvisioningData | None
    #: OpenSSH public key lines that open this job
    keys: tuple[str, ...]

    @property
    def running(self) -> bool:
        return self.status == JobStatus.RUNNING and self.jpd is not None


async def find_target(db: Database, keys: EntryKeys, job_id: str) -> JobTarget | None:
    """The job named by an SSH user name, or None (no such job, or its run was deleted)."""
    if not JOB_ID.match(job_id):
        return None
    async with db.session() as session:
        row = (
            await session.execute(
                select(JobModel, RunModel).join(RunModel, RunModel.id == JobModel.run_id).where(JobModel.id == job_id)
            )
        ).first()
        if row is None:
            return None
        job, run = row
        if run.deleted:
            return None
        spec = JobSpec.model_validate_json(job.job_spec)
        run_key = _run_key(run.run_spec)
        allowed = tuple(k for k in (run_key, keys.user_public_key(run.user_id)) if k)
        jpd = JobProvisioningData.model_validate_json(job.job_provisioning_data) if job.job_provisioning_data else None
        return JobTarget(
            job_id=job.id,
            run_id=run.id,
            run_type=run.run_type,
            status=job.status,
            ports=frozenset(spec.ports),
            jpd=jpd,
            keys=allowed,
        )


def _run_key(run_spec: str) -> str | None:
    key = json.loads(run_spec).get("ssh_key_pub")
    return key if isinstance(key, str) else None
