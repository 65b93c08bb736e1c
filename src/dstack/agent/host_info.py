"""What this host offers, so the server can match offers to resources."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import psutil

from dstack.agent import containers
from dstack.agent.venvs import VenvFactory

NVIDIA_QUERY = ["--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"]


def parse_nvidia_smi(output: str) -> list[dict[str, Any]]:
    """Parse ``nvidia-smi --query-gpu=index,name,memory.total`` CSV lines."""
    gpus: list[dict[str, Any]] = []
    for line in output.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        try:
            index, memory = int(parts[0]), int(float(parts[-1]))
        except ValueError:
            continue
        name = ",".join(parts[1:-1]).strip()
        gpus.append({"index": index, "name": name, "memory_mib": memory, "vendor": "nvidia"})
    return gpus


def nvidia_gpus() -> list[dict[str, Any]]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, *NVIDIA_QUERY], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(out.stdout) if out.returncode == 0 else []


def host_info(home: Path, venvs: VenvFactory) -> dict[str, Any]:
    runtime = containers.detect()
    return {
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count() or psutil.cpu_count() or 1,
        "memory_mib": psutil.virtual_memory().total // (1024 * 1024),
        "disk_mib": shutil.disk_usage(home).total // (1024 * 1024),
        "gpus": nvidia_gpus(),
        "pythons": venvs.versions(),
        # Jobs with an image run through this container CLI (podman or docker), when one works.
        "containers": runtime is not None,
        "container_runtime": runtime.kind if runtime is not None else None,
    }
