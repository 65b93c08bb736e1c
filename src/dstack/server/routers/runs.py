"""Runs: plan, submit/apply, list, get, stop, delete; and their logs."""

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.models.runs import RunSpec, RunType
from dstack.server.db import get_database, get_session
from dstack.server.models import ProjectModel, RunModel, UserModel
from dstack.server.routers import dstack_wire
from dstack.server.routers.projects import user_projects
from dstack.server.security import require_project_member, require_user
from dstack.server.services import logs as logs_service
from dstack.server.services import runs as runs_service
from dstack.server.services import secret_store
from dstack.server.services.log_window import log_window

router = APIRouter(tags=["runs"])


class RunSpecRequest(BaseModel):
    run_spec: RunSpec
    #: dstack's `dstack offer`: only the offers matter, the configuration is a placeholder
    for_offers_only: bool = False


class PlanToApply(BaseModel):
    """A plan from `get_plan`, as the client sends it back: only its `run_spec` is used."""

    model_config = ConfigDict(extra="allow")

    run_spec: RunSpec


class ApplyRequest(BaseModel):
    plan: PlanToApply
    force: bool = False


#: JSON numbers beyond this do not fit the database's 64-bit integers
MAX_INT = 2**63 - 1


class ListRunsRequest(BaseModel):
    project_name: str | None = Field(default=None, max_length=100)  # /api/runs/list: one project only
    only_active: bool = False
    limit: int = Field(default=1000, ge=1, le=10_000)


class RunNameRequest(BaseModel):
    run_name: str


class StopRunsRequest(BaseModel):
    runs_names: list[str]
    abort: bool = False


class DeleteRunsRequest(BaseModel):
    runs_names: list[str]


class PollLogsRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    run_name: str
    job_num: int = Field(default=0, ge=0, le=MAX_INT)
    replica_num: int = Field(default=0, ge=0, le=MAX_INT)
    start_after: int = Field(default=0, ge=0, le=MAX_INT)
    limit: int = Field(default=1000, ge=0, le=MAX_INT)  # at most 5000 are returned
    wait: float = Field(default=0, ge=0, le=3600)  # at most 30 s are waited
    # dstack's client: one submission, its own cursor (`next_token`), a start time
    job_submission_id: str | None = Field(default=None, max_length=64)
    next_token: str | None = Field(default=None, max_length=20, pattern=r"^[0-9]+$")
    start_time: datetime | None = None
    end_time: datetime | None = None
    descending: bool = False
    diagnose: bool = False

    @field_validator("diagnose")
    @classmethod
    def _not_yet(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            raise ValueError(f"{info.field_name} is not supported yet")
        return value


async def _wire(request: Request, run: RunModel) -> dict[str, Any]:
    wire = request.app.state.run_to_wire(run)
    if run.run_type == RunType.SERVERLESS:
        wire.extra["endpoint_id"] = run.run_name
        wire.extra["endpoint_url"] = f"{request.app.state.settings.url}/v2/{run.run_name}"
        if not wire.status.is_finished():
            status = await request.app.state.serverless_bridge.status(run.run_name)
            if status:
                wire.extra.update(status)
    data = wire.model_dump(mode="json")
    return dstack_wire.run(data, dstack_wire.ssh_entry(request)) if dstack_wire.wants_dstack_shapes(request) else data


@router.post("/api/project/{project_name}/runs/get_plan")
async def get_plan(
    body: RunSpecRequest,
    request: Request,
    member: tuple[UserModel, ProjectModel] = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    user, project = member
    run_spec = dstack_wire.with_user_key(request, user.id, dstack_wire.fold_profile(body.run_spec))
    run_spec = dstack_wire.offers_only_spec(run_spec) if body.for_offers_only else run_spec
    plan = await runs_service.get_plan(session, project, user, run_spec, request.app.state.settings.limits)
    data = plan.model_dump(mode="json")
    return dstack_wire.plan(data) if dstack_wire.wants_dstack_shapes(request) else data


async def _submit(
    request: Request,
    session: AsyncSession,
    member: tuple[UserModel, ProjectModel],
    run_spec: RunSpec,
) -> dict[str, Any]:
    user, project = member
    settings = request.app.state.settings
    run_spec = dstack_wire.with_user_key(request, user.id, run_spec)
    await secret_store.check_references(session, project.id, run_spec.configuration)  # 400 naming unknown ones
    run = await runs_service.submit_run(session, project, user, run_spec, settings.url, settings.limits)
    await request.app.state.on_run_submitted(run)
    request.app.state.pipeline.wake(run.id)  # this run's pass only (others have their own wakes)
    return await _wire(request, run)


@router.post("/api/project/{project_name}/runs/submit")
async def submit(
    body: RunSpecRequest,
    request: Request,
    member: tuple[UserModel, ProjectModel] = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    return await _submit(request, session, member, dstack_wire.fold_profile(body.run_spec))


@router.post("/api/project/{project_name}/runs/apply")
async def apply(
    body: ApplyRequest,
    request: Request,
    member: tuple[UserModel, ProjectModel] = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    run_spec = dstack_wire.fold_profile(body.plan.run_spec)
    user, project = member
    if run_spec.run_name and body.force:
        existing = await runs_service.find_run(session, project, run_spec.run_name)
        if existing is not None and not existing.status.is_finished():
            await runs_service.stop_runs(get_database(), project, [run_spec.run_name], abort=True)
            await session.commit()  # ends this session's read, so the submission sees the stop
    return await _submit(request, session, member, run_spec)


@router.post("/api/project/{project_name}/runs/list")
async def list_project_runs(
    body: ListRunsRequest,
    request: Request,
    member: tuple[UserModel, ProjectModel] = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> list[dict[str, Any]]:
    runs = await runs_service.list_runs(session, [member[1].id], body.only_active, body.limit)
    return [await _wire(request, r) for r in runs]


@router.post("/api/runs/list")
async def list_all_runs(
    body: ListRunsRequest,
    request: Request,
    user: UserModel = Depends(require_user),
    session: AsyncSession = Depends(get_session),
) -> list[dict[str, Any]]:
    projects = [p for p in await user_projects(session, user) if body.project_name in (None, p.name)]
    runs = await runs_service.list_runs(session, [p.id for p in projects], body.only_active, body.limit)
    return [await _wire(request, r) for r in runs]


@router.post("/api/project/{project_name}/runs/get")
async def get_run(
    body: RunNameRequest,
    request: Request,
    member: tuple[UserModel, ProjectModel] = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    return await _wire(request, await runs_service.get_run(session, member[1], body.run_name))


@router.post("/api/project/{project_name}/runs/stop")
async def stop_runs(
    body: StopRunsRequest,
    request: Request,
    member: tuple[UserModel, ProjectModel] = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> None:
    await runs_service.stop_runs(get_database(), member[1], body.runs_names, body.abort)
    request.app.state.pipeline.wake()


@router.post("/api/project/{project_name}/runs/delete")
async def delete_runs(
    body: DeleteRunsRequest,
    member: tuple[UserModel, ProjectModel] = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> None:
    await runs_service.delete_runs(get_database(), member[1], body.runs_names)


@router.post("/api/project/{project_name}/logs/poll")
async def poll_logs(
    body: PollLogsRequest,
    request: Request,
    member: tuple[UserModel, ProjectModel] = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    run = await runs_service.get_run(session, member[1], body.run_name)
    limit = min(max(body.limit, 1), 5000)
    if body.descending or body.end_time is not None:
        # a window of what is stored now (dstack's client: newest first, or up to a time), no waiting
        window = await log_window(
            session,
            run,
            body.job_num,
            body.replica_num,
            int(body.next_token) if body.next_token else (body.start_after or None),
            limit,
            submission_id=body.job_submission_id,
            after_time=body.start_time.timestamp() if body.start_time else None,
            before_time=body.end_time.timestamp() if body.end_time else None,
            descending=body.descending,
        )
        return {**window, "finished": run.status.is_finished() and window["next_token"] is None}
    page = await logs_service.poll_logs(
        session,
        request.app.state.log_notifier,
        run,
        body.job_num,
        body.replica_num,
        int(body.next_token) if body.next_token else body.start_after,
        limit,
        min(max(body.wait, 0), 30),
        submission_id=body.job_submission_id,
        after_time=body.start_time.timestamp() if body.start_time else None,
    )
    # `next_token`: where the next page starts, null when this page holds everything there is now
    # (clients that follow it, as dstack's does, stop there); `cursor` is that position always.
    cursor = page["next_token"]
    page["cursor"] = cursor
    page["next_token"] = str(cursor) if len(page["logs"]) >= limit else None
    return page


@router.post("/api/project/{project_name}/backends/list")
async def list_backends(
    member: tuple[UserModel, ProjectModel] = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> list[dict[str, Any]]:
    instances = await runs_service.list_instances(session)
    names = sorted({i.backend for i in instances})
    return [
        {
            "name": n,
            "config": {"type": n},
            "instances": [i.name for i in instances if i.backend == n],
        }
        for n in names
    ]
