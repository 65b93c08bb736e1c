"""Project volumes: create, list, delete, and who has one attached.

A `local` volume lives on the server's own host: a directory `<local agent home>/volumes/<id>`
(the local agent's data dir; the agent mounts it into jobs, agent/mounts.py), or, registered with
`volume_id`, an existing directory of the host, which delete leaves in place. `size` is enforced
by an ext4 image of that size loop-mounted on the directory where the server is root
(agent/volume_image.py); elsewhere it is only recorded (`size_enforced: false`).

Attachment is read from the runs: a volume is attached to every run not yet finished whose
configuration names it. So nothing needs releasing when a run ends, a run's stop frees its
volumes at once, and a server restart loses nothing. A volume not declared `shared` takes one
run at a time (a second submission is refused naming the run that has it); a volume attached to
a run cannot be deleted.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.agent import volume_image
from dstack.agent.models import AgentJobSubmission
from dstack.core.models.configurations import BaseRunConfiguration
from dstack.core.models.runs import RunStatus
from dstack.core.models.volumes import InstanceMountPoint, VolumeConfiguration, VolumeMountPoint, named_volumes
from dstack.server.errors import InvalidRequest, ResourceExists, ResourceNotFound
from dstack.server.models import ProjectModel, RunModel, VolumeModel

MAX_NAMES_PER_REQUEST = 100
#: the local backend's agent home under the server dir (backends/local.py is started with it)
LOCAL_AGENT_DIR = "local-agent"


def local_volume_dir(server_dir: Path, volume_id: str) -> Path:
    """Where the local agent keeps volume `volume_id` (the agent computes the same path from its home)."""
    return server_dir / LOCAL_AGENT_DIR / "volumes" / volume_id


def volume_path(server_dir: Path, volume: VolumeModel) -> Path:
    return Path(volume.external_path) if volume.external_path else local_volume_dir(server_dir, volume.id)


# --- attachments --------------------------------------------------------------------------------


def _mounted_names(run_spec: str) -> list[str]:
    try:
        entries = json.loads(run_spec).get("configuration", {}).get("volumes") or []
    except (ValueError, AttributeError):
        return []
    return [e["name"] for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)]


async def attachments(session: AsyncSession, project_id: str) -> dict[str, list[str]]:
    """Volume name → the runs (not yet finished) that have it attached, in submission order."""
    rows = await session.execute(
        select(RunModel.run_name, RunModel.run_spec)
        .where(
            RunModel.project_id == project_id,
            RunModel.deleted.is_(False),
            RunModel.status.not_in(RunStatus.finished_statuses()),
        )
        .order_by(RunModel.submitted_at)
    )
    found: dict[str, list[str]] = {}
    for run_name, run_spec in rows:
        for name in _mounted_names(run_spec):
            found.setdefault(name, []).append(run_name)
    return found


# --- storage ------------------------------------------------------------------------------------


async def list_volumes(session: AsyncSession, project: ProjectModel) -> list[VolumeModel]:
    query = select(VolumeModel).where(VolumeModel.project_id == project.id).order_by(VolumeModel.name)
    return list((await session.execute(query)).scalars())


async def find_volume(session: AsyncSession, project_id: str, name: str) -> VolumeModel | None:
    query = select(VolumeModel).where(VolumeModel.project_id == project_id, VolumeModel.name == name)
    return (await session.execute(query)).scalar_one_or_none()


async def get_volume(session: AsyncSession, project: ProjectModel, name: str) -> VolumeModel:
    volume = await find_volume(session, project.id, name)
    if volume is None:
        raise ResourceNotFound(f"volume '{name}' does not exist in project '{project.name}'", fields=["name"])
    return volume


def _stored(conf: VolumeConfiguration) -> str:
    return json.dumps(conf.model_dump(mode="json"), sort_keys=True)


async def create_volume(
    session: AsyncSession, project: ProjectModel, conf: VolumeConfiguration, server_dir: Path
) -> VolumeModel:
    """Create the volume, or answer the existing one when applied again unchanged."""
    existing = await find_volume(session, project.id, conf.name)
    if existing is not None:
        if existing.configuration == _stored(conf):
            return existing
        raise ResourceExists(
            f"volume '{conf.name}' exists with another configuration; delete it first (dstack volume delete "
            f"{conf.name}) or pick another name",
            fields=["name"],
        )
    if conf.volume_id is not None and not os.path.isdir(conf.volume_id):
        raise InvalidRequest(
            f"volume_id {conf.volume_id} is not an existing directory on the server's host", fields=["volume_id"]
        )
    volume = VolumeModel(
        project_id=project.id,
        name=conf.name,
        backend=conf.backend,
        size_gb=float(conf.size) if conf.size is not None else None,
        external_path=conf.volume_id,
        shared=conf.shared,
        configuration=_stored(conf),
    )
    session.add(volume)
    try:
        await session.flush()
    except IntegrityError as e:
        await session.rollback()
        raise ResourceExists(f"volume '{conf.name}' is being created by another request", fields=["name"]) from e
    if volume.external_path is None:
        path = local_volume_dir(server_dir, volume.id)
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            if volume.size_gb is not None and volume_image.why_not_enforced() is None:
                await asyncio.to_thread(volume_image.create, path, int(volume.size_gb * 1024**3))
        except (OSError, subprocess.SubprocessError) as e:
            await session.rollback()
            raise InvalidRequest(f"cannot create the volume's storage on the server's host: {e}") from e
    await session.commit()
    return volume


async def delete_volumes(session: AsyncSession, project: ProjectModel, names: list[str], server_dir: Path) -> None:
    """Delete all of `names` (and the data of the ones we made), or none of them: when one does not
    exist (404) or is attached to a run (400 naming it)."""
    volumes = [await get_volume(session, project, name) for name in dict.fromkeys(names)]
    attached = await attachments(session, project.id)
    busy = [f"'{v.name}' is attached to run {', '.join(attached[v.name])}" for v in volumes if attached.get(v.name)]
    if busy:
        raise InvalidRequest(
            f"cannot delete a volume while a run uses it: {'; '.join(busy)} (stop the run first)", fields=["names"]
        )
    for volume in volumes:
        await session.delete(volume)
    await session.commit()
    for volume in volumes:
        if volume.external_path is None:
            await asyncio.to_thread(volume_image.remove, local_volume_dir(server_dir, volume.id))


# --- runs ---------------------------------------------------------------------------------------


async def check_run_volumes(session: AsyncSession, project: ProjectModel, conf: BaseRunConfiguration) -> None:
    """At submission: every named volume exists, and one not `shared` is attached to no other run."""
    names = named_volumes(conf.volumes)
    if not names:
        return
    # PostgreSQL: the volumes' rows stay locked until the submission commits, so a concurrent
    # submission naming one waits and then sees this run (SQLite ignores FOR UPDATE).
    locked = await session.execute(
        select(VolumeModel)
        .where(VolumeModel.project_id == project.id, VolumeModel.name.in_(names))
        .order_by(VolumeModel.id)
        .with_for_update()
    )
    by_name = {v.name: v for v in locked.scalars()}
    attached = await attachments(session, project.id)
    for name in names:
        volume = by_name.get(name)
        if volume is None:
            raise InvalidRequest(
                f"volume '{name}' does not exist in project '{project.name}' (create it with "
                f"`dstack apply -f` a `type: volume` configuration)",
                fields=["volumes"],
            )
        others = attached.get(name) or []
        if others and not volume.shared:
            raise InvalidRequest(
                f"volume '{name}' is attached to run {', '.join(others)}; a volume takes one run at a time "
                f"unless it is declared shared: true (stop that run first)",
                fields=["volumes"],
            )


async def agent_mounts(session: AsyncSession, project_id: str, conf: BaseRunConfiguration) -> list[dict[str, Any]]:
    """The job's mounts as the agent takes them (agent.mounts.AgentMount): a volume of ours by id
    (the agent keeps it under its home), a registered or instance directory by its host path."""
    out: list[dict[str, Any]] = []
    for m in conf.volumes:
        if isinstance(m, InstanceMountPoint):
            out.append({"instance_path": m.instance_path, "path": m.path})
            continue
        assert isinstance(m, VolumeMountPoint)
        volume = await find_volume(session, project_id, m.name)
        if volume is None:
            raise ResourceNotFound(f"volume '{m.name}' was deleted before the job started", fields=["volumes"])
        if volume.external_path is not None:
            out.append({"instance_path": volume.external_path, "path": m.path})
        else:
            out.append({"volume_id": volume.id, "path": m.path})
    return out


def size_enforced(server_dir: Path, volume: VolumeModel) -> bool:
    """Whether the volume's size is a real limit (a filesystem image of that size backs it)."""
    return volume.external_path is None and volume_image.image_path(local_volume_dir(server_dir, volume.id)).exists()


