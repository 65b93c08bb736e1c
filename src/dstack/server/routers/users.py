"""Users: who am I, and (admins) create, list, rotate tokens, delete."""

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.names import name_error
from dstack.server.db import get_session
from dstack.server.errors import InvalidRequest, ResourceExists, ResourceNotFound
from dstack.server.models import UserModel
from dstack.server.routers import dstack_wire
from dstack.server.security import hash_token, new_token, require_admin, require_user

router = APIRouter(prefix="/api/users", tags=["users"])


class CreateUserRequest(BaseModel):
    username: str
    global_role: Literal["admin", "user"] = "user"


class UsernameRequest(BaseModel):
    username: str


class DeleteUsersRequest(BaseModel):
    users: list[str]


def user_dict(user: UserModel, token: str | None = None) -> dict[str, Any]:
    """A user as dstack's clients read it (the official 0.22 client requires every field here)."""
    d: dict[str, Any] = {
        "id": user.id,
        "username": user.name,
        "created_at": user.created_at.isoformat() if user.created_at else None,
        "global_role": user.global_role,
        "email": None,
        "active": user.active,
        # any user may create projects here (projects/create checks nothing more)
        "permissions": {"can_create_projects": True},
        "ssh_public_key": None,
    }
    if token is not None:
        d["creds"] = {"token": token}
    return d


@router.post("/get_my_user")
async def get_my_user(request: Request, user: UserModel = Depends(require_user)) -> dict[str, Any]:
    # dstack's client attaches with the user's SSH key pair, which only this answer carries
    return {**user_dict(user), **dstack_wire.user_keys(request, user.id)}


@router.post("/list")
async def list_users(
    _: UserModel = Depends(require_admin), session: AsyncSession = Depends(get_session)
) -> list[dict[str, Any]]:
    return [user_dict(u) for u in (await session.execute(select(UserModel).order_by(UserModel.name))).scalars()]


@router.post("/create")
async def create_user(
    body: CreateUserRequest,
    _: UserModel = Depends(require_admin),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    problem = name_error("user", body.username)
    if problem is not None:
        raise InvalidRequest(problem, fields=["username"])
    if (await session.execute(select(UserModel).where(UserModel.name == body.username))).first():
        raise ResourceExists(f"user '{body.username}' already exists")
    token = new_token()
    user = UserModel(name=body.username, global_role=body.global_role, token_hash=hash_token(token))
    session.add(user)
    await session.commit()
    return user_dict(user, token)


@router.post("/refresh_token")
async def refresh_token(
    body: UsernameRequest,
    me: UserModel = Depends(require_user),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    if body.username != me.name and me.global_role != "admin":
        raise ResourceNotFound(f"user '{body.username}' not found")
    user = (await session.execute(select(UserModel).where(UserModel.name == body.username))).scalar_one_or_none()
    if user is None:
        raise ResourceNotFound(f"user '{body.username}' not found")
    token = new_token()
    user.token_hash = hash_token(token)
    await session.commit()
    return user_dict(user, token)


@router.post("/delete")
async def delete_users(
    body: DeleteUsersRequest,
    _: UserModel = Depends(require_admin),
    session: AsyncSession = Depends(get_session),
) -> None:
    for name in body.users:
        user = (await session.execute(select(UserModel).where(UserModel.name == name))).scalar_one_or_none()
        if user is not None:
            user.active = False
            user.token_hash = hash_token(new_token())  # the old token stops working at once
    await session.commit()
