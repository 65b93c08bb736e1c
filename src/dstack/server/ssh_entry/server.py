"""The SSH entry: how dstack's official client attaches to a job (`dstack apply` without `-d`,
`dstack attach`, `ssh RUN`).

That client reaches a job in two SSH hops, as it does on dstack's own hosts ("dockerized"): it
logs into `<hostname>:<ssh_port>` as the job's `username`, opens `direct-tcpip` to
`localhost:10022` there (`ProxyJump`), and speaks SSH again over that channel to the "container",
forwarding `localhost:10999` (the runner's `/logs_ws`) and the job's ports. Here:

* the outer hop is this server (listening where the API listens, on `DSTACK_SERVER_SSH_PORT`):
  the user name is a job id, the key must be the run's `ssh_key_pub` or its owner's user key,
  and the only channel it opens is `direct-tcpip` to port 10022;
* that channel leads, for a dev environment, to the job's own SSH server (`agent/devenv.py`,
  reached as `routers/tunnel.py` reaches it: shells, SFTP and forwards are the job's); for other
  runs, to an inner SSH server run in this process over a socket pair, which accepts the same
  keys and opens `direct-tcpip` only to port 10999 (answered by `logs_ws`, from our log store)
  and to the ports the job declares (relayed as the proxy reaches replicas).

No shell, exec, remote forward or other destination is served by the entry itself.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import asyncssh

from dstack.agent.devenv import ssh_port as devenv_ssh_port
from dstack.core.models.runs import RunType
from dstack.server.db import Database
from dstack.server.routers.tunnel import SESSIONS, record_ssh_session
from dstack.server.services import fleets
from dstack.server.services.logs import LogNotifier
from dstack.server.ssh_entry import logs_ws
from dstack.server.ssh_entry.access import JobTarget, find_target
from dstack.server.ssh_entry.keys import EntryKeys, same_key

logger = logging.getLogger(__name__)
#: the "container" SSH port dstack's client jumps to through the outer hop
CONTAINER_SSH_PORT = 10022
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
CHUNK = 65536
CONNECT_SECONDS = 15
LOGIN_SECONDS = 30

Handler = Callable[[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]], Awaitable[None]]


class Entry:
    """What both hops share: the database, the log notifier, the keys."""

    def __init__(self, db: Database, notifier: LogNotifier, keys: EntryKeys) -> None:
        self.db = db
        self.notifier = notifier
        self.keys = keys
        self._server: asyncssh.SSHAcceptor | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncssh.listen(
            host,
            port,
            server_factory=lambda: _Outer(self),
            server_host_keys=[self.keys.host_key],
            login_timeout=LOGIN_SECONDS,
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
        )
        self.port = self._server.get_port()  # the one chosen when `port` is 0
        logger.info("SSH entry for dstack's client listening on %s:%s", host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def outer_channel(self, target: JobTarget) -> Handler:
        """What the outer hop's channel to port 10022 leads to."""
        if target.run_type == RunType.DEV_ENVIRONMENT:
            return self._devenv_relay(target)
        return self._inner_server(target)

    def _devenv_relay(self, target: JobTarget) -> Handler:
        async def handler(reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]) -> None:
            if not target.running or target.jpd is None:
                writer.close()
                return
            # counts for the dev environment's inactivity_duration, as a WebSocket tunnel does
            SESSIONS.opened(target.run_id)
            await record_ssh_session(target.job_id, "ssh_opened_at")
            try:
                await _relay_to(reader, writer, await fleets.replica_url(target.jpd, devenv_ssh_port(target.job_id)))
            finally:
                SESSIONS.closed(target.run_id)
                await record_ssh_session(target.job_id, "ssh_closed_at")

        return handler

    def _inner_server(self, target: JobTarget) -> Handler:
        async def handler(reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]) -> None:
            ours, theirs = socket.socketpair()

            async def serve() -> asyncssh.SSHServerConnection:
                return await asyncssh.run_server(
                    ours,
                    server_factory=lambda: _Inner(self, target),
                    server_host_keys=[self.keys.host_key],
                    login_timeout=LOGIN_SECONDS,
                    allow_scp=False,
                    agent_forwarding=False,
                    x11_forwarding=False,
                )

            server = asyncio.create_task(serve())
            conn: asyncssh.SSHServerConnection | None = None
            try:
                r2, w2 = await asyncio.open_connection(sock=theirs)
                pipe = asyncio.create_task(_pipe_both(reader, writer, r2, w2))
                await asyncio.wait([server, pipe], return_when=asyncio.FIRST_COMPLETED)
                if server.done() and server.exception() is None:
                    conn = server.result()
                await pipe
            finally:
                if not server.done():
                    server.cancel()
                if conn is not None:
                    conn.close()
                ours.close()
                writer.close()

        return handler


