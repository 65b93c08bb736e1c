"""Repos and their code archives (content-addressed)."""

import asyncio
import hashlib
import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.names import repo_id_error
from dstack.server.db import get_session
from dstack.server.errors import InvalidRequest
from dstack.server.limits import BodyTooLarge, check_code_archive
from dstack.server.models import CodeModel, RepoModel
from dstack.server.security import ProjectMember, require_project_member

router = APIRouter(prefix="/api/project/{project_name}/repos", tags=["repos"])


class InitRepoRequest(BaseModel):
    repo_id: str
    repo_info: dict[str, Any] = {}


def _check_repo_id(repo_id: str) -> None:
    problem = repo_id_error(repo_id)
    if problem is not None:
        raise InvalidRequest(problem, fields=["repo_id"])


async def _get_or_create_repo(session: AsyncSession, project_id: str, repo_id: str) -> RepoModel:
    repo = (
        await session.execute(select(RepoModel).where(RepoModel.project_id == project_id, RepoModel.name == repo_id))
    ).scalar_one_or_none()
    if repo is None:
        repo = RepoModel(project_id=project_id, name=repo_id)
        session.add(repo)
        await session.flush()
    return repo


@router.post("/init")
async def init_repo(
    body: InitRepoRequest,
    member: ProjectMember = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, str]:
    _check_repo_id(body.repo_id)
    repo = await _get_or_create_repo(session, member[1].id, body.repo_id)
    repo.info = json.dumps(body.repo_info)
    await session.commit()
    return {"repo_id": repo.name}


@router.post("/upload_code")
async def upload_code(
    repo_id: str,
    request: Request,
    member: ProjectMember = Depends(require_project_member),
    session: AsyncSession = Depends(get_session),
) -> dict[str, str]:
    _check_repo_id(repo_id)
    limit = request.app.state.settings.code_upload_limit_bytes
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(
                f"code archive is larger than the server's limit of {limit // (1024 * 1024)} MiB "
                "(DSTACK_SERVER_CODE_UPLOAD_LIMIT); exclude large files with .gitignore or .dstackignore"
            )
        chunks.append(chunk)
    blob = b"".join(chunks)
    await asyncio.to_thread(check_code_archive, blob, request.app.state.settings.limits)
    digest = hashlib.sha256(blob).hexdigest()
    repo = await _get_or_create_repo(session, member[1].id, repo_id)
    exists = (
        await session.execute(select(CodeModel.id).where(CodeModel.repo_id == repo.id, CodeModel.blob_hash == digest))
    ).first()
    if not exists:
        session.add(CodeModel(repo_id=repo.id, blob_hash=digest, blob=blob))
    await session.commit()
    return {"hash": digest}
