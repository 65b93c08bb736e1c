"""Pieces of running one job's process: code extraction, environment, script, pipe pumping."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dstack.agent.logs import LogStore
from dstack.core.archives import ExtractBudget

#: the outbound proxy settings, in both spellings tools read
PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
PASS_ENV = {
    "PATH",
    "HOME",
    "LANG",
    "LANGUAGE",
    "USER",
    "LOGNAME",
    "SHELL",
    "TERM",
    "TZ",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    *PROXY_ENV,
    "PYENV_ROOT",
    "CUDA_HOME",
    "HF_HOME",
}
PASS_PREFIXES = ("LC_", "PIP_", "NVIDIA_")
CHUNK = 256 * 1024
MAX_RECORD = 64 * 1024  # a line longer than this is split into several records
PARTIAL_FLUSH_SECONDS = 0.05


def base_env() -> dict[str, str]:
    """The agent's own minimal environment, without its Python/venv settings."""
    env = {k: v for k, v in os.environ.items() if k in PASS_ENV or k.startswith(PASS_PREFIXES)}
    drop: set[str] = set()
    if os.environ.get("VIRTUAL_ENV"):
        drop.add(os.path.join(os.environ["VIRTUAL_ENV"], "bin"))
    if sys.prefix != sys.base_prefix:
        drop.add(os.path.join(sys.prefix, "bin"))
    path = [p for p in env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(os.pathsep) if p]
    env["PATH"] = os.pathsep.join(p for p in path if os.path.normpath(p) not in drop)
    return env


def job_env(spec_env: dict[str, str], venv_dir: Path | None, gpus: list[int], pip_cache: Path) -> dict[str, str]:
    env = base_env()
    env.update(spec_env)
    if venv_dir is not None:
        env["VIRTUAL_ENV"] = str(venv_dir)
        env["PATH"] = os.pathsep.join(p for p in (str(venv_dir / "bin"), env.get("PATH")) if p)
        env.pop("PYTHONHOME", None)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    env.setdefault("PIP_CACHE_DIR", str(pip_cache))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def job_argv(shell: str | None, entrypoint: str | None, commands: list[str], script: Path) -> list[str]:
    """A host job's command line: its `entrypoint` with the commands as arguments (no shell, as
    dstack runs it), else the script under `shell` (`sh`, `bash`, an absolute path; default bash)."""
    if entrypoint is not None:
        return [*shlex.split(entrypoint), *commands]
    if shell is None or shell == "bash":
        return ["bash", "--noprofile", "--norc", str(script)]
    return ["/bin/sh" if shell == "sh" else shell, str(script)]


def write_script(path: Path, setup: list[str], commands: list[str], setup_lock: Path | None = None) -> None:
    """One bash script: setup then commands, stopping at the first failing line with its status.

    With ``setup_lock`` (a job on a shared venv) the setup lines run holding an exclusive flock on
    that file, so jobs sharing the venv never ``pip install`` into it at the same time. The lines
    stay in the script's own shell (``export``/``cd`` reach the commands); fd 9 is closed for them
    so a background process started in setup does not keep the lock. Without the ``flock`` tool the
    lock is taken on the same fd by a one-line Python (a flock belongs to the open file, not to
    the process that took it).
    """
    lines = ["set -e"]
    if setup and setup_lock is not None:
        if shutil.which("flock"):
            try_lock, lock, unlock = "flock -n 9", "flock 9", "flock -u 9"
        else:
            py = shlex.quote(str(setup_lock.parent / "bin" / "python")) + " -c 'import fcntl; fcntl.flock(9, fcntl.{})'"
            try_lock = py.format("LOCK_EX | fcntl.LOCK_NB") + " 2>/dev/null"
            lock, unlock = py.format("LOCK_EX"), py.format("LOCK_UN")
        lines += [
            f"exec 9>>{shlex.quote(str(setup_lock))}",
            f"{try_lock} || {{ echo 'dstack: waiting for another job to finish its setup in the shared venv' >&2; {lock}; }}",
            "{",
            *setup,
            "} 9>&-",
            unlock,
            "exec 9>&-",
        ]
    else:
        lines += setup
    lines += commands
    path.write_text("\n".join(lines) + "\n")


