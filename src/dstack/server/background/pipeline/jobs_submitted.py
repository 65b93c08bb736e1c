"""A `submitted` job: find an instance with room for it and reserve its share, or wait, or fail.

`load_assign_context` reads what the decision needs (instances, what they hold, port clashes);
`process_submitted_job` decides from it alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.models.configurations import Retry
from dstack.core.models.resources import ResourcesSpec
from dstack.core.models.runs import InstanceResources, JobSpec, JobStatus, JobTerminationReason, RunSpec
from dstack.server.backends.slurm.registry import SlurmPlacement, slurm_backends
from dstack.server.background.pipeline.common import (
    FINISHED_JOB,
    REPLICATED_RUN_TYPES,
    aware,
    capped_timedelta,
)
from dstack.server.background.pipeline.decisions import Assignment, JobDecision, JobEnd
from dstack.server.models import InstanceModel, JobModel, ProjectModel, RunModel
from dstack.server.services import offers
from dstack.server.services.fleets import cluster_candidates
from dstack.server.services.jobs import nodes_count
from dstack.server.services.runs import held_by_instance, instance_resources, list_instances, parse_configuration
from dstack.server.services.volumes import volume_homes


@dataclass(frozen=True)
class Candidate:
    """An instance whose total resources fit the job, with what it holds now."""

    instance: InstanceModel
    resources: InstanceResources
    held: list[offers.Reservation]
    #: why the job cannot share this instance's network, or None
    port_conflict: str | None


@dataclass(frozen=True)
class AssignContext:
    requirements: ResourcesSpec
    retry: Retry | None
    #: replicas of services and workers of endpoints wait for a busy host
    replicated: bool
    submitted_at: datetime
    #: every instance whose agent answers, for the "why nothing fits" message
    instances: list[tuple[str, InstanceResources]]
    candidates: list[Candidate]
    #: an instance's agent is being brought back (seconds)
    recovering: bool
    #: instances that fit but the placement settings rule out, and why (backends, regions, ...)
    placement_excluded: tuple[tuple[str, str], ...] = ()
    #: where the project's Slurm backends would take the job when no instance has room
    slurm: SlurmPlacement | None = None


def process_submitted_job(ctx: AssignContext, now: datetime) -> JobDecision:
    port_conflicts: list[str] = []
    for c in ctx.candidates:
        if c.port_conflict:
            port_conflicts.append(c.port_conflict)
            continue
        reservation = offers.reserve(ctx.requirements, c.resources, c.held)
        if reservation is not None:
            return JobDecision(assign=Assignment(c.instance, c.resources, reservation))
    if ctx.slurm is not None:
        return JobDecision(slurm=ctx.slurm)
    if ctx.recovering:
        # Wait for the agent rather than fail for lack of a host.
        return JobDecision(wake_at=now.timestamp() + 1.0)
    all_ports_taken = bool(port_conflicts) and len(port_conflicts) == len(ctx.candidates)
    waits = (
        bool(ctx.candidates)
        and not all_ports_taken
        and ((ctx.retry is not None and "no-capacity" in ctx.retry.on_events) or ctx.replicated)
    )
    if waits:
        if ctx.retry is None or ctx.retry.duration is None:
            return JobDecision()  # an instance freeing up wakes the pipeline
        give_up = (aware(ctx.submitted_at) or now) + capped_timedelta(ctx.retry.duration)
        if now < give_up:
            return JobDecision(wake_at=give_up.timestamp())
    # A request no host could ever meet fails at once.
    if all_ports_taken:
        msg = "; ".join(port_conflicts)
    elif ctx.candidates:
        msg = f"all instances that fit {ctx.requirements.pretty_format()} are busy with other jobs"
    elif ctx.placement_excluded:
        msg = "no offers match the placement settings: " + "; ".join(f"{n}: {w}" for n, w in ctx.placement_excluded)
    else:
        msg = offers.describe_shortfall(ctx.requirements, ctx.instances)
    return JobDecision(end=JobEnd(JobStatus.FAILED, JobTerminationReason.FAILED_TO_START_DUE_TO_NO_CAPACITY, msg))


async def load_assign_context(
    session: AsyncSession, run: RunModel, job: JobModel, is_down: Callable[[str], bool]
) -> AssignContext:
    """What `process_submitted_job` needs, read now (after earlier assignments of this pass were
    flushed, so their reservations count). `is_down(instance_id)`: its agent is being brought back."""
    spec = JobSpec.model_validate_json(job.job_spec)
    requirements = ResourcesSpec.model_validate(spec.requirements)
    conf = parse_configuration(RunSpec.model_validate_json(run.run_spec))
    every = await list_instances(session, run.project_id)  # the server's own and the project's fleet hosts
    every = [i for i in every if i.backend != "slurm"]  # a Slurm allocation is its own job's alone
    instances = [i for i in every if not is_down(i.id)]
    homes = await volume_homes(session, run.project_id, conf)  # a named volume's host
    candidates = []
    excluded: list[tuple[str, str]] = []
    held_now = await held_by_instance(session, [i.id for i in instances])
    for inst in instances:
        res = instance_resources(inst)
        if not offers.fits_total(requirements, res):
            continue
        why = offers.placement_mismatch(
            conf, inst.backend, inst.region, inst.price, hostname=inst.hostname, volume_homes=homes
        )
        if why is not None:
            excluded.append((inst.name, why))
            continue
        conflict = await port_conflict(session, inst, spec)
        held = [] if conflict else held_now[inst.id]
        candidates.append(Candidate(inst, res, held, conflict))
    cluster = await cluster_candidates(  # a multi-node task on a `placement: cluster` fleet
        session,
        run,
        conf.fleets,
        nodes_count(conf),
        candidates,
        lambda c: c.instance,
        lambda c: not c.port_conflict and offers.reserve(requirements, c.resources, c.held) is not None,
    )
    if cluster is not None:
        candidates = cluster
    slurm = None
    registry = slurm_backends()
    if registry is not None and (nodes_count(conf) == 1 or cluster is None):  # N nodes: one Slurm allocation
        project = (await session.execute(select(ProjectModel.name).where(ProjectModel.id == run.project_id))).scalar()
        slurm = registry.placement(project, requirements, conf) if project else None
    return AssignContext(
        requirements=requirements,
        retry=conf.effective_retry(),
        replicated=run.run_type in REPLICATED_RUN_TYPES,
        submitted_at=run.submitted_at,
        instances=[(i.name, instance_resources(i)) for i in instances],
        candidates=candidates,
        recovering=len(instances) < len(every),
        placement_excluded=tuple(excluded),
        slurm=slurm,
    )


async def port_conflict(session: AsyncSession, inst: InstanceModel, spec: JobSpec) -> str | None:
    """Why the job can't share this instance's network, or None. Only hosts whose agent cannot
    give jobs their own network namespace (not root, not Linux) have this limit."""
    if not spec.ports or json.loads(inst.agent or "{}").get("network_isolation"):
        return None
    rows = await session.execute(
        select(JobModel.job_spec, JobModel.job_name).where(
            JobModel.instance_id == inst.id, JobModel.status.notin_(FINISHED_JOB)
        )
    )
    for other_spec, other_name in rows:
        taken = set(JobSpec.model_validate_json(other_spec).ports) & set(spec.ports)
        if taken:
            return (
                f"port {sorted(taken)[0]} on {inst.name} is already used by job {other_name}, and this host's "
                "agent cannot give jobs their own network namespaces (that needs root on Linux with iproute2)"
            )
    return None
