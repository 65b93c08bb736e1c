"""Wire models of the agent HTTP API (see docs/contracts.md, "Agent HTTP API")."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dstack.agent.mounts import AgentMount
from dstack.core.models.runs import JobProcess

JobState = Literal["submitted", "preparing", "running", "done", "failed", "terminated", "aborted"]
#: the states a job never leaves; the one list, read by the agent and the server's pipeline alike
FINAL_STATES: frozenset[str] = frozenset({"done", "failed", "terminated", "aborted"})

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class RegistryCredentials(BaseModel):
    username: str
    password: str

    def __repr__(self) -> str:  # keep the password out of logs and tracebacks
        return f"RegistryCredentials(username={self.username!r}, password='***')"

    __str__ = __repr__


class AgentJobSubmission(JobProcess):
    """What the server sends to run one job (built by server.background.pipeline.jobs_provisioning):
    the job's process as in its `JobSpec` (the shared `JobProcess` fields: commands, setup, env,
    working_dir, python, image, ports) plus what the host needs; unknown fields are ignored for
    forward compatibility."""

    model_config = ConfigDict(extra="ignore")

    job_id: str
    run_name: str = ""
    # Jobs of one project run as one unprivileged user of their own where the agent isolates jobs
    # (agent.sandbox); jobs without it share the user of "default".
    project_id: str | None = Field(default=None, max_length=128)
    # With an image and no commands: arguments to the image's own entrypoint (e.g. an engine's flags).
    args: list[str] = Field(default_factory=list)
    # Credentials for pulling a private `image` ({"username", "password"}); never logged.
    registry_auth: RegistryCredentials | None = None
    # Names of `env` variables whose values hold project secrets: kept in memory only, never in
    # env.json (a job whose agent restarts before its start fails then as "agent restarted").
    secret_env: list[str] = Field(default_factory=list, max_length=1000)
    gpus: list[int] = Field(default_factory=list)
    # Volumes and host directories mounted into the job (agent.mounts).
    volumes: list[AgentMount] = Field(default_factory=list, max_length=32)
    stop_grace_seconds: float = Field(default=10, ge=0)
    # "isolated": own network namespace (if the host supports it; else it runs as "host").
    network: Literal["host", "isolated"] = "host"
    # Set: the job uses the shared, prepared venv ``cache/venvs/<python>/<venv_key>`` (created on
    # first use, kept across runs and agent restarts) instead of a fresh one of its own.
    venv_key: str | None = None
    # Set for serverless workers: `python script.py` forks a warm zygote of the venv (agent.prewarm).
    prewarm: bool = False
    # Set for serverless workers: dstack's sitecustomize on PYTHONPATH (agent.workersite), which
    # gives the runpod SDK event-driven job loops.
    worker_site: bool = False

    @field_validator("job_id")
    @classmethod
    def _safe_job_id(cls, v: str) -> str:
        # The id names a directory on disk, so it must not contain separators or be "..".
        if not _JOB_ID.match(v) or v in (".", ".."):
            raise ValueError("job_id must be 1-128 characters of letters, digits, '_', '.', '-'")
        return v

    @field_validator("venv_key")
    @classmethod
    def _safe_venv_key(cls, v: str | None) -> str | None:
        # The key names a directory under the cache; "" means no key.
        if not v:
            return None
        if not _JOB_ID.match(v) or v in (".", ".."):
            raise ValueError("venv_key must be 1-128 characters of letters, digits, '_', '.', '-'")
        return v


class StopRequest(BaseModel):
    abort: bool = False


#: the most jobs one `POST /api/metrics` may name (an agent runs far fewer)
MAX_METRICS_BATCH_JOBS = 10_000


class MetricsBatchRequest(BaseModel):
    """`POST /api/metrics`: for each job id, the time after which its samples are wanted."""

    after: dict[str, float] = Field(default_factory=dict, max_length=MAX_METRICS_BATCH_JOBS)
    limit: int = Field(default=1000, ge=1)
