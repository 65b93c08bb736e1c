"""Project volumes: create, list, delete, and who has one attached.

A `local` volume lives on the server's own host: a directory `<local agent home>/volumes/<id>`
(the local agent's data dir; the agent mounts it into jobs, agent/mounts.py), or, registered with
`volume_id`, an existing directory of the host, which delete leaves in place. `size` is enforced
by an ext4 image of that size loop-mounted on the directory where the server is root
(agent/volume_image.py); elsewhere it is only recorded (`size_enforced: false`).

An `ssh` volume lives on one host of a fleet (`region` the fleet, `host` the host's address as the
fleet lists it): `availability_zone` names the host, else the fleet's first reachable host is
taken at create. Its directory (and image) is made and removed by that host's agent
(agent/volumes_api.py) under the agent's home, the same layout as `local`; runs naming it are
placed only on that host (`volume_homes` → offers.placement_mismatch). A host that does not
answer at create or delete refuses the request with nothing changed; a volume whose host is no
longer in an active fleet refuses runs, and delete then forgets it (its data stays on the host).

Attachment is read from the runs: a volume is attached to every run not yet finished whose
configuration names it. So nothing needs releasing when a run ends, a run's stop frees its
volumes at once, and a server restart loses nothing. A volume not declared `shared` takes one
run at a time (a second submission is refused naming the run that has it); a volume attached to
a run cannot be deleted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.agent import volume_image
from dstack.agent.models import AgentJobSubmission
from dstack.core.domain_errors import DomainError, ErrorKind
from dstack.core.models.configurations import BaseRunConfiguration
from dstack.core.models.runs import InstanceStatus, RunStatus
from dstack.core.models.volumes import (
    InstanceMountPoint,
    VolumeConfiguration,
    VolumeHome,
    VolumeMountPoint,
    named_volumes,
)
from dstack.server.agent_client import AgentClient, AgentError
from dstack.server.errors import InvalidRequest, ResourceExists, ResourceNotFound
from dstack.server.fleet_models import FleetInstanceModel, FleetModel
from dstack.server.models import InstanceModel, ProjectModel, RunModel, VolumeModel, new_id
from dstack.server.services.instances import InstanceManager

logger = logging.getLogger(__name__)

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


class HostUnavailable(DomainError):
    """The volume's host cannot be asked now (unreachable, or its agent is being brought back)."""

    kind = ErrorKind.UNAVAILABLE
    code = "host_unreachable"


async def fleet_hosts(
    session: AsyncSession, project_id: str, fleet_name: str
) -> tuple[FleetModel | None, list[tuple[FleetInstanceModel, InstanceModel]]]:
    """The project's active fleet `fleet_name` and its hosts not terminated, in fleet order."""
    fleet = (
        await session.execute(
            select(FleetModel).where(
                FleetModel.project_id == project_id, FleetModel.name == fleet_name, FleetModel.deleted.is_(False)
            )
        )
    ).scalar_one_or_none()
    if fleet is None:
        return None, []
    rows = await session.execute(
        select(FleetInstanceModel, InstanceModel)
        .join(InstanceModel, InstanceModel.id == FleetInstanceModel.instance_id)
        .where(FleetInstanceModel.fleet_id == fleet.id, InstanceModel.status != InstanceStatus.TERMINATED)
        .order_by(FleetInstanceModel.instance_num)
    )
    return fleet, [(fi, inst) for fi, inst in rows.all()]


def _host_client(instances: InstanceManager | None, inst: InstanceModel) -> AgentClient | None:
    """The host's agent client while the host is up (idle or busy, its agent not being recovered)."""
    if instances is None or inst.status not in (InstanceStatus.IDLE, InstanceStatus.BUSY):
        return None
    if not instances.has_client(inst.id) or instances.is_down(inst.id):
        return None
    return instances.client(inst.id)


async def _volume_host(
    session: AsyncSession, project: ProjectModel, volume: VolumeModel
) -> tuple[FleetInstanceModel, InstanceModel] | None:
    """The fleet host keeping an `ssh` volume, or None when it is no longer in an active fleet."""
    _, hosts = await fleet_hosts(session, project.id, volume.region or "")
    return next(((fi, inst) for fi, inst in hosts if fi.hostname == volume.host), None)


