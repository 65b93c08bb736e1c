"""ORM models of the control plane. Every state change of a run or job is a committed row."""

import uuid
from datetime import UTC, datetime
from enum import Enum as PyEnum
from typing import TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship, validates

from dstack.core.models.runs import (
    InstanceStatus,
    JobStatus,
    JobTerminationReason,
    RunStatus,
    RunTerminationReason,
    RunType,
)
from dstack.server.db import Base


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(DateTime):
    """Stored naive in UTC (SQLite has no time zones); returned aware."""


def _dt() -> DateTime:
    return DateTime(timezone=True)


def _enum(enum_class: type[PyEnum], length: int) -> Enum:
    """A column the ORM reads and writes as `enum_class`, stored as its values in a VARCHAR(`length`).

    Not a native enum and no CHECK constraint: the table stays as the migrations made it (a new
    state needs no migration), and a row holds the same string it always did.
    """
    return Enum(
        enum_class,
        native_enum=False,
        create_constraint=False,
        length=length,
        values_callable=lambda members: [m.value for m in members],
    )


E = TypeVar("E", bound=PyEnum)


def _as(enum_class: type[E], value: E | str | None) -> E | None:
    """Assigning the value's string works too (`job.status = "running"`): the attribute still holds
    the enum, so code reading it never meets a plain string, even before the row is reloaded."""
    return None if value is None else enum_class(value)


