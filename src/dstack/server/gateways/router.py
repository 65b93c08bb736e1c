"""Gateways' HTTP API: users manage them under /api/project/{p}/gateways/; gateways call back
on /api/proxy/authorize and /api/proxy/wake with their own token."""

import re
import secrets
import socket
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.server.db import get_session
from dstack.server.errors import ResourceExists, ResourceNotFound, ServerClientError
from dstack.server.gateways.manager import GatewayStartError
from dstack.server.gateways.models import GatewayModel
from dstack.server.gateways.urls import public_base
from dstack.server.models import ProjectModel
from dstack.server.security import authenticate, bearer_token, project_for_member, require_project_member

router = APIRouter(tags=["gateways"])

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,40}$")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


class CreateGatewayRequest(BaseModel):
    name: str
    domain: str
    backend: str = "local"
    region: str | None = None
    host: str = "0.0.0.0"
    port: int | None = Field(default=None, ge=1, le=65535)
    tls_cert: str | None = None
    tls_key: str | None = None
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


def gateway_dict(gw: GatewayModel) -> dict:
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
    gw = (await session.execute(
        select(GatewayModel).where(GatewayModel.project_id == project.id, GatewayModel.name == name)
    )).scalar_one_or_none()
    if gw is None:
        raise ResourceNotFound(f"gateway '{name}' not found in project '{project.name}'")
    return gw


async def _project_gateways(session: AsyncSession, project: ProjectModel) -> list[GatewayModel]:
    return list((await session.execute(
        select(GatewayModel).where(GatewayModel.project_id == project.id).order_by(GatewayModel.created_at)
    )).scalars().unique())


def _validate(body: CreateGatewayRequest) -> CreateGatewayRequest:
    if not _NAME.match(body.name):
        raise ServerClientError("gateway name must be lowercase letters, digits and '-', starting with a letter "
                                "(at most 41 characters)", fields=["name"])
    domain = body.domain.strip().strip(".").lower()
    if domain.startswith("*."):
        domain = domain[2:]
    if not _DOMAIN.match(domain) or len(domain) > 253:
        raise ServerClientError(f"invalid domain '{body.domain}'", fields=["domain"])
    if body.backend != "local":
        raise ServerClientError(f"gateways run on the 'local' backend only (got '{body.backend}')", fields=["backend"])
    if bool(body.tls_cert) != bool(body.tls_key):
        raise ServerClientError("tls_cert and tls_key go together", fields=["tls_cert", "tls_key"])
    cert = key = None
    if body.tls_cert:
        cert, key = Path(body.tls_cert).expanduser(), Path(body.tls_key).expanduser()
        for p, f in ((cert, "tls_cert"), (key, "tls_key")):
            if not p.is_absolute():
                raise ServerClientError(f"{f} must be an absolute path on the server host", fields=[f])
            if not p.is_file():
                raise ServerClientError(f"{f}: no such file on the server host: {p}", fields=[f])
    port = body.port or (443 if cert else 80)
    return body.model_copy(update={"domain": domain, "port": port, "tls_cert": str(cert) if cert else None,
                                   "tls_key": str(key) if key else None})


@router.post("/api/project/{project_name}/gateways/create")
async def create_gateway(body: CreateGatewayRequest, request: Request, member=Depends(require_project_member),
                         session: AsyncSession = Depends(get_session)) -> dict:
    _, project = member
    body = _validate(body)
    existing = await _project_gateways(session, project)
    if any(g.name == body.name for g in existing):
        raise ResourceExists(f"gateway '{body.name}' already exists in project '{project.name}'")
    for clash in (await session.execute(select(GatewayModel).where(GatewayModel.port == body.port))).scalars().unique():
        if clash.host == body.host or "0.0.0.0" in (clash.host, body.host):
            raise ServerClientError(f"port {body.port} is taken by gateway '{clash.name}'", fields=["port"])
    make_default = body.default or not any(g.default for g in existing)
    if make_default:
        for g in existing:
            g.default = False
    gw = GatewayModel(project_id=project.id, name=body.name, backend="local", region=body.region or "local",
                      domain=body.domain, host=body.host, port=body.port, tls_cert=body.tls_cert,
                      tls_key=body.tls_key, default=make_default, token=secrets.token_urlsafe(32))
    session.add(gw)
    await session.commit()
    manager = request.app.state.gateways
    try:
        await manager.ensure_running(gw.id)
    except GatewayStartError as e:
        await session.delete(gw)
        await session.commit()
        raise ServerClientError(f"gateway '{body.name}' did not start: {e}")
    await session.refresh(gw)  # pid and status were written by the manager's session
    return gateway_dict(gw)


@router.post("/api/project/{project_name}/gateways/list")
async def list_gateways(member=Depends(require_project_member), session: AsyncSession = Depends(get_session)) -> list[dict]:
    return [gateway_dict(g) for g in await _project_gateways(session, member[1])]


@router.post("/api/project/{project_name}/gateways/get")
async def get_gateway(body: GatewayNameRequest, member=Depends(require_project_member),
                      session: AsyncSession = Depends(get_session)) -> dict:
    return gateway_dict(await _get(session, member[1], body.name))


@router.post("/api/project/{project_name}/gateways/set_default")
async def set_default_gateway(body: GatewayNameRequest, member=Depends(require_project_member),
                              session: AsyncSession = Depends(get_session)) -> dict:
    gw = await _get(session, member[1], body.name)
    for g in await _project_gateways(session, member[1]):
        g.default = g.id == gw.id
    await session.commit()
    return gateway_dict(gw)


@router.post("/api/project/{project_name}/gateways/delete")
async def delete_gateways(body: DeleteGatewaysRequest, request: Request, member=Depends(require_project_member),
                          session: AsyncSession = Depends(get_session)) -> None:
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

async def _calling_gateway(request: Request, session: AsyncSession) -> GatewayModel | JSONResponse:
    token = bearer_token(request)
    if token is None:
        return JSONResponse({"detail": [{"msg": "gateway token required", "code": "not_authenticated"}]}, 401)
    gw = (await session.execute(select(GatewayModel).where(GatewayModel.token == token))).scalar_one_or_none()
    if gw is None:
        return JSONResponse({"detail": [{"msg": "unknown gateway token", "code": "forbidden"}]}, 403)
    return gw


@router.post("/api/proxy/authorize", include_in_schema=False)
async def authorize(body: AuthorizeRequest, request: Request, session: AsyncSession = Depends(get_session)):
    gw = await _calling_gateway(request, session)
    if isinstance(gw, JSONResponse):
        return gw
    allowed = False
    if body.project == gw.project.name and body.token:
        user = await authenticate(session, body.token)
        allowed = user is not None and await project_for_member(session, user, body.project) is not None
    if not allowed:
        return JSONResponse({"allowed": False}, 403)
    return {"allowed": True}


@router.post("/api/proxy/wake", include_in_schema=False)
async def wake(body: WakeRequest, request: Request, session: AsyncSession = Depends(get_session)):
    gw = await _calling_gateway(request, session)
    if isinstance(gw, JSONResponse):
        return gw
    if body.project != gw.project.name:
        return JSONResponse({"detail": [{"msg": "not this gateway's project", "code": "forbidden"}]}, 403)
    await request.app.state.services.wake(body.project, body.run_name)
    return {}
