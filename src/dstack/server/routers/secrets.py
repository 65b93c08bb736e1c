"""Project secrets, at dstack's paths: `/api/project/{p}/secrets/{list,get,create_or_update,delete}`.

For global admins and the project's admins and managers (403 for other members). `list` and
`create_or_update` answer without values; `get` answers with the value (services.secret_store).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.server.db import get_session
from dstack.server.models import ProjectModel, SecretModel, UserModel
from dstack.server.security import require_project_member
from dstack.server.services import secret_store

router = APIRouter(prefix="/api/project/{project_name}/secrets", tags=["secrets"])

_NAME = Field(min_length=1, max_length=200)


class GetSecretRequest(BaseModel):
    name: str = _NAME


class CreateOrUpdateSecretRequest(BaseModel):
    name: str = _NAME
    value: str = Field(max_length=secret_store.MAX_VALUE_LENGTH)


class DeleteSecretsRequest(BaseModel):
    secrets_names: list[str] = Field(min_length=1, max_length=secret_store.MAX_NAMES_PER_REQUEST)


def _wire(secret: SecretModel, value: str | None = None) -> dict[str, Any]:
    return {"id": secret.id, "name": secret.name, "value": value}


async def _manager(
    member: tuple[UserModel, ProjectModel] = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> ProjectModel:
    user, project = member
    await secret_store.require_manager(session, user, project)
    return project


@router.post("/list")
async def list_secrets(
    project: ProjectModel = Depends(_manager), session: AsyncSession = Depends(get_session)
) -> list[dict[str, Any]]:
    return [_wire(s) for s in await secret_store.list_secrets(session, project)]


@router.post("/get")
async def get_secret(
    body: GetSecretRequest, project: ProjectModel = Depends(_manager), session: AsyncSession = Depends(get_session)
) -> dict[str, Any]:
    secret = await secret_store.get_secret(session, project, body.name)
    return _wire(secret, secret_store.plain_value(secret))


@router.post("/create_or_update")
async def create_or_update_secret(
    body: CreateOrUpdateSecretRequest,
    project: ProjectModel = Depends(_manager),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    return _wire(await secret_store.set_secret(session, project, body.name, body.value))


@router.post("/delete")
async def delete_secrets(
    body: DeleteSecretsRequest, project: ProjectModel = Depends(_manager), session: AsyncSession = Depends(get_session)
) -> dict[str, Any]:
    await secret_store.delete_secrets(session, project, body.secrets_names)
    return {}
