"""Who is asking: the dashboard's session cookie checked against the users table, and CSRF.

Sign-in takes a user token once and answers with a signed session cookie (`sessions.py`); every
page and partial then loads the user the cookie names and checks it against that user's current
token hash, so membership is decided by the server's own `user_projects`/`project_for_member`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import HTTPException, Request
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.server.models import ProjectModel, UserModel
from dstack.server.security import project_for_member
from dstack.web.sessions import COOKIE, SessionKeys


def session_keys(request: Request) -> SessionKeys:
    keys = getattr(request.app.state, "web_session_keys", None)
    if keys is None:
        keys = SessionKeys.load(request.app.state.settings.server_dir / "web-session.key")
        request.app.state.web_session_keys = keys
    return keys


async def current_user(request: Request, session: AsyncSession) -> UserModel | None:
    keys = session_keys(request)
    cookie = request.cookies.get(COOKIE)
    user_id = keys.user_id(cookie)
    if cookie is None or user_id is None:
        return None
    user = await session.get(UserModel, user_id)
    if user is None or not user.active or not keys.verify(cookie, user.token_hash):
        return None
    return user


def sign_in_needed(request: Request) -> HTTPException:
    """Pages go to the sign-in form; htmx partials ask htmx to navigate there."""
    if request.headers.get("hx-request"):
        return HTTPException(401, "sign in first", headers={"HX-Redirect": "/signin"})
    return HTTPException(303, "sign in first", headers={"Location": "/signin"})


async def require_web_user(request: Request, session: AsyncSession) -> UserModel:
    user = await current_user(request, session)
    if user is None:
        raise sign_in_needed(request)
    return user


async def require_web_project(request: Request, session: AsyncSession, project: str) -> tuple[UserModel, ProjectModel]:
    user = await require_web_user(request, session)
    found = await project_for_member(session, user, project)
    if found is None:
        raise HTTPException(404, f"project '{project}' does not exist or you are not a member of it")
    return user, found


def csrf_token(request: Request) -> str:
    cookie = request.cookies.get(COOKIE)
    return session_keys(request).csrf(cookie) if cookie else ""


def same_origin(request: Request) -> bool:
    """A browser's POST names its origin; one from another site is refused (SameSite covers the rest)."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


def check_post(request: Request, form_token: str | None) -> None:
    cookie = request.cookies.get(COOKIE) or ""
    token = form_token or request.headers.get("x-csrf-token")
    if not same_origin(request) or not session_keys(request).check_csrf(cookie, token):
        raise HTTPException(403, "the form is stale or came from another site: reload the page and try again")
