"""The agent on a fleet host: shipped over SFTP, started to outlive the SSH session, bound to the
host's loopback, and reached only through a local port forward of the server's SSH connection.

Layout on the host (`~/.dstack/agent/`): `bundles/<digest>/` (the extracted bundle), `token`
(0600), `home/` (the agent's home: `agent.json`, jobs), `agent.log`. Attaching first looks for a
running agent with our token (a server restart, a re-apply) and reuses it with its jobs.
"""

from __future__ import annotations

import asyncio
import json
import shlex
from dataclasses import dataclass

import asyncssh

from dstack.server.backends.ssh.bundle import AgentBundle
from dstack.server.backends.ssh.probe import HostProbe

AGENT_DIR = ".dstack/agent"  # relative to the SSH user's home
START_TIMEOUT = 60.0


class AgentDeployError(Exception):
    pass


@dataclass
class RemoteAgent:
    pid: int
    port: int  # on the host's 127.0.0.1


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value or "")


async def _run(conn: asyncssh.SSHClientConnection, command: str, timeout: float = 60.0) -> tuple[int, str, str]:
    try:
        r = await conn.run(command, check=False, timeout=timeout)
    except TimeoutError:
        raise AgentDeployError(f"a command on the host did not finish within {timeout:g} s") from None
    return int(r.exit_status or 0), _text(r.stdout), _text(r.stderr)


async def running_agent(conn: asyncssh.SSHClientConnection, token: str) -> RemoteAgent | None:
    """The agent already running there with this token, if any."""
    code, out, _ = await _run(
        conn,
        f'f="$HOME/{AGENT_DIR}/home/agent.json"; [ -f "$f" ] && cat "$f" && '
        'pid=$(sed -n \'s/.*"pid": *\\([0-9]*\\).*/\\1/p\' "$f") && kill -0 "$pid" 2>/dev/null && echo && echo alive',
        timeout=20,
    )
    if code != 0 or not out.rstrip().endswith("alive"):
        return None
    try:
        info = json.loads(out.splitlines()[0])
    except (ValueError, IndexError):
        return None
    if info.get("token") != token:
        return None
    return RemoteAgent(pid=int(info["pid"]), port=int(info["port"]))


def check_python(probe: HostProbe, bundle: AgentBundle) -> str:
    """The interpreter to run the agent with, or `AgentDeployError` saying what is missing."""
    if probe.machine and probe.machine != bundle.machine:
        raise AgentDeployError(f"the host is {probe.machine}; the agent bundle is built for {bundle.machine}")
    python = probe.python_for(bundle.python)
    if python is None:
        have = ", ".join(sorted(set(probe.pythons.values()))) or "none"
        raise AgentDeployError(f"the agent needs CPython {bundle.python} on the host (found: {have})")
    return python


async def _ship_bundle(conn: asyncssh.SSHClientConnection, bundle: AgentBundle) -> str:
    """Make sure `bundles/<name>/` exists on the host; returns its absolute path."""
    code, home, err = await _run(conn, 'printf %s "$HOME"', timeout=20)
    if code != 0 or not home.startswith("/"):
        raise AgentDeployError(f"cannot find the SSH user's home directory: {err.strip()[:200]}")
    base = f"{home}/{AGENT_DIR}"
    target = f"{base}/bundles/{bundle.name}"
    code, _, _ = await _run(conn, f"test -f {shlex.quote(target)}/.complete", timeout=20)
    if code == 0:
        return target
    await _run(conn, f"mkdir -p {shlex.quote(base)}/bundles && chmod 700 {shlex.quote(base)}", timeout=20)
    archive = f"{target}.tar.gz"
    async with conn.start_sftp_client() as sftp:
        async with sftp.open(archive, "wb") as f:
            await f.write(bundle.data)
    q = shlex.quote
    code, _, err = await _run(
        conn,
        f"rm -rf {q(target)}.tmp && mkdir -p {q(target)}.tmp && tar -xzf {q(archive)} -C {q(target)}.tmp"
        f" && rm -rf {q(target)} && mv {q(target)}.tmp {q(target)} && touch {q(target)}/.complete; "
        f"s=$?; rm -f {q(archive)}; exit $s",
        timeout=300,
    )
    if code != 0:
        raise AgentDeployError(f"unpacking the agent on the host failed: {err.strip()[-300:]}")
    return target


async def start_agent(
    conn: asyncssh.SSHClientConnection, token: str, probe: HostProbe, bundle: AgentBundle, unit: str
) -> RemoteAgent:
    """Ship the bundle if needed and start a new agent (stopping one with another token)."""
    python = check_python(probe, bundle)
    bundle_dir = await _ship_bundle(conn, bundle)
    q = shlex.quote
    base = bundle_dir.rsplit("/bundles/", 1)[0]
    async with conn.start_sftp_client() as sftp:
        async with sftp.open(f"{base}/token", "w", asyncssh.SFTPAttrs(permissions=0o600)) as f:
            await f.write(token)
        await sftp.chmod(f"{base}/token", 0o600)
    agent = f"{q(python)} -m dstack.agent --host 127.0.0.1 --port 0 --home {q(base)}/home --token-file {q(base)}/token"
    stop_old = (
        f'f={q(base)}/home/agent.json; if [ -f "$f" ]; then '
        'pid=$(sed -n \'s/.*"pid": *\\([0-9]*\\).*/\\1/p\' "$f"); '
        '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -f "$f"; fi'
    )
    if probe.systemd:
        launch = (
            f"systemctl stop {q(unit)} 2>/dev/null; systemctl reset-failed {q(unit)} 2>/dev/null; "
            f"systemd-run --quiet --unit={q(unit)} --property=KillMode=process --setenv=PYTHONPATH={q(bundle_dir)} "
            f"--working-directory={q(base)} sh -c {q(agent + f' >> {base}/agent.log 2>&1')}"
        )
    else:
        # One simple command in the background, every stream redirected: nothing keeps the SSH channel open.
        launch = (
            f"cd {q(base)} || exit 1; "
            f"PYTHONPATH={q(bundle_dir)} setsid nohup {agent} >> {q(base)}/agent.log 2>&1 < /dev/null &"
        )
    code, _, err = await _run(conn, f"{stop_old}; {launch}", timeout=60)
    if code != 0:
        raise AgentDeployError(f"starting the agent failed: {err.strip()[-300:]}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while loop.time() < deadline:
        found = await running_agent(conn, token)
        if found is not None:
            return found
        await asyncio.sleep(0.3)
    _, log, _ = await _run(conn, f"tail -c 2000 {q(base)}/agent.log", timeout=20)
    raise AgentDeployError(f"the agent did not start within {START_TIMEOUT:g} s: {log.strip()[-1000:]}")


async def stop_agent(conn: asyncssh.SSHClientConnection, token: str, unit: str) -> None:
    """Stop the host's agent (the fleet or the instance is deleted); its jobs end with it."""
    found = await running_agent(conn, token)
    await _run(conn, f"systemctl stop {shlex.quote(unit)} 2>/dev/null; true", timeout=30)
    if found is not None:
        # SIGTERM, up to 10 s for the agent to stop its jobs and exit, then SIGKILL: the fleet is
        # deleted when this returns, not some time later.
        pid = found.pid
        await _run(
            conn,
            f"kill {pid} 2>/dev/null; for _ in $(seq 50); do kill -0 {pid} 2>/dev/null || exit 0; sleep 0.2; done; "
            f"kill -9 {pid} 2>/dev/null; true",
            timeout=20,
        )
