"""The agent as one archive the server ships to hosts that have no internet.

It holds the installed `dstack` package and the distributions the agent imports, taken from
the server's own environment (so it runs on hosts with the same CPython minor version and
machine: binary modules such as pydantic-core are included as built here). It is built once
per server process, deterministically (sorted members, fixed times), and named by its digest,
so a host that already has it is not sent it again.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import dstack

#: what the agent loads at start and on its first requests (uvicorn picks protocol modules lazily)
_AGENT_IMPORTS = (
    "dstack.agent.__main__",
    "dstack.agent.app",
    "dstack.agent.runner",
    "dstack.agent.jobs",
    "dstack.agent.devenv",  # a dev environment's SSH server (asyncssh), run by its job
    "uvicorn.protocols.http.h11_impl",
    "uvicorn.lifespan.on",
    "uvicorn.loops.asyncio",
)
_SKIP_DIRS = {"__pycache__", "tests", "test"}
MAX_BUNDLE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class AgentBundle:
    data: bytes
    digest: str  # sha256 hex, first 16 characters name it on hosts
    python: str  # "3.11"
    machine: str  # "x86_64"

    @property
    def name(self) -> str:
        return self.digest[:16]


def _site_packages_tops() -> list[Path]:
    """Top-level modules/packages outside the standard library that the agent imports."""
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
    files: list[str] = json.loads(out.stdout)
    tops: set[Path] = set()
    for f in files:
        for marker in ("/site-packages/", "/dist-packages/"):
            if marker in f:
                base, rest = f.split(marker, 1)
                tops.add(Path(base + marker) / rest.split("/", 1)[0])
    return sorted(tops)


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


def _add(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    if path.is_dir():
        for child in sorted(path.iterdir()):
            if child.name in _SKIP_DIRS or child.is_symlink():
                continue
            _add(tar, child, f"{arcname}/{child.name}")
        return
    if path.suffix == ".pyc":
        return
    info = tar.gettarinfo(str(path), arcname)
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    with open(path, "rb") as f:
        tar.addfile(info, f)


def build_bundle() -> AgentBundle:
    buf = io.BytesIO()
    dstack_dir = Path(dstack.__file__).resolve().parent
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        _add(tar, dstack_dir, "dstack")
        tops = [t for t in _site_packages_tops() if t.name != "dstack" and not t.name.endswith((".pth", ".dist-info"))]
        for top in tops:
            _add(tar, top, top.name)
        for info in _dist_infos(tops):  # packages that ask importlib.metadata for their versions
            _add(tar, info, info.name)
    data = buf.getvalue()
    if len(data) > MAX_BUNDLE_BYTES:
        raise RuntimeError(f"the agent bundle is {len(data) >> 20} MiB, over {MAX_BUNDLE_BYTES >> 20} MiB")
    return AgentBundle(
        data=data,
        digest=hashlib.sha256(data).hexdigest(),
        python=f"{sys.version_info[0]}.{sys.version_info[1]}",
        machine=platform.machine(),
    )


_lock = threading.Lock()
_cached: AgentBundle | None = None


def agent_bundle() -> AgentBundle:
    """The bundle, built on first use (seconds) and kept for the process's life."""
    global _cached
    with _lock:
        if _cached is None:
            _cached = build_bundle()
        return _cached
