"""The agent on a fleet host: shipped over SFTP, started to outlive the SSH session, bound to the
host's loopback, and reached only through a local port forward of the server's SSH connection.

Layout on the host (`~/.dstack/agent/`): `bundles/<digest>/` (the extracted bundle), `token`
(0600), `home/` (the agent's home: `agent.json`, jobs), `agent.log`. Attaching first looks for a
running agent with our token (a server restart, a re-apply) and reuses it with its jobs.
"""

from __future__ import annotations

import json
import secrets
import shlex
from dataclasses import dataclass

import asyncssh

from dstack.server.backends.ssh.bundle import AgentBundle
from dstack.server.backends.ssh.phases import Phases
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
    return _parse_agent_json(out.splitlines()[0], token)


def check_python(probe: HostProbe, bundle: AgentBundle) -> str:
    """The interpreter to run the agent with, or `AgentDeployError` saying what is missing."""
    if probe.machine and probe.machine != bundle.machine:
        raise AgentDeployError(f"the host is {probe.machine}; the agent bundle is built for {bundle.machine}")
    python = probe.python_for(bundle.python)
    if python is None:
        have = ", ".join(sorted(set(probe.pythons.values()))) or "none"
        raise AgentDeployError(f"the agent needs CPython {bundle.python} on the host (found: {have})")
    return python


