"""Runs: plans, submission, listing, stopping, and their wire form."""

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.errors import ConfigurationError
from dstack.core.models.configurations import (
    BaseRunConfiguration,
    ServerlessConfiguration,
    ServiceConfiguration,
    parse_run_configuration,
)
from dstack.core.models.resources import ResourcesSpec
from dstack.core.models.runs import (
    InstanceOffer,
    InstanceResources,
    InstanceStatus,
    Job,
    JobPlan,
    JobProvisioningData,
    JobSpec,
    JobStatus,
    JobSubmission,
    JobTerminationReason,
    Run,
    RunPlan,
    RunSpec,
    RunStatus,
    RunTerminationReason,
    RunType,
    ServiceSpec,
)
from dstack.core.names import name_error
from dstack.server import crypto
from dstack.server.backends.slurm.registry import PLAN_MAX_AGE_SECONDS, slurm_backends
from dstack.server.db import Database, retry_on_conflict
from dstack.server.errors import InvalidRequest, ResourceExists, ResourceNotFound
from dstack.server.fleet_models import FleetInstanceModel
from dstack.server.gateways.models import GatewayModel
from dstack.server.gateways.urls import resolve_gateway, service_urls
from dstack.server.limits import ServerLimits, check_project_quota, check_run_limits
from dstack.server.models import InstanceModel, JobModel, ProjectModel, RunModel, UserModel, utcnow
from dstack.server.services import offers
from dstack.server.services.jobs import build_job_spec, check_privileged, check_ssh_key, nodes_count
from dstack.server.services.names import random_run_name
from dstack.server.services.secrets import redact_configuration, redact_env, refuse_redacted, seal_configuration
from dstack.server.services.volumes import volume_homes


def parse_configuration(run_spec: RunSpec) -> BaseRunConfiguration:
    where = f"{run_spec.configuration_path}: " if run_spec.configuration_path else ""
    try:
        return parse_run_configuration(run_spec.configuration, environ={})
    except ConfigurationError as e:
        raise InvalidRequest(f"invalid configuration: {where}{e}", fields=[e.field] if e.field else None) from e
    except (ValueError, TypeError, OverflowError, RecursionError) as e:  # a validator tripped on odd input
        raise InvalidRequest(f"invalid configuration: {where}{type(e).__name__}: {str(e)[:200]}") from e


def requested_run_name(run_spec: RunSpec, conf: BaseRunConfiguration) -> str | None:
    """The name the client asked for (`-n`, else the configuration's `name`), checked against
    dstack's naming rule; `None` when the server is to pick one."""
    if run_spec.run_name is not None:
        problem = name_error("run", run_spec.run_name)
        if problem is not None:
            raise InvalidRequest(problem, fields=["run_name"])
    return run_spec.run_name or conf.name


def check_limits(conf: BaseRunConfiguration, limits: ServerLimits | None) -> None:
    if limits is not None:
        check_run_limits(conf, limits)


def check_engine(conf: BaseRunConfiguration) -> None:
    """Refuse engine settings the engine cannot serve, before anything starts."""
    engine = getattr(conf, "engine", None)
    if engine is None:
        return
    from dstack.server.services.engines import EngineError, check_engine_settings

    try:
        check_engine_settings(engine, gpu_requested=_gpu_requested(conf))
    except EngineError as e:
        raise InvalidRequest(str(e), fields=[e.field]) from e


def _gpu_requested(conf: BaseRunConfiguration) -> bool:
    """At least one GPU, whatever the offer (`gpu: 0..1` may land on a CPU host)."""
    gpu = conf.resources.gpu
    return gpu is not None and (gpu.count.min or 0) > 0


def initial_replicas(conf: BaseRunConfiguration) -> int:
    if isinstance(conf, ServiceConfiguration):
        return conf.replicas.min or 0
    if isinstance(conf, ServerlessConfiguration):
        return 0  # workers are started by the serverless scaler
    return 1


