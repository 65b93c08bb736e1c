"""`SSHBackend`: fleet hosts as instances. One SSH connection per host carries a local port
forward to the host's agent (bound to the host's loopback); the server's `AgentClient` talks to
the forwarded port. Reaching a host, re-attaching to its agent, or deploying one are the same
call (`attach`), so a re-apply, a server restart and a lost connection all recover the same way.

The same connection carries a reverse forward the other way (`Home`): a port on the host's
loopback that ends at the server, for jobs there that call it (serverless workers' RUNPOD_WEBHOOK_*
URLs; the server is not reachable on the host's network). Its port is stored and asked for again
at every re-attach, so the URLs running workers were given keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncssh
from sqlalchemy import select

from dstack.core.models.runs import InstanceResources, InstanceStatus
from dstack.server import crypto
from dstack.server.backends.base import AgentEndpoint, Backend, ProvisionedInstance, agent_host
from dstack.server.backends.ssh import agent as remote
from dstack.server.backends.ssh.bundle import agent_bundle
from dstack.server.backends.ssh.connection import Connection, Endpoint, Target, connect, describe_error
from dstack.server.backends.ssh.forwards import Forward, open_forward
from dstack.server.backends.ssh.phases import Phases
from dstack.server.backends.ssh.probe import HostProbe, probe
from dstack.server.db import Database
from dstack.server.fleet_models import FleetInstanceModel, FleetModel
from dstack.server.models import InstanceModel

logger = logging.getLogger(__name__)

UNIT = "dstack-agent"
ATTACH_TIMEOUT = 120.0
QUICK_CHECK_TIMEOUT = 5.0  # a command over a live connection, when the agent stopped answering


class HostUnreachable(Exception):
    """The host could not be reached or its agent not brought up; the message says why."""


@dataclass(frozen=True)
class Home:
    """The server as jobs on fleet hosts reach it: `url` (the server's URL as jobs are told it,
    `ServerSettings.url`) becomes `http://127.0.0.1:<port>` on a host, a reverse forward that ends
    at `host:port` on the server's machine."""

    url: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str, bind_host: str, port: int) -> Home:
        """From the server's URL and the address it binds (a wildcard is reached on loopback)."""
        host = "127.0.0.1" if bind_host in ("", "0.0.0.0", "::") else bind_host
        return cls(url.rstrip("/"), host, port)


@dataclass
class _Attached:
    connection: Connection
    listener: asyncssh.SSHListener
    home: asyncssh.SSHListener | None = None


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


async def _connect(target: Target) -> Connection:
    try:
        return await connect(target)
    except Exception as e:
        raise HostUnreachable(describe_error(e)) from e


async def _probe(conn: Connection) -> HostProbe:
    try:
        return await probe(conn.conn)
    except Exception as e:
        conn.close()
        raise HostUnreachable(f"probing the host failed: {describe_error(e)}") from e


async def connect_and_probe(target: Target, phases: Phases | None = None) -> tuple[Connection, HostProbe]:
    phases = phases or Phases()
    conn = await _connect(target)
    phases.mark("connect")
    found = await _probe(conn)
    phases.mark("probe")
    return conn, found


#: a connection already open to a host and what it probed there (the apply's plan), to reuse
Ready = tuple[Connection, HostProbe]


