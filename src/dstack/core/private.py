"""Files and directories only their owner may read: credentials, databases, job state.

Used by the server, the agent and the client config, whatever the process's umask is.
"""

from __future__ import annotations

import os
from pathlib import Path


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) and make `path` itself 0700."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.chmod(path, 0o700)
    except PermissionError:  # not ours (e.g. a shared parent given by the user): leave it
        pass
    return path


def write_private(path: Path, data: str | bytes, *, exclusive: bool = False) -> None:
    """Write `data` to `path` as a 0600 file, atomically (a temporary file renamed over it).

    `exclusive` fails with FileExistsError when `path` already exists (first writer wins)."""
    path = Path(path)
    private_dir(path.parent)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, 0o600)
        if exclusive:
            os.link(tmp, path)  # atomic and refuses to replace
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after a replace; the link's source after a link


def touch_private(path: Path) -> None:
    """Make sure `path` exists as a file only its owner can read (e.g. before SQLite opens it)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)
