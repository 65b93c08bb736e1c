"""Fleets: plan, apply (create or update in place), list, get, delete; and the manager that
brings fleet hosts up in the background and keeps trying the unreachable ones.

Applying probes every new host over SSH first (its key trusted on first use and stored), so a
host that cannot be reached or does not meet the fleet's `resources` refuses the whole apply
with the reason; nothing is created half-way. Then each host gets an `instances` row
(`provisioning`) and the manager deploys or re-attaches its agent (`idle`); a host that fails
is `unreachable` (with the reason) and retried. A server restart re-attaches the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import platform
import secrets
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import asyncssh
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.agent.models import AgentJobSubmission
from dstack.core.models.fleets import FleetConfiguration, SSHHostParams, SSHKey, SSHProxyParams
from dstack.core.models.runs import InstanceResources, InstanceStatus, JobProvisioningData, JobStatus, RunType
from dstack.server import crypto
from dstack.server import errors as _errors
from dstack.server.backends.ssh.backend import HostUnreachable, Ready, SSHBackend, connect_and_probe
from dstack.server.backends.ssh.bundle import AgentBundle, agent_bundle
from dstack.server.backends.ssh.connection import Endpoint, Target
from dstack.server.backends.ssh.phases import Phases
from dstack.server.backends.ssh.probe import HostProbe
from dstack.server.db import Database
from dstack.server.errors import ResourceExists, ResourceNotFound
from dstack.server.fleet_models import FleetInstanceModel, FleetModel
from dstack.server.models import InstanceModel, JobModel, ProjectModel, RunModel
from dstack.server.services import offers
from dstack.server.services.instances import InstanceManager

if TYPE_CHECKING:
    from dstack.serverless.service import ServerlessService

logger = logging.getLogger(__name__)
T = TypeVar("T")

# The 400 refusal: `InvalidRequest` once the errors refactoring lands, `ServerClientError` before.
BadRequest: Any = getattr(_errors, "InvalidRequest", None) or getattr(_errors, "ServerClientError")  # noqa: B009

RETRY_SECONDS = 10.0
PROBE_CONCURRENCY = 16
ACTIVE_JOB_STATUSES = [s.value for s in JobStatus.active_statuses()]


def _key_text(key: SSHKey | None) -> str | None:
    return key.private if key is not None else None


def _ssh_json(host: SSHHostParams, host_key: str | None, jump_host_key: str | None) -> str:
    """What reaching the host needs, private keys encrypted."""
    ssh: dict[str, Any] = {"private_key": crypto.encrypt(_key_text(host.ssh_key) or "")}
    if host.proxy_jump is not None:
        pj = host.proxy_jump
        ssh["proxy_jump"] = {
            "hostname": pj.hostname,
            "port": pj.port or 22,
            "user": pj.user or host.user,
            "private_key": crypto.encrypt(_key_text(pj.ssh_key) or _key_text(host.ssh_key) or ""),
        }
    if host_key:
        ssh["host_key"] = host_key
    if jump_host_key:
        ssh["jump_host_key"] = jump_host_key
    return json.dumps(ssh)


def _target(host: SSHHostParams, known: dict[str, Any] | None) -> Target:
    known = known or {}
    key = _key_text(host.ssh_key) or ""
    jump = None
    if host.proxy_jump is not None:
        pj: SSHProxyParams = host.proxy_jump
        jump = Endpoint(
            pj.hostname, pj.port or 22, pj.user or host.user or "root", _key_text(pj.ssh_key) or key,
            known.get("jump_host_key"),
        )  # fmt: skip
    return Target(Endpoint(host.hostname, host.port or 22, host.user or "root", key, known.get("host_key")), jump)


def _host_id(hostname: str, port: int | None) -> str:
    return f"{hostname}:{port or 22}"


def _stored_spec(conf: FleetConfiguration) -> str:
    """The configuration as stored: every private key encrypted."""
    data = conf.model_dump(mode="json")

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            key = node.get("ssh_key")
            if isinstance(key, dict) and key.get("private"):
                key["private"] = crypto.encrypt(key["private"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(data)
    return json.dumps(data)


def public_spec(spec: str) -> dict[str, Any]:
    """The configuration as answered: private keys left out."""
    data = json.loads(spec)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("ssh_key"), dict):
                node["ssh_key"] = {"private": "<hidden>", "public": node["ssh_key"].get("public")}
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(data)
    return dict(data)


#: the running server's SSH backend (set while a FleetManager runs): reaches replicas on fleet hosts
_forwarder: SSHBackend | None = None


async def replica_url(jpd: JobProvisioningData, port: int) -> str:
    """Where the proxy reaches a service replica: directly on the server's own host; through the
    fleet host's SSH connection (a local port forward) on a fleet host, whose job network the
    server cannot reach and where no port is opened for it."""
    address = jpd.address or "127.0.0.1"
    if jpd.backend == "ssh" and _forwarder is not None:
        try:
            return await _forwarder.forward_url(jpd.instance_name, address, port)
        except (HostUnreachable, OSError, asyncssh.Error) as e:
            logger.warning("no tunnel to replica %s:%s on %s: %s", address, port, jpd.instance_name, e)
    return f"http://{address}:{port}"


def with_home(inst: InstanceModel, submission: AgentJobSubmission) -> AgentJobSubmission:
    """A job for a fleet host, with the server's URL in its env (serverless workers'
    RUNPOD_WEBHOOK_* and anything else that starts with it) pointing at the host's reverse forward
    to the server: the server is not reachable on the host's network."""
    if inst.backend != "ssh" or _forwarder is None or _forwarder.home is None:
        return submission
    home = _forwarder.home_url(inst.name)
    server = _forwarder.home.url
    if home is None:
        logger.warning(
            "fleet host %s has no forward to the server: its job %s cannot call it", inst.name, submission.job_id
        )
        return submission
    env = {
        k: home + v[len(server) :] if v == server or v.startswith(server + "/") else v
        for k, v in submission.env.items()
    }
    return submission.model_copy(update={"env": env})