def volume_to_wire(
    volume: VolumeModel, project_name: str, attached_to: list[str], server_dir: Path | None = None
) -> dict[str, Any]:
    """dstack's volume shape, with what this server adds (`attached_to`, `shared`, `size_enforced`)."""
    return {
        "id": volume.id,
        "name": volume.name,
        "project_name": project_name,
        "configuration": json.loads(volume.configuration),
        "external": volume.external_path is not None,
        "created_at": volume.created_at.isoformat(),
        "status": "active",
        "status_message": None,
        "deleted": False,
        "volume_id": volume.external_path or volume.id,
        "last_processed_at": volume.created_at.isoformat(),
        "provisioning_data": {
            "backend": volume.backend,
            "volume_id": volume.external_path or volume.id,
            "size_gb": volume.size_gb,
            "region": "local",
        },
        "attachments": None,  # dstack's are per instance; runs using it are in attached_to
        "attached_to": attached_to,
        "shared": volume.shared,
        "size_enforced": server_dir is not None and size_enforced(server_dir, volume),
    }


async def with_mounts(
    session: AsyncSession, project_id: str, conf: BaseRunConfiguration, submission: AgentJobSubmission
) -> AgentJobSubmission:
    """The agent's submission with the job's volumes (at provisioning; a volume deleted since
    submission fails the job naming it)."""
    if not conf.volumes:
        return submission
    found = await agent_mounts(session, project_id, conf)
    return AgentJobSubmission.model_validate({**submission.model_dump(), "volumes": found})
