"""The SSH server of a dev environment, run as the job's own process (``python -m dstack.agent.devenv``).

Why inside the job: it then has everything the job has — its user and sandbox, its network
namespace, its venv and env vars, its working directory — and every session it opens inherits
them. OpenSSH's sshd cannot do this for a sandboxed job: it looks its user up in /etc/passwd and
job users have no entry. The server reaches it through its tunnel (server/routers/tunnel.py).

Environment: ``DSTACK_SSH_PORT`` (where to listen), ``DSTACK_SSH_KEY_PUB`` (the one accepted
public key; removed before any session starts). A fresh host key is made at each start.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import hashlib
import os
import pty
import struct
import sys
import termios
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncssh

PORT_ENV = "DSTACK_SSH_PORT"
KEY_ENV = "DSTACK_SSH_KEY_PUB"
PORT_BASE = 20000
PORT_SPAN = 30000


AGENT_PYTHON_ENV = "DSTACK_AGENT_PYTHON"
AGENT_PATH_ENV = "DSTACK_AGENT_PATH"


def with_agent_python(env: dict[str, str]) -> Path:
    """Called by the agent for a dev environment's job: the agent's interpreter and the folder its
    `dstack` (and asyncssh) import from, which the job runs this module with — the server's own
    interpreter path means nothing on a fleet host. Returns that folder (the sandbox exposes it)."""
    import dstack

    root = Path(dstack.__file__).resolve().parent.parent
    env[AGENT_PYTHON_ENV] = sys.executable
    env[AGENT_PATH_ENV] = str(root)
    return root


def ssh_port(job_id: str) -> int:
    """The port a job's SSH server listens on, derived from the job id so the server and the job
    agree on it without another round trip (a host-network job shares ports with its neighbours)."""
    digest = hashlib.sha256(job_id.encode()).digest()
    return PORT_BASE + int.from_bytes(digest[:4], "big") % PORT_SPAN


def _session_env(term: str | None) -> dict[str, str]:
    own = (KEY_ENV, PORT_ENV, AGENT_PYTHON_ENV, AGENT_PATH_ENV)
    env = {k: v for k, v in os.environ.items() if k not in own}
    if term:
        env["TERM"] = term
    return env


def _argv(command: str | None) -> list[str]:
    shell = os.environ.get("SHELL") or "/bin/bash"
    if not os.path.exists(shell):
        shell = "/bin/sh"
    return [shell, "-c", command] if command else [shell, "-i"]


class Launcher:
    """How a session's process starts. This one: on the job's own host, as the job (this process
    runs inside the job); `agent.devenv_container.ContainerLauncher` runs them in a container.
    `local_files`: asyncssh's own SFTP and scp serve this process's filesystem (the job's)."""

    local_files = True

    def argv(self, command: str | None, term: str | None) -> list[str]:
        return _argv(command)

    def env(self, term: str | None) -> dict[str, str]:
        return _session_env(term)


HOST = Launcher()


@functools.cache
def _server_class() -> Callable[[asyncssh.SSHKey], asyncssh.SSHServer]:
    """The SSH server class, made on first use: asyncssh is imported only where a session server
    runs (the agent imports this module for its constants; asyncssh costs ~0.1 s of its start)."""
    import asyncssh

    class _Server(asyncssh.SSHServer):
        def __init__(self, key: asyncssh.SSHKey) -> None:
            self._key = key

        def begin_auth(self, username: str) -> bool:
            return True  # any user name: the key decides

        def public_key_auth_supported(self) -> bool:
            return True

        def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
            return key.public_data == self._key.public_data

        def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
            return True  # local forwards (VS Code's server, `ssh -L`) from inside the job's network

    return _Server


async def _run_pipes(process: asyncssh.SSHServerProcess[bytes], argv: Sequence[str], env: dict[str, str]) -> int:
    import asyncssh

    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None

    async def copy_out(src: asyncio.StreamReader, dst: Any) -> None:
        while data := await src.read(65536):
            dst.write(data)

    async def copy_in(dst: asyncio.StreamWriter) -> None:
        try:
            while data := await process.stdin.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, asyncssh.Error):
            pass
        finally:
            dst.close()

    feeder = asyncio.create_task(copy_in(proc.stdin))
    # all of the output is sent before the exit status: the client reads it in that order
    await asyncio.gather(copy_out(proc.stdout, process.stdout), copy_out(proc.stderr, process.stderr))
    rc = await proc.wait()
    feeder.cancel()
    return rc