async def serverless_workers_on(session: AsyncSession, instance_name: str) -> list[str]:
    """Serverless workers (their jobs' names) that run, or are being started, on an instance."""
    rows = await session.execute(
        select(JobModel.job_name)
        .join(RunModel, RunModel.id == JobModel.run_id)
        .join(InstanceModel, InstanceModel.id == JobModel.instance_id)
        .where(
            InstanceModel.name == instance_name,
            RunModel.run_type == RunType.SERVERLESS,
            JobModel.status.in_(ACTIVE_JOB_STATUSES),
        )
    )
    return [name for name in rows.scalars() if name]


class FleetManager:
    def __init__(self, db: Database, instances: InstanceManager, backend: SSHBackend) -> None:
        self.db = db
        self.instances = instances
        self.backend = backend
        #: set by the app once the queue exists: workers on a host found unreachable are lost to it
        self.serverless: ServerlessService | None = None
        backend.unreachable_listeners.append(self._host_unreachable)
        self._attaching: dict[str, asyncio.Task[None]] = {}  # instance id -> attach in progress
        self._loop: asyncio.Task[None] | None = None
        self._prebuild: asyncio.Task[AgentBundle] | None = None

    # --- bringing hosts up ----------------------------------------------------------------

    async def start(self) -> None:
        global _forwarder
        _forwarder = self.backend
        await self._attach_pending()
        self._loop = asyncio.create_task(self._retry_loop(), name="fleet-hosts")
        # The agent bundle is built when a plan is asked (not at every server start: seconds of
        # CPU most servers never need), so it is ready by the time the hosts are confirmed.

    async def stop(self) -> None:
        global _forwarder
        if _forwarder is self.backend:
            _forwarder = None
        tasks: list[asyncio.Task[Any]] = [
            t for t in [self._loop, self._prebuild, *self._attaching.values()] if t is not None
        ]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(RETRY_SECONDS)
            try:
                await self._attach_pending()
            except Exception:
                logger.exception("retrying fleet hosts failed")

    async def _attach_pending(self) -> None:
        """Attach every live fleet host the instance manager does not supervise yet."""
        async with self.db.session() as session:
            rows = (
                await session.execute(
                    select(InstanceModel.id, InstanceModel.name, InstanceModel.agent).where(
                        InstanceModel.backend == self.backend.name, InstanceModel.status != InstanceStatus.TERMINATED
                    )
                )
            ).all()
        for instance_id, name, agent in rows:
            if not self.instances.has_client(instance_id):
                self._spawn_attach(instance_id, name, agent)

    def _spawn_attach(
        self,
        instance_id: str,
        name: str,
        agent_json: str | None,
        phases: Phases | None = None,
        ready: Ready | None = None,
    ) -> None:
        task = self._attaching.get(instance_id)
        if task is not None and not task.done():
            if ready is not None:
                ready[0].close()
            return
        self._attaching[instance_id] = asyncio.create_task(
            self._attach(instance_id, name, agent_json, phases or Phases(), ready)
        )

    async def _attach(
        self, instance_id: str, name: str, agent_json: str | None, phases: Phases, ready: Ready | None = None
    ) -> None:
        token = None
        with contextlib.suppress(ValueError, crypto.DecryptionError):
            stored = json.loads(agent_json or "{}").get("token")
            token = crypto.decrypt(stored) if stored else None
        try:
            inst = await self.backend.attach(name, token, phases, ready)
        except HostUnreachable as e:
            logger.warning("fleet host %s: %s", name, e)
            await self.backend.mark(name, InstanceStatus.UNREACHABLE, str(e))
            return
        async with self.db.session() as session:
            row = await session.get(InstanceModel, instance_id)
            if row is None or row.status == InstanceStatus.TERMINATED:  # deleted meanwhile
                await self.backend.terminate(name, inst.agent.token)
                return
            fi = await session.get(FleetInstanceModel, instance_id)
            if fi is not None:
                fi.status_message = None
                await session.commit()
        await self.instances.add(instance_id, self.backend, inst)
        phases.mark("idle")
        logger.info("fleet host %s idle in %.2f s: %s", name, phases.total, phases)
        # A new agent there, as after a recovery: the pipeline passes now, so a run waiting for
        # room starts on this host at once rather than at its next idle round (seconds).
        for listener in self.instances.agent_listeners:
            try:
                await listener(instance_id)
            except Exception:
                logger.exception("a listener of fleet host %s failed", name)

    async def _host_unreachable(self, name: str) -> None:
        """The host stopped answering (SSH and agent both, ~20 s after it went away; faster than
        a worker's missed heartbeats): the jobs its serverless workers hold go back to the queue
        now and the scaler starts replacements where there is room. A worker that was alive after
        all may still post its result: the queue keeps the first result of a job, so it is never
        reported twice."""
        if self.serverless is None:
            return
        async with self.db.session() as session:
            workers = await serverless_workers_on(session, name)
        if workers:
            await self.serverless.pool.workers_lost(workers, f"instance {name} is unreachable")

    # --- plan and apply -------------------------------------------------------------------

    async def plan(
        self,
        session: AsyncSession,
        project: ProjectModel,
        conf: FleetConfiguration,
        keep: dict[str, Ready] | None = None,
    ) -> dict[str, Any]:
        """What applying would do, with what each new host offers (probed now over SSH). `keep`:
        the connections to new hosts that probed fine are left open there, by host id (`apply`
        deploys the agents over them instead of connecting again); the caller closes them."""
        if self._prebuild is None:  # the agent bundle, built while the hosts are probed and confirmed
            self._prebuild = asyncio.create_task(asyncio.to_thread(agent_bundle), name="agent-bundle")
        _check_conf(conf)
        name = conf.name or ""
        fleet = await _active_fleet(session, project, name) if name else None
        existing = await _fleet_instances(session, fleet) if fleet is not None else []
        by_host = {_host_id(fi.hostname, fi.port): (fi, inst) for fi, inst in existing}
        assert conf.ssh_config is not None
        hosts = conf.ssh_config.resolved_hosts()
        wanted = {_host_id(h.hostname, h.port) for h in hosts}
        sem = asyncio.Semaphore(PROBE_CONCURRENCY)

        async def probe_one(h: SSHHostParams) -> dict[str, Any]:
            hid = _host_id(h.hostname, h.port)
            row: dict[str, Any] = {"hostname": h.hostname, "port": h.port, "user": h.user}
            if hid in by_host:
                fi, inst = by_host[hid]
                row.update(action="keep", instance_name=inst.name, status=inst.status)
                row["resources"] = json.loads(inst.resources or "{}")
                return row
            row["action"] = "add"
            async with sem:
                try:
                    conn, found = await connect_and_probe(_target(h, None))
                except HostUnreachable as e:
                    row["error"] = str(e)
                    return row
            row["probe"] = found.to_dict()
            row["host_key"] = conn.host_key
            row["jump_host_key"] = conn.jump_host_key
            row["resources"] = _resources(found).model_dump()
            problem = _python_problem(found) or _resources_problem(conf, found)
            if problem:
                row["error"] = problem
            if keep is not None and not problem:
                keep[hid] = (conn, found)
            else:
                conn.close()
            return row

        rows = list(await asyncio.gather(*(probe_one(h) for h in hosts)))
        for fi, inst in existing:
            if _host_id(fi.hostname, fi.port) not in wanted:
                rows.append(
                    {
                        "hostname": fi.hostname,
                        "port": fi.port,
                        "user": fi.user,
                        "action": "remove",
                        "instance_name": inst.name,
                        "status": inst.status,
                        "resources": json.loads(inst.resources or "{}"),
                    }
                )
        return {
            "name": name or None,
            "action": "update" if fleet is not None else "create",
            "placement": conf.placement,
            "hosts": rows,
        }

    async def apply(self, session: AsyncSession, project: ProjectModel, conf: FleetConfiguration) -> dict[str, Any]:
        _check_conf(conf)
        if conf.name is None:
            conf = conf.model_copy(update={"name": f"fleet-{secrets.token_hex(3)}"})
        opened: dict[str, Ready] = {}  # the plan's connections to new hosts, handed to their attaches
        try:
            return await self._apply(session, project, conf, opened)
        finally:
            for conn, _ in opened.values():
                conn.close()

    async def _apply(
        self, session: AsyncSession, project: ProjectModel, conf: FleetConfiguration, opened: dict[str, Ready]
    ) -> dict[str, Any]:
        assert conf.name is not None and conf.ssh_config is not None
        phases = Phases()
        plan = await self.plan(session, project, conf, opened)
        phases.mark("plan")
        failed = [h for h in plan["hosts"] if h.get("error")]
        if failed:
            raise BadRequest("; ".join(f"{h['hostname']}: {h['error']}" for h in failed), fields=["ssh_config.hosts"])
        hosts = {_host_id(h.hostname, h.port): h for h in conf.ssh_config.resolved_hosts()}
        await _check_hosts_free(session, project, conf.name, list(hosts))
        fleet = await _active_fleet(session, project, conf.name)
        if fleet is None:
            fleet = FleetModel(project_id=project.id, name=conf.name, spec=_stored_spec(conf))
            session.add(fleet)
            await session.flush()
        else:
            fleet.spec = _stored_spec(conf)
        existing = await _fleet_instances(session, fleet)
        removed = [(fi, inst) for fi, inst in existing if _host_id(fi.hostname, fi.port) not in hosts]
        await _refuse_busy(session, [inst for _, inst in removed])
        removed_ids = {inst.id for _, inst in removed}
        kept = {_host_id(fi.hostname, fi.port): fi for fi, inst in existing if inst.id not in removed_ids}
        for hid, fi in kept.items():  # a new key or user for a kept host; its trusted host key stays
            h = hosts[hid]
            old = json.loads(fi.ssh or "{}")
            fi.user = h.user or "root"
            fi.internal_ip = h.internal_ip or fi.internal_ip
            fi.ssh = _ssh_json(h, old.get("host_key"), old.get("jump_host_key"))
        next_num = max((fi.instance_num for fi, _ in existing), default=-1) + 1
        new_ids: list[tuple[str, str, str]] = []
        for row in plan["hosts"]:
            if row["action"] != "add":
                continue
            h = hosts[_host_id(row["hostname"], row["port"])]
            inst_name = f"{conf.name}-{next_num}"
            clash = (
                await session.execute(select(InstanceModel.id).where(InstanceModel.name == inst_name))
            ).scalar_one_or_none()
            if clash is not None:
                raise ResourceExists(f"instance name {inst_name!r} is in use (a fleet of that name in another project)")
            inst = InstanceModel(
                name=inst_name,
                backend=self.backend.name,
                region=conf.name,
                hostname=h.hostname,
                status=InstanceStatus.PROVISIONING,
                resources=json.dumps(row["resources"]),
                price=0.0,
                agent="{}",
            )
            session.add(inst)
            await session.flush()
            session.add(
                FleetInstanceModel(
                    instance_id=inst.id,
                    fleet_id=fleet.id,
                    project_id=project.id,
                    instance_num=next_num,
                    hostname=h.hostname,
                    port=h.port or 22,
                    user=h.user or "root",
                    internal_ip=h.internal_ip,
                    ssh=_ssh_json(h, row.get("host_key"), row.get("jump_host_key")),
                )
            )
            new_ids.append((inst.id, inst_name, _host_id(row["hostname"], row["port"])))
            next_num += 1
        await session.commit()
        for _fi, inst in removed:
            await self._terminate(session, inst)
        await session.commit()
        phases.mark("rows")
        for instance_id, inst_name, hid in new_ids:
            self._spawn_attach(instance_id, inst_name, None, phases.fork(), opened.pop(hid, None))
        return await self.get(session, project, conf.name)

    # --- reading and deleting -------------------------------------------------------------

    async def list_fleets(self, session: AsyncSession, project: ProjectModel) -> list[dict[str, Any]]:
        fleets = (
            await session.execute(
                select(FleetModel)
                .where(FleetModel.project_id == project.id, FleetModel.deleted.is_(False))
                .order_by(FleetModel.created_at)
            )
        ).scalars()
        return [await self._fleet_dict(session, f) for f in fleets]

    async def get(self, session: AsyncSession, project: ProjectModel, name: str) -> dict[str, Any]:
        fleet = await _active_fleet(session, project, name)
        if fleet is None:
            raise ResourceNotFound(f"fleet {name!r} not found in project {project.name!r}")
        return await self._fleet_dict(session, fleet)

    async def delete(self, session: AsyncSession, project: ProjectModel, names: list[str]) -> None:
        fleets = []
        for name in names:
            fleet = await _active_fleet(session, project, name)
            if fleet is None:
                raise ResourceNotFound(f"fleet {name!r} not found in project {project.name!r}")
            fleets.append(fleet)
        for fleet in fleets:
            live = [inst for _, inst in await _fleet_instances(session, fleet)]
            await _refuse_busy(session, live)
            for inst in live:
                await self._terminate(session, inst)
            fleet.status = "terminated"
            fleet.deleted = True
            await session.commit()

    async def delete_instances(
        self, session: AsyncSession, project: ProjectModel, name: str, instance_nums: list[int]
    ) -> dict[str, Any]:
        fleet = await _active_fleet(session, project, name)
        if fleet is None:
            raise ResourceNotFound(f"fleet {name!r} not found in project {project.name!r}")
        by_num = {fi.instance_num: inst for fi, inst in await _fleet_instances(session, fleet)}
        missing = [n for n in instance_nums if n not in by_num]
        if missing:
            raise ResourceNotFound(f"fleet {name!r} has no instance {missing[0]}")
        chosen = [by_num[n] for n in instance_nums]
        await _refuse_busy(session, chosen)
        for inst in chosen:
            await self._terminate(session, inst)
        await session.commit()
        return await self._fleet_dict(session, fleet)

    async def _terminate(self, session: AsyncSession, inst: InstanceModel) -> None:
        """Stop the host's agent and retire the row (renamed, so the name can be used again)."""
        task = self._attaching.pop(inst.id, None)
        if task is not None:
            task.cancel()
        token = None
        with contextlib.suppress(ValueError, crypto.DecryptionError):
            stored = json.loads(inst.agent or "{}").get("token")
            token = crypto.decrypt(stored) if stored else None
        await self.instances.remove(inst.id)
        await self.backend.terminate(inst.name, token)
        inst.status = InstanceStatus.TERMINATED
        inst.name = f"{inst.name}~{inst.id[:8]}"[:100]

    async def _fleet_dict(self, session: AsyncSession, fleet: FleetModel) -> dict[str, Any]:
        pairs = await _fleet_instances(session, fleet, include_terminated=False)
        ids = [inst.id for _, inst in pairs]
        jobs: dict[str, list[str]] = {}
        if ids:
            for instance_id, run_name, job_name in (
                await session.execute(
                    select(JobModel.instance_id, RunModel.run_name, JobModel.job_name)
                    .join(RunModel, RunModel.id == JobModel.run_id)
                    .where(JobModel.instance_id.in_(ids), JobModel.status.in_(ACTIVE_JOB_STATUSES))
                )
            ).all():
                jobs.setdefault(str(instance_id), []).append(job_name or run_name)
        instances = []
        for fi, inst in pairs:
            status = str(inst.status)
            if status == InstanceStatus.IDLE and jobs.get(inst.id):
                status = InstanceStatus.BUSY.value
            res = InstanceResources.model_validate(json.loads(inst.resources or "{}"))
            instances.append(
                {
                    "name": inst.name,
                    "instance_num": fi.instance_num,
                    "hostname": fi.hostname,
                    "port": fi.port,
                    "user": fi.user,
                    "internal_ip": fi.internal_ip,
                    "backend": inst.backend,
                    "region": inst.region,
                    "status": status,
                    "status_message": fi.status_message,
                    "resources": res.model_dump(),
                    "resources_pretty": res.pretty(),
                    "price": inst.price,
                    "jobs": jobs.get(inst.id, []),
                    "created_at": inst.created_at.isoformat() if inst.created_at else None,
                }
            )
        return {
            "id": fleet.id,
            "name": fleet.name,
            "project_name": fleet.project.name,
            "status": fleet.status,
            "created_at": fleet.created_at.isoformat() if fleet.created_at else None,
            "spec": public_spec(fleet.spec),
            "instances": instances,
        }