async def list_instances(session: AsyncSession, project_id: str | None = None) -> list[InstanceModel]:
    """Instances a job may be placed on: the server's own, and for a project's jobs that project's
    fleet hosts whose agents are up (`idle`; see services/fleets.py)."""
    fleet_hosts = select(FleetInstanceModel.instance_id)
    where: ColumnElement[bool] = InstanceModel.id.not_in(fleet_hosts)
    if project_id is not None:
        own = InstanceModel.id.in_(fleet_hosts.where(FleetInstanceModel.project_id == project_id))
        where = where | (own & (InstanceModel.status == InstanceStatus.IDLE))
    result = await session.execute(select(InstanceModel).where(where).order_by(InstanceModel.created_at))
    return list(result.scalars())


def instance_resources(instance: InstanceModel) -> InstanceResources:
    return InstanceResources.model_validate(json.loads(instance.resources))


async def held_reservations(session: AsyncSession, instance_id: str) -> list[offers.Reservation]:
    return (await held_by_instance(session, [instance_id]))[instance_id]


async def held_by_instance(session: AsyncSession, instance_ids: list[str]) -> dict[str, list[offers.Reservation]]:
    """What the active jobs on each of these instances hold, in one query (a plan or an assignment
    looks at every instance: one query each was 50 per job on a 50-host fleet)."""
    held: dict[str, list[offers.Reservation]] = {i: [] for i in instance_ids}
    if not instance_ids:
        return held
    result = await session.execute(
        select(JobModel.instance_id, JobModel.reserved).where(
            JobModel.instance_id.in_(instance_ids),
            JobModel.status.in_(JobStatus.active_statuses()),
            JobModel.reserved.is_not(None),
        )
    )
    for instance_id, reserved in result:
        if reserved and instance_id in held:
            held[instance_id].append(offers.Reservation.from_dict(json.loads(reserved)))
    return held


async def get_offers(
    session: AsyncSession,
    spec: ResourcesSpec,
    conf: BaseRunConfiguration | None = None,
    project_id: str | None = None,
) -> tuple[list[InstanceOffer], str | None]:
    """Offers that could run the job, free ones first; and, when none, why. With `conf`, its
    placement settings (backends, regions, spot_policy, max_price) filter them too. With
    `project_id`, the project's fleet hosts are offered too."""
    # A Slurm allocation is its own job's alone: Slurm's offers are the partitions (get_plan).
    instances = [i for i in await list_instances(session, project_id) if i.backend != "slurm"]
    homes = await volume_homes(session, project_id, conf) if conf is not None and project_id is not None else None
    found: list[InstanceOffer] = []
    excluded: list[tuple[str, str]] = []
    held = await held_by_instance(session, [i.id for i in instances])
    for inst in instances:
        res = instance_resources(inst)
        if not offers.fits_total(spec, res):
            continue
        why = (
            offers.placement_mismatch(
                conf, inst.backend, inst.region, inst.price, hostname=inst.hostname, volume_homes=homes
            )
            if conf is not None
            else None
        )
        if why is not None:
            excluded.append((inst.name, why))
            continue
        free = offers.reserve(spec, res, held[inst.id]) is not None
        found.append(
            InstanceOffer(
                backend=inst.backend,
                region=inst.region,
                instance_name=inst.name,
                resources=res,
                price=inst.price,
                availability="available" if free else "busy",
            )
        )
    found.sort(key=lambda o: (o.availability != "available", o.price))
    reason = None
    if not found and excluded and conf is not None:
        reason = offers.describe_placement(conf, excluded)
    elif not found:
        reason = offers.describe_shortfall(spec, [(i.name, instance_resources(i)) for i in instances])
    return found, reason