async def _choose_host(
    session: AsyncSession, project: ProjectModel, conf: VolumeConfiguration, instances: InstanceManager | None
) -> tuple[FleetInstanceModel, InstanceModel, AgentClient]:
    """The host a new `ssh` volume goes to: `availability_zone`, else the fleet's first reachable host."""
    fleet_name = conf.region or ""
    fleet, hosts = await fleet_hosts(session, project.id, fleet_name)
    if fleet is None:
        raise InvalidRequest(
            f"fleet '{fleet_name}' does not exist in project '{project.name}' (region of a backend ssh volume "
            "is the fleet whose host keeps it; apply the fleet first)",
            fields=["configuration.region"],
        )
    if conf.availability_zone is not None:
        chosen = [(fi, inst) for fi, inst in hosts if conf.availability_zone in (fi.hostname, inst.name)]
        if not chosen:
            listed = ", ".join(fi.hostname for fi, _ in hosts) or "none"
            raise InvalidRequest(
                f"availability_zone {conf.availability_zone} is not a host of fleet '{fleet_name}' (its hosts: "
                f"{listed})",
                fields=["configuration.availability_zone"],
            )
    else:
        chosen = hosts
    for fi, inst in chosen:
        client = _host_client(instances, inst)
        if client is not None and await client.healthy(timeout=5.0):
            return fi, inst, client
    what = f"host {conf.availability_zone}" if conf.availability_zone else "no host"
    states = ", ".join(f"{fi.hostname}: {inst.status.value}" for fi, inst in chosen) or "no hosts"
    raise HostUnavailable(
        f"cannot create volume '{conf.name}': {what} of fleet '{fleet_name}' is reachable now ({states}); "
        "nothing was created, try again when the host is back",
        fields=["configuration.availability_zone" if conf.availability_zone else "configuration.region"],
    )


async def _create_on_host(
    client: AgentClient, fi: FleetInstanceModel, conf: VolumeConfiguration, volume_id: str
) -> bool:
    """Make the volume on its host (or check a registered directory); whether its size is enforced."""
    try:
        if conf.volume_id is not None:
            if not await client.is_dir(conf.volume_id):
                raise InvalidRequest(
                    f"volume_id {conf.volume_id} is not an existing directory on host {fi.hostname}",
                    fields=["configuration.volume_id"],
                )
            return False
        size = int(float(conf.size) * 1024**3) if conf.size is not None else None
        return await client.create_volume(volume_id, size)
    except (httpx.HTTPError, AgentError) as e:
        raise HostUnavailable(
            f"cannot create volume '{conf.name}' on host {fi.hostname}: {e}; nothing was created"
        ) from e


def _same(volume: VolumeModel, conf: VolumeConfiguration) -> bool:
    """Whether `conf` is the volume's configuration as applied (stored before a field was added: the
    field's default)."""
    try:
        return VolumeConfiguration.model_validate(json.loads(volume.configuration)) == conf
    except ValueError:
        return False


async def create_volume(
    session: AsyncSession,
    project: ProjectModel,
    conf: VolumeConfiguration,
    server_dir: Path,
    instances: InstanceManager | None = None,
) -> VolumeModel:
    """Create the volume, or answer the existing one when applied again unchanged. An `ssh`
    volume is made on its host first and stored after, so a host that fails leaves nothing."""
    existing = await find_volume(session, project.id, conf.name)
    if existing is not None:
        if _same(existing, conf):
            return existing
        raise ResourceExists(
            f"volume '{conf.name}' exists with another configuration; delete it first (dstack volume delete "
            f"{conf.name}) or pick another name",
            fields=["name"],
        )
    if conf.backend == "local" and conf.volume_id is not None and not os.path.isdir(conf.volume_id):
        raise InvalidRequest(
            f"volume_id {conf.volume_id} is not an existing directory on the server's host", fields=["volume_id"]
        )
    volume = VolumeModel(
        id=new_id(),
        project_id=project.id,
        name=conf.name,
        backend=conf.backend,
        size_gb=float(conf.size) if conf.size is not None else None,
        external_path=conf.volume_id,
        shared=conf.shared,
        configuration=_stored(conf),
    )
    made_on: AgentClient | None = None
    if conf.backend == "ssh":
        fi, _, client = await _choose_host(session, project, conf, instances)
        volume.region, volume.host = conf.region, fi.hostname
        volume.size_enforced = await _create_on_host(client, fi, conf, volume.id)
        made_on = client if conf.volume_id is None else None
    session.add(volume)
    try:
        await session.flush()
    except IntegrityError as e:
        await session.rollback()
        if made_on is not None:
            await _forget_on_host(made_on, volume)
        raise ResourceExists(f"volume '{conf.name}' is being created by another request", fields=["name"]) from e
    if volume.backend == "local" and volume.external_path is None:
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


