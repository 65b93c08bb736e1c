"""The server's limits on what one request or one project may ask for (README "Limits").

They sit below the hard bounds of `dstack.core.limits`, which every configuration obeys, and
can be changed per server through environment variables, read once into `ServerSettings`.
Each refusal names the field and the setting that would allow it.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.archives import (
    DEFAULT_MAX_EXTRACTED_BYTES,
    DEFAULT_MAX_FILES,
    ArchiveTooLarge,
    ExtractBudget,
    scan_tar,
)
from dstack.core.domain_errors import ErrorKind
from dstack.core.models.configurations import (
    BaseRunConfiguration,
    ServerlessConfiguration,
    ServiceConfiguration,
    TaskConfiguration,
)
from dstack.core.models.runs import JobStatus
from dstack.server.errors import InvalidRequest

MIB = 1024 * 1024


class QuotaExceeded(InvalidRequest):
    kind = ErrorKind.QUOTA_EXCEEDED
    code = "quota_exceeded"


class BodyTooLarge(InvalidRequest):
    kind = ErrorKind.TOO_LARGE
    code = "too_large"


@dataclass(frozen=True)
class ServerLimits:
    max_nodes: int = 64
    max_replicas: int = 64
    max_workers: int = 64
    max_active_jobs_per_project: int = 256
    max_body_bytes: int = 16 * MIB
    code_extracted_limit_bytes: int = DEFAULT_MAX_EXTRACTED_BYTES
    code_max_files: int = DEFAULT_MAX_FILES

    #: the environment variable behind each limit
    SETTINGS = {
        "max_nodes": "DSTACK_SERVER_MAX_NODES",
        "max_replicas": "DSTACK_SERVER_MAX_REPLICAS",
        "max_workers": "DSTACK_SERVER_MAX_WORKERS",
        "max_active_jobs_per_project": "DSTACK_SERVER_MAX_ACTIVE_JOBS_PER_PROJECT",
        "max_body_bytes": "DSTACK_SERVER_MAX_BODY_SIZE",
        "code_extracted_limit_bytes": "DSTACK_SERVER_CODE_EXTRACTED_LIMIT",
        "code_max_files": "DSTACK_SERVER_CODE_MAX_FILES",
    }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerLimits:
        env = os.environ if environ is None else environ
        values = {}
        for name, var in cls.SETTINGS.items():
            raw = env.get(var)
            if not raw:
                continue
            try:
                values[name] = int(raw)
            except ValueError:
                raise ValueError(f"{var} must be a whole number, not {raw!r}") from None
            if values[name] < 1:
                raise ValueError(f"{var} must be at least 1, not {raw}")
        return cls(**values)


def check_run_limits(conf: BaseRunConfiguration, limits: ServerLimits) -> None:
    """Refuse a run bigger than this server allows (400, naming the field and the setting)."""
    checks: list[tuple[str, int | None, int, str]] = []
    if isinstance(conf, TaskConfiguration):
        checks.append(("nodes", conf.nodes, limits.max_nodes, "max_nodes"))
    if isinstance(conf, ServiceConfiguration):
        checks.append(("replicas", conf.replicas.max, limits.max_replicas, "max_replicas"))
    if isinstance(conf, ServerlessConfiguration):
        checks.append(("workers", conf.workers.max, limits.max_workers, "max_workers"))
    for field, value, limit, setting in checks:
        if value is not None and value > limit:
            raise InvalidRequest(
                f"{field}: {value} is more than this server allows per run ({limit}; "
                f"the server's {ServerLimits.SETTINGS[setting]} sets it)",
                fields=[field],
            )


async def check_project_quota(session: AsyncSession, project_id: str, new_jobs: int, limits: ServerLimits) -> None:
    """Refuse (429) a submission that would take the project's active jobs over its quota."""
    from dstack.server.models import JobModel

    if new_jobs <= 0:
        return
    active = (
        await session.execute(
            select(func.count(JobModel.id)).where(
                JobModel.project_id == project_id,
                JobModel.status.in_(JobStatus.active_statuses()),
            )
        )
    ).scalar_one()
    limit = limits.max_active_jobs_per_project
    if active + new_jobs > limit:
        raise QuotaExceeded(
            f"the project has {active} active jobs and this run adds {new_jobs}: more than its quota of {limit} "
            f"(the server's {ServerLimits.SETTINGS['max_active_jobs_per_project']} sets it); stop some runs first"
        )


def check_code_archive(blob: bytes, limits: ServerLimits) -> None:
    """Read an uploaded code archive through, refusing (400) what is not a tar archive or
    would extract to more than the limits; called in a thread (it decompresses)."""
    if not blob:
        return
    budget = ExtractBudget(limits.code_extracted_limit_bytes, limits.code_max_files)
    try:
        scan_tar(io.BytesIO(blob), budget)
    except ArchiveTooLarge as e:
        raise InvalidRequest(
            f"{e} (the server allows {limits.code_extracted_limit_bytes // MIB} MiB and "
            f"{limits.code_max_files} files: {ServerLimits.SETTINGS['code_extracted_limit_bytes']}, "
            f"{ServerLimits.SETTINGS['code_max_files']})"
        ) from None
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise InvalidRequest(f"the code archive is not a readable tar archive: {e}") from None
