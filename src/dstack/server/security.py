"""Access checks of the control plane. Tokens are random; only their SHA-256 is stored
(`dstack.core.tokens`). Refusals are domain errors, answered through `dstack.core.http_errors`."""

import hmac

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.tokens import bearer_token as parse_bearer
from dstack.core.tokens import hash_token, new_token
from dstack.proxy.auth import Access
from dstack.server.db import Database, get_session
from dstack.server.errors import Forbidden, NotAuthenticated
from dstack.server.models import MemberModel, ProjectModel, UserModel

__all__ = ["hash_token", "new_token"]  # re-exported: the server's modules take them from here
MISSING_TOKEN = "missing Authorization: Bearer <token> header"
INVALID_TOKEN = "invalid or revoked token"


def bearer_token(request: Request) -> str | None:
    """The request's token: `Authorization: Bearer <t>`, or a bare `<t>` (the API has always taken it)."""
    return parse_bearer(request.headers.get("authorization"), bare=True)


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


async def project_access(db: Database, project: str, token: str | None) -> Access:
    """May this token's user reach `project` (its services, its serverless endpoints)? The hook
    behind the one `AuthCache` that the proxy and `/v2` share."""
    if not token:
        return Access.UNKNOWN_TOKEN
    async with db.session() as session:
        user = await authenticate(session, token)
        if user is None:
            return Access.UNKNOWN_TOKEN
        return Access.ALLOWED if await project_for_member(session, user, project) is not None else Access.DENIED


async def require_user(request: Request, session: AsyncSession = Depends(get_session)) -> UserModel:
    token = bearer_token(request)
    if token is None:
        raise NotAuthenticated(MISSING_TOKEN)
    user = await authenticate(session, token)
    if user is None:
        raise NotAuthenticated(INVALID_TOKEN)
    return user


async def require_admin(user: UserModel = Depends(require_user)) -> UserModel:
    if user.global_role != "admin":
        raise Forbidden("only a global admin may do this")
    return user


async def require_metrics_reader(request: Request, session: AsyncSession, metrics_token: str | None) -> None:
    """`/metrics` lists every project's services: a global admin or the configured metrics token."""
    token = bearer_token(request)
    if token is None:
        raise NotAuthenticated(MISSING_TOKEN)
    if metrics_token and hmac.compare_digest(token.encode(), metrics_token.encode()):
        return
    user = await authenticate(session, token)
    if user is None:
        raise NotAuthenticated(INVALID_TOKEN)
    if user.global_role != "admin":
        raise Forbidden("metrics cover every project: only a global admin or the metrics token may read them")


#: what `require_project_member` gives an endpoint: the caller and the project they are a member of
ProjectMember = tuple[UserModel, ProjectModel]


async def require_project_member(
    project_name: str,
    user: UserModel = Depends(require_user),
    session: AsyncSession = Depends(get_session),
) -> ProjectMember:
    project = await project_for_member(session, user, project_name)
    if project is None:
        # Same answer whether the project is missing or foreign: don't leak names.
        raise Forbidden(f"project '{project_name}' does not exist or you are not a member of it")
    return user, project
