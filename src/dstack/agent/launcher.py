"""Start an agent as a detached process on this host and check on it (used by the server)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from dstack.core.daemon import child_pythonpath, spawn_daemon
from dstack.core.private import private_dir


@dataclass(frozen=True)
class AgentInfo:
    pid: int
    port: int
    token: str
    url: str  # "http://127.0.0.1:<port>"


class AgentStartError(Exception):
    pass


def read_agent_json(home: Path, host: str = "127.0.0.1") -> AgentInfo | None:
    try:
        data = json.loads((Path(home) / "agent.json").read_text())
        return AgentInfo(int(data["pid"]), int(data["port"]), str(data["token"]), f"http://{host}:{int(data['port'])}")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def start_agent(home: Path, token: str, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> AgentInfo:
    """Spawn ``python -m dstack.agent`` in its own session and wait until it answers healthchecks.

    The agent outlives the caller; its output goes to ``home/agent.log``.
    """
    home = private_dir(Path(home).expanduser().resolve())
    (home / "agent.json").unlink(missing_ok=True)
    # The token goes by environment (the agent drops it from its jobs' env): not on the command line.
    env = dict(os.environ, PYTHONPATH=child_pythonpath(), DSTACK_AGENT_TOKEN=token)
    cmd = [sys.executable, "-m", "dstack.agent", "--host", host, "--port", str(port), "--home", str(home)]
    proc = spawn_daemon(cmd, env, home / "agent.log", home, "agent")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AgentStartError(f"agent exited with status {proc.returncode}: {_log_tail(home)}")
        info = read_agent_json(home, host)
        if info is not None and info.pid == proc.pid and _healthy(info):
            return info
        time.sleep(0.05)
    proc.kill()
    raise AgentStartError(f"agent did not start within {timeout:g} s: {_log_tail(home)}")


def _healthy(info: AgentInfo, timeout: float = 2.0) -> bool:
    try:
        r = httpx.get(f"{info.url}/api/healthcheck", timeout=timeout)
        return r.status_code == 200 and r.json().get("pid") == info.pid
    except (httpx.HTTPError, ValueError):
        return False


def is_agent_alive(info: AgentInfo) -> bool:
    """True when the agent process exists (not a zombie) and answers its healthcheck."""
    try:
        if psutil.Process(info.pid).status() == psutil.STATUS_ZOMBIE:
            return False
    except psutil.Error:
        return False
    return _healthy(info)


def _log_tail(home: Path, size: int = 2000) -> str:
    try:
        return (home / "agent.log").read_bytes()[-size:].decode(errors="replace")
    except OSError:
        return "(no log)"
