"""Starting our own long-lived helper processes (an agent, a gateway) that outlive the starter.

Each runs `python -m dstack.<part>` in its own session (a Ctrl-C or a dying parent does not take
it along), appends to a log file only its owner reads, and is reaped by a thread while the starter
lives, so it never lingers as a zombie. Credentials go in `env`, never on the command line.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import dstack


def child_pythonpath() -> str:
    """PYTHONPATH for the child: ours plus the directory this ``dstack`` was imported from."""
    src = str(Path(dstack.__file__).resolve().parent.parent)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if src not in parts:
        parts.append(src)
    return os.pathsep.join(parts)


def spawn_daemon(cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path, name: str) -> subprocess.Popen[bytes]:
    """Start `cmd` detached, its output appended to `log_path` (0600); `name` names the reaper thread."""
    with open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=env,
            cwd=str(cwd),
        )
    threading.Thread(target=proc.wait, name=f"reap-{name}-{proc.pid}", daemon=True).start()
    return proc
