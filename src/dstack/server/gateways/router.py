"""Gateways' HTTP API: users manage them under /api/project/{p}/gateways/; gateways call back
on /api/proxy/authorize and /api/proxy/wake with their own token."""

import hmac
import logging
import re
import secrets
import socket
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.domain_errors import ErrorKind
from dstack.core.http_errors import status_for
from dstack.core.names import name_error
from dstack.server import crypto
from dstack.server.db import get_database, get_session
from dstack.server.errors import Forbidden, InvalidRequest, NotAuthenticated, ResourceExists, ResourceNotFound
from dstack.server.gateways.manager import GatewayStartError
from dstack.server.gateways.models import GatewayModel
from dstack.server.gateways.tls import MAX_PEM, check_bind_address, read_tls_pair
from dstack.server.gateways.urls import public_base
from dstack.server.models import ProjectModel, UserModel, new_id
from dstack.server.security import ProjectMember, bearer_token, project_access, require_project_member

router = APIRouter(tags=["gateways"])
logger = logging.getLogger(__name__)

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


class CreateGatewayRequest(BaseModel):
    name: str
    domain: str = Field(max_length=255)
    backend: str = Field(default="local", max_length=30)
    region: str | None = Field(default=None, max_length=50)
    #: default: 0.0.0.0 for global admins, 127.0.0.1 for other users (who may bind loopback only)
    host: str | None = Field(default=None, max_length=255)
    port: int | None = Field(default=None, ge=1, le=65535)
    #: PEM contents, or (global admins only) an absolute path on the server host
    tls_cert: str | None = Field(default=None, max_length=MAX_PEM)
    tls_key: str | None = Field(default=None, max_length=MAX_PEM)
    default: bool = False


class GatewayNameRequest(BaseModel):
    name: str


class DeleteGatewaysRequest(BaseModel):
    names: list[str]


class AuthorizeRequest(BaseModel):
    project: str
    token: str | None = None


class WakeRequest(BaseModel):
    project: str
    run_name: str


def gateway_dict(gw: GatewayModel) -> dict[str, Any]:
    host = socket.gethostname() if gw.host in ("0.0.0.0", "::", "") else gw.host
    return {
        "name": gw.name,
        "project_name": gw.project.name,
        "backend": gw.backend,
        "region": gw.region,
        "hostname": f"{host}:{gw.port}",
        "domain": gw.domain,
        "wildcard_domain": gw.domain,
        "host": gw.host,
        "port": gw.port,
        "tls": gw.tls,
        "default": gw.default,
        "status": gw.status,
        "status_message": gw.status_message,
        "pid": gw.pid,
        "url": public_base(gw, "gateway"),
        "created_at": gw.created_at.isoformat() if gw.created_at else None,
    }


async def _get(session: AsyncSession, project: ProjectModel, name: str) -> GatewayModel:
    gw = (
        await session.execute(
            select(GatewayModel).where(GatewayModel.project_id == project.id, GatewayModel.name == name)
        )
    ).scalar_one_or_none()
    if gw is None:
        raise ResourceNotFound(f"gateway '{name}' not found in project '{project.name}'")
    return gw


async def _project_gateways(session: AsyncSession, project: ProjectModel) -> list[GatewayModel]:
    return list(
        (
            await session.execute(
                select(GatewayModel).where(GatewayModel.project_id == project.id).order_by(GatewayModel.created_at)
            )
        )
        .scalars()
        .unique()
    )


def _validate(body: CreateGatewayRequest, user: UserModel) -> CreateGatewayRequest:
    problem = name_error("gateway", body.name)
    if problem is not None:
        raise InvalidRequest(problem, fields=["name"])
    domain = body.domain.strip().strip(".").lower()
    if domain.startswith("*."):
        domain = domain[2:]
    if not _DOMAIN.match(domain) or len(domain) > 253:
        raise InvalidRequest(f"invalid domain '{body.domain}'", fields=["domain"])
    if body.backend != "local":
        raise InvalidRequest(f"gateways run on the 'local' backend only (got '{body.backend}')", fields=["backend"])
    if bool(body.tls_cert) != bool(body.tls_key):
        raise InvalidRequest("tls_cert and tls_key go together", fields=["tls_cert", "tls_key"])
    admin = user.global_role == "admin"
    host = check_bind_address(body.host, admin)
    pem = None
    if body.tls_cert and body.tls_key:
        pem = read_tls_pair(body.tls_cert, body.tls_key, admin)
    port = body.port or (443 if pem else 80)
    return body.model_copy(
        update={
            "domain": domain,
            "port": port,
            "host": host,
            "tls_cert": pem[0] if pem else None,
            "tls_key": pem[1] if pem else None,
        }
    )


