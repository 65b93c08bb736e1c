"""`SSHBackend`: fleet hosts as instances. One SSH connection per host carries a local port
forward to the host's agent (bound to the host's loopback); the server's `AgentClient` talks to
the forwarded port. Reaching a host, re-attaching to its agent, or deploying one are the same
call (`attach`), so a re-apply, a server restart and a lost connection all recover the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from dataclasses import dataclass

import asyncssh
from sqlalchemy import select

from dstack.core.models.runs import InstanceResources, InstanceStatus
from dstack.server import crypto
from dstack.server.backends.base import AgentEndpoint, Backend, ProvisionedInstance, agent_host
from dstack.server.backends.ssh import agent as remote
from dstack.server.backends.ssh.bundle import agent_bundle
from dstack.server.backends.ssh.connection import Connection, Endpoint, Target, connect, describe_error
from dstack.server.backends.ssh.probe import HostProbe, probe
from dstack.server.db import Database
from dstack.server.fleet_models import FleetInstanceModel, FleetModel
from dstack.server.models import InstanceModel

logger = logging.getLogger(__name__)

UNIT = "dstack-agent"
ATTACH_TIMEOUT = 120.0


class HostUnreachable(Exception):
    """The host could not be reached or its agent not brought up; the message says why."""


@dataclass
class _Attached:
    connection: Connection
    listener: asyncssh.SSHListener


def target_of(fi: FleetInstanceModel) -> Target:
    """How to reach the host, from its row (keys decrypted here only)."""
    ssh = json.loads(fi.ssh or "{}")
    key = crypto.decrypt(ssh.get("private_key", ""))
    host = Endpoint(fi.hostname, fi.port, fi.user, key, ssh.get("host_key"))
    jump = None
    if ssh.get("proxy_jump"):
        pj = ssh["proxy_jump"]
        jump = Endpoint(
            pj["hostname"], pj.get("port") or 22, pj.get("user") or fi.user,
            crypto.decrypt(pj.get("private_key") or ssh.get("private_key", "")), ssh.get("jump_host_key"),
        )  # fmt: skip
    return Target(host=host, jump=jump)


async def connect_and_probe(target: Target) -> tuple[Connection, HostProbe]:
    try:
        conn = await connect(target)
    except Exception as e:
        raise HostUnreachable(describe_error(e)) from e
    try:
        return conn, await probe(conn.conn)
    except Exception as e:
        conn.close()
        raise HostUnreachable(f"probing the host failed: {describe_error(e)}") from e


class SSHBackend(Backend):
    name = "ssh"

    def __init__(self, db: Database) -> None:
        self.db = db
        self._attached: dict[str, _Attached] = {}  # instance name -> connection and forward
        #: (instance name, address on the host, port) -> local forward to it (service replicas)
        self._forwards: dict[tuple[str, str, int], asyncssh.SSHListener] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # --- the Backend interface ------------------------------------------------------------

    async def ensure_instances(self, known: dict[str, AgentEndpoint]) -> list[ProvisionedInstance]:
        """Fleet hosts whose agents a previous server used come back as they were stored, without
        connecting: their forwarded ports are gone, so the supervisor's first check finds them
        down and `recover_instance` re-attaches over SSH (running jobs are reconciled as after
        any agent recovery). Never-attached hosts are left to the fleet manager, so a host that
        does not answer never delays the server's start."""
        async with self.db.session() as session:
            rows = (
                await session.execute(
                    select(InstanceModel).where(
                        InstanceModel.backend == self.name, InstanceModel.status != InstanceStatus.TERMINATED
                    )
                )
            ).scalars()
            out = []
            for row in rows:
                endpoint = known.get(row.name)
                if endpoint is None:
                    continue
                agent = json.loads(row.agent or "{}")
                endpoint.network_isolation = bool(agent.get("network_isolation"))
                endpoint.containers = bool(agent.get("containers"))
                out.append(
                    ProvisionedInstance(
                        name=row.name,
                        backend=self.name,
                        region=row.region,
                        hostname=row.hostname,
                        resources=InstanceResources.model_validate_json(row.resources),
                        price=row.price,
                        agent=endpoint,
                    )
                )
        return out

    async def recover_instance(self, name: str, lost: AgentEndpoint) -> ProvisionedInstance | None:
        try:
            return await self.attach(name, lost.token)
        except HostUnreachable as e:
            await self.mark(name, InstanceStatus.UNREACHABLE, str(e))
            raise

    async def shutdown(self) -> None:
        for name in list(self._attached):
            await self._detach(name)

    # --- fleets ---------------------------------------------------------------------------

    async def mark(self, name: str, status: InstanceStatus, message: str | None) -> None:
        async with self.db.session() as session:
            row = (await session.execute(select(InstanceModel).where(InstanceModel.name == name))).scalar_one_or_none()
            if row is None or row.status == InstanceStatus.TERMINATED:
                return
            fi = await session.get(FleetInstanceModel, row.id)
            row.status = status
            if fi is not None:
                fi.status_message = message
            await session.commit()

    async def attach(self, name: str, token: str | None) -> ProvisionedInstance:
        """Connect to the host (trusting its key on first use), reuse its agent if one runs with
        `token`, else deploy and start one, and forward a local port to it."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            try:
                return await asyncio.wait_for(self._attach(name, token), ATTACH_TIMEOUT)
            except HostUnreachable:
                raise
            except TimeoutError as e:
                raise HostUnreachable(f"timed out reaching the host or its agent (limit {ATTACH_TIMEOUT:g} s)") from e
            except remote.AgentDeployError as e:
                raise HostUnreachable(str(e)) from e
            except Exception as e:
                raise HostUnreachable(describe_error(e)) from e

    async def _attach(self, name: str, token: str | None) -> ProvisionedInstance:
        await self._detach(name)
        async with self.db.session() as session:
            inst = (await session.execute(select(InstanceModel).where(InstanceModel.name == name))).scalar_one()
            fi = await session.get(FleetInstanceModel, inst.id)
            if fi is None:
                raise HostUnreachable(f"instance {name} is not a fleet host")
            fleet = await session.get(FleetModel, fi.fleet_id)
            target = target_of(fi)
            region = fleet.name if fleet is not None else ""
            internal_ip = fi.internal_ip
        conn, found = await connect_and_probe(target)
        try:
            await self._trust(name, conn)
            token = token or secrets.token_hex(24)
            agent = await remote.running_agent(conn.conn, token)
            if agent is None:
                agent = await remote.start_agent(conn.conn, token, found, await asyncio.to_thread(agent_bundle), UNIT)
                logger.info("started the agent on %s (%s), pid %s", name, target.host.hostname, agent.pid)
            else:
                logger.info("re-attached to the agent on %s (%s), pid %s", name, target.host.hostname, agent.pid)
            listener = await conn.conn.forward_local_port("127.0.0.1", 0, "127.0.0.1", agent.port)
        except BaseException:
            conn.close()
            raise
        self._attached[name] = _Attached(conn, listener)
        endpoint = AgentEndpoint(url=f"http://127.0.0.1:{listener.get_port()}", token=token, pid=agent.pid)
        host = await agent_host(endpoint)
        endpoint.network_isolation = bool(host.get("network_isolation"))
        endpoint.containers = bool(host.get("containers"))
        if internal_ip is None:
            addresses = found.addresses
            internal_ip = target.host.hostname if target.host.hostname in addresses else next(iter(addresses), None)
            await self._set_internal_ip(name, internal_ip)
        return ProvisionedInstance(
            name=name,
            backend=self.name,
            region=region,
            hostname=target.host.hostname,
            resources=InstanceResources(
                cpus=host["cpus"], memory_mib=host["memory_mib"], disk_mib=host["disk_mib"], gpus=host.get("gpus", [])
            ),
            price=0.0,
            agent=endpoint,
        )

    async def _trust(self, name: str, conn: Connection) -> None:
        """Store the host keys seen on first use (later connections enforce them)."""
        async with self.db.session() as session:
            inst = (await session.execute(select(InstanceModel).where(InstanceModel.name == name))).scalar_one()
            fi = await session.get(FleetInstanceModel, inst.id)
            assert fi is not None
            ssh = json.loads(fi.ssh or "{}")
            changed = False
            if not ssh.get("host_key"):
                ssh["host_key"] = conn.host_key
                changed = True
            if conn.jump_host_key and not ssh.get("jump_host_key"):
                ssh["jump_host_key"] = conn.jump_host_key
                changed = True
            if changed:
                fi.ssh = json.dumps(ssh)
                await session.commit()

    async def _set_internal_ip(self, name: str, ip: str | None) -> None:
        async with self.db.session() as session:
            inst = (await session.execute(select(InstanceModel).where(InstanceModel.name == name))).scalar_one()
            fi = await session.get(FleetInstanceModel, inst.id)
            if fi is not None and fi.internal_ip is None:
                fi.internal_ip = ip
                await session.commit()

    async def terminate(self, name: str, token: str | None) -> None:
        """Stop the host's agent (best effort: an unreachable host keeps it until it is reused)."""
        attached = self._attached.get(name)
        try:
            if attached is not None and token:
                await asyncio.wait_for(remote.stop_agent(attached.connection.conn, token, UNIT), 30)
        except Exception as e:
            logger.warning("stopping the agent on %s failed: %s", name, describe_error(e))
        await self._detach(name)

    async def forward_url(self, name: str, address: str, port: int) -> str:
        """A local URL that reaches `address:port` as seen from the host (a service replica in
        the host's job network), through the host's SSH connection: no port opens on the host.
        Raises `HostUnreachable` while the host is not attached."""
        attached = self._attached.get(name)
        if attached is None:
            raise HostUnreachable(f"instance {name} is not attached")
        key = (name, address, port)
        listener = self._forwards.get(key)
        if listener is None:
            listener = await attached.connection.conn.forward_local_port("127.0.0.1", 0, address, port)
            self._forwards[key] = listener
        return f"http://127.0.0.1:{listener.get_port()}"

    async def _detach(self, name: str) -> None:
        for key in [k for k in self._forwards if k[0] == name]:
            self._forwards.pop(key).close()
        attached = self._attached.pop(name, None)
        if attached is not None:
            attached.listener.close()
            attached.connection.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(attached.connection.wait_closed(), 5)