async def get_plan(
    session: AsyncSession, project: ProjectModel, user: UserModel, run_spec: RunSpec, limits: ServerLimits | None = None
) -> RunPlan:
    conf = parse_configuration(run_spec)
    check_engine(conf)
    check_limits(conf, limits)
    run_name = requested_run_name(run_spec, conf)
    current = None
    if run_name:
        existing = await find_run(session, project, run_name)
        if existing is not None:
            current = run_to_wire(existing)
    found, reason = await get_offers(session, conf.resources, conf, project_id=project.id)
    slurm = slurm_backends()
    # The project's Slurm partitions (config.yml); a multi-node task there is one allocation of N
    # nodes, unless it names fleets (a `placement: cluster` fleet's hosts take it).
    if slurm is not None and (nodes_count(conf) == 1 or not conf.fleets):
        await slurm.refresh(max_age=PLAN_MAX_AGE_SECONDS)
        extra = slurm.offers(project.name, conf.resources, conf)
        if extra:
            found, reason = found + extra, None
    spec = build_job_spec(run_name or "<random>", conf, 0, 0)
    spec.env = redact_env(spec.env)
    # Answers carry no credential: the client applies the plan with its own configuration.
    plan_spec = run_spec.model_copy(
        update={"run_name": run_name, "configuration": redact_configuration(conf.model_dump(mode="json"))}
    )
    return RunPlan(
        project_name=project.name,
        user=user.name,
        run_spec=plan_spec,
        job_plans=[JobPlan(job_spec=spec, offers=found, total_offers=len(found), no_offers_reason=reason)],
        current_resource=current,
        action="update" if current is not None and not current.status.is_finished() else "create",
    )


async def find_run(session: AsyncSession, project: ProjectModel, run_name: str) -> RunModel | None:
    result = await session.execute(
        select(RunModel).where(
            RunModel.project_id == project.id, RunModel.run_name == run_name, RunModel.deleted.is_(False)
        )
    )
    return result.scalars().first()


async def submit_run(
    session: AsyncSession,
    project: ProjectModel,
    user: UserModel,
    run_spec: RunSpec,
    server_url: str = "",
    limits: ServerLimits | None = None,
) -> RunModel:
    conf = parse_configuration(run_spec)
    check_limits(conf, limits)
    requested_run_name(run_spec, conf)
    if limits is not None:
        await check_project_quota(session, project.id, initial_replicas(conf) * nodes_count(conf), limits)
    refuse_redacted(conf.model_dump(mode="json"))
    check_engine(conf)
    check_ssh_key(conf, run_spec.ssh_key_pub)
    check_privileged(conf, user.global_role)
    if run_spec.file_archives:  # dstack's official client uploaded them (routers/files.py)
        from dstack.server.services.file_archives import check_archives

        await check_archives(session, user.id, run_spec, limits.code_extracted_limit_bytes if limits else None)
    elif conf.files and not run_spec.files_in_code:
        raise InvalidRequest(
            "files: this client uploaded them neither with the code nor as file archives; "
            "use dstack's own client or dstack's official client, or remove files",
            fields=["files"],
        )
    from dstack.server.services.volumes import check_run_volumes

    await check_run_volumes(session, project, conf)  # named volumes exist and are free
    model_meta = await _model_meta(conf)
    gateway = await resolve_gateway(session, project, conf.gateway) if isinstance(conf, ServiceConfiguration) else None
    run_name = run_spec.run_name or conf.name
    if run_name:
        existing = await find_run(session, project, run_name)
        if existing is not None:
            if not existing.status.is_finished():
                raise ResourceExists(
                    f"run '{run_name}' is still {existing.status}; stop it first (dstack stop {run_name})"
                )
            existing.deleted = True  # a finished run's name is reused, as dstack does
    else:
        taken = set(
            (
                await session.execute(
                    select(RunModel.run_name).where(RunModel.project_id == project.id, RunModel.deleted.is_(False))
                )
            ).scalars()
        )
        run_name = random_run_name(taken)
    # Stored with its credentials and env values encrypted (see services.secrets).
    run_spec = run_spec.model_copy(
        update={"run_name": run_name, "configuration": seal_configuration(conf.model_dump(mode="json"))}
    )
    parse_configuration(run_spec)  # what the pipeline will read: a credential may be too long once encrypted
    now = utcnow()
    run = RunModel(
        project_id=project.id,
        user_id=user.id,
        run_name=run_name,
        submitted_at=now,
        last_processed_at=now,
        status=RunStatus.SUBMITTED,
        run_type=RunType(conf.type),
        run_spec=run_spec.model_dump_json(),
        desired_replica_count=initial_replicas(conf),
        service_spec=service_spec_json(conf, project.name, run_name, server_url, model_meta, gateway),
    )
    session.add(run)
    await session.flush()
    for replica_num in range(run.desired_replica_count):
        for job in new_jobs(run, conf, replica_num, submission_num=0):
            session.add(job)
    await session.commit()
    return await reload_run(session, run.id)


