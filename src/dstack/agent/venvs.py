"""Python interpreters on the host and fast per-job virtual environments.

A job gets its own venv so its ``pip install`` never touches the agent's or the server's
environment. Creating it with ``python -m venv`` plus ensurepip costs seconds, so instead the venv
is written by hand (pyvenv.cfg + interpreter symlinks, about a millisecond) and pip comes from a
per-version bundle unpacked once under ``cache/pip-<version>`` and put on ``sys.path`` by a
``.pth`` file. The ``bin/pip`` wrappers run that pip with the venv's interpreter, so packages land
in the venv's own site-packages.

A job that names a ``venv_key`` instead uses a shared venv ``cache/venvs/<version>/<key>/``, built
the same way on first use and kept across runs and agent restarts, so a ``setup`` that installs
packages pays for them once ("Requirement already satisfied" afterwards). Its build is guarded by a
lock file beside it; the job script serialises ``setup`` on ``<venv>/.setup.lock``; a venv unused
for ``SHARED_VENV_TTL_SECONDS`` is removed when the agent starts.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_VERSION_NAME = re.compile(r"^python(3\.\d+)$")

# A script that is valid sh and valid Python: sh re-executes it with the python beside it.
SH_TRAMPOLINE = "#!/bin/sh\n'''exec' \"$(dirname -- \"$0\")/python\" \"$0\" \"$@\"\n' '''\n"

SHARED_VENV_TTL_SECONDS = 7 * 24 * 3600
SHARED_MARKER = ".dstack-venv.json"  # written last when a shared venv is built: it is complete
LAST_USED = ".last-used"  # unix time of the last job that used a shared venv
SETUP_LOCK = ".setup.lock"  # jobs' setup sections take it (flock) inside their script


@dataclass(frozen=True)
class Interpreter:
    version: str  # "3.12"
    executable: Path  # resolved real binary


class PythonNotFound(Exception):
    pass


def _pyenv_root() -> Path:
    return Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")


def _pyenv_interpreters() -> list[Interpreter]:
    versions_dir = _pyenv_root() / "versions"
    found: list[Interpreter] = []
    if not versions_dir.is_dir():
        return found
    for entry in sorted(versions_dir.iterdir(), key=lambda p: p.name, reverse=True):
        m = re.match(r"^(3\.\d+)\.\d+\S*$", entry.name)
        if not m:
            continue
        exe = entry / "bin" / f"python{m.group(1)}"
        if exe.is_file() and os.access(exe, os.X_OK):
            found.append(Interpreter(m.group(1), Path(os.path.realpath(exe))))
    return found


def _is_shims_dir(path: str) -> bool:
    return path.rstrip("/").endswith("/shims") and ".pyenv" in path


def discover_interpreters(path_env: str | None = None) -> dict[str, Interpreter]:
    """Map "3.X" to an interpreter, in PATH order; a pyenv shims dir stands for pyenv's versions."""
    path_env = os.environ.get("PATH", "") if path_env is None else path_env
    result: dict[str, Interpreter] = {}
    pyenv_done = False
    for d in path_env.split(os.pathsep):
        if not d:
            continue
        if _is_shims_dir(d):
            if not pyenv_done:
                pyenv_done = True
                for interp in _pyenv_interpreters():
                    result.setdefault(interp.version, interp)
            continue
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            m = _VERSION_NAME.match(name)
            if not m or m.group(1) in result:
                continue
            exe = os.path.join(d, name)
            if os.path.isfile(exe) and os.access(exe, os.X_OK):
                result[m.group(1)] = Interpreter(m.group(1), Path(os.path.realpath(exe)))
    if not pyenv_done:
        for interp in _pyenv_interpreters():
            result.setdefault(interp.version, interp)
    return result


def default_version(interpreters: dict[str, Interpreter], path_env: str | None = None) -> str | None:
    """The version ``python3`` on PATH means (pyenv's global version where shims come first)."""
    path_env = os.environ.get("PATH", "") if path_env is None else path_env
    for d in path_env.split(os.pathsep):
        if not d:
            continue
        if _is_shims_dir(d):
            name = os.environ.get("PYENV_VERSION", "").split(":")[0]
            if not name:
                try:
                    name = (_pyenv_root() / "version").read_text().split()[0]
                except (OSError, IndexError):
                    name = ""
            m = re.match(r"^(3\.\d+)", name)
            if m and m.group(1) in interpreters:
                return m.group(1)
            continue
        exe = os.path.join(d, "python3")
        if os.path.isfile(exe) and os.access(exe, os.X_OK):
            m = _VERSION_NAME.match(os.path.basename(os.path.realpath(exe)))
            version = m.group(1) if m else _ask_version(exe)
            if version in interpreters:
                return version
            break
    own = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if own in interpreters:
        return own
    return max(interpreters, key=lambda v: int(v.split(".")[1]), default=None)


