"""Run and job states, termination reasons and the wire models the server and clients share."""

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from dstack.core.models.configurations import RetryEvent


class RunStatus(StrEnum):
    PENDING = "pending"
    SUBMITTED = "submitted"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    FAILED = "failed"
    DONE = "done"

    def is_finished(self) -> bool:
        return self in (RunStatus.TERMINATED, RunStatus.FAILED, RunStatus.DONE)

    @classmethod
    def finished_statuses(cls) -> list["RunStatus"]:
        return [s for s in cls if s.is_finished()]


class JobStatus(StrEnum):
    SUBMITTED = "submitted"
    PROVISIONING = "provisioning"
    PULLING = "pulling"
    RUNNING = "running"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    ABORTED = "aborted"
    FAILED = "failed"
    DONE = "done"

    def is_finished(self) -> bool:
        return self in (JobStatus.TERMINATED, JobStatus.ABORTED, JobStatus.FAILED, JobStatus.DONE)

    @classmethod
    def finished_statuses(cls) -> list["JobStatus"]:
        return [s for s in cls if s.is_finished()]

    @classmethod
    def active_statuses(cls) -> list["JobStatus"]:
        return [s for s in cls if not s.is_finished()]


class JobTerminationReason(StrEnum):
    FAILED_TO_START_DUE_TO_NO_CAPACITY = "failed_to_start_due_to_no_capacity"
    INTERRUPTED_BY_NO_CAPACITY = "interrupted_by_no_capacity"
    WAITING_INSTANCE_LIMIT_EXCEEDED = "waiting_instance_limit_exceeded"
    INSTANCE_UNREACHABLE = "instance_unreachable"
    CONTAINER_EXITED_WITH_ERROR = "container_exited_with_error"
    EXECUTOR_ERROR = "executor_error"
    CREATING_CONTAINER_ERROR = "creating_container_error"
    PORTS_BINDING_FAILED = "ports_binding_failed"
    DONE_BY_RUNNER = "done_by_runner"
    TERMINATED_BY_USER = "terminated_by_user"
    ABORTED_BY_USER = "aborted_by_user"
    TERMINATED_BY_SERVER = "terminated_by_server"
    MAX_DURATION_EXCEEDED = "max_duration_exceeded"
    SCALED_DOWN = "scaled_down"

    def to_status(self) -> JobStatus:
        return {
            JobTerminationReason.DONE_BY_RUNNER: JobStatus.DONE,
            JobTerminationReason.TERMINATED_BY_USER: JobStatus.TERMINATED,
            JobTerminationReason.TERMINATED_BY_SERVER: JobStatus.TERMINATED,
            JobTerminationReason.SCALED_DOWN: JobStatus.TERMINATED,
            JobTerminationReason.MAX_DURATION_EXCEEDED: JobStatus.TERMINATED,
            JobTerminationReason.ABORTED_BY_USER: JobStatus.ABORTED,
        }.get(self, JobStatus.FAILED)

    def is_retryable_error(self) -> bool:
        return self in (
            JobTerminationReason.CONTAINER_EXITED_WITH_ERROR,
            JobTerminationReason.EXECUTOR_ERROR,
            JobTerminationReason.CREATING_CONTAINER_ERROR,
            JobTerminationReason.PORTS_BINDING_FAILED,
        )

    def retry_event(self) -> RetryEvent | None:
        """The `retry.on_events` value that covers a job ending for this reason (None: no retry
        resubmits it; a stop or a success is never retried)."""
        if self == JobTerminationReason.FAILED_TO_START_DUE_TO_NO_CAPACITY:
            return "no-capacity"
        if self == JobTerminationReason.INSTANCE_UNREACHABLE:
            return "interruption"
        if self.is_retryable_error():
            return "error"
        return None


class RunTerminationReason(StrEnum):
    ALL_JOBS_DONE = "all_jobs_done"
    JOB_FAILED = "job_failed"
    RETRY_LIMIT_EXCEEDED = "retry_limit_exceeded"
    STOPPED_BY_USER = "stopped_by_user"
    ABORTED_BY_USER = "aborted_by_user"
    SERVER_ERROR = "server_error"
    MAX_DURATION_EXCEEDED = "max_duration_exceeded"

    def to_status(self) -> RunStatus:
        if self == RunTerminationReason.ALL_JOBS_DONE:
            return RunStatus.DONE
        if self in (
            RunTerminationReason.STOPPED_BY_USER,
            RunTerminationReason.ABORTED_BY_USER,
            RunTerminationReason.MAX_DURATION_EXCEEDED,
        ):
            return RunStatus.TERMINATED
        return RunStatus.FAILED


class RunType(StrEnum):
    """A run's configuration type: stored as a column at submission, never re-derived from the spec."""

    TASK = "task"
    SERVICE = "service"
    SERVERLESS = "serverless"
    DEV_ENVIRONMENT = "dev-environment"


class InstanceStatus(StrEnum):
    """An instance's lifecycle (dstack's names); the local backend's instance is always `idle`."""

    PENDING = "pending"
    PROVISIONING = "provisioning"
    IDLE = "idle"
    BUSY = "busy"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    #: a fleet host whose SSH connection or agent stopped answering (retried; services/fleets.py)
    UNREACHABLE = "unreachable"