def _check_conf(conf: FleetConfiguration) -> None:
    if conf.ssh_config is None:
        raise BadRequest("ssh_config is required: only SSH fleets exist here", fields=["ssh_config"])
    for i, h in enumerate(conf.ssh_config.resolved_hosts()):
        if h.ssh_key is None:
            raise BadRequest(
                f"no SSH key for host {h.hostname!r}: set identity_file (the client reads it) or ssh_key",
                fields=[f"ssh_config.hosts[{i}]"],
            )


def _resources(found: HostProbe) -> InstanceResources:
    return InstanceResources(cpus=found.cpus, memory_mib=found.memory_mib, disk_mib=found.disk_mib, gpus=found.gpus)


def _python_problem(found: HostProbe) -> str | None:
    """The agent runs on the host's CPython of the server's minor version (its bundle holds
    binary modules built for it): say so at plan time rather than fail the deployment later."""
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if found.machine and found.machine != platform.machine():
        return f"the host is {found.machine}; the agent is built for {platform.machine()}"
    if found.python_for(want) is None:
        have = ", ".join(sorted(set(found.pythons.values()))) or "none"
        return f"the agent needs CPython {want} on the host (found: {have})"
    return None


def _resources_problem(conf: FleetConfiguration, found: HostProbe) -> str | None:
    if conf.resources is None or offers.fits_total(conf.resources, _resources(found)):
        return None
    return f"offers {_resources(found).pretty()}, short of the fleet's resources {conf.resources.pretty_format()}"


