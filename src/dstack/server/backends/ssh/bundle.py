"""The agent as one archive the server ships to hosts that have no internet.

It holds the installed `dstack` package and the distributions the agent imports, taken from
the server's own environment (so it runs on hosts with the same CPython minor version and
machine: binary modules such as pydantic-core are included as built here), plus bytecode for
every module the agent imports at start (unchecked-hash `.pyc`: the bundle never changes once
unpacked, so the host neither compiles them nor checks their sources). It is built
deterministically (sorted members, fixed times) and named by its digest, so a host that already
has it is not sent it again.

Building takes seconds of CPU (an import of the agent in a subprocess, compiling, compressing),
so the result is kept on disk (`cache_dir()`), keyed by a fingerprint of what went into it: the
interpreter, and the path, size and mtime of every file of `dstack` and of the distributions it
took. A server reuses it (one walk of those trees and one read) until an upgrade or an edit
changes one of them.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import platform
import py_compile
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import dstack

logger = logging.getLogger(__name__)

#: what the agent loads at start and on its first requests (uvicorn picks protocol modules lazily)
_AGENT_IMPORTS = (
    "dstack.agent.__main__",
    "dstack.agent.app",
    "dstack.agent.runner",
    "dstack.agent.jobs",
    "dstack.agent.devenv",  # a dev environment's SSH server, run by its job with the agent's code
    "asyncssh",  # ... which imports it only when it serves (the agent does not: not found by the scan)
    "uvicorn.protocols.http.h11_impl",
    "uvicorn.lifespan.on",
    "uvicorn.loops.asyncio",
)
_SKIP_DIRS = {"__pycache__", "tests", "test"}
MAX_BUNDLE_BYTES = 256 * 1024 * 1024
#: bumped when the archive's layout changes, so older cached archives are not reused
FORMAT = 2
#: a directory for built bundles; "off" builds one per server process and keeps none
CACHE_ENV = "DSTACK_SERVER_AGENT_BUNDLE_CACHE"


@dataclass(frozen=True)
class AgentBundle:
    data: bytes
    digest: str  # sha256 hex, first 16 characters name it on hosts
    python: str  # "3.11"
    machine: str  # "x86_64"

    @property
    def name(self) -> str:
        return self.digest[:16]


def _agent_imports() -> tuple[list[Path], set[Path]]:
    """Top-level modules/packages outside the standard library that the agent imports, and the
    source files of every module it imports (those get bytecode in the bundle)."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {list(_AGENT_IMPORTS)!r}:\n"
        "    try: importlib.import_module(m)\n"
        "    except Exception: pass\n"
        "print(json.dumps(sorted({getattr(m, '__file__', None) or '' for m in list(sys.modules.values())})))\n"
    )
    src = str(Path(dstack.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    # the last line: a module that prints while it is imported must not break the build
    files: list[str] = json.loads((out.stdout.strip().splitlines() or ["[]"])[-1])
    tops: set[Path] = set()
    for f in files:
        for marker in ("/site-packages/", "/dist-packages/"):
            if marker in f:
                base, rest = f.split(marker, 1)
                tops.add(Path(base + marker) / rest.split("/", 1)[0])
    imported = {Path(f).resolve() for f in files if f.endswith(".py")}
    return sorted(tops), imported


def _dist_infos(tops: list[Path]) -> list[Path]:
    """The `.dist-info` folders of the distributions that provide `tops`."""
    by_top = importlib.metadata.packages_distributions()
    found: set[Path] = set()
    for top in tops:
        for dist_name in by_top.get(top.name.removesuffix(".py"), []):
            try:
                dist = importlib.metadata.distribution(dist_name)
            except importlib.metadata.PackageNotFoundError:
                continue
            path = getattr(dist, "_path", None)
            if isinstance(path, Path) and path.name.endswith(".dist-info") and path.is_dir():
                found.add(path)
    return sorted(found)


def _member(path: Path, arcname: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(arcname)
    info.size = path.stat().st_size
    info.mode = path.stat().st_mode & 0o755
    return info


def _add(tar: tarfile.TarFile, path: Path, arcname: str, compile_: set[Path], scratch: Path) -> None:
    if path.is_dir():
        for child in sorted(path.iterdir()):
            if child.name in _SKIP_DIRS or child.is_symlink():
                continue
            _add(tar, child, f"{arcname}/{child.name}", compile_, scratch)
        return
    if path.suffix == ".pyc":
        return
    with open(path, "rb") as f:
        tar.addfile(_member(path, arcname), f)
    if path.suffix == ".py" and path.resolve() in compile_:
        pyc = scratch / "module.pyc"
        try:
            py_compile.compile(
                str(path),
                cfile=str(pyc),
                dfile=arcname,
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
        except py_compile.PyCompileError:
            return  # the host compiles it, or reports the error, as it would without bytecode
        with open(pyc, "rb") as f:
            tar.addfile(_member(pyc, importlib.util.cache_from_source(arcname)), f)


def _parts() -> tuple[Path, list[Path], list[Path], set[Path]]:
    """What goes into the bundle: the dstack package, the other top-level packages the agent
    imports, their distributions' metadata, and the source files to compile."""
    dstack_dir = Path(dstack.__file__).resolve().parent
    found, imported = _agent_imports()
    tops = [t for t in found if t.name != "dstack" and not t.name.endswith((".pth", ".dist-info"))]
    return dstack_dir, tops, _dist_infos(tops), imported


def build_bundle() -> AgentBundle:
    return _build(*_parts())


def _build(dstack_dir: Path, tops: list[Path], infos: list[Path], imported: set[Path]) -> AgentBundle:
    buf = io.BytesIO()
    with (
        tempfile.TemporaryDirectory(prefix="dstack-bundle-") as scratch,
        gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        _add(tar, dstack_dir, "dstack", imported, Path(scratch))
        for top in tops:
            _add(tar, top, top.name, imported, Path(scratch))
        for info in infos:  # packages that ask importlib.metadata for their versions
            _add(tar, info, info.name, set(), Path(scratch))
    data = buf.getvalue()
    if len(data) > MAX_BUNDLE_BYTES:
        raise RuntimeError(f"the agent bundle is {len(data) >> 20} MiB, over {MAX_BUNDLE_BYTES >> 20} MiB")
    return _bundle_of(data)


def _bundle_of(data: bytes) -> AgentBundle:
    return AgentBundle(
        data=data,
        digest=hashlib.sha256(data).hexdigest(),
        python=f"{sys.version_info[0]}.{sys.version_info[1]}",
        machine=platform.machine(),
    )


# --- the on-disk cache ------------------------------------------------------------------------


def cache_dir() -> Path | None:
    """Where built bundles are kept: `DSTACK_SERVER_AGENT_BUNDLE_CACHE` ("off": nowhere), else
    the user's cache directory (`$XDG_CACHE_HOME/dstack/agent-bundles`)."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() == "off":
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dstack" / "agent-bundles"


def fingerprint(paths: list[Path]) -> str:
    """A digest of the interpreter, of every file under `paths` as the bundle takes them (path,
    size, mtime) and of the names in the folders that hold them (a package installed or removed
    beside them): what changes when a package is upgraded, installed, removed or edited, and not
    when Python writes bytecode (`__pycache__` and folder mtimes are left out for that)."""
    h = hashlib.sha256(f"{FORMAT} {sys.version} {platform.machine()} {sys.executable}".encode())
    for folder in sorted({p.parent for p in paths}):
        with contextlib.suppress(OSError):
            names = sorted(n for n in os.listdir(folder) if n not in _SKIP_DIRS)
            h.update(f"{folder}: {' '.join(names)}\n".encode())
    for root in paths:
        stack = [root]
        while stack:
            p = stack.pop()
            try:
                st = p.lstat()
            except OSError:
                h.update(f"-{p}\n".encode())
                continue
            if stat.S_ISDIR(st.st_mode):
                h.update(f"{p}/\n".encode())
                stack.extend(sorted((c for c in p.iterdir() if c.name not in _SKIP_DIRS), reverse=True))
            elif p.suffix != ".pyc":
                h.update(f"{p} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _manifest_path(cache: Path) -> Path:
    """One manifest per environment (several virtualenvs may share the cache directory)."""
    env = hashlib.sha256(f"{sys.executable} {Path(dstack.__file__).resolve()}".encode()).hexdigest()[:16]
    return cache / f"manifest-{env}.json"


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _from_cache(cache: Path) -> AgentBundle | None:
    try:
        manifest = json.loads(_manifest_path(cache).read_text())
        tops = [Path(p) for p in manifest["tops"]]
        infos = [Path(p) for p in manifest["dist_infos"]]
        dstack_dir = Path(dstack.__file__).resolve().parent
        if manifest.get("key") != fingerprint([dstack_dir, *tops, *infos]):
            return None
        data = (cache / manifest["file"]).read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    bundle = _bundle_of(data)
    return bundle if bundle.digest == manifest.get("digest") else None


def _build_into(cache: Path) -> AgentBundle:
    dstack_dir, tops, infos, imported = _parts()
    # fingerprinted before building: an edit made meanwhile makes the next start build again
    key = fingerprint([dstack_dir, *tops, *infos])
    bundle = _build(dstack_dir, tops, infos, imported)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        path = _manifest_path(cache)
        with_old = json.loads(path.read_text()) if path.exists() else {}
        name = f"agent-{bundle.name}.tar.gz"
        _write_atomically(cache / name, bundle.data)
        manifest = {
            "key": key,
            "digest": bundle.digest,
            "file": name,
            "tops": [str(t) for t in tops],
            "dist_infos": [str(i) for i in infos],
        }
        _write_atomically(path, json.dumps(manifest).encode())
        old = with_old.get("file") if isinstance(with_old, dict) else None
        if isinstance(old, str) and old != name and "/" not in old:
            (cache / old).unlink(missing_ok=True)
    except (OSError, ValueError) as e:
        logger.warning("cannot keep the agent bundle in %s (%s): it is built again by the next server", cache, e)
    return bundle


_lock = threading.Lock()
_cached: AgentBundle | None = None


def agent_bundle() -> AgentBundle:
    """The bundle: kept for the process's life, read from the cache if it is current there,
    else built (seconds) and stored there."""
    global _cached
    with _lock:
        if _cached is None:
            cache = cache_dir()
            found = _from_cache(cache) if cache is not None else None
            if found is None:
                found = _build_into(cache) if cache is not None else build_bundle()
            _cached = found
        return _cached
