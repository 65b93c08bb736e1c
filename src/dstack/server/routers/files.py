"""`files:` archives of dstack's official client (`/api/files/...`, user-scoped as in its wire).

Its client tars each `files:` entry, uploads it here and names the returned id in
`RunSpec.file_archives`; at provisioning the server puts each archive into the job's code archive at
its path (services.file_archives). Bounded and checked like code uploads; stored once per user+hash.
"""

import asyncio
import hashlib

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import UploadFile

from dstack.server.db import get_session
from dstack.server.errors import InvalidRequest, ResourceNotFound
from dstack.server.limits import check_code_archive
from dstack.server.models import FileArchiveModel, UserModel
from dstack.server.security import require_user

router = APIRouter(prefix="/api/files", tags=["files"])


class GetArchiveByHashRequest(BaseModel):
    hash: str = Field(min_length=64, max_length=64, pattern="^[0-9a-f]{64}$")


async def _find(session: AsyncSession, user_id: str, digest: str) -> FileArchiveModel | None:
    query = select(FileArchiveModel).where(FileArchiveModel.user_id == user_id, FileArchiveModel.blob_hash == digest)
    return (await session.execute(query)).scalar_one_or_none()


@router.post("/get_archive_by_hash")
async def get_archive_by_hash(
    body: GetArchiveByHashRequest,
    user: UserModel = Depends(require_user),
    session: AsyncSession = Depends(get_session),
) -> dict[str, str]:
    archive = await _find(session, user.id, body.hash)
    if archive is None:
        raise ResourceNotFound(f"no file archive with hash {body.hash}")
    return {"id": archive.id, "hash": archive.blob_hash}


@router.post("/upload_archive")
async def upload_archive(
    request: Request,
    user: UserModel = Depends(require_user),
    session: AsyncSession = Depends(get_session),
) -> dict[str, str]:
    limit: int = request.app.state.settings.code_upload_limit_bytes
    async with request.form(max_files=1, max_fields=1) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("upload_archive takes one multipart file named 'file'", fields=["file"])
        blob = await upload.read(limit + 1)
    if len(blob) > limit:  # 400 as dstack's server answers: its client shows only a 400's message
        raise InvalidRequest(
            f"file archive is larger than the server's limit of {limit // (1024 * 1024)} MiB "
            "(DSTACK_SERVER_CODE_UPLOAD_LIMIT); exclude large files with .gitignore or .dstackignore"
        )
    await asyncio.to_thread(check_code_archive, blob, request.app.state.settings.limits)
    digest = hashlib.sha256(blob).hexdigest()
    archive = await _find(session, user.id, digest)
    if archive is None:
        archive = FileArchiveModel(user_id=user.id, blob_hash=digest, blob=blob)
        session.add(archive)
        await session.commit()
    return {"id": archive.id, "hash": digest}