class SSHBackend(Backend):
    name = "ssh"

    def __init__(self, db: Database, home: Home | None = None) -> None:
        self.db = db
        #: where jobs on the hosts reach the server (None: no reverse forward, e.g. unit tests)
        self.home = home
        #: awaited with an instance's name each time it is marked unreachable (its serverless
        #: workers' jobs are requeued at once rather than after a missed heartbeat)
        self.unreachable_listeners: list[Callable[[str], Awaitable[None]]] = []
        self._attached: dict[str, _Attached] = {}  # instance name -> connection and forward
        #: (instance name, address on the host, port) -> local forward to it (service replicas)
        self._forwards: dict[tuple[str, str, int], Forward] = {}
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
        # The agent is lost. If the host's SSH connection does not run a command either, the host
        # is unreachable now: say so at once (its serverless workers' jobs are requeued) rather
        # than after a new connection times out too.
        attached = self._attached.get(name)
        marked = attached is not None and not await _answers(attached.connection.conn)
        if marked:
            await self.mark(name, InstanceStatus.UNREACHABLE, "the host does not answer over SSH")
        try:
            inst = await self.attach(name, lost.token)
        except HostUnreachable as e:
            await self.mark(name, InstanceStatus.UNREACHABLE, str(e))
            raise
        if marked:  # back already: the instance manager stores it idle; the reason goes
            await self._clear_message(name)
        return inst

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
        if status == InstanceStatus.UNREACHABLE:
            for listener in self.unreachable_listeners:
                try:
                    await listener(name)
                except Exception:
                    logger.exception("a listener of unreachable instance %s failed", name)

    async def attach(
        self, name: str, token: str | None, phases: Phases | None = None, ready: Ready | None = None
    ) -> ProvisionedInstance:
        """Connect to the host (trusting its key on first use), reuse its agent if one runs with
        `token`, else deploy and start one, and forward a local port to it. `ready`: a connection
        the caller opened and probed moments ago (it is used instead of a new one, and owned)."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            try:
                return await asyncio.wait_for(self._attach(name, token, phases or Phases(), ready), ATTACH_TIMEOUT)
            except HostUnreachable:
                raise
            except TimeoutError as e:
                raise HostUnreachable(f"timed out reaching the host or its agent (limit {ATTACH_TIMEOUT:g} s)") from e
            except remote.AgentDeployError as e:
                raise HostUnreachable(str(e)) from e
            except Exception as e:
                raise HostUnreachable(describe_error(e)) from e

    async def _attach(self, name: str, token: str | None, phases: Phases, ready: Ready | None) -> ProvisionedInstance:
        try:
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
                home_port = json.loads(fi.ssh or "{}").get("home_port")
        except BaseException:
            if ready is not None:
                ready[0].close()
            raise
        phases.mark("read host")
        deploy = token is None  # a new token: no agent there has it, nothing to look for
        base: str | None = None
        if ready is not None:
            conn, found = ready
        elif deploy:  # probe and ship at once, on two channels of one connection
            conn = await _connect(target)
            phases.mark("connect")
            try:
                found, base = await asyncio.gather(_probe(conn), self._ship(conn))
            except BaseException:
                conn.close()
                raise
            phases.mark("probe + ship")
        else:
            conn, found = await connect_and_probe(target, phases)
        try:
            await self._trust(name, conn)
            agent = None
            if token is not None:
                agent = await remote.running_agent(conn.conn, token)
                phases.mark("look for agent")
            else:
                token = secrets.token_hex(24)
            if agent is None:
                bundle = await asyncio.to_thread(agent_bundle)
                phases.mark("bundle")
                agent = await remote.start_agent(conn.conn, token, found, bundle, UNIT, phases, base)
                logger.info("started the agent on %s (%s), pid %s", name, target.host.hostname, agent.pid)
            else:
                logger.info("re-attached to the agent on %s (%s), pid %s", name, target.host.hostname, agent.pid)
            listener = await conn.conn.forward_local_port("127.0.0.1", 0, "127.0.0.1", agent.port)
            home = await self._forward_home(name, conn.conn, home_port if isinstance(home_port, int) else None)
            phases.mark("forwards")
        except BaseException:
            conn.close()
            raise
        self._attached[name] = _Attached(conn, listener, home)
        if home is not None and home.get_port() != home_port:
            await self._set_home_port(name, home.get_port())
        endpoint = AgentEndpoint(url=f"http://127.0.0.1:{listener.get_port()}", token=token, pid=agent.pid)
        host = await agent_host(endpoint)
        phases.mark("healthcheck")
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

    async def _ship(self, conn: Connection) -> str:
        bundle = await asyncio.to_thread(agent_bundle)
        return await remote.ship_bundle(conn.conn, bundle)

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

    async def _forward_home(
        self, name: str, conn: asyncssh.SSHClientConnection, stored: int | None
    ) -> asyncssh.SSHListener | None:
        """The reverse forward to the server on the host's loopback, on the port used before if
        there was one (running workers were given it). A port still held by a stale sshd session
        of this host's previous connection (its link went down: the host's sshd never saw the
        connection end) is freed by ending that session; any other holder gets a new port."""
        if self.home is None:
            return None
        if stored:
            for attempt in range(2):
                try:
                    return await conn.forward_remote_port("127.0.0.1", stored, self.home.host, self.home.port)
                except asyncssh.ChannelListenError:
                    if attempt == 0 and await _end_stale_forward(conn, stored):
                        continue
                    logger.warning(
                        "fleet host %s: port %s on its loopback is taken; jobs started there before"
                        " reach the server no more (serverless workers are replaced)",
                        name,
                        stored,
                    )
        try:
            return await conn.forward_remote_port("127.0.0.1", 0, self.home.host, self.home.port)
        except asyncssh.ChannelListenError as e:  # sshd refuses remote forwarding (AllowTcpForwarding)
            logger.warning("fleet host %s: no forward to the server (%s): jobs there cannot call it", name, e)
            return None

    def home_url(self, name: str) -> str | None:
        """The server's URL as jobs on this (attached) host reach it, or None."""
        attached = self._attached.get(name)
        if attached is None or attached.home is None:
            return None
        return f"http://127.0.0.1:{attached.home.get_port()}"

    async def _set_home_port(self, name: str, port: int) -> None:
        async with self.db.session() as session:
            inst = (await session.execute(select(InstanceModel).where(InstanceModel.name == name))).scalar_one()
            fi = await session.get(FleetInstanceModel, inst.id)
            if fi is not None:
                ssh = json.loads(fi.ssh or "{}")
                ssh["home_port"] = port
                fi.ssh = json.dumps(ssh)
                await session.commit()

    async def _clear_message(self, name: str) -> None:
        async with self.db.session() as session:
            inst = (await session.execute(select(InstanceModel).where(InstanceModel.name == name))).scalar_one()
            fi = await session.get(FleetInstanceModel, inst.id)
            if fi is not None and fi.status_message is not None:
                fi.status_message = None
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
        forward = self._forwards.get(key)
        if forward is None:
            forward = self._forwards[key] = await open_forward(attached.connection.conn, address, port)
        return f"http://127.0.0.1:{forward.get_port()}"

    async def _detach(self, name: str) -> None:
        for key in [k for k in self._forwards if k[0] == name]:
            self._forwards.pop(key).close()
        attached = self._attached.pop(name, None)
        if attached is not None:
            attached.listener.close()
            if attached.home is not None:
                attached.home.close()
            attached.connection.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(attached.connection.wait_closed(), 5)