def safe_extract(archive: Path, dest: Path, budget: ExtractBudget | None = None) -> None:
    """Extract a (possibly empty) tar archive without letting any path escape ``dest``.

    Each member is charged to ``budget`` (default: ``DSTACK_AGENT_CODE_EXTRACTED_LIMIT`` bytes
    and ``DSTACK_AGENT_CODE_MAX_FILES`` members) before it is written, so an archive bomb stops
    at the first member over the limit (``ArchiveTooLarge``, a ``ValueError``).
    """
    dest.mkdir(parents=True, exist_ok=True)
    if archive.stat().st_size == 0:
        return
    budget = budget or ExtractBudget.from_env("DSTACK_AGENT")
    with tarfile.open(archive, "r:*") as tar:
        if hasattr(tarfile, "data_filter"):
            # a generator: extractall takes the members one by one, interleaved with writing them
            tar.extractall(dest, members=_admitted(tar, budget), filter="data")
            return
        root = os.path.realpath(dest)
        for member in tar.getmembers():
            budget.admit(member)
            target = os.path.realpath(os.path.join(root, member.name))
            if os.path.commonpath([root, target]) != root:
                raise ValueError(f"archive member escapes the repo directory: {member.name}")
            if member.issym() or member.islnk():
                link = os.path.realpath(os.path.join(os.path.dirname(target), member.linkname))
                if member.islnk():
                    link = os.path.realpath(os.path.join(root, member.linkname))
                if os.path.commonpath([root, link]) != root:
                    raise ValueError(f"archive link escapes the repo directory: {member.name}")
            elif not (member.isfile() or member.isdir()):
                raise ValueError(f"archive member is not a file or directory: {member.name}")
        tar.extractall(dest)


def _admitted(tar: tarfile.TarFile, budget: ExtractBudget) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        budget.admit(member)
        yield member


def resolve_working_dir(repo: Path, working_dir: str | None) -> Path:
    if not working_dir:
        return repo
    path = Path(os.path.expanduser(working_dir))
    return path if path.is_absolute() else repo / path


async def pump(reader: asyncio.StreamReader, stream: str, logs: LogStore, notify: Callable[[], None]) -> None:
    """Turn a pipe into log records, one per line; a partial line is flushed after 50 ms."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    timer: asyncio.TimerHandle | None = None

    def flush_partial() -> None:
        nonlocal timer
        timer = None
        if buf:
            logs.append(stream, bytes(buf), time.time())
            buf.clear()
            notify()

    try:
        while True:
            chunk = await reader.read(CHUNK)
            if not chunk:
                break
            buf += chunk
            ts = time.time()
            end = buf.rfind(b"\n")
            if end >= 0:
                start = 0
                while start <= end:
                    nl = buf.find(b"\n", start, end + 1)
                    stop = nl + 1
                    while stop - start > MAX_RECORD:
                        logs.append(stream, bytes(buf[start : start + MAX_RECORD]), ts)
                        start += MAX_RECORD
                    logs.append(stream, bytes(buf[start:stop]), ts)
                    start = stop
                del buf[: end + 1]
            while len(buf) >= MAX_RECORD:
                logs.append(stream, bytes(buf[:MAX_RECORD]), ts)
                del buf[:MAX_RECORD]
            if not buf and timer is not None:
                timer.cancel()
                timer = None
            elif buf and timer is None:  # flush 50 ms after the partial line began, not after its last byte
                timer = loop.call_later(PARTIAL_FLUSH_SECONDS, flush_partial)
            notify()
    finally:
        if timer is not None:
            timer.cancel()
    if buf:
        logs.append(stream, bytes(buf), time.time())
        notify()
