"""Fleets' HTTP API under /api/project/{p}/fleets/ (dstack's paths: get_plan, apply, list, get,
delete, delete_instances). Private keys come in with the configuration and never go out."""

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.models.fleets import FleetConfiguration
from dstack.server.db import get_session
from dstack.server.security import ProjectMember, require_project_member
from dstack.server.services.fleets import FleetManager

router = APIRouter(prefix="/api/project/{project_name}/fleets", tags=["fleets"])


class FleetSpecRequest(BaseModel):
    configuration: FleetConfiguration


class FleetNameRequest(BaseModel):
    name: str = Field(max_length=100)


class DeleteFleetsRequest(BaseModel):
    names: list[str] = Field(min_length=1, max_length=100)


class DeleteInstancesRequest(BaseModel):
    name: str = Field(max_length=100)
    instance_nums: list[int] = Field(min_length=1, max_length=1000)


def _fleets(request: Request) -> FleetManager:
    manager: FleetManager = request.app.state.fleets
    return manager


@router.post("/get_plan")
async def get_plan(
    body: FleetSpecRequest,
    request: Request,
    member: ProjectMember = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    """Probe each new host over SSH and say what applying would do."""
    return await _fleets(request).plan(session, member[1], body.configuration)


@router.post("/apply")
async def apply(
    body: FleetSpecRequest,
    request: Request,
    member: ProjectMember = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    """Create the fleet, or update it in place (hosts added or removed)."""
    return await _fleets(request).apply(session, member[1], body.configuration)


@router.post("/list")
async def list_fleets(
    request: Request,
    member: ProjectMember = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> list[dict[str, Any]]:
    return await _fleets(request).list_fleets(session, member[1])


@router.post("/get")
async def get(
    body: FleetNameRequest,
    request: Request,
    member: ProjectMember = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    return await _fleets(request).get(session, member[1], body.name)


@router.post("/delete")
async def delete(
    body: DeleteFleetsRequest,
    request: Request,
    member: ProjectMember = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    await _fleets(request).delete(session, member[1], body.names)
    return {}


@router.post("/delete_instances")
async def delete_instances(
    body: DeleteInstancesRequest,
    request: Request,
    member: ProjectMember = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    return await _fleets(request).delete_instances(session, member[1], body.name, body.instance_nums)