async def _answers(conn: asyncssh.SSHClientConnection) -> bool:
    """Whether the host runs a command over this connection within `QUICK_CHECK_TIMEOUT`."""
    try:
        result = await asyncio.wait_for(conn.run("true", check=False), QUICK_CHECK_TIMEOUT)
    except (asyncssh.Error, OSError, TimeoutError):
        return False
    return result.exit_status == 0


async def _end_stale_forward(conn: asyncssh.SSHClientConnection, port: int) -> bool:
    """End the sshd process listening on the host's 127.0.0.1:`port` if it is an sshd session of
    this SSH user whose connection came from where this one does (a connection of ours that died on
    our side only; never another machine's); True if one was ended."""
    script = (
        'me="${SSH_CLIENT%% *}"; [ -n "$me" ] || exit 1; '
        f"pids=$(ss -Hltnp 'sport = :{int(port)}' 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); "
        'n=0; for p in $pids; do [ "$(cat /proc/$p/comm 2>/dev/null)" = sshd ] && '
        '[ "$(stat -c %u /proc/$p)" = "$(id -u)" ] && '
        'ss -Htnp state established 2>/dev/null | grep "pid=$p," | grep -q " $me:" && '
        'kill "$p" 2>/dev/null && n=1; done; '
        '[ "$n" = 1 ] && sleep 0.5; [ "$n" = 1 ]'
    )
    try:
        result = await conn.run(f"sh -c {shlex.quote(script)}", check=False, timeout=15)
    except (asyncssh.Error, OSError, TimeoutError):
        return False
    return result.exit_status == 0
