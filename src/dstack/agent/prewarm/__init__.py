"""Warm starts for serverless workers (the agent's side).

A job marked `prewarm` (a serverless worker on a shared venv) gets a `python` of ours first on
its PATH. It hands `python [-u] script.py ...` to a zygote: a process of that venv that has
already imported what a RunPod worker imports, and forks a child per worker. The first worker
of a venv starts the usual way and starts the zygote for the ones after it; a worker scaling
up from zero then skips ~2 s of imports. See zygote.py for the protocol, starter.py for `python`.
"""

import hashlib
import os
import stat
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ZYGOTE = HERE / "zygote.py"
STARTER = HERE / "starter.py"
DIR_NAME = ".dstack-prewarm"


def socket_path(venv_dir: Path, uid: int | None = None) -> Path:
    """Unix socket paths are limited to ~108 bytes, venv paths are not: a short private path.

    ``uid``: the user the job (and so its zygote) runs as, when the agent isolates jobs
    (agent.sandbox); the directory is made (by root) for that user."""
    uid = os.getuid() if uid is None else uid
    sock_dir = Path(tempfile.gettempdir()) / f"dstack-zygotes-{uid}"
    sock_dir.mkdir(mode=0o700, exist_ok=True)
    st = sock_dir.lstat()
    if uid != os.getuid() and st.st_uid == os.getuid() and not st.st_mode & 0o077 and stat.S_ISDIR(st.st_mode):
        os.chown(sock_dir, uid, uid)  # just made by us (root) for the job's user
        st = sock_dir.lstat()
    if st.st_uid != uid or st.st_mode & 0o077 or not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{sock_dir} must be private to uid {uid}")
    return sock_dir / (hashlib.sha256(str(venv_dir.resolve()).encode()).hexdigest()[:24] + ".sock")


def prewarm_bin(venv_dir: Path, uid: int | None = None) -> Path:
    """Write (once per venv and dstack version) the `python`/`python3` starters; returns their dir."""
    bin_dir = venv_dir / DIR_NAME / "bin"
    real = venv_dir / "bin" / "python"
    sock = socket_path(venv_dir, uid)
    header = f"#!{real} -IS\nREAL = {str(real)!r}\nSOCK = {str(sock)!r}\nZYGOTE = {str(ZYGOTE)!r}\n"
    text = header + STARTER.read_text()
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("python", "python3"):
        path = bin_dir / name
        try:
            if path.read_text() == text:
                continue
        except OSError:
            pass
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, path)
    return bin_dir


def with_prewarm_path(env: dict[str, str], venv_dir: Path, uid: int | None = None) -> dict[str, str]:
    """The job's env with the starters ahead of the venv's own interpreter."""
    env = dict(env)
    env["PATH"] = os.pathsep.join([str(prewarm_bin(venv_dir, uid)), env.get("PATH", "")])
    return env


__all__ = ["prewarm_bin", "with_prewarm_path"]