async def _active_fleet(session: AsyncSession, project: ProjectModel, name: str) -> FleetModel | None:
    return (
        await session.execute(
            select(FleetModel).where(
                FleetModel.project_id == project.id, FleetModel.name == name, FleetModel.deleted.is_(False)
            )
        )
    ).scalar_one_or_none()


async def _fleet_instances(
    session: AsyncSession, fleet: FleetModel, include_terminated: bool = False
) -> list[tuple[FleetInstanceModel, InstanceModel]]:
    q = (
        select(FleetInstanceModel, InstanceModel)
        .join(InstanceModel, InstanceModel.id == FleetInstanceModel.instance_id)
        .where(FleetInstanceModel.fleet_id == fleet.id)
        .order_by(FleetInstanceModel.instance_num)
    )
    if not include_terminated:
        q = q.where(InstanceModel.status != InstanceStatus.TERMINATED)
    return [(fi, inst) for fi, inst in (await session.execute(q)).all()]


async def _check_hosts_free(session: AsyncSession, project: ProjectModel, fleet_name: str, host_ids: list[str]) -> None:
    """A host belongs to one live fleet: two agents on one host would both hand out its resources."""
    rows = (
        await session.execute(
            select(FleetInstanceModel.hostname, FleetInstanceModel.port, FleetModel.name, FleetModel.project_id)
            .join(FleetModel, FleetModel.id == FleetInstanceModel.fleet_id)
            .join(InstanceModel, InstanceModel.id == FleetInstanceModel.instance_id)
            .where(InstanceModel.status != InstanceStatus.TERMINATED)
        )
    ).all()
    wanted = set(host_ids)
    for hostname, port, other, project_id in rows:
        if _host_id(hostname, port) in wanted and (other != fleet_name or project_id != project.id):
            raise ResourceExists(f"host {hostname}:{port} is already in fleet {other!r}", fields=["ssh_config.hosts"])