async def _model_meta(conf: BaseRunConfiguration) -> dict[str, Any] | None:
    """For `format: tgi` services, the chat template and eos token, found before anything starts."""
    if not isinstance(conf, ServiceConfiguration) or conf.model is None:
        return None
    import asyncio

    from dstack.server.services.model_meta import ModelMetadataError, resolve_chat_metadata

    if conf.model.format != "tgi":
        return {}
    try:
        meta = await asyncio.to_thread(
            resolve_chat_metadata, conf.model.name, conf.model.chat_template, conf.model.eos_token
        )
    except ModelMetadataError as e:
        raise InvalidRequest(str(e), fields=["model.chat_template"]) from e
    return {"chat_template": meta.chat_template, "eos_token": meta.eos_token, "bos_token": meta.bos_token}


def service_spec_json(
    conf: BaseRunConfiguration,
    project: str,
    run_name: str,
    server_url: str,
    model_meta: dict[str, Any] | None,
    gateway: GatewayModel | None = None,
) -> str | None:
    if not isinstance(conf, ServiceConfiguration):
        return None
    if gateway is not None:  # published at <run>.<domain>, models at gateway.<domain>/v1
        url, model_base = service_urls(gateway, run_name)
    else:  # the in-server proxy
        url, model_base = (
            f"{server_url}/proxy/services/{project}/{run_name}/",
            f"{server_url}/proxy/models/{project}/v1",
        )
    spec: dict[str, Any] = {"url": url}
    if conf.model is not None:
        spec["model"] = {"name": conf.model.name, "type": conf.model.type, "base_url": model_base}
    if model_meta:
        spec["model_meta"] = model_meta
    return json.dumps(spec)


def new_jobs(run: RunModel, conf: BaseRunConfiguration, replica_num: int, submission_num: int) -> list[JobModel]:
    now = utcnow()
    out = []
    for job_num in range(nodes_count(conf)):
        spec = build_job_spec(run.run_name, conf, replica_num, job_num)
        spec.env = crypto.encrypt_env(spec.env)  # decrypted for the agent only, at provisioning
        out.append(
            JobModel(
                run_id=run.id,
                project_id=run.project_id,
                job_num=job_num,
                replica_num=replica_num,
                submission_num=submission_num,
                job_name=spec.job_name,
                submitted_at=now,
                last_processed_at=now,
                status=JobStatus.SUBMITTED,
                job_spec=spec.model_dump_json(),
            )
        )
    return out


def latest_jobs(run: RunModel) -> dict[tuple[int, int], JobModel]:
    """The latest submission of each job, keyed by (replica_num, job_num)."""
    latest: dict[tuple[int, int], JobModel] = {}
    for job in run.jobs:
        key = (job.replica_num, job.job_num)
        if key not in latest or job.submission_num > latest[key].submission_num:
            latest[key] = job
    return latest


async def reload_run(session: AsyncSession, run_id: str) -> RunModel:
    result = await session.execute(
        select(RunModel).where(RunModel.id == run_id).execution_options(populate_existing=True)
    )
    return result.scalar_one()


async def get_run(session: AsyncSession, project: ProjectModel, run_name: str) -> RunModel:
    run = await find_run(session, project, run_name)
    if run is None:
        raise ResourceNotFound(f"run '{run_name}' not found in project '{project.name}'")
    return run


