"""The agent's volume routes: the server makes and removes a volume on this host through them
(a fleet host's volumes live under its agent's home, the server cannot reach that disk itself).

- `POST /api/volumes/{volume_id}` `{"size_bytes": int | null}` → `{"size_enforced": bool}`: the
  volume's directory, and its filesystem image of that size where this host can (volume_image);
  making one that exists again is a no-op.
- `DELETE /api/volumes/{volume_id}` → `{}`: unmounted, image and directory removed.
- `POST /api/volumes/check` `{"path": str}` → `{"is_dir": bool}`: whether a directory registered
  as a volume (`volume_id` of the configuration) exists here.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dstack.agent import volume_image
from dstack.agent.mounts import AgentMount, volumes_dir
from dstack.core.models.volumes import check_absolute_path

MAX_SIZE_BYTES = 1024**5  # 1PB, the configuration's bound


class CreateVolume(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size_bytes: int | None = Field(default=None, gt=0, le=MAX_SIZE_BYTES)


class CheckPath(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(max_length=4096)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return check_absolute_path(v, "path")


def _volume_dir(home: Path, volume_id: str) -> Path:
    try:
        AgentMount(volume_id=volume_id, path="/data")  # the one rule for ids (no '/', no '..')
    except ValueError as e:
        raise HTTPException(400, f"invalid volume id: {volume_id[:130]!r}") from e
    return volumes_dir(home) / volume_id


def volume_routes(home: Path, auth: Callable[..., None]) -> APIRouter:
    router = APIRouter(prefix="/api/volumes", dependencies=[Depends(auth)])

    @router.post("/check")
    async def check(body: CheckPath) -> dict[str, Any]:
        return {"is_dir": await asyncio.to_thread(Path(body.path).is_dir)}

    @router.post("/{volume_id}")
    async def create(volume_id: str, body: CreateVolume) -> dict[str, Any]:
        path = _volume_dir(home, volume_id)
        try:
            enforced = await asyncio.to_thread(volume_image.prepare, path, body.size_bytes)
        except (OSError, subprocess.SubprocessError) as e:
            raise HTTPException(500, f"cannot create the volume's storage on this host: {e}") from e
        return {"size_enforced": enforced}

    @router.delete("/{volume_id}")
    async def delete(volume_id: str) -> dict[str, Any]:
        await asyncio.to_thread(volume_image.remove, _volume_dir(home, volume_id))
        return {}

    return router
