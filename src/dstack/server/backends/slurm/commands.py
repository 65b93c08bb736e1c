"""Running Slurm's own CLI (`sbatch`, `squeue`, `scontrol`, `scancel`, `sinfo`): the universal
transport. Locally (the server's host is a Slurm client) or on a login host over SSH."""

from __future__ import annotations

import asyncio
import os
import shlex
from abc import ABC, abstractmethod
from dataclasses import dataclass

import asyncssh

from dstack.server.backends.slurm.config import SlurmLogin
from dstack.server.backends.ssh.forwards import Forward, open_forward

#: the most output one Slurm command may return (a huge cluster's `sinfo` is far below this)
MAX_OUTPUT = 8 * 1024 * 1024
COMMAND_TIMEOUT = 30.0


class SlurmCommandError(Exception):
    """A Slurm command failed or could not be run; the message says which and why."""


@dataclass(frozen=True)
class CommandResult:
    code: int
    stdout: str
    stderr: str


class CommandRunner(ABC):
    @abstractmethod
    async def run(self, argv: list[str], stdin: str | None = None) -> CommandResult:
        """Run `argv` where Slurm's commands live; never raises for a non-zero exit."""

    async def forward(self, host: str, port: int) -> tuple[str, int]:
        """Where this side reaches `host:port`: the address itself (no tunnel needed)."""
        return host, port

    async def close_forward(self, host: str, port: int) -> None:
        """Stop forwarding to `host:port` (its job ended); nothing to do without a tunnel."""
        return None

    async def close(self) -> None:
        return None

    async def check(self, argv: list[str], stdin: str | None = None) -> str:
        """`run`, raising `SlurmCommandError` (with the command's stderr) on a non-zero exit."""
        r = await self.run(argv, stdin)
        if r.code != 0:
            raise SlurmCommandError(
                f"{argv[0]} failed ({r.code}): {r.stderr.strip()[:2000] or r.stdout.strip()[:2000]}"
            )
        return r.stdout


class LocalRunner(CommandRunner):
    """Slurm's commands on this host; `env` adds variables (e.g. `SLURM_CONF`)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = {**os.environ, **(env or {})}

    async def run(self, argv: list[str], stdin: str | None = None) -> CommandResult:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.env,
            )
        except OSError as e:
            raise SlurmCommandError(f"cannot run {argv[0]}: {e}") from e
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(stdin.encode() if stdin is not None else None), COMMAND_TIMEOUT
            )
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SlurmCommandError(f"{argv[0]} did not finish within {COMMAND_TIMEOUT:g} s") from None
        return CommandResult(
            proc.returncode or 0, out[:MAX_OUTPUT].decode(errors="replace"), err[:MAX_OUTPUT].decode(errors="replace")
        )


class SshRunner(CommandRunner):
    """Slurm's commands on a login host, over one asyncssh connection (opened on first use)."""

    def __init__(self, login: SlurmLogin) -> None:
        self.login = login
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()
        self._forwards: dict[tuple[str, int], Forward] = {}

    async def _connection(self) -> asyncssh.SSHClientConnection:
        async with self._lock:
            if self._conn is not None and self._conn.is_closed():  # dropped: its forwards went with it
                self._conn = None
            if self._conn is None:
                keys = [os.path.expanduser(self.login.identity_file)] if self.login.identity_file else None
                known = os.path.expanduser(self.login.known_hosts or "~/.ssh/known_hosts")
                try:
                    self._conn = await asyncssh.connect(
                        self.login.hostname,
                        port=self.login.port,
                        username=self.login.user,
                        client_keys=keys,
                        known_hosts=known,  # never unchecked: an unknown host key refuses the connection
                        connect_timeout=COMMAND_TIMEOUT,
                    )
                except (OSError, asyncssh.Error) as e:
                    raise SlurmCommandError(
                        f"cannot reach the Slurm login host {self.login.user}@{self.login.hostname}: {e}"
                    ) from e
            return self._conn

    async def run(self, argv: list[str], stdin: str | None = None) -> CommandResult:
        conn = await self._connection()
        try:
            r = await conn.run(shlex.join(argv), input=stdin, check=False, timeout=COMMAND_TIMEOUT)
        except (OSError, asyncssh.Error, TimeoutError) as e:
            self._conn = None
            raise SlurmCommandError(f"{argv[0]} on {self.login.hostname} failed: {e}") from e
        if r.exit_status is None:  # no exit status: the connection dropped under it, not "exit 0, no output"
            self._conn = None
            raise SlurmCommandError(f"{argv[0]} on {self.login.hostname} did not finish: the connection dropped")
        out, err = r.stdout or "", r.stderr or ""
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        err = err.decode(errors="replace") if isinstance(err, bytes) else err
        return CommandResult(int(r.exit_status or 0), out[:MAX_OUTPUT], err[:MAX_OUTPUT])

    async def forward(self, host: str, port: int) -> tuple[str, int]:
        """A local port forwarded through the login host's connection to `host:port` (a compute
        node the server cannot reach itself), opened once per target and connection."""
        conn = await self._connection()
        key = (host, port)
        found = self._forwards.get(key)
        if found is not None and found.conn is conn:
            return "127.0.0.1", found.get_port()
        if found is not None:  # opened over a connection that dropped since: re-opened on this one
            found.close()
        try:
            forward = await open_forward(conn, host, port)
        except (OSError, asyncssh.Error) as e:
            raise SlurmCommandError(f"no forward to {host}:{port} through {self.login.hostname}: {e}") from e
        self._forwards[key] = forward
        return "127.0.0.1", forward.get_port()

    async def close_forward(self, host: str, port: int) -> None:
        found = self._forwards.pop((host, port), None)
        if found is not None:
            found.close()

    async def close(self) -> None:
        for forward in self._forwards.values():
            forward.close()
        self._forwards.clear()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def runner_for(login: SlurmLogin | None, env: dict[str, str] | None = None) -> CommandRunner:
    return SshRunner(login) if login is not None else LocalRunner(env)