async def _forget_on_host(client: AgentClient, volume: VolumeModel) -> None:
    """Best effort: remove a volume just made on its host whose row could not be stored."""
    try:
        await client.delete_volume(volume.id)
    except (httpx.HTTPError, AgentError) as e:
        logger.warning("volume %s: removing it from host %s failed: %s", volume.name, volume.host, e)


async def delete_volumes(
    session: AsyncSession,
    project: ProjectModel,
    names: list[str],
    server_dir: Path,
    instances: InstanceManager | None = None,
) -> None:
    """Delete all of `names` (and the data of the ones we made), or none of them: when one does not
    exist (404), is attached to a run (400 naming it) or lives on a fleet host that does not answer
    (503 naming it). A volume whose host left its fleets is only forgotten (its data stays there).
    A host that fails between its check and its delete is reported with those deleted before it."""
    volumes = [await get_volume(session, project, name) for name in dict.fromkeys(names)]
    attached = await attachments(session, project.id)
    busy = [f"'{v.name}' is attached to run {', '.join(attached[v.name])}" for v in volumes if attached.get(v.name)]
    if busy:
        raise InvalidRequest(
            f"cannot delete a volume while a run uses it: {'; '.join(busy)} (stop the run first)", fields=["names"]
        )
    remote: list[tuple[VolumeModel, AgentClient]] = []
    down: list[str] = []
    for volume in volumes:
        if volume.backend != "ssh" or volume.external_path is not None:
            continue
        found = await _volume_host(session, project, volume)
        if found is None:
            logger.info("volume %s: host %s left fleet %s; forgetting it", volume.name, volume.host, volume.region)
            continue
        client = _host_client(instances, found[1])
        if client is None or not await client.healthy(timeout=5.0):
            down.append(f"'{volume.name}' (host {volume.host} of fleet {volume.region} is {found[1].status.value})")
        else:
            remote.append((volume, client))
    if down:
        raise HostUnavailable(
            f"cannot delete now: {'; '.join(down)} does not answer; nothing was deleted, try again when it is back",
            fields=["names"],
        )
    removed: list[VolumeModel] = []
    for volume, client in remote:
        try:
            await client.delete_volume(volume.id)
        except (httpx.HTTPError, AgentError) as e:
            for gone in removed:  # their data is gone: so are their rows
                await session.delete(gone)
            await session.commit()
            done = f" (deleted: {', '.join(v.name for v in removed)})" if removed else ""
            raise HostUnavailable(
                f"cannot delete volume '{volume.name}' on host {volume.host}: {e}{done}", fields=["names"]
            ) from e
        removed.append(volume)
    for volume in volumes:
        await session.delete(volume)
    await session.commit()
    for volume in volumes:
        if volume.backend == "local" and volume.external_path is None:
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
        if volume.backend == "ssh" and await _volume_host(session, project, volume) is None:
            raise InvalidRequest(
                f"volume '{name}' lives on host {volume.host} of fleet '{volume.region}', which is no longer a host "
                f"of an active fleet in project '{project.name}' (apply the fleet with that host again, or "
                f"delete the volume: its data stays on the host)",
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


def volume_home(volume: VolumeModel) -> VolumeHome:
    if volume.backend == "ssh":
        return VolumeHome("ssh", volume.region or "", volume.host)
    return VolumeHome(volume.backend, "local")


async def volume_homes(session: AsyncSession, project_id: str, conf: BaseRunConfiguration) -> dict[str, VolumeHome]:
    """Where each named volume of the run lives (for offers.placement_mismatch); a name that does
    not exist is left out (the placement check says so)."""
    names = named_volumes(conf.volumes)
    if not names:
        return {}
    rows = await session.execute(
        select(VolumeModel).where(VolumeModel.project_id == project_id, VolumeModel.name.in_(names))
    )
    return {v.name: volume_home(v) for v in rows.scalars()}


def size_enforced(server_dir: Path, volume: VolumeModel) -> bool:
    """Whether the volume's size is a real limit (a filesystem image of that size backs it)."""
    if volume.backend == "ssh":
        return bool(volume.size_enforced)  # the host's agent said so at create
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
            "region": volume.region or "local",
            "availability_zone": volume.host,  # `ssh`: the fleet host keeping it
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