@router.post("/api/project/{project_name}/gateways/create")
async def create_gateway(
    body: CreateGatewayRequest,
    request: Request,
    member: ProjectMember = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    user, project = member
    body = _validate(body, user)
    existing = await _project_gateways(session, project)
    if any(g.name == body.name for g in existing):
        raise ResourceExists(f"gateway '{body.name}' already exists in project '{project.name}'")
    for clash in (await session.execute(select(GatewayModel).where(GatewayModel.port == body.port))).scalars().unique():
        if clash.host == body.host or "0.0.0.0" in (clash.host, body.host):
            mine = clash.project_id == project.id  # other projects' gateway names are theirs
            raise InvalidRequest(
                f"port {body.port} is taken by " + (f"gateway '{clash.name}'" if mine else "another gateway"),
                fields=["port"],
            )
    make_default = body.default or not any(g.default for g in existing)
    if make_default:
        for g in existing:
            g.default = False
    gw = GatewayModel(
        id=new_id(),
        project_id=project.id,
        name=body.name,
        backend="local",
        region=body.region or "local",
        domain=body.domain,
        host=body.host,
        port=body.port,
        default=make_default,
        token=crypto.encrypt(secrets.token_urlsafe(32)),
    )
    manager = request.app.state.gateways
    if body.tls_cert and body.tls_key:  # validated PEM: the gateway process reads it from 0600 files of its own
        gw.tls_cert, gw.tls_key = manager.store_tls(gw.id, body.tls_cert.encode(), body.tls_key.encode())
    session.add(gw)
    await session.commit()
    try:
        await manager.ensure_running(gw.id)
    except GatewayStartError as e:
        await session.delete(gw)
        await session.commit()
        manager.remove_tls(gw.id)
        logger.warning("gateway %s/%s did not start: %s", project.name, body.name, e)
        # Its log is the server host's business: other users learn that it failed, not the traceback.
        why = f": {e}" if user.global_role == "admin" else " (the server's log says why)"
        raise InvalidRequest(f"gateway '{body.name}' did not start{why}") from e
    await session.refresh(gw)  # pid and status were written by the manager's session
    return gateway_dict(gw)


@router.post("/api/project/{project_name}/gateways/list")
async def list_gateways(
    member: ProjectMember = Depends(require_project_member), session: AsyncSession = Depends(get_session)
) -> list[dict[str, Any]]:
    return [gateway_dict(g) for g in await _project_gateways(session, member[1])]


@router.post("/api/project/{project_name}/gateways/get")
async def get_gateway(
    body: GatewayNameRequest,
    member: ProjectMember = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    return gateway_dict(await _get(session, member[1], body.name))


@router.post("/api/project/{project_name}/gateways/set_default")
async def set_default_gateway(
    body: GatewayNameRequest,
    member: ProjectMember = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, Any]:
    gw = await _get(session, member[1], body.name)
    for g in await _project_gateways(session, member[1]):
        g.default = g.id == gw.id
    await session.commit()
    return gateway_dict(gw)


@router.post("/api/project/{project_name}/gateways/delete")
async def delete_gateways(
    body: DeleteGatewaysRequest,
    request: Request,
    member: ProjectMember = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> None:
    _, project = member
    gws = [await _get(session, project, name) for name in body.names]  # all exist, or nothing is deleted
    await session.commit()
    for gw in gws:
        await request.app.state.gateways.delete_gateway(gw.id)
    session.expunge_all()
    left = await _project_gateways(session, project)
    if left and not any(g.default for g in left):
        left[0].default = True
    await session.commit()


# --- called by gateways -------------------------------------------------------------------


async def _calling_gateway(request: Request, session: AsyncSession) -> GatewayModel:
    token = bearer_token(request)
    if token is None:
        raise NotAuthenticated("gateway token required")
    # Tokens are stored encrypted (each with its own nonce): compare with every gateway's (a handful).
    gw = next(
        (
            g
            for g in (await session.execute(select(GatewayModel))).scalars().unique()
            if hmac.compare_digest(crypto.decrypt(g.token).encode(), token.encode())
        ),
        None,
    )
    if gw is None:
        raise Forbidden("unknown gateway token")
    return gw


@router.post("/api/proxy/authorize", include_in_schema=False, response_model=None)
async def authorize(
    body: AuthorizeRequest, request: Request, session: AsyncSession = Depends(get_session)
) -> JSONResponse | dict[str, bool]:
    gw = await _calling_gateway(request, session)
    # uncached: the gateway caches the answer itself (a second cache here would double how long a
    # revoked token keeps working there)
    allowed = body.project == gw.project.name and await project_access(get_database(), body.project, body.token)
    if not allowed:
        return JSONResponse({"allowed": False}, status_for(ErrorKind.FORBIDDEN))
    return {"allowed": True}


@router.post("/api/proxy/wake", include_in_schema=False)
async def wake(body: WakeRequest, request: Request, session: AsyncSession = Depends(get_session)) -> dict[str, Any]:
    gw = await _calling_gateway(request, session)
    if body.project != gw.project.name:
        raise Forbidden("not this gateway's project")
    await request.app.state.services.wake(body.project, body.run_name)
    return {}
