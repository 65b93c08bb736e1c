"""Repos and their code archives (content-addressed)."""

import hashlib
import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.server.db import get_session
from dstack.server.errors import ServerClientError
from dstack.server.models import CodeModel, RepoModel
from dstack.server.security import require_project_member

router = APIRouter(prefix="/api/project/{project_name}/repos", tags=["repos"])


class InitRepoRequest(BaseModel):
    repo_id: str
    repo_info: dict[str, Any] = {}


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
async def init_repo(body: InitRepoRequest, member=Depends(require_project_member), session: AsyncSession = Depends(get_session)) -> dict:
    repo = await _get_or_create_repo(session, member[1].id, body.repo_id)
    repo.info = json.dumps(body.repo_info)
    await session.commit()
    return {"repo_id": repo.name}


@router.post("/upload_code")
async def upload_code(
    repo_id: str, request: Request, member=Depends(require_project_member), session: AsyncSession = Depends(get_session)
) -> dict:
    limit = request.app.state.settings.code_upload_limit_bytes
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServerClientError(
                f"code archive is larger than the server's limit of {limit // (1024 * 1024)} MiB; "
                "exclude large files with .gitignore or .dstackignore"
            )
        chunks.append(chunk)
    blob = b"".join(chunks)
    digest = hashlib.sha256(blob).hexdigest()
    repo = await _get_or_create_repo(session, member[1].id, repo_id)
    exists = (
        await session.execute(select(CodeModel.id).where(CodeModel.repo_id == repo.id, CodeModel.blob_hash == digest))
    ).first()
    if not exists:
        session.add(CodeModel(repo_id=repo.id, blob_hash=digest, blob=blob))
    await session.commit()
    return {"hash": digest}