def _set_size(fd: int, size: tuple[int, int, int, int]) -> None:
    cols, rows = size[0] or 80, size[1] or 24
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def _run_pty(process: asyncssh.SSHServerProcess[bytes], argv: Sequence[str], env: dict[str, str]) -> int:
    import asyncssh

    master, slave = pty.openpty()
    _set_size(master, process.term_size)

    def controlling_tty() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        preexec_fn=controlling_tty,
    )
    os.close(slave)
    loop = asyncio.get_running_loop()
    output_done = asyncio.Event()

    def readable() -> None:
        try:
            data = os.read(master, 65536)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(master)
            output_done.set()
            return
        process.stdout.write(data)

    loop.add_reader(master, readable)

    async def feed() -> None:
        while True:
            try:
                data = await process.stdin.read(65536)
            except asyncssh.TerminalSizeChanged as change:
                _set_size(master, (change.width, change.height, 0, 0))
                continue
            except asyncssh.BreakReceived:
                continue
            if not data:
                return
            os.write(master, data)

    feeder = asyncio.create_task(feed())
    rc = await proc.wait()
    try:
        await asyncio.wait_for(output_done.wait(), 1.0)
    except TimeoutError:
        loop.remove_reader(master)
    feeder.cancel()
    os.close(master)
    return rc


async def _handle(process: asyncssh.SSHServerProcess[bytes], launcher: Launcher) -> None:
    import asyncssh

    try:
        term = process.get_terminal_type()
        if process.subsystem:
            process.stderr.write(f"dstack: no subsystem {process.subsystem!r} here\n".encode())
            process.exit(1)
            return
        if term:
            rc = await _run_pty(process, launcher.argv(process.command, term), launcher.env(term))
        else:
            rc = await _run_pipes(process, launcher.argv(process.command, None), launcher.env(None))
        process.exit(rc if rc >= 0 else 128 - rc)
    except (OSError, asyncssh.Error) as e:
        process.stderr.write(f"dstack: cannot start the session: {e}\n".encode())
        process.exit(1)


async def serve(port: int, key_line: str, host: str = "0.0.0.0", launcher: Launcher = HOST) -> asyncssh.SSHAcceptor:
    """Listen for SSH sessions that present `key_line`'s key; `launcher` starts their processes.

    SFTP and scp are asyncssh's own (on this process's filesystem) only when sessions run here:
    beside a container, this process's filesystem is the host's, so they are off there."""
    import asyncssh

    server_class = _server_class()
    client_key = asyncssh.import_public_key(key_line)
    host_key = asyncssh.generate_private_key("ssh-ed25519")

    async def handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
        await _handle(process, launcher)

    return await asyncssh.create_server(
        lambda: server_class(client_key),
        host,
        port,
        server_host_keys=[host_key],
        process_factory=handle,
        encoding=None,
        sftp_factory=True if launcher.local_files else None,
        allow_scp=launcher.local_files,
        agent_forwarding=False,
        x11_forwarding=False,
        keepalive_interval=30,
    )


async def _main(argv: list[str]) -> int:
    import asyncssh

    port_text, key_line = os.environ.get(PORT_ENV, ""), os.environ.pop(KEY_ENV, "")
    if not port_text.isdigit() or not key_line:
        print(f"dstack: {PORT_ENV} and {KEY_ENV} must be set", file=sys.stderr)
        return 2
    try:
        acceptor = await serve(int(port_text), key_line)
    except (OSError, ValueError, asyncssh.Error) as e:
        print(f"dstack: cannot start the SSH server on port {port_text}: {e}", file=sys.stderr)
        return 1
    print(f"dstack: the dev environment is ready (SSH on port {port_text}, working dir {os.getcwd()})", flush=True)
    await acceptor.wait_closed()
    return 0


def main(argv: list[str] | None = None) -> Any:
    return asyncio.run(_main(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