async def _refuse_busy(session: AsyncSession, instances: list[InstanceModel]) -> None:
    ids = [i.id for i in instances]
    if not ids:
        return
    busy = (
        await session.execute(
            select(JobModel.instance_id, RunModel.run_name)
            .join(RunModel, RunModel.id == JobModel.run_id)
            .where(JobModel.instance_id.in_(ids), JobModel.status.in_(ACTIVE_JOB_STATUSES))
        )
    ).all()
    if busy:
        names = {i.id: i.name for i in instances}
        what = ", ".join(sorted({f"{names.get(str(i), i)} runs {r}" for i, r in busy}))
        raise BadRequest(f"cannot remove instances with active jobs ({what}); stop those runs first")


# --- multi-node runs on `placement: cluster` fleets ---------------------------------------------


async def cluster_fleet_of(session: AsyncSession, run: RunModel, fleets: list[str] | None) -> FleetModel | None:
    """The `placement: cluster` fleet a run's `fleets:` names (its project's), if any."""
    for name in fleets or []:
        fleet = (
            await session.execute(
                select(FleetModel).where(
                    FleetModel.project_id == run.project_id, FleetModel.name == name, FleetModel.deleted.is_(False)
                )
            )
        ).scalar_one_or_none()
        if fleet is not None and json.loads(fleet.spec).get("placement") == "cluster":
            return fleet
    return None


