"""What a state's `process_*` function decides; the loop (`loop.py`) applies it to the rows.

A decision names changes, never makes them: the `process_*` functions read rows and the time
and return one of these, so each state's rules are tested without a database or an agent, and
all of a run's changes of one pass are committed together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum

from dstack.core.models.runs import (
    InstanceResources,
    JobStatus,
    JobTerminationReason,
    RunStatus,
    RunTerminationReason,
)
from dstack.server.backends.slurm.registry import SlurmPlacement
from dstack.server.models import InstanceModel, JobModel
from dstack.server.services.offers import Reservation


class Unset(Enum):
    """Marks a field a decision leaves as it is (where None is a value to store)."""

    UNSET = "unset"


UNSET = Unset.UNSET


@dataclass(frozen=True)
class JobEnd:
    """The job ends now, in `status`; a reason given replaces the job's own."""

    status: JobStatus
    reason: JobTerminationReason | None = None
    message: str | None = None


@dataclass(frozen=True)
class Assignment:
    """The job runs on `instance`, holding `reservation` of its resources."""

    instance: InstanceModel
    resources: InstanceResources
    reservation: Reservation


@dataclass(frozen=True)
class StopJob:
    """Mark a job terminating (the agent is told after the commit)."""

    job_id: str
    reason: JobTerminationReason
    message: str | None = None


@dataclass(frozen=True)
class Resubmit:
    """A new submission of one job of a run."""

    replica_num: int
    job_num: int
    submission_num: int


@dataclass
class JobDecision:
    """One job's step: at most one of `end`, `stop`, `assign`; `send_stop` asks the loop to
    tell the job's agent to stop it once the pass is committed."""

    end: JobEnd | None = None
    stop: StopJob | None = None
    assign: Assignment | None = None
    #: the job goes to a Slurm allocation (backends/slurm/allocations.py launches it after the commit)
    slurm: SlurmPlacement | None = None
    send_stop: bool = False
    wake_at: float | None = None


@dataclass
class RunDecision:
    """One run's step. Fields left at their defaults change nothing."""

    status: RunStatus | None = None
    termination_reason: RunTerminationReason | None = None
    error: str | None | Unset = UNSET
    stop_jobs: list[StopJob] = field(default_factory=list)
    resubmit: list[Resubmit] = field(default_factory=list)
    #: added to the run's `resubmission_attempt` (retries and replaced replicas count)
    resubmission_attempts: int = 0
    next_attempt_at: datetime | None | Unset = UNSET
    wake_at: float | None = None


def stop_remaining(
    jobs: list[JobModel],
    reason: JobTerminationReason = JobTerminationReason.TERMINATED_BY_SERVER,
    message: str | None = None,
) -> list[StopJob]:
    """Stops for every job of `jobs` that is still active and not already being stopped (a
    stop under way keeps its own reason)."""
    return [
        StopJob(j.id, reason, message)
        for j in jobs
        if not JobStatus(j.status).is_finished() and j.status != JobStatus.TERMINATING
    ]


def end_run(
    jobs: list[JobModel], reason: RunTerminationReason, error: str | None | Unset, message: str | None = None
) -> RunDecision:
    """The run ends for `reason`: its remaining jobs are stopped, and it is `terminating` until
    they have, or ends at once when none is active."""
    active = [j for j in jobs if not JobStatus(j.status).is_finished()]
    return RunDecision(
        status=RunStatus.TERMINATING if active else reason.to_status(),
        termination_reason=reason,
        error=error,
        stop_jobs=stop_remaining(jobs, message=message),
    )
