"""ORM tables of serverless endpoints: the durable job queue, workers, stream chunks, webhooks.

Times are epoch seconds (float) so deadlines (TTL, execution timeout, heartbeats) are plain
arithmetic in SQL on both SQLite and PostgreSQL. JSON payloads are stored as text and handed to
workers and clients without re-encoding.
"""

from __future__ import annotations

import time
import uuid

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from dstack.core.tables import Base  # shared with the server: foreign keys to `projects` and `runs` resolve by name

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TIMED_OUT = "TIMED_OUT"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED, TIMED_OUT})


def new_job_id() -> str:
    return str(uuid.uuid4())


class ServerlessEndpointModel(Base):
    """One per `type: serverless` run; `endpoint_id` is the run name (the URL path segment)."""

    __tablename__ = "serverless_endpoints"
    endpoint_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), nullable=True)
    settings: Mapped[str] = mapped_column(Text)  # JSON EndpointSettings
    # JSON list of SHA-256 hashes of valid worker tokens; each server process adds its own and
    # the last few stay valid so workers outlive a server restart.
    worker_token_hashes: Mapped[str] = mapped_column(Text, default="[]")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class ServerlessJobModel(Base):
    __tablename__ = "serverless_jobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_job_id)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("serverless_endpoints.endpoint_id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default=IN_QUEUE)
    input: Mapped[str] = mapped_column(Text)  # JSON
    output: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON (progress while IN_PROGRESS)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook: Mapped[str | None] = mapped_column(Text, nullable=True)
    execution_timeout_ms: Mapped[int] = mapped_column(BigInteger)
    ttl_ms: Mapped[int] = mapped_column(BigInteger)
    low_priority: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # "|w1||w2|": workers the job was requeued away from. A late result from one of them still
    # counts while the job is not finished (first result wins), so a job that a live worker
    # completed is not run again because its result came after a server restart.
    past_workers: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims by workers
    retried: Mapped[int] = mapped_column(Integer, default=0)  # /retry calls
    created_at: Mapped[float] = mapped_column(Float)
    queued_at: Mapped[float] = mapped_column(Float)  # FIFO key; reset by /retry
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    expires_at: Mapped[float] = mapped_column(Float)
    stream_seq: Mapped[int] = mapped_column(Integer, default=0)  # last chunk seq written
    stream_cursor: Mapped[int] = mapped_column(Integer, default=0)  # last chunk seq handed to /stream

    __table_args__ = (
        Index("ix_serverless_jobs_take", "endpoint_id", "status", "low_priority", "queued_at"),
        Index("ix_serverless_jobs_worker", "worker_id", "status"),
        Index("ix_serverless_jobs_expires", "expires_at"),
        Index("ix_serverless_jobs_finished", "finished_at"),
    )


class ServerlessStreamChunkModel(Base):
    __tablename__ = "serverless_stream_chunks"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("serverless_jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    output: Mapped[str] = mapped_column(Text)  # JSON chunk

    __table_args__ = (Index("ix_serverless_stream_chunks_job", "job_id", "seq"),)


class ServerlessWorkerModel(Base):
    """A worker process. Stored states: initializing, ready, unhealthy, stopping; `ready` is shown
    as idle or running depending on whether it holds jobs."""

    __tablename__ = "serverless_workers"
    worker_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("serverless_endpoints.endpoint_id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16), default="initializing")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    last_ping_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    jobs_in_flight: Mapped[int] = mapped_column(Integer, default=0)  # as of the last heartbeat
    runpod_version: Mapped[str | None] = mapped_column(String(40), nullable=True)
    stop_reason: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (Index("ix_serverless_workers_endpoint", "endpoint_id", "state"),)


class ServerlessWebhookModel(Base):
    """A pending or finished webhook POST; outlives the job it reports (no foreign key)."""

    __tablename__ = "serverless_webhook_deliveries"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36))
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)  # JSON status object
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_serverless_webhooks_due", "status", "next_attempt_at"),)
