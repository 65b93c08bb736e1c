"""Project volumes, at dstack's paths: `/api/project/{p}/volumes/{list,get,create,delete}`.

Any member of the project may list, create and delete its volumes (as in dstack); see
services.volumes for where a volume lives (the server's host, or a fleet host whose agent makes
and removes it) and when one may be attached or deleted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.models.volumes import VolumeConfiguration
from dstack.server.db import get_session
from dstack.server.errors import InvalidRequest
from dstack.server.models import ProjectModel, UserModel
from dstack.server.security import require_project_member
from dstack.server.services import volumes
from dstack.server.services.instances import InstanceManager

router = APIRouter(prefix="/api/project/{project_name}/volumes", tags=["volumes"])


class GetVolumeRequest(BaseModel):
    name: str = Field(min_length=1, max_length=100)


class CreateVolumeRequest(BaseModel):
    configuration: dict[str, Any]


class DeleteVolumesRequest(BaseModel):
    names: list[str] = Field(min_length=1, max_length=volumes.MAX_NAMES_PER_REQUEST)


def _server_dir(request: Request) -> Path:
    server_dir: Path = request.app.state.settings.server_dir
    return server_dir


def _instances(request: Request) -> InstanceManager | None:
    """The agents of the project's fleet hosts (an `ssh` volume is made and removed by its host's)."""
    instances: InstanceManager | None = getattr(request.app.state, "instances", None)
    return instances


def _configuration(data: dict[str, Any]) -> VolumeConfiguration:
    try:
        return VolumeConfiguration.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        raise InvalidRequest(f"invalid volume configuration: {field}: {msg}", fields=[f"configuration.{field}"]) from e


@router.post("/list")
async def list_volumes(
    request: Request,
    member: tuple[UserModel, ProjectModel] = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> list[dict[str, Any]]:
    _, project = member
    attached = await volumes.attachments(session, project.id)
    return [
        volumes.volume_to_wire(v, project.name, attached.get(v.name, []), _server_dir(request))
        for v in await volumes.list_volumes(session, project)
    ]


@router.post("/get")
async def get_volume(
    body: GetVolumeRequest,
    request: Request,
    member: tuple[UserModel, ProjectModel] = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    _, project = member
    volume = await volumes.get_volume(session, project, body.name)
    attached = await volumes.attachments(session, project.id)
    return volumes.volume_to_wire(volume, project.name, attached.get(volume.name, []), _server_dir(request))


@router.post("/create")
async def create_volume(
    body: CreateVolumeRequest,
    request: Request,
    member: tuple[UserModel, ProjectModel] = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    _, project = member
    conf = _configuration(body.configuration)
    volume = await volumes.create_volume(session, project, conf, _server_dir(request), _instances(request))
    attached = await volumes.attachments(session, project.id)
    return volumes.volume_to_wire(volume, project.name, attached.get(volume.name, []), _server_dir(request))


@router.post("/delete")
async def delete_volumes(
    body: DeleteVolumesRequest,
    request: Request,
    member: tuple[UserModel, ProjectModel] = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    _, project = member
    await volumes.delete_volumes(session, project, body.names, _server_dir(request), _instances(request))
    return {}
