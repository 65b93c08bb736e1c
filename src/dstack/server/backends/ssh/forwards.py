"""Local port forwards over an SSH connection, with a reachability check that goes end to end.

A TCP connect to a forward's local port proves nothing about the far side: the local listener
accepts first, and only then is the SSH channel to the target opened (and the local connection
closed if the target refuses). A service replica probed that way looks ready before its app
listens, and the proxy's first request to it fails. `reachable` opens a channel instead.
"""

import asyncio

import asyncssh

#: seconds a reachability check may take (the same bound as a direct TCP check's connect)
CHECK_TIMEOUT = 2.0


class Forward:
    """A local listener on 127.0.0.1 forwarding to `host:port` as the SSH server sees it."""

    def __init__(self, conn: asyncssh.SSHClientConnection, listener: asyncssh.SSHListener, host: str, port: int):
        self.conn = conn
        self.listener = listener
        self.host = host
        self.port = port
        self.local_port = listener.get_port()

    def get_port(self) -> int:
        return self.local_port

    def close(self) -> None:
        if _open.get(self.local_port) is self:  # the port may be another forward's by now
            del _open[self.local_port]
        self.listener.close()

    async def reachable(self) -> bool:
        """Whether the target accepts a connection from the SSH server's side right now."""
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                _, writer = await self.conn.open_connection(self.host, self.port)
        except (asyncssh.Error, OSError, TimeoutError):
            return False
        writer.close()
        return True


#: open forwards by local port, for `reachable_through_forward`
_open: dict[int, Forward] = {}


async def open_forward(conn: asyncssh.SSHClientConnection, host: str, port: int) -> Forward:
    """Forward a fresh local port on 127.0.0.1 to `host:port` through `conn`."""
    listener = await conn.forward_local_port("127.0.0.1", 0, host, port)
    forward = Forward(conn, listener, host, port)
    _open[forward.local_port] = forward
    return forward


async def reachable_through_forward(host: str, port: int) -> bool | None:
    """For a local address that is one of our forwards, whether its target is reachable; None when
    `host:port` is not a forward (a direct TCP connect tells the truth there)."""
    if host != "127.0.0.1":
        return None
    forward = _open.get(port)
    if forward is None:
        return None
    return await forward.reachable()