async def cluster_candidates(
    session: AsyncSession,
    run: RunModel,
    fleets: list[str] | None,
    nodes: int,
    candidates: list[T],
    instance_of: Callable[[T], InstanceModel],
    has_room: Callable[[T], bool],
) -> list[T] | None:
    """For a multi-node task pinned to a `placement: cluster` fleet: the candidates on that
    fleet's hosts that no other job of the run holds (one node per host), and none at all unless
    every node still waiting gets a host now (all or nothing: a run never starts half its nodes).
    None when the run is not such a task (the candidates stand as they are)."""
    if nodes <= 1:
        return None
    fleet = await cluster_fleet_of(session, run, fleets)
    if fleet is None:
        return None
    hosts = set(
        (
            await session.execute(select(FleetInstanceModel.instance_id).where(FleetInstanceModel.fleet_id == fleet.id))
        ).scalars()
    )
    active = [j for j in run.jobs if not JobStatus(j.status).is_finished()]
    held = {j.instance_id for j in active if j.instance_id is not None}
    waiting = sum(1 for j in active if j.status == JobStatus.SUBMITTED)
    mine = [c for c in candidates if instance_of(c).id in hosts and instance_of(c).id not in held]
    if sum(1 for c in mine if has_room(c)) < waiting:
        return []
    return mine


async def node_ips(session: AsyncSession, run: RunModel) -> list[str] | None:
    """The internal addresses of a multi-node run's hosts, by node rank (DSTACK_NODES_IPS;
    the first is DSTACK_MASTER_NODE_IP), or None for a single-node run."""
    latest: dict[int, JobModel] = {}
    for j in run.jobs:
        if j.replica_num == 0 and (j.job_num not in latest or j.submission_num > latest[j.job_num].submission_num):
            latest[j.job_num] = j
    if len(latest) <= 1:
        return None
    ips = []
    for num in sorted(latest):
        instance_id = latest[num].instance_id
        if instance_id is None:
            return None
        fi = await session.get(FleetInstanceModel, instance_id)
        inst = await session.get(InstanceModel, instance_id)
        if inst is not None and inst.backend == "slurm":
            # The node's NodeAddr, stored with the rank's placement in the same commit as its
            # instance (not the agent's URL: with a login host that is a forward on loopback).
            address = json.loads(latest[num].job_provisioning_data or "{}").get("address")
            if not address:
                return None
            ips.append(address)
            continue
        ips.append((fi.internal_ip if fi is not None else None) or (inst.hostname if inst is not None else ""))
    return ips