class UserModel(Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    global_role: Mapped[str] = mapped_column(String(20), default="user")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(_dt(), default=utcnow)


class ProjectModel(Base):
    __tablename__ = "projects"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(_dt(), default=utcnow)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    members: Mapped[list["MemberModel"]] = relationship(back_populates="project", lazy="selectin")


class MemberModel(Base):
    __tablename__ = "members"
    __table_args__ = (UniqueConstraint("project_id", "user_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    project_role: Mapped[str] = mapped_column(String(20), default="user")
    project: Mapped[ProjectModel] = relationship(back_populates="members")
    user: Mapped[UserModel] = relationship(lazy="joined")


class RepoModel(Base):
    __tablename__ = "repos"
    __table_args__ = (UniqueConstraint("project_id", "name"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    info: Mapped[str] = mapped_column(Text, default="{}")


class CodeModel(Base):
    """An uploaded code archive, content-addressed so the same tree is stored once."""

    __tablename__ = "codes"
    __table_args__ = (UniqueConstraint("repo_id", "blob_hash"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    repo_id: Mapped[str] = mapped_column(ForeignKey("repos.id", ondelete="CASCADE"))
    blob_hash: Mapped[str] = mapped_column(String(64))
    blob: Mapped[bytes] = mapped_column(LargeBinary)


class FileArchiveModel(Base):
    """A `files:` archive uploaded by dstack's official client, stored once per user and hash."""

    __tablename__ = "file_archives"
    __table_args__ = (UniqueConstraint("user_id", "blob_hash"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    blob_hash: Mapped[str] = mapped_column(String(64))
    blob: Mapped[bytes] = mapped_column(LargeBinary)


class InstanceModel(Base):
    """A host that runs jobs. The local backend has one: this host."""

    __tablename__ = "instances"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    backend: Mapped[str] = mapped_column(String(30))
    region: Mapped[str] = mapped_column(String(50), default="local")
    hostname: Mapped[str] = mapped_column(String(200))
    status: Mapped[InstanceStatus] = mapped_column(_enum(InstanceStatus, 20), default=InstanceStatus.IDLE)
    resources: Mapped[str] = mapped_column(Text)  # JSON: cpus, memory_mib, disk_mib, gpus
    price: Mapped[float] = mapped_column(Float, default=0.0)
    agent: Mapped[str] = mapped_column(Text, default="{}")  # JSON: url, pid, port, token
    created_at: Mapped[datetime] = mapped_column(_dt(), default=utcnow)

    @validates("status")
    def _status(self, _key: str, value: InstanceStatus | str) -> InstanceStatus | None:
        return _as(InstanceStatus, value)


class RunModel(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    run_name: Mapped[str] = mapped_column(String(100))
    submitted_at: Mapped[datetime] = mapped_column(_dt(), default=utcnow)
    last_processed_at: Mapped[datetime] = mapped_column(_dt(), default=utcnow)
    status: Mapped[RunStatus] = mapped_column(_enum(RunStatus, 20))
    #: set at submission from the configuration's `type` (migration 0007 filled older rows from run_spec)
    run_type: Mapped[RunType] = mapped_column(_enum(RunType, 20), server_default=RunType.TASK.value)
    termination_reason: Mapped[RunTerminationReason | None] = mapped_column(
        _enum(RunTerminationReason, 50), nullable=True
    )
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    run_spec: Mapped[str] = mapped_column(Text)  # JSON RunSpec
    service_spec: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: url, model
    desired_replica_count: Mapped[int] = mapped_column(Integer, default=1)
    resubmission_attempt: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(_dt(), nullable=True)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    #: bumped by every UPDATE; see `db.retry_on_conflict`
    version: Mapped[int] = mapped_column(Integer, nullable=False, server_default="1")
    project: Mapped[ProjectModel] = relationship(lazy="joined")
    user: Mapped[UserModel] = relationship(lazy="joined")
    jobs: Mapped[list["JobModel"]] = relationship(
        back_populates="run", lazy="selectin", order_by="JobModel.submitted_at"
    )

    __table_args__ = (
        Index("ix_runs_project_submitted", "project_id", "submitted_at"),
        Index("ix_runs_status", "status"),
        Index("ix_runs_project_name", "project_id", "run_name"),
    )
    __mapper_args__ = {"version_id_col": version}

    @validates("status")
    def _status(self, _key: str, value: RunStatus | str) -> RunStatus | None:
        return _as(RunStatus, value)

    @validates("run_type")
    def _run_type(self, _key: str, value: RunType | str) -> RunType | None:
        return _as(RunType, value)

    @validates("termination_reason")
    def _termination_reason(self, _key: str, value: RunTerminationReason | str | None) -> RunTerminationReason | None:
        return _as(RunTerminationReason, value)


class JobModel(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    job_num: Mapped[int] = mapped_column(Integer, default=0)
    replica_num: Mapped[int] = mapped_column(Integer, default=0)
    submission_num: Mapped[int] = mapped_column(Integer, default=0)
    job_name: Mapped[str] = mapped_column(String(120))
    submitted_at: Mapped[datetime] = mapped_column(_dt(), default=utcnow)
    last_processed_at: Mapped[datetime] = mapped_column(_dt(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(_dt(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(_dt(), nullable=True)
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, 20))
    termination_reason: Mapped[JobTerminationReason | None] = mapped_column(
        _enum(JobTerminationReason, 50), nullable=True
    )
    termination_reason_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    exit_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    job_spec: Mapped[str] = mapped_column(Text)  # JSON JobSpec
    job_provisioning_data: Mapped[str | None] = mapped_column(Text, nullable=True)
    instance_id: Mapped[str | None] = mapped_column(ForeignKey("instances.id"), nullable=True)
    reserved: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: cpus, memory_mib, gpus
    agent_state: Mapped[str | None] = mapped_column(String(20), nullable=True)
    log_cursor: Mapped[int] = mapped_column(BigInteger, default=0)
    stop_requested: Mapped[str | None] = mapped_column(String(20), nullable=True)  # stop | abort
    # a dev environment's last SSH session: opened and closed (routers/tunnel.py, inactivity_duration)
    ssh_opened_at: Mapped[datetime | None] = mapped_column(_dt(), nullable=True)
    ssh_closed_at: Mapped[datetime | None] = mapped_column(_dt(), nullable=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False, server_default="1")
    run: Mapped[RunModel] = relationship(back_populates="jobs")

    __table_args__ = (
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_run", "run_id"),
        Index("ix_jobs_instance", "instance_id"),
    )
    __mapper_args__ = {"version_id_col": version}

    @validates("status")
    def _status(self, _key: str, value: JobStatus | str) -> JobStatus | None:
        return _as(JobStatus, value)

    @validates("termination_reason")
    def _termination_reason(self, _key: str, value: JobTerminationReason | str | None) -> JobTerminationReason | None:
        return _as(JobTerminationReason, value)


class JobLogModel(Base):
    __tablename__ = "job_logs"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    timestamp: Mapped[float] = mapped_column(Float)
    stream: Mapped[str] = mapped_column(String(10))
    data: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (Index("ix_job_logs_job_id", "job_id", "id"),)


class SecretModel(Base):
    """A project's secret (`dstack secret set`); `value` is always `crypto.encrypt`ed."""

    __tablename__ = "secrets"
    __table_args__ = (UniqueConstraint("project_id", "name"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(_dt(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(_dt(), default=utcnow)


class JobMetricsPointModel(Base):
    """One sample of a job's usage, as its agent measured it; older ones are deleted (retention)."""

    __tablename__ = "job_metrics_points"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    timestamp: Mapped[float] = mapped_column(Float)  # unix seconds, the agent's clock
    cpu_percent: Mapped[float] = mapped_column(Float)  # of one core: 200 = two cores busy
    cpu_seconds: Mapped[float] = mapped_column(Float)  # CPU time of the job's processes so far
    memory_bytes: Mapped[int] = mapped_column(BigInteger)  # RSS of the job's process tree
    gpus: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON [{index, util_percent, memory_*}]

    __table_args__ = (
        Index("ix_job_metrics_points_job_ts", "job_id", "timestamp"),
        Index("ix_job_metrics_points_ts", "timestamp"),
    )


class VolumeModel(Base):
    """A project's volume (`type: volume`); which runs have it attached is read from the runs
    themselves (services/volumes.py), so nothing needs releasing when a run ends."""

    __tablename__ = "volumes"
    __table_args__ = (UniqueConstraint("project_id", "name"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    backend: Mapped[str] = mapped_column(String(20))
    size_gb: Mapped[float | None] = mapped_column(Float, nullable=True)  # enforced where root (volume_image)
    #: an existing directory of the host registered as the volume (`volume_id`); None: one of ours
    external_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    shared: Mapped[bool] = mapped_column(Boolean, default=False)
    configuration: Mapped[str] = mapped_column(Text)  # JSON, as applied
    created_at: Mapped[datetime] = mapped_column(_dt(), default=utcnow)
    #: `ssh`: the fleet and the host (its address) keeping the volume; None on `local`
    region: Mapped[str | None] = mapped_column(String(100), nullable=True)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: `ssh`: whether the host's agent backs the size with a filesystem image (local: read from disk)
    size_enforced: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
