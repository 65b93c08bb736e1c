"""runpod and its dependencies as wheels in a world-readable folder, for jobs on hosts without
internet (namespaced fleet hosts, Slurm nodes): downloaded once into /var/tmp, kept across runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RUNPOD = "runpod==1.12.0"
WHEELS = Path("/var/tmp/dstack-test-wheels/runpod-1.12.0")  # world-readable: job users install from it


def runpod_wheelhouse() -> Path:
    """The wheelhouse's folder, downloading it first if needed; skips (saying why) when PyPI can't be reached."""
    if (WHEELS / ".complete").exists():
        return WHEELS
    tmp = WHEELS.with_name(f"{WHEELS.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", RUNPOD, "-d", str(tmp)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"cannot download {RUNPOD} for the hosts' wheelhouse: {r.stderr.strip()[-300:]}")
    (tmp / ".complete").touch()
    for d in (WHEELS.parent, tmp):
        d.chmod(0o755)
    shutil.rmtree(WHEELS, ignore_errors=True)
    tmp.rename(WHEELS)
    return WHEELS