def _ask_version(exe: str) -> str | None:
    try:
        out = subprocess.run(
            [exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version_key(wheel: Path) -> tuple[int, ...]:
    m = re.match(r"^pip-([\d.]+)-", wheel.name)
    return tuple(int(x) for x in m.group(1).split(".") if x.isdigit()) if m else ()


def _find_pip_wheel(interp: Interpreter) -> Path | None:
    """The pip wheel bundled with the interpreter (ensurepip), or the distro's shared copy."""
    prefix = interp.executable.parent.parent
    candidates = list(prefix.glob(f"lib/python{interp.version}/ensurepip/_bundled/pip-*.whl"))
    if not candidates:
        candidates = list(Path("/usr/share/python-wheels").glob("pip-*.whl"))
    return max(candidates, key=_version_key) if candidates else None


class VenvFactory:
    """Creates job venvs; caches one unpacked pip per Python version under ``cache_dir``."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._interpreters: dict[str, Interpreter] | None = None
        self._default: str | None = None
        self._lock = threading.Lock()
        self._pip_locks: dict[str, threading.Lock] = {}

    @property
    def interpreters(self) -> dict[str, Interpreter]:
        with self._lock:
            if self._interpreters is None:
                self._interpreters = discover_interpreters()
                self._default = default_version(self._interpreters)
            return self._interpreters

    @property
    def default(self) -> str | None:
        _ = self.interpreters
        return self._default

    def versions(self) -> list[str]:
        return sorted(self.interpreters, key=lambda v: int(v.split(".")[1]))

    def resolve(self, version: str | None) -> Interpreter:
        interps = self.interpreters
        wanted = version or self.default
        if wanted is not None:
            m = re.match(r"^(\d+\.\d+)", str(wanted).strip())
            wanted = m.group(1) if m else str(wanted)
        if wanted is None or wanted not in interps:
            available = ", ".join(self.versions()) or "none"
            what = f"Python {version}" if version else "a default python3"
            raise PythonNotFound(f"{what} is not available on this host; available: {available}")
        return interps[wanted]

    def pip_bundle(self, interp: Interpreter) -> Path | None:
        """Directory holding an importable ``pip`` package for this version (built once)."""
        target = self.cache_dir / f"pip-{interp.version}"
        if (target / ".complete").exists():
            return target
        with self._lock:
            lock = self._pip_locks.setdefault(interp.version, threading.Lock())
        with lock:
            if (target / ".complete").exists():
                return target
            wheel = _find_pip_wheel(interp)
            if wheel is None:
                return None
            tmp = self.cache_dir / f".pip-{interp.version}.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(tmp)
            _readable_by_all(tmp)  # jobs may run as other users (agent.sandbox)
            (tmp / ".complete").write_text(wheel.name)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            threading.Thread(
                target=_precompile, args=(interp, target), name=f"compile-pip-{interp.version}", daemon=True
            ).start()
            return target

    def create(self, interp: Interpreter, venv_dir: Path) -> Path:
        """Write a venv at ``venv_dir`` by hand; returns its bin directory."""
        bin_dir = venv_dir / "bin"
        site = venv_dir / "lib" / f"python{interp.version}" / "site-packages"
        bin_dir.mkdir(parents=True, exist_ok=True)
        site.mkdir(parents=True, exist_ok=True)
        if not (venv_dir / "lib64").exists():
            os.symlink("lib", venv_dir / "lib64")
        (venv_dir / "pyvenv.cfg").write_text(
            f"home = {interp.executable.parent}\n"
            "include-system-site-packages = false\n"
            f"version = {interp.version}\n"
            f"executable = {interp.executable}\n"
        )
        for name in ("python", "python3", f"python{interp.version}"):
            link = bin_dir / name
            if not link.exists():
                os.symlink(interp.executable, link)
        pip_dir = self.pip_bundle(interp)
        if pip_dir is not None:
            # A .pth entry goes after site-packages, so a pip the job installs itself wins.
            (site / "_dstack_pip.pth").write_text(f"{pip_dir}\n")
            python = bin_dir / "python"
            if len(str(python)) < 120:
                header = f"#!{python}\n"
            else:  # too long for a shebang: let sh find the interpreter next to the script
                header = SH_TRAMPOLINE
            script = header + "import sys\nfrom pip._internal.cli.main import main\nsys.exit(main())\n"
            for name in ("pip", "pip3", f"pip{interp.version}"):
                path = bin_dir / name
                path.write_text(script)
                path.chmod(0o755)
        activate = bin_dir / "activate"
        activate.write_text(
            f'VIRTUAL_ENV="{venv_dir}"\nexport VIRTUAL_ENV\n'
            'PATH="$VIRTUAL_ENV/bin:$PATH"\nexport PATH\nunset PYTHONHOME\n'
        )
        return bin_dir

    # -- shared (keyed) venvs ------------------------------------------------------------------
    @property
    def shared_root(self) -> Path:
        return self.cache_dir / "venvs"

    def shared(self, interp: Interpreter, key: str) -> Path:
        """The shared venv for ``key`` (built on first use); records this use. Returns its dir."""
        root = self.shared_root / interp.version
        venv_dir = root / key
        root.mkdir(parents=True, exist_ok=True)
        with _file_lock(root / f".{key}.lock"):
            if not _is_complete(venv_dir, interp):
                if venv_dir.exists() or venv_dir.is_symlink():
                    # half-built by an agent that died, or built for another interpreter binary
                    _remove(venv_dir)
                self.create(interp, venv_dir)
                (venv_dir / SHARED_MARKER).write_text(
                    json.dumps(
                        {
                            "key": key,
                            "version": interp.version,
                            "executable": str(interp.executable),
                            "created_at": time.time(),
                        }
                    )
                )
            touch_last_used(venv_dir)
        return venv_dir

    def evict_unused(self, max_age: float = SHARED_VENV_TTL_SECONDS, now: float | None = None) -> list[Path]:
        """Remove shared venvs whose last use is older than ``max_age``; returns what was removed."""
        now = time.time() if now is None else now
        removed: list[Path] = []
        if not self.shared_root.is_dir():
            return removed
        for root in sorted(p for p in self.shared_root.iterdir() if p.is_dir()):
            for entry in sorted(root.iterdir()):
                if entry.name.startswith(".trash-") and entry.is_dir():
                    _remove(entry)  # left by an eviction that was interrupted
                    continue
                if entry.name.startswith(".") or not entry.is_dir() or entry.is_symlink():
                    continue
                with _file_lock(root / f".{entry.name}.lock"):
                    age = now - last_used(entry)
                    if age <= max_age:
                        continue
                    trash = root / f".trash-{entry.name}-{os.getpid()}"
                    try:
                        os.replace(entry, trash)
                    except OSError as e:
                        logger.warning("cannot evict shared venv %s: %s", entry, e)
                        continue
                _remove(trash)
                removed.append(entry)
                logger.info("evicted shared venv %s (unused for %.1f days)", entry, age / 86400)
        return removed


def touch_last_used(venv_dir: Path) -> None:
    try:
        tmp = venv_dir / f"{LAST_USED}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(f"{time.time():.3f}\n")
        os.replace(tmp, venv_dir / LAST_USED)
    except OSError as e:
        logger.warning("cannot record the use of %s: %s", venv_dir, e)


def last_used(venv_dir: Path) -> float:
    """When a shared venv was last used (its directory's mtime when not recorded)."""
    try:
        return float((venv_dir / LAST_USED).read_text().strip())
    except (OSError, ValueError):
        try:
            return venv_dir.stat().st_mtime
        except OSError:
            return 0.0


def _is_complete(venv_dir: Path, interp: Interpreter) -> bool:
    try:
        info = json.loads((venv_dir / SHARED_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(info, dict)
        and info.get("executable") == str(interp.executable)
        and (venv_dir / "bin" / "python").exists()
    )


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _precompile(interp: Interpreter, bundle: Path) -> None:
    """Byte-compile the unpacked pip (in the background: jobs meanwhile compile it in memory).
    Jobs that run as another user (agent.sandbox) cannot write its ``__pycache__``, so without
    this every ``pip`` they run would compile all of pip again (seconds)."""
    try:
        subprocess.run(
            [str(interp.executable), "-m", "compileall", "-q", "-d", str(bundle), str(bundle)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=600,
        )
        _readable_by_all(bundle)
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("cannot byte-compile %s: %s", bundle, e)


def _readable_by_all(root: Path) -> None:
    """Directories 0755 and files 0644 (executables 0755), whatever the umask was."""
    for d, _dirs, files in os.walk(root):
        os.chmod(d, 0o755)
        for name in files:
            path = os.path.join(d, name)
            os.chmod(path, 0o755 if os.stat(path).st_mode & 0o100 else 0o644)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path``: between threads (each opens its own file) and processes.
    The file is 0600: a job running as another user cannot take the lock and stall the agent."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as f:
        os.fchmod(f.fileno(), 0o600)  # one an older agent left
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