def _parse_agent_json(text: str, token: str) -> RemoteAgent | None:
    try:
        info = json.loads(text)
        if info.get("token") != token:
            return None
        return RemoteAgent(pid=int(info["pid"]), port=int(info["port"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


async def ship_bundle(conn: asyncssh.SSHClientConnection, bundle: AgentBundle) -> str:
    """Make sure the bundle's archive or its unpacked folder is on the host (one command, then
    one SFTP upload only if the host has neither); returns the agent's base folder there. The
    archive is unpacked by `launch`, in the same command that starts the agent."""
    name = shlex.quote(bundle.name)
    code, out, err = await _run(
        conn,
        f'base="$HOME/{AGENT_DIR}"; mkdir -p "$base/bundles" && chmod 700 "$base" && printf "%s\\n" "$base" && '
        f'{{ [ -f "$base/bundles/"{name}/.complete ] || [ -f "$base/bundles/"{name}.tar.gz ] && echo have || echo need; }}',
        timeout=20,
    )
    lines = out.split("\n")
    base = lines[0].strip()
    if code != 0 or not base.startswith("/"):
        raise AgentDeployError(f"cannot make the agent's folder in the SSH user's home: {err.strip()[:200]}")
    if out.strip().endswith("need"):
        archive = f"{base}/bundles/{bundle.name}.tar.gz"
        partial = f"{archive}.{secrets.token_hex(4)}.part"  # two servers may ship at once
        async with conn.start_sftp_client() as sftp:
            async with sftp.open(partial, "wb") as f:
                await f.write(bundle.data)
            await sftp.posix_rename(partial, archive)
    return base


def launch_script(base: str, bundle: AgentBundle, python: str, unit: str, systemd: bool, timeout: float) -> str:
    """One shell command that unpacks the bundle if it is still an archive, stores the token (read
    from stdin, 0600), stops an agent started before with another token, starts the agent so it
    outlives the SSH session, and waits (polling every 50 ms) until the agent has written
    `agent.json`, which it does once it listens; prints that file. Exit 3 (with the end of the
    agent's log on stderr) if the agent exits or does not come up within `timeout`."""
    q = shlex.quote
    target = f"{base}/bundles/{bundle.name}"
    unpack = (
        f"if [ ! -f {q(target)}/.complete ]; then "
        f"rm -rf {q(target)}.tmp && mkdir -p {q(target)}.tmp && tar -xzf {q(target)}.tar.gz -C {q(target)}.tmp "
        f"&& rm -rf {q(target)} && mv {q(target)}.tmp {q(target)} && touch {q(target)}/.complete "
        f"|| {{ s=$?; echo 'unpacking the agent failed' >&2; exit $s; }}; fi; rm -f {q(target)}.tar.gz"
    )
    store_token = f"(umask 077 && cat > {q(base)}/token.new && mv {q(base)}/token.new {q(base)}/token) || exit 1"
    info = f"{base}/home/agent.json"
    stop_old = (
        f"if [ -f {q(info)} ]; then "
        f"pid=$(sed -n 's/.*\"pid\": *\\([0-9]*\\).*/\\1/p' {q(info)}); "
        f'[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -f {q(info)}; fi'
    )
    agent = f"{q(python)} -m dstack.agent --host 127.0.0.1 --port 0 --home {q(base)}/home --token-file {q(base)}/token"
    # One simple command in the background, every stream redirected: nothing keeps the channel
    # open. Not in a subshell: `$!` is the agent itself (setsid does not fork outside job control).
    nohup = f"PYTHONPATH={q(target)} setsid nohup {agent} >> {q(base)}/agent.log 2>&1 < /dev/null & apid=$!"
    if systemd:
        start = (
            f"systemctl stop {q(unit)} 2>/dev/null; systemctl reset-failed {q(unit)} 2>/dev/null; "
            f"if ! systemd-run --quiet --unit={q(unit)} --property=KillMode=process --setenv=PYTHONPATH={q(target)} "
            f"--working-directory={q(base)} sh -c {q(agent + f' >> {q(base)}/agent.log 2>&1')}; then "
            f"echo 'systemd-run failed: starting the agent with setsid instead' >> {q(base)}/agent.log; {nohup}; fi"
        )
    else:
        start = nohup
    tries = max(1, int(timeout / 0.05))
    wait = (
        f"i=0; while [ $i -lt {tries} ]; do "
        f"if [ -f {q(info)} ]; then "
        f"pid=$(sed -n 's/.*\"pid\": *\\([0-9]*\\).*/\\1/p' {q(info)}); "
        f'if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then cat {q(info)}; exit 0; fi; fi; '
        'if [ -n "$apid" ] && ! kill -0 "$apid" 2>/dev/null; then break; fi; '
        "i=$((i+1)); sleep 0.05 2>/dev/null || sleep 1; done; "
        f"echo 'the agent did not start' >&2; tail -c 2000 {q(base)}/agent.log >&2; exit 3"
    )
    return f"cd {q(base)} || exit 1; apid=; {unpack}; {store_token}; {stop_old}; {start}; {wait}"


async def launch(
    conn: asyncssh.SSHClientConnection,
    token: str,
    base: str,
    bundle: AgentBundle,
    python: str,
    unit: str,
    systemd: bool,
) -> RemoteAgent:
    """Start the agent from the shipped bundle (one command); its pid and port once it listens."""
    script = launch_script(base, bundle, python, unit, systemd, START_TIMEOUT)
    try:
        r = await conn.run(script, input=token, check=False, timeout=START_TIMEOUT + 30)
    except TimeoutError:
        raise AgentDeployError(f"the agent did not start within {START_TIMEOUT:g} s") from None
    out, err = _text(r.stdout), _text(r.stderr)
    if r.exit_status == 3:
        raise AgentDeployError(f"the agent did not start: {err.strip()[-1000:]}")
    if r.exit_status != 0:
        raise AgentDeployError(f"starting the agent failed: {err.strip()[-300:]}")
    found = _parse_agent_json(out.strip(), token)
    if found is None:
        raise AgentDeployError(f"the agent started without the expected token: {out.strip()[:200]}")
    return found


async def start_agent(
    conn: asyncssh.SSHClientConnection,
    token: str,
    probe: HostProbe,
    bundle: AgentBundle,
    unit: str,
    phases: Phases | None = None,
    base: str | None = None,
) -> RemoteAgent:
    """Ship the bundle unless `base` says it was (or the host has it) and start a new agent
    (stopping one with another token)."""
    phases = phases or Phases()
    python = check_python(probe, bundle)
    if base is None:
        base = await ship_bundle(conn, bundle)
        phases.mark("ship")
    found = await launch(conn, token, base, bundle, python, unit, use_systemd(probe))
    phases.mark("start agent")
    return found


def use_systemd(probe: HostProbe) -> bool:
    """Whether the agent runs as a systemd unit: where systemd runs and the SSH user is root (the
    system manager; a user manager's units end with the user's last session unless lingering
    is on). Elsewhere, and if `systemd-run` fails, it is started with `setsid nohup`."""
    return probe.systemd and probe.uid == 0


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
