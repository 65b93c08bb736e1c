"""Tokens and access checks. Tokens are random; only their SHA-256 is stored."""

import hashlib
import hmac
import secrets

from fastapi import Depends, HTTPException, Request
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.server.db import get_session
from dstack.server.models import MemberModel, ProjectModel, UserModel


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(request: Request) -> str | None:
    """The token from `Authorization: Bearer <t>` (or a bare token, as RunPod workers send it)."""
    return token_from_authorization(request.headers.get("authorization"))


def token_from_authorization(header: str | None) -> str | None:
    """The token of an Authorization header value: `Bearer <t>`, or a bare `<t>`."""
    if not header:
        return None
    parts = header.split(None, 1)
    if len(parts) == 2 and parts[0].lower() == "bearer":
        return parts[1].strip() or None
    return header.strip() or None


async def authenticate(session: AsyncSession, token: str | None) -> UserModel | None:
    if not token:
        return None
    result = await session.execute(
        select(UserModel).where(UserModel.token_hash == hash_token(token), UserModel.active.is_(True))
    )
    return result.scalar_one_or_none()


async def project_for_member(session: AsyncSession, user: UserModel, project_name: str) -> ProjectModel | None:
    """The project if `user` may use it (a member, or a global admin); None otherwise."""
    result = await session.execute(
        select(ProjectModel).where(ProjectModel.name == project_name, ProjectModel.deleted.is_(False))
    )
    project = result.scalar_one_or_none()
    if project is None:
        return None
    if user.global_role == "admin":
        return project
    member = await session.execute(
        select(MemberModel.id).where(MemberModel.project_id == project.id, MemberModel.user_id == user.id)
    )
    return project if member.first() is not None else None


def error_detail(msg: str, code: str, fields: list[str] | None = None) -> dict:
    item: dict = {"msg": msg, "code": code}
    if fields:
        item["fields"] = fields
    return {"detail": [item]}


async def require_user(request: Request, session: AsyncSession = Depends(get_session)) -> UserModel:
    token = bearer_token(request)
    if token is None:
        raise HTTPException(
            401, detail=error_detail("missing Authorization: Bearer <token> header", "not_authenticated")["detail"]
        )
    user = await authenticate(session, token)
    if user is None:
        raise HTTPException(401, detail=error_detail("invalid or revoked token", "not_authenticated")["detail"])
    return user


async def require_admin(user: UserModel = Depends(require_user)) -> UserModel:
    if user.global_role != "admin":
        raise HTTPException(403, detail=error_detail("only a global admin may do this", "forbidden")["detail"])
    return user


async def require_metrics_reader(request: Request, session: AsyncSession, metrics_token: str | None) -> None:
    """`/metrics` lists every project's services: a global admin or the configured metrics token."""
    token = bearer_token(request)
    if token is None:
        raise HTTPException(
            401, detail=error_detail("missing Authorization: Bearer <token> header", "not_authenticated")["detail"]
        )
    if metrics_token and hmac.compare_digest(token.encode(), metrics_token.encode()):
        return
    user = await authenticate(session, token)
    if user is None:
        raise HTTPException(401, detail=error_detail("invalid or revoked token", "not_authenticated")["detail"])
    if user.global_role != "admin":
        raise HTTPException(
            403,
            detail=error_detail(
                "metrics cover every project: only a global admin or the metrics token may read them", "forbidden"
            )["detail"],
        )


async def require_project_member(
    project_name: str,
    user: UserModel = Depends(require_user),
    session: AsyncSession = Depends(get_session),
) -> tuple[UserModel, ProjectModel]:
    project = await project_for_member(session, user, project_name)
    if project is None:
        # Same answer whether the project is missing or foreign: don't leak names.
        raise HTTPException(
            403,
            detail=error_detail(f"project '{project_name}' does not exist or you are not a member of it", "forbidden")[
                "detail"
            ],
        )
    return user, project