async def list_runs(session: AsyncSession, project_ids: list[str], only_active: bool, limit: int) -> list[RunModel]:
    query = select(RunModel).where(RunModel.project_id.in_(project_ids), RunModel.deleted.is_(False))
    if only_active:
        query = query.where(RunModel.status.notin_(RunStatus.finished_statuses()))
    query = query.order_by(RunModel.submitted_at.desc()).limit(limit)
    return list((await session.execute(query)).scalars())


async def stop_runs(db: Database, project: ProjectModel, names: list[str], abort: bool) -> None:
    """In a session of its own: a retry after a conflict expires every row the session holds."""

    async def stop() -> None:
        for name in names:
            run = await get_run(session, project, name)
            if not run.status.is_finished():
                request_stop(run, abort)
        await session.commit()

    async with db.session() as session:
        await retry_on_conflict(session, stop)


def request_stop(run: RunModel, abort: bool) -> None:
    """Mark a run and its active jobs for stopping; the pipeline does the rest."""
    reason = JobTerminationReason.ABORTED_BY_USER if abort else JobTerminationReason.TERMINATED_BY_USER
    run.status = RunStatus.TERMINATING
    run.termination_reason = RunTerminationReason.ABORTED_BY_USER if abort else RunTerminationReason.STOPPED_BY_USER
    for job in run.jobs:
        if job.status.is_finished():
            continue
        mark_job_terminating(job, reason, abort=abort)


def mark_job_terminating(
    job: JobModel, reason: JobTerminationReason, abort: bool = False, message: str | None = None
) -> None:
    job.termination_reason = reason
    job.termination_reason_message = message
    job.stop_requested = "abort" if abort else "stop"
    job.status = JobStatus.TERMINATING
    job.last_processed_at = utcnow()


async def delete_runs(db: Database, project: ProjectModel, names: list[str]) -> None:
    async def delete() -> None:
        for name in names:
            run = await get_run(session, project, name)
            if not run.status.is_finished():
                raise InvalidRequest(f"run '{name}' is {run.status}; stop it before deleting")
            run.deleted = True
        await session.commit()

    async with db.session() as session:
        await retry_on_conflict(session, delete)


def _aware(dt: datetime | None) -> datetime | None:
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt


def job_to_submission(job: JobModel) -> JobSubmission:
    return JobSubmission(
        id=job.id,
        submission_num=job.submission_num,
        submitted_at=_aware(job.submitted_at),
        started_at=_aware(job.started_at),
        finished_at=_aware(job.finished_at),
        status=job.status,
        termination_reason=job.termination_reason,
        termination_reason_message=job.termination_reason_message,
        exit_status=job.exit_status,
        job_provisioning_data=JobProvisioningData.model_validate_json(job.job_provisioning_data)
        if job.job_provisioning_data
        else None,
    )


def run_to_wire(run: RunModel, service_url: str | None = None) -> Run:
    by_key: dict[tuple[int, int], list[JobModel]] = {}
    for job in sorted(run.jobs, key=lambda j: (j.replica_num, j.job_num, j.submission_num)):
        by_key.setdefault((job.replica_num, job.job_num), []).append(job)
    jobs = [
        Job(job_spec=_redacted_job_spec(subs[-1].job_spec), job_submissions=[job_to_submission(j) for j in subs])
        for _, subs in sorted(by_key.items())
    ]
    run_spec = RunSpec.model_validate_json(run.run_spec)
    run_spec.configuration = redact_configuration(run_spec.configuration)
    service = ServiceSpec.model_validate_json(run.service_spec) if run.service_spec else None
    extra: dict[str, Any] = {}
    return Run(
        id=run.id,
        project_name=run.project.name,
        user=run.user.name,
        run_name=run.run_name,
        submitted_at=_aware(run.submitted_at),
        last_processed_at=_aware(run.last_processed_at),
        status=run.status,
        termination_reason=run.termination_reason,
        error=run.error,
        run_spec=run_spec,
        jobs=jobs,
        service=service,
        extra=extra,
    )


def _redacted_job_spec(stored: str) -> JobSpec:
    spec = JobSpec.model_validate_json(stored)
    spec.env = redact_env(spec.env)
    return spec
