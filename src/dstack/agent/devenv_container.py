"""A dev environment with an ``image``: its SSH server runs beside the container, its sessions inside.

Why beside, not inside: an image need not have a Python at all (the busybox of the tests has
none), and the agent's own interpreter cannot be bind-mounted in with any confidence (its libc
and libraries are the host's, an Alpine or CUDA image has others). So the server is
``agent.devenv`` with the agent's Python on the host, and every session is ``podman exec``
(``docker exec``) into the container: the CLI gives the session exactly what a process of the
job has — the container's filesystem and mounts, its environment (the job's env was set on
``run``), working directory, user, cgroup (so the job's metrics count it) and PID namespace —
with no host binary entering the image. Alternatives rejected: ``nsenter`` into the container's
namespaces leaves its env, user and cgroup to be rebuilt by hand; a chroot or ``/proc/PID/root``
file server run by this root process would follow a symlink made inside the container out to
the host's files.

Forwards (``ssh -L``, VS Code's server): connections this process opens from the job's network
namespace, which the container joined (``--network ns:...``; this process enters it with
``setns`` right after starting the container's CLI), or from the host network the container
shares: either way they reach what the job listens on. SFTP is not served yet (the request is
refused): asyncssh's SFTP and scp would read and write this process's filesystem, the host's, as
root, and asyncssh hands the ``sftp`` subsystem to its own server only; relaying it to the
image's ``sftp-server`` through ``exec`` needs a session of our own. Legacy ``scp -O`` works
where the image has ``scp`` (it is a command), and so does ``ssh RUN 'cat > f' < f``.

How it runs: for such a job the agent's job process is this module with the CLI's ``run`` line
as its arguments (`wrap`). It starts the container and passes its output on; the job's script
prints `READY_LINE` after ``init`` and then sleeps (`KEEPALIVE`), and only then does the server
listen — as a host dev environment's server starts after ``init``. The module exits with the
container's status: stop and abort reach the container through the CLI as for any image job.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstack.agent import devenv
from dstack.agent.containers import ContainerRuntime, ContainerSpec, container_shell

if TYPE_CHECKING:  # imported where a session server starts: the agent itself never needs it
    import asyncssh

SETTINGS_ENV = "DSTACK_DEVENV_CONTAINER"  # JSON: the CLI with its global args, the container, netns, shell
READY_LINE = "dstack: init is done, starting the SSH server of the dev environment"  # no quote in it
#: what the container runs after `init`: says so (this module then listens), then stays up until stopped
KEEPALIVE = f"echo '{READY_LINE}'; exec sleep infinity"
BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from dstack.agent.devenv_container import main; sys.exit(main(sys.argv[2:]))"
)
# Runs a session's shell: bash where the image has it, else its POSIX sh (as a job's script runs).
PICK_SHELL = 'if command -v bash >/dev/null 2>&1; then exec bash "$@"; fi; exec /bin/sh "$@"'
CLONE_NEWNET = 0x40000000
OWN_ENV = (SETTINGS_ENV, devenv.KEY_ENV, devenv.PORT_ENV, devenv.AGENT_PYTHON_ENV, devenv.AGENT_PATH_ENV)


def wrap(
    run_argv: list[str], rt: ContainerRuntime, c: ContainerSpec, netns: Path | None, env: dict[str, str]
) -> list[str]:
    """The job's command line for an image dev environment (called by the agent): this module with
    the agent's Python, the container's `run` line as its arguments; its settings go into `env`."""
    root = devenv.with_agent_python(env)
    settings = {"cli": rt.global_args, "name": c.name, "netns": str(netns) if netns else None, "shell": c.shell}
    env[SETTINGS_ENV] = json.dumps(settings)
    return [sys.executable, "-c", BOOT, str(root), *run_argv]


class ContainerLauncher(devenv.Launcher):
    """Sessions as `exec` into the container: its files, env, working directory and user."""

    local_files = False  # asyncssh's SFTP/scp would serve the host's files, as root

    def __init__(self, cli: list[str], name: str, shell: str | None, environ: Mapping[str, str]) -> None:
        self.cli, self.name, self.shell = cli, name, shell
        self._env = {k: v for k, v in environ.items() if k not in OWN_ENV}

    def shell_argv(self, command: str | None) -> list[str]:
        args = ["-c", command] if command else ["-i"]
        if self.shell is not None:
            return [container_shell(self.shell), *args]
        return ["/bin/sh", "-c", PICK_SHELL, "sh", *args]

    def argv(self, command: str | None, term: str | None) -> list[str]:
        tty = ["-t", "--env", f"TERM={term}"] if term else []
        return [*self.cli, "exec", "-i", *tty, self.name, *self.shell_argv(command)]

    def env(self, term: str | None) -> dict[str, str]:
        return dict(self._env)  # the CLI's own environment: the container's is set on `run`


def join_netns(path: str) -> None:
    """Enter the job's network namespace (this thread and the threads it starts from now on)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


class ReadyWatch:
    """Finds `READY_LINE` in a byte stream read in chunks (it may be split between two)."""

    def __init__(self) -> None:
        self._marker = READY_LINE.encode()
        self._tail = b""
        self.seen = False

    def feed(self, chunk: bytes) -> bool:
        if not self.seen:
            data = self._tail + chunk
            self.seen = self._marker in data
            self._tail = data[-len(self._marker) :]
        return self.seen


async def _serve_beside(run_argv: list[str], settings: dict[str, Any], port: int, key_line: str) -> int:
    import asyncssh

    cli, name = list(settings["cli"]), str(settings["name"])
    env = {k: v for k, v in os.environ.items() if k not in OWN_ENV}
    proc = await asyncio.create_subprocess_exec(
        *run_argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    launcher = ContainerLauncher(cli, name, settings.get("shell"), os.environ)
    acceptor: asyncssh.SSHAcceptor | None = None
    failed = False
    try:
        if settings.get("netns"):
            join_netns(str(settings["netns"]))
        watch, out = ReadyWatch(), sys.stdout.buffer
        while chunk := await proc.stdout.read(65536):
            out.write(chunk)
            out.flush()
            if acceptor is None and watch.feed(chunk):
                acceptor = await devenv.serve(port, key_line, launcher=launcher)
                print(f"dstack: the dev environment is ready (SSH on port {port}, inside the container)", flush=True)
    except (OSError, ValueError, asyncssh.Error) as e:
        print(f"dstack: cannot start the SSH server on port {port}: {e}", file=sys.stderr, flush=True)
        failed = True
        kill = await asyncio.create_subprocess_exec(*cli, "kill", name, stdout=asyncio.subprocess.DEVNULL)
        await kill.wait()
    rc = await proc.wait()
    if acceptor is not None:
        acceptor.close()
    if failed:
        return 1
    return rc if rc >= 0 else 128 - rc


def main(argv: list[str]) -> int:
    port_text, key_line = os.environ.get(devenv.PORT_ENV, ""), os.environ.pop(devenv.KEY_ENV, "")
    try:
        settings = json.loads(os.environ.get(SETTINGS_ENV, ""))
    except ValueError:
        settings = None
    if not port_text.isdigit() or not key_line or not isinstance(settings, dict) or not argv:
        print(
            f"dstack: {devenv.PORT_ENV}, {devenv.KEY_ENV}, {SETTINGS_ENV} and the run line must be set", file=sys.stderr
        )
        return 2
    return asyncio.run(_serve_beside(argv, settings, int(port_text), key_line))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