class FileArchiveMapping(BaseModel):
    """dstack's official client uploads each `files:` entry as an archive (`/api/files/upload_archive`)
    and names it here with the entry's job path; the server puts it into the code at provisioning."""

    id: str = Field(max_length=36)
    path: str = Field(min_length=1, max_length=4096)


class RunSpec(BaseModel):
    """What a client submits: the configuration plus where its code is.

    Strings are bounded here; the run name's rule is checked by the server at submission (runs
    stored before the rule existed must still load).
    """

    run_name: str | None = Field(default=None, max_length=100)
    repo_id: str | None = Field(default=None, max_length=200)
    repo_code_hash: str | None = Field(default=None, max_length=64)
    working_dir: str | None = Field(default=None, max_length=4096)
    configuration_path: str | None = Field(default=None, max_length=4096)
    configuration: dict[str, Any]
    ssh_key_pub: str | None = Field(default=None, max_length=16384)
    #: the configuration's `files` are inside the code archive (dstack's own client packs them there)
    files_in_code: bool = False
    #: dstack's official client: its uploaded `files:` archives (server.services.file_archives)
    file_archives: list[FileArchiveMapping] = Field(default_factory=list, max_length=100)
    #: dstack's client sends its profile (`.dstack/profiles.yml`) beside the configuration; the
    #: routers fold it into the configuration (`dstack_wire.fold_profile`); never stored
    profile: dict[str, Any] | None = Field(default=None, exclude=True)


class InstanceResources(BaseModel):
    cpus: int
    memory_mib: int
    disk_mib: int
    gpus: list[dict[str, Any]] = Field(default_factory=list)  # {index, name, memory_mib, vendor}

    def pretty(self) -> str:
        from dstack.core.models.views import pretty_resources

        return pretty_resources(self.cpus, self.memory_mib, self.disk_mib, self.gpus)


class InstanceOffer(BaseModel):
    backend: str
    region: str
    instance_name: str
    resources: InstanceResources
    spot: bool = False
    price: float = 0.0
    availability: str = "available"  # available | busy (fits, but not free now)


class JobProcess(BaseModel):
    """What a job runs and how its process starts, written once for both sides of the seam: the
    server's `JobSpec` (API and database) and the agent's wire submission
    (`dstack.agent.models.AgentJobSubmission`) extend it. They stay two models because each adds
    what only its side has: the server the job's place in the run and its resource request, the
    agent the host's decisions (job id, GPUs, credentials, network, venv)."""

    commands: list[str] = Field(default_factory=list)
    setup: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    working_dir: str | None = None
    python: str | None = None
    image: str | None = None
    ports: list[int] = Field(default_factory=list)
    #: the configuration's `shell` (`sh`, `bash`, an absolute path; None: bash, else sh)
    shell: str | None = Field(default=None, max_length=4096)
    #: the configuration's `entrypoint`: run directly, `commands` are its arguments
    entrypoint: str | None = Field(default=None, max_length=4096)
    #: image jobs: the container's `--user`, HOME inside it (None: the image's), a privileged container
    user: str | None = Field(default=None, max_length=65)
    home_dir: str | None = Field(default=None, max_length=4096)
    privileged: bool = False


class JobSpec(JobProcess):
    job_num: int = 0
    replica_num: int = 0
    job_name: str
    requirements: dict[str, Any] = Field(default_factory=dict)  # ResourcesSpec as dict
    max_duration: int | None = None
    stop_grace_seconds: int = 10
    #: the job is an inference engine (`engine:`, CompletionService): its deaths read "engine crashed: SIGSEGV"
    engine: bool = False


class JobProvisioningData(BaseModel):
    backend: str
    region: str
    instance_id: str
    instance_name: str
    hostname: str
    resources: InstanceResources
    reserved: dict[str, Any] = Field(default_factory=dict)
    price: float = 0.0
    #: where the job's ports are reachable from the host (its network namespace's address)
    address: str | None = None
    network: str = "host"


class JobSubmission(BaseModel):
    id: str
    submission_num: int
    submitted_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    status: JobStatus
    termination_reason: JobTerminationReason | None = None
    termination_reason_message: str | None = None
    exit_status: int | None = None
    job_provisioning_data: JobProvisioningData | None = None


class Job(BaseModel):
    job_spec: JobSpec
    job_submissions: list[JobSubmission]


class ServiceModelSpec(BaseModel):
    name: str
    base_url: str
    type: str = "chat"


class ServiceSpec(BaseModel):
    url: str
    model: ServiceModelSpec | None = None


class Run(BaseModel):
    id: str
    project_name: str
    user: str
    run_name: str
    submitted_at: datetime
    last_processed_at: datetime
    status: RunStatus
    termination_reason: RunTerminationReason | None = None
    error: str | None = None
    run_spec: RunSpec
    jobs: list[Job] = Field(default_factory=list)
    service: ServiceSpec | None = None
    cost: float = 0.0
    extra: dict[str, Any] = Field(default_factory=dict)  # type-specific: serverless endpoint URL, queue


class JobPlan(BaseModel):
    job_spec: JobSpec
    offers: list[InstanceOffer]
    total_offers: int
    max_price: float | None = None
    no_offers_reason: str | None = None


class RunPlan(BaseModel):
    project_name: str
    user: str
    run_spec: RunSpec
    job_plans: list[JobPlan]
    current_resource: Run | None = None
    action: str = "create"  # create | update
