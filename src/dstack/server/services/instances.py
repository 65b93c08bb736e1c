"""Instances the backends provide, one agent client for each, and the supervisor that brings a
dead agent back.

Every few seconds the supervisor asks each agent's healthcheck. An agent that stops answering is
handed to its backend, which re-attaches to one that still runs or starts a new one; the
instance's row and client then point at that agent and listeners (the pipeline) reconcile the
jobs. While an instance is being recovered it is `down`: nothing new is assigned to it.
"""

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

from sqlalchemy import select

from dstack.core.models.runs import InstanceStatus
from dstack.core.notifier import KeyedNotifier
from dstack.server import crypto
from dstack.server.agent_client import AgentClient
from dstack.server.backends.base import AgentEndpoint, Backend, ProvisionedInstance
from dstack.server.db import Database
from dstack.server.models import InstanceModel

logger = logging.getLogger(__name__)

#: an agent that answers other requests all the time still gets a real healthcheck this often (in checks)
HEALTHCHECK_EVERY_CHECKS = 5


class InstanceManager:
    def __init__(
        self,
        db: Database,
        backends: list[Backend],
        check_seconds: float = 2.0,
        recovery_hold_seconds: float = 60.0,
    ) -> None:
        self.db = db
        self.backends = backends
        #: how often each agent's healthcheck is asked (settings: DSTACK_SERVER_AGENT_CHECK_SECONDS)
        self.check_seconds = check_seconds
        # Jobs wait this long for an instance whose agent is being brought back; past it the instance is
        # offered again (and fails what it cannot run) rather than holding work back forever.
        self.recovery_hold_seconds = recovery_hold_seconds
        self._clients: dict[str, AgentClient] = {}
        self._backend_of: dict[str, tuple[Backend, str]] = {}  # instance id -> (backend, instance name)
        self._retired: list[AgentClient] = []  # clients of replaced agents (closed at shutdown)
        self._down: dict[str, float] = {}  # instance id -> when its agent was found lost (monotonic)
        self._recovered: KeyedNotifier[str] = KeyedNotifier()  # instance ids whose agent was replaced
        self._supervisor: asyncio.Task[None] | None = None
        self._checking: dict[str, asyncio.Task[None]] = {}  # instance id -> its check in progress
        #: awaited with an instance id once its agent was replaced (the pipeline reconciles jobs)
        self.agent_listeners: list[Callable[[str], Awaitable[None]]] = []

    async def start(self) -> None:
        """Bring every backend's instances up, reusing agents that outlived a previous server,
        and start supervising their agents."""
        async with self.db.session() as session:
            rows = {i.name: i for i in (await session.execute(select(InstanceModel))).scalars()}
            known = {}
            for name, row in rows.items():
                agent = json.loads(row.agent or "{}")
                if agent.get("url"):
                    try:
                        token = crypto.decrypt(agent["token"])
                    except crypto.DecryptionError:  # another key file: the backend starts a new agent
                        logger.warning("instance %s: its agent token cannot be decrypted", name)
                        continue
                    known[name] = AgentEndpoint(url=agent["url"], token=token, pid=agent.get("pid"))
            for backend in self.backends:
                for inst in await backend.ensure_instances(known):
                    found = rows.get(inst.name)
                    if found is None:
                        row = InstanceModel(name=inst.name, backend=inst.backend)
                        session.add(row)
                    else:
                        row = found
                    _store(row, inst)
                    await session.flush()
                    self._clients[row.id] = AgentClient(inst.agent)
                    self._backend_of[row.id] = (backend, inst.name)
            await session.commit()
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name="agent-supervisor")

    def client(self, instance_id: str) -> AgentClient:
        return self._clients[instance_id]

    def has_client(self, instance_id: str) -> bool:
        return instance_id in self._clients

    async def add(self, instance_id: str, backend: Backend, inst: ProvisionedInstance) -> None:
        """An instance that came up after start (a fleet host): store its agent and supervise it."""
        async with self.db.session() as session:
            row = (await session.execute(select(InstanceModel).where(InstanceModel.id == instance_id))).scalar_one()
            _store(row, inst)
            await session.commit()
        old = self._clients.get(instance_id)
        if old is not None:
            self._retired.append(old)
        self._clients[instance_id] = AgentClient(inst.agent)
        self._backend_of[instance_id] = (backend, inst.name)
        self._down.pop(instance_id, None)
        self._recovered.notify(instance_id)

    async def remove(self, instance_id: str) -> None:
        """Stop supervising an instance (its fleet or the host was deleted)."""
        client = self._clients.pop(instance_id, None)
        self._backend_of.pop(instance_id, None)
        self._down.pop(instance_id, None)
        if client is not None:
            await client.close()

    def is_down(self, instance_id: str) -> bool:
        """True while the instance's agent is lost and being brought back."""
        since = self._down.get(instance_id)
        return since is not None and time.monotonic() - since < self.recovery_hold_seconds

    async def wait_recovered(self, instance_id: str, old: AgentClient, timeout: float) -> AgentClient | None:
        """After a connection error through `old`: the instance's client once its agent answers
        again (a new client if the agent was replaced), or None after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            current = self._clients.get(instance_id)
            if current is None:
                return None
            if current is not old:
                return current
            if await current.healthy(timeout=min(2.0, max(0.1, deadline - loop.time()))):
                return current
            await self._recovered.wait(instance_id, min(self.check_seconds, max(0.0, deadline - loop.time())))
        return None

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(self.check_seconds)
            # Each in its own task: a host that does not answer (an SSH connect timing out) must
            # not delay the checks of the others; one check per instance at a time.
            for instance_id in list(self._clients):
                task = self._checking.get(instance_id)
                if task is None or task.done():
                    self._checking[instance_id] = asyncio.create_task(self._check_logged(instance_id))

    async def _check_logged(self, instance_id: str) -> None:
        try:
            if instance_id in self._clients:
                await self.check(instance_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("checking the agent of instance %s failed", instance_id)

    def _recently_alive(self, client: AgentClient) -> bool:
        """The agent answered other requests (polls, metrics) since the last check and passed a real
        healthcheck (which also proves its pid) within HEALTHCHECK_EVERY_CHECKS checks: no request
        needed now. With 50 busy hosts that is most of the supervisor's requests saved."""
        now = time.monotonic()
        return (
            client.last_answer is not None
            and client.last_healthy is not None
            and now - client.last_answer < self.check_seconds
            and now - client.last_healthy < self.check_seconds * HEALTHCHECK_EVERY_CHECKS
        )

    def _answered_lately(self, client: AgentClient) -> bool:
        """The agent answered something within HEALTHCHECK_EVERY_CHECKS checks."""
        return (
            client.last_answer is not None
            and time.monotonic() - client.last_answer < self.check_seconds * HEALTHCHECK_EVERY_CHECKS
        )

    def _timing_out_briefly(self, client: AgentClient) -> bool:
        """Healthchecks have run out of time for less than HEALTHCHECK_EVERY_CHECKS checks in a row."""
        since = client.timing_out_since
        return since is not None and time.monotonic() - since < self.check_seconds * HEALTHCHECK_EVERY_CHECKS

    async def check(self, instance_id: str) -> bool:
        """Ask the instance's agent whether it lives; bring back one that died. True if it was replaced."""
        client = self._clients[instance_id]
        if self._recently_alive(client):
            self._down.pop(instance_id, None)
            return False
        if await client.healthy():
            self._down.pop(instance_id, None)
            return False
        if client.last_check_timed_out and (self._answered_lately(client) or self._timing_out_briefly(client)):
            # A healthcheck that only ran out of time, while the agent answers other requests or
            # not for long yet: the server (or the host) is busy, not the agent gone. Re-attaching
            # now would add load (a new SSH connection per host) exactly when there is too much.
            logger.debug("the agent of instance %s answered its healthcheck late; not treated as lost", instance_id)
            return False
        backend, name = self._backend_of[instance_id]
        first = instance_id not in self._down
        self._down.setdefault(instance_id, time.monotonic())
        try:
            inst = await backend.recover_instance(name, client.endpoint)
        except Exception as e:
            if first:  # once per outage, not every few seconds
                logger.exception("bringing back the agent of instance %s failed; trying again", name)
            else:
                logger.debug("bringing back the agent of instance %s failed again: %s", name, e)
            return False
        if inst is None:  # the agent lives but is slow to answer: not replaced
            self._down.pop(instance_id, None)
            return False
        if self._backend_of.get(instance_id) != (backend, name):  # removed meanwhile (its fleet was deleted)
            return False
        async with self.db.session() as session:
            row = (await session.execute(select(InstanceModel).where(InstanceModel.id == instance_id))).scalar_one()
            _store(row, inst)
            await session.commit()
        self._retired.append(client)  # requests in flight through it fail by themselves
        self._clients[instance_id] = AgentClient(inst.agent)
        self._down.pop(instance_id, None)
        logger.warning(
            "the agent of instance %s (pid %s) was lost; now using the agent with pid %s at %s",
            name,
            client.endpoint.pid,
            inst.agent.pid,
            inst.agent.url,
        )
        self._recovered.notify(instance_id)
        for listener in self.agent_listeners:
            try:
                await listener(instance_id)
            except Exception:
                logger.exception("reconciling jobs of instance %s failed", name)
        return True

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        for task in self._checking.values():
            task.cancel()
        await asyncio.gather(*self._checking.values(), return_exceptions=True)
        for c in [*self._clients.values(), *self._retired]:
            await c.close()
        for b in self.backends:
            await b.shutdown()


def _store(row: InstanceModel, inst: ProvisionedInstance) -> None:
    row.region = inst.region
    row.hostname = inst.hostname
    row.resources = inst.resources.model_dump_json()
    row.price = inst.price
    row.status = InstanceStatus.IDLE
    row.agent = json.dumps(
        {
            "url": inst.agent.url,
            "token": crypto.encrypt(inst.agent.token),
            "pid": inst.agent.pid,
            "network_isolation": inst.agent.network_isolation,
            "containers": inst.agent.containers,
        }
    )
