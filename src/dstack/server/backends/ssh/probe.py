"""What a host offers, asked over SSH before anything is installed there (the fleet plan)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncssh

from dstack.agent.host_info import NVIDIA_QUERY, parse_nvidia_smi

PROBE_TIMEOUT = 30.0

# One round trip; each line `key=value`. Only read-only commands.
PROBE_SCRIPT = f"""
echo "cpus=$(nproc 2>/dev/null || echo 0)"
echo "mem_kb=$(awk '/^MemTotal:/{{print $2}}' /proc/meminfo 2>/dev/null)"
echo "disk_kb=$(df -Pk "$HOME" 2>/dev/null | awk 'NR==2{{print $2}}')"
echo "hostname=$(hostname 2>/dev/null)"
echo "machine=$(uname -m)"
echo "addrs=$( (ip -4 -o addr show scope global 2>/dev/null || true) | awk '{{print $4}}' | cut -d/ -f1 | tr '\\n' ' ')"
for p in python3 python3.13 python3.12 python3.11 python3.10 python3.9; do
  if command -v "$p" >/dev/null 2>&1; then
    echo "python=$(command -v "$p") $("$p" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"
  fi
done
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi {" ".join(NVIDIA_QUERY)} 2>/dev/null | sed 's/^/gpu=/'
fi
for c in podman docker; do command -v "$c" >/dev/null 2>&1 && echo "container=$c"; done
[ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1 && echo "systemd=1"
echo "uid=$(id -u)"
true
"""


@dataclass
class HostProbe:
    hostname: str
    cpus: int
    memory_mib: int
    disk_mib: int
    machine: str
    gpus: list[dict[str, Any]] = field(default_factory=list)
    #: interpreter path -> "3.11"
    pythons: dict[str, str] = field(default_factory=dict)
    containers: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    systemd: bool = False
    uid: int | None = None

    def python_for(self, version: str) -> str | None:
        """An interpreter of this minor version, preferring the versioned name."""
        found = [p for p, v in self.pythons.items() if v == version]
        found.sort(key=lambda p: not p.endswith(version))
        return found[0] if found else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "disk_mib": self.disk_mib,
            "machine": self.machine,
            "gpus": self.gpus,
            "pythons": sorted(set(self.pythons.values())),
            "containers": self.containers,
            "addresses": self.addresses,
        }


def parse_probe(output: str) -> HostProbe:
    values: dict[str, str] = {}
    gpu_lines: list[str] = []
    pythons: dict[str, str] = {}
    containers: list[str] = []
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "gpu":
            gpu_lines.append(value)
        elif key == "python":
            path, _, version = value.strip().partition(" ")
            if path and version:
                pythons.setdefault(path, version.strip())
        elif key == "container":
            containers.append(value.strip())
        else:
            values[key] = value.strip()

    def num(key: str) -> int:
        try:
            return int(values.get(key) or 0)
        except ValueError:
            return 0

    return HostProbe(
        hostname=values.get("hostname", ""),
        cpus=num("cpus"),
        memory_mib=num("mem_kb") // 1024,
        disk_mib=num("disk_kb") // 1024,
        machine=values.get("machine", ""),
        gpus=parse_nvidia_smi("\n".join(gpu_lines)),
        pythons=pythons,
        containers=containers,
        addresses=values.get("addrs", "").split(),
        systemd=values.get("systemd") == "1",
        uid=num("uid") if values.get("uid", "").isdigit() else None,
    )


async def probe(conn: asyncssh.SSHClientConnection) -> HostProbe:
    result = await conn.run(PROBE_SCRIPT, check=False, timeout=PROBE_TIMEOUT)
    out = result.stdout if isinstance(result.stdout, str) else (result.stdout or b"").decode(errors="replace")
    return parse_probe(out)
