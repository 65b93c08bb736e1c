"""Projects and their members. A user sees only projects they belong to (admins see all)."""

from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.names import name_error
from dstack.server.db import get_session
from dstack.server.errors import (
    Forbidden,
    InvalidRequest,
    ResourceExists,
    ResourceNotFound,
)
from dstack.server.models import MemberModel, ProjectModel, UserModel
from dstack.server.routers.users import user_dict
from dstack.server.security import require_project_member, require_user

router = APIRouter(tags=["projects"])


class CreateProjectRequest(BaseModel):
    project_name: str


class Member(BaseModel):
    username: str
    project_role: Literal["admin", "manager", "user"] = "user"


class AddMembersRequest(BaseModel):
    members: list[Member]


class RemoveMembersRequest(BaseModel):
    usernames: list[str]


def project_dict(project: ProjectModel, owner: UserModel | None = None) -> dict[str, Any]:
    """A project as dstack's clients read it: the official 0.22 client requires `owner`, `backends`
    and each member's full user and `permissions`. `backends` is empty: the local backend has no
    configuration that client's backend types describe (`backends/list` names it)."""
    if owner is None:
        owner = next((m.user for m in project.members if m.user_id == project.owner_id), None)
    return {
        "project_id": project.id,
        "project_name": project.name,
        "owner": user_dict(owner) if owner is not None else None,
        "created_at": project.created_at.isoformat() if project.created_at else None,
        "backends": [],
        "members": [
            {
                "user": user_dict(m.user),
                "project_role": m.project_role,
                "permissions": {
                    "can_manage_ssh_fleets": m.project_role in ("admin", "manager"),
                    "can_manage_secrets": m.project_role in ("admin", "manager"),
                },
            }
            for m in project.members
        ],
        "is_public": False,
    }


async def projects_wire(session: AsyncSession, projects: list[ProjectModel]) -> list[dict[str, Any]]:
    """`project_dict` of each, with owners no longer members read in one query."""
    missing = {p.owner_id for p in projects} - {m.user_id for p in projects for m in p.members}
    owners: dict[str, UserModel] = {}
    if missing:
        rows = await session.execute(select(UserModel).where(UserModel.id.in_(missing)))
        owners = {u.id: u for u in rows.scalars()}
    return [project_dict(p, owners.get(p.owner_id)) for p in projects]


async def user_projects(session: AsyncSession, user: UserModel) -> list[ProjectModel]:
    query = select(ProjectModel).where(ProjectModel.deleted.is_(False)).order_by(ProjectModel.name)
    if user.global_role != "admin":
        query = query.join(MemberModel, MemberModel.project_id == ProjectModel.id).where(MemberModel.user_id == user.id)
    return list((await session.execute(query)).scalars().unique())


@router.post("/api/projects/list")
async def list_projects(
    user: UserModel = Depends(require_user),
    session: AsyncSession = Depends(get_session),
) -> list[dict[str, Any]]:
    return await projects_wire(session, await user_projects(session, user))


@router.post("/api/projects/create")
async def create_project(
    body: CreateProjectRequest,
    user: UserModel = Depends(require_user),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    problem = name_error("project", body.project_name)
    if problem is not None:
        raise InvalidRequest(problem, fields=["project_name"])
    if (await session.execute(select(ProjectModel).where(ProjectModel.name == body.project_name))).first():
        raise ResourceExists(f"project '{body.project_name}' already exists")
    project = ProjectModel(name=body.project_name, owner_id=user.id)
    session.add(project)
    await session.flush()
    session.add(MemberModel(project_id=project.id, user_id=user.id, project_role="admin"))
    await session.commit()
    await session.refresh(project, ["members"])
    return (await projects_wire(session, [project]))[0]


@router.post("/api/projects/{project_name}/get")
async def get_project(
    member: tuple[UserModel, ProjectModel] = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    return (await projects_wire(session, [member[1]]))[0]


async def _require_project_admin(session: AsyncSession, user: UserModel, project: ProjectModel) -> None:
    if user.global_role == "admin":
        return
    role = (
        await session.execute(
            select(MemberModel.project_role).where(MemberModel.project_id == project.id, MemberModel.user_id == user.id)
        )
    ).scalar_one_or_none()
    if role not in ("admin", "manager"):
        raise Forbidden("only a project admin or manager may change members")


@router.post("/api/projects/{project_name}/add_members")
async def add_members(
    body: AddMembersRequest,
    member: tuple[UserModel, ProjectModel] = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    user, project = member
    await _require_project_admin(session, user, project)
    for m in body.members:
        target = (await session.execute(select(UserModel).where(UserModel.name == m.username))).scalar_one_or_none()
        if target is None:
            raise ResourceNotFound(f"user '{m.username}' not found")
        existing = (
            await session.execute(
                select(MemberModel).where(
                    MemberModel.project_id == project.id,
                    MemberModel.user_id == target.id,
                )
            )
        ).scalar_one_or_none()
        if existing:
            existing.project_role = m.project_role
        else:
            session.add(
                MemberModel(
                    project_id=project.id,
                    user_id=target.id,
                    project_role=m.project_role,
                )
            )
    await session.commit()
    await session.refresh(project, ["members"])
    return (await projects_wire(session, [project]))[0]


@router.post("/api/projects/{project_name}/remove_members")
async def remove_members(
    body: RemoveMembersRequest,
    member: tuple[UserModel, ProjectModel] = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    user, project = member
    await _require_project_admin(session, user, project)
    for name in body.usernames:
        target = (await session.execute(select(UserModel).where(UserModel.name == name))).scalar_one_or_none()
        if target is None:
            continue
        row = (
            await session.execute(
                select(MemberModel).where(
                    MemberModel.project_id == project.id,
                    MemberModel.user_id == target.id,
                )
            )
        ).scalar_one_or_none()
        if row is not None:
            await session.delete(row)
    await session.commit()
    await session.refresh(project, ["members"])
    return (await projects_wire(session, [project]))[0]