class _Outer(asyncssh.SSHServer):
    """The first hop: a job's id as the user name, the run's keys, one channel to port 10022."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.target: JobTarget | None = None

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        target = await find_target(self.entry.db, self.entry.keys, username[:64])
        if target is None or not any(same_key(key, k) for k in target.keys):
            return False
        self.target = target
        return True

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Handler | bool:
        if self.target is None:
            return False
        if dest_host not in LOCAL_NAMES or dest_port != CONTAINER_SSH_PORT:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, f"only localhost:{CONTAINER_SSH_PORT} is reachable here"
            )
        return self.entry.outer_channel(self.target)


class _Inner(asyncssh.SSHServer):
    """The second hop of a task or service: the same keys; `/logs_ws` and the job's ports."""

    def __init__(self, entry: Entry, target: JobTarget) -> None:
        self.entry = entry
        self.target = target

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return any(same_key(key, k) for k in self.target.keys)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Handler | bool:
        if dest_host not in LOCAL_NAMES:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "only localhost is reachable")
        if dest_port == logs_ws.RUNNER_HTTP_PORT:
            return self._logs
        if dest_port in self.target.ports:
            return self._port(dest_port)
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, f"port {dest_port} is not one of the job's ports"
        )

    async def _logs(self, reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]) -> None:
        await logs_ws.serve(reader, writer, self.entry.db, self.entry.notifier, self.target)  # type: ignore[arg-type]

    def _port(self, port: int) -> Handler:
        async def handler(reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]) -> None:
            # the job's state now, not at login: a job that ended has nothing to reach
            target = await find_target(self.entry.db, self.entry.keys, self.target.job_id)
            if target is None or not target.running or target.jpd is None:
                writer.close()
                return
            await _relay_to(reader, writer, await fleets.replica_url(target.jpd, port))

        return handler


async def _relay_to(reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes], url: str) -> None:
    parts = urlsplit(url)
    try:
        r2, w2 = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 80), CONNECT_SECONDS
        )
    except (OSError, TimeoutError) as e:
        logger.info("SSH entry: cannot reach %s: %s", url, e)
        writer.close()
        return
    await _pipe_both(reader, writer, r2, w2)


async def _pipe_both(
    reader: asyncssh.SSHReader[bytes],
    writer: asyncssh.SSHWriter[bytes],
    r2: asyncio.StreamReader,
    w2: asyncio.StreamWriter,
) -> None:
    async def up() -> None:
        try:
            while data := await reader.read(CHUNK):
                w2.write(data)
                await w2.drain()
        except (ConnectionError, OSError, asyncssh.Error):
            pass
        finally:
            if w2.can_write_eof():
                try:
                    w2.write_eof()
                except OSError:
                    pass

    async def down() -> None:
        try:
            while data := await r2.read(CHUNK):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, asyncssh.Error):
            pass
        finally:
            try:
                writer.write_eof()
            except (OSError, asyncssh.Error):
                pass

    tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
    try:
        # both directions end on their own (half-closes pass through); a reset ends both
        await asyncio.wait(tasks, return_when=asyncio.ALL_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        w2.close()
        writer.close()
