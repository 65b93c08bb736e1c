"""Projects and their members. A user sees only projects they belong to (admins see all)."""

from typing import Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.names import name_error
from dstack.server.db import get_session
from dstack.server.errors import Forbidden, InvalidRequest, ResourceExists, ResourceNotFound
from dstack.server.models import MemberModel, ProjectModel, UserModel
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


def project_dict(project: ProjectModel) -> dict:
    return {
        "project_id": project.id,
        "project_name": project.name,
        "members": [{"user": {"username": m.user.name}, "project_role": m.project_role} for m in project.members],
    }


async def user_projects(session: AsyncSession, user: UserModel) -> list[ProjectModel]:
    query = select(ProjectModel).where(ProjectModel.deleted.is_(False)).order_by(ProjectModel.name)
    if user.global_role != "admin":
        query = query.join(MemberModel, MemberModel.project_id == ProjectModel.id).where(MemberModel.user_id == user.id)
    return list((await session.execute(query)).scalars().unique())


@router.post("/api/projects/list")
async def list_projects(
    user: UserModel = Depends(require_user), session: AsyncSession = Depends(get_session)
) -> list[dict]:
    return [project_dict(p) for p in await user_projects(session, user)]


@router.post("/api/projects/create")
async def create_project(
    body: CreateProjectRequest, user: UserModel = Depends(require_user), session: AsyncSession = Depends(get_session)
) -> dict:
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
    return project_dict(project)


@router.post("/api/projects/{project_name}/get")
async def get_project(member=Depends(require_project_member)) -> dict:
    return project_dict(member[1])


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
    body: AddMembersRequest, member=Depends(require_project_member), session: AsyncSession = Depends(get_session)
) -> dict:
    user, project = member
    await _require_project_admin(session, user, project)
    for m in body.members:
        target = (await session.execute(select(UserModel).where(UserModel.name == m.username))).scalar_one_or_none()
        if target is None:
            raise ResourceNotFound(f"user '{m.username}' not found")
        existing = (
            await session.execute(
                select(MemberModel).where(MemberModel.project_id == project.id, MemberModel.user_id == target.id)
            )
        ).scalar_one_or_none()
        if existing:
            existing.project_role = m.project_role
        else:
            session.add(MemberModel(project_id=project.id, user_id=target.id, project_role=m.project_role))
    await session.commit()
    await session.refresh(project, ["members"])
    return project_dict(project)


@router.post("/api/projects/{project_name}/remove_members")
async def remove_members(
    body: RemoveMembersRequest, member=Depends(require_project_member), session: AsyncSession = Depends(get_session)
) -> dict:
    user, project = member
    await _require_project_admin(session, user, project)
    for name in body.usernames:
        target = (await session.execute(select(UserModel).where(UserModel.name == name))).scalar_one_or_none()
        if target is None:
            continue
        row = (
            await session.execute(
                select(MemberModel).where(MemberModel.project_id == project.id, MemberModel.user_id == target.id)
            )
        ).scalar_one_or_none()
        if row is not None:
            await session.delete(row)
    await session.commit()
    await session.refresh(project, ["members"])
    return project_dict(project)
