"""SSH connections to fleet hosts: key auth, optional proxy jump, host keys trusted on first use.

The first connection to a host accepts its key and reports it; the caller stores it with the
instance, and every later connection accepts only that key (a changed key is refused, as
OpenSSH does). The same holds for the jump host.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import asyncssh

CONNECT_TIMEOUT = 15.0
KEEPALIVE_INTERVAL = 5  # seconds; a host that stops answering is found dead in ~15 s


class HostKeyMismatch(Exception):
    """The host's key is not the one trusted before."""


@dataclass
class Endpoint:
    """How to reach one SSH server; `host_key` (OpenSSH public key text) once trusted."""

    hostname: str
    port: int
    user: str
    private_key: str = field(repr=False)
    host_key: str | None = None


@dataclass
class Target:
    host: Endpoint
    jump: Endpoint | None = None


@dataclass
class Connection:
    conn: asyncssh.SSHClientConnection
    jump: asyncssh.SSHClientConnection | None
    #: the keys the host (and jump host) presented, OpenSSH public key text
    host_key: str
    jump_host_key: str | None

    def close(self) -> None:
        self.conn.close()
        if self.jump is not None:
            self.jump.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(Exception):
            await self.conn.wait_closed()
        if self.jump is not None:
            with contextlib.suppress(Exception):
                await self.jump.wait_closed()


def _known_hosts(ep: Endpoint) -> tuple[list[asyncssh.SSHKey], list[asyncssh.SSHKey], list[asyncssh.SSHKey]] | None:
    if ep.host_key is None:
        return None  # first use: accept, and report what was presented
    return ([asyncssh.import_public_key(ep.host_key)], [], [])


def _presented(conn: asyncssh.SSHClientConnection) -> str:
    key = conn.get_server_host_key()
    if key is None:
        raise asyncssh.Error(asyncssh.DISC_HOST_KEY_NOT_VERIFIABLE, "the server presented no host key")
    return key.export_public_key("openssh").decode().strip()


async def _open(ep: Endpoint, tunnel: asyncssh.SSHClientConnection | None) -> asyncssh.SSHClientConnection:
    try:
        key = asyncssh.import_private_key(ep.private_key)
    except (asyncssh.KeyImportError, ValueError) as e:
        raise ValueError(f"the private key for {ep.user}@{ep.hostname} cannot be read: {e}") from None
    try:
        return await asyncio.wait_for(
            asyncssh.connect(
                ep.hostname,
                ep.port,
                username=ep.user,
                client_keys=[key],
                known_hosts=_known_hosts(ep),
                tunnel=tunnel,
                agent_path=None,
                config=None,
                password=None,
                kbdint_auth=False,
                keepalive_interval=KEEPALIVE_INTERVAL,
                keepalive_count_max=3,
                login_timeout=CONNECT_TIMEOUT,
            ),
            CONNECT_TIMEOUT,
        )
    except asyncssh.HostKeyNotVerifiable as e:
        raise HostKeyMismatch(
            f"the host key of {ep.hostname}:{ep.port} changed since it was first trusted; refusing to connect"
            " (remove the host from the fleet and add it again if the change is expected)"
        ) from e


async def connect(target: Target) -> Connection:
    """Open a connection (through the jump host if any); raises `OSError`, `asyncssh.Error`,
    `TimeoutError`, `HostKeyMismatch` or `ValueError` (a bad key)."""
    jump = None
    jump_key = None
    if target.jump is not None:
        jump = await _open(target.jump, None)
        jump_key = _presented(jump)
    try:
        conn = await _open(target.host, jump)
    except BaseException:
        if jump is not None:
            jump.close()
        raise
    return Connection(conn=conn, jump=jump, host_key=_presented(conn), jump_host_key=jump_key)


def describe_error(e: BaseException) -> str:
    """A one-line reason for a failed connection, naming no secrets."""
    if isinstance(e, TimeoutError):
        return "timed out connecting over SSH"
    if isinstance(e, asyncssh.PermissionDenied):
        return "SSH authentication failed (the key was refused)"
    if isinstance(e, asyncssh.Error):
        return f"SSH error: {e.reason}"
    if isinstance(e, OSError):
        return f"cannot connect: {e.strerror or e}"
    return str(e) or type(e).__name__
