"""dstack's official client (from PyPI) in a virtualenv of its own, cached across test runs.

The venv lives in `~/.cache/dstack-tests/dstack-<version>/` (override the folder with
`DSTACK_TEST_CACHE`), so CI pays for the install once. It is built under a lock, in a
temporary folder renamed into place only when complete, so a half-built venv is never used.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

OFFICIAL_VERSION = "0.22.5"


def cache_dir() -> Path:
    return Path(os.environ.get("DSTACK_TEST_CACHE", Path.home() / ".cache" / "dstack-tests"))


def official_venv(version: str = OFFICIAL_VERSION) -> Path:
    """The venv's folder, built on first use; `RuntimeError` (with pip's output) when it cannot be."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / f"dstack-{version}"
    python = venv / "bin" / "python"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and (venv / ".complete").exists():
            return venv
        tmp = root / f"dstack-{version}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True)
        pip = subprocess.run(
            [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", f"dstack=={version}"],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if pip.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"pip install dstack=={version} failed:\n{pip.stdout[-2000:]}\n{pip.stderr[-2000:]}")
        (tmp / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        shutil.rmtree(venv, ignore_errors=True)
        tmp.rename(venv)  # the venv is run through bin/python, which works from its new place
        return venv


@dataclass
class OfficialClient:
    """Runs the official CLI (`python -m dstack._internal.cli.main`) and scripts with its Python,
    in a home of its own (`~/.dstack/config.yml` there)."""

    venv: Path
    home: Path

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DSTACK_", "PYTHON", "VIRTUAL_ENV"))}
        env["HOME"] = str(self.home)
        env["DSTACK_CLI_LOG_LEVEL"] = "warning"
        env["COLUMNS"] = "200"  # rich tables unwrapped
        env["NO_COLOR"] = "1"
        return env

    def cli(self, *args: str, cwd: Path | None = None, timeout: float = 180, check: bool = True):
        r = subprocess.run(
            [self.python, "-m", "dstack._internal.cli.main", *args],
            cwd=cwd or self.home,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"dstack {' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
            )
        return r

    def start(self, *args: str, cwd: Path | None = None) -> subprocess.Popen:
        """The CLI as a background process (attached `apply`, `attach`), output to pipes, in a
        process group of its own so a test can interrupt it like Ctrl-C."""
        return subprocess.Popen(
            [self.python, "-m", "dstack._internal.cli.main", *args],
            cwd=cwd or self.home,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def script(self, code: str, cwd: Path | None = None, timeout: float = 240):
        return subprocess.run(
            [self.python, "-c", code],
            cwd=cwd or self.home,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
